"""``scripts/lock``: the pinned dependency files, compiled from pyproject.toml.

pyproject.toml is the one dependency list. Two files are compiled from it with
``uv pip compile`` (uv itself is pinned in requirements-dev.txt), every
distribution pinned with its hashes:

``requirements.txt``
    ``writeback[functions]`` for the Functions Python 3.11 image (CPython 3.11,
    Linux x86_64, wheels up to manylinux_2_31: the image runs Debian 11, glibc
    2.31). The Function app installs exactly this (scripts/package).
``requirements-dev.txt``
    every extra of the product (python-ldap too, which the Function app cannot
    have: it is built from source), what the sandbox distribution needs
    (sandbox/pyproject.toml) and the tools in requirements-dev.in, held to the
    versions of requirements.txt, so the development venv tests what ships.

Existing pins are kept unless ``--upgrade`` (or ``--upgrade-package NAME``) is
given. Each file's header records two fingerprints, which
tests/unit/test_dependencies.py checks offline: ``inputs-sha256`` of what it was
compiled from (pyproject.toml's dependency tables, the target, the dev inputs)
and ``lock-sha256`` of the pinned lines below the header. Editing pyproject.toml
without running scripts/lock, or editing a compiled file by hand, fails it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

#: The Functions Linux Python 3.11 image: CPython 3.11 on Debian 11 (glibc 2.31).
PYTHON_VERSION = "3.11"
UV_PLATFORM = "x86_64-manylinux_2_31"
GLIBC = (2, 31)


@dataclass(frozen=True)
class Lock:
    """One compiled file: what it is compiled from and how it is described."""

    path: str
    title: str
    extras: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()
    #: Also what the sandbox distribution (sandbox/pyproject.toml) depends on.
    sandbox: bool = False


FUNCTIONS = Lock(
    path="requirements.txt",
    title=(
        "The Function app's dependencies: writeback[functions] for CPython 3.11 on\n"
        "# manylinux x86_64 up to glibc 2.31 (the Functions Python 3.11 image), with hashes."
    ),
    extras=("functions",),
)
DEV = Lock(
    path="requirements-dev.txt",
    title=(
        "The development venv: every extra of writeback plus requirements-dev.in, at the\n"
        "# versions of requirements.txt, with hashes (scripts/bootstrap.sh installs it)."
    ),
    extras=("all", "python-ldap"),
    inputs=("requirements-dev.in",),
    constraints=("requirements.txt",),
    sandbox=True,
)
SANDBOX = "sandbox/pyproject.toml"
#: Where the sandbox's own dependencies are written for uv (it cannot read that
#: pyproject.toml, which names the product, not on any index).
SANDBOX_INPUT = ROOT / "build" / "lock" / "sandbox-dependencies.in"
LOCKS = (FUNCTIONS, DEV)
HEADER_END = "# lock-sha256: "


def dependency_tables(root: Path = ROOT) -> dict[str, object]:
    """What pyproject.toml says the product depends on (order of entries ignored)."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return {
        "requires-python": project.get("requires-python"),
        "dependencies": sorted(project.get("dependencies", [])),
        "optional-dependencies": {name: sorted(reqs) for name, reqs in sorted(extras.items())},
    }


def requirement_lines(text: str) -> list[str]:
    """The requirement lines of a requirements file (comments and blanks dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def sandbox_requirements(root: Path = ROOT) -> tuple[list[str], list[str]]:
    """The sandbox's dependencies: the product's extras it asks for, and the others."""
    project = tomllib.loads((root / SANDBOX).read_text())["project"]
    extras: list[str] = []
    others: list[str] = []
    for text in project.get("dependencies", []):
        requirement = Requirement(text)
        if normalize(requirement.name) == "writeback":
            extras += sorted(requirement.extras)
        else:
            others.append(text)
    return extras, sorted(others)


def inputs_fingerprint(lock: Lock, root: Path = ROOT) -> str:
    document = {
        "tables": dependency_tables(root),
        "extras": list(lock.extras),
        "target": [PYTHON_VERSION, UV_PLATFORM],
        "inputs": {name: requirement_lines((root / name).read_text()) for name in lock.inputs},
        "sandbox": sandbox_requirements(root) if lock.sandbox else None,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def split(text: str) -> tuple[dict[str, str], str]:
    """A compiled file's header fields and its body (everything after the header)."""
    fields: dict[str, str] = {}
    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        match = re.match(r"# (inputs-sha256|lock-sha256): ([0-9a-f]{64})$", line.rstrip("\n"))
        if match:
            fields[match.group(1)] = match.group(2)
        if line.startswith(HEADER_END):
            return fields, "".join(lines[index + 1 :])
    return fields, text


def body_fingerprint(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def render(lock: Lock, body: str, root: Path = ROOT) -> str:
    header = (
        f"# {lock.title}\n"
        "# Compiled from pyproject.toml by scripts/lock (uv pip compile); never edit by hand:\n"
        "# change pyproject.toml (or requirements-dev.in) and run scripts/lock.\n"
        f"# inputs-sha256: {inputs_fingerprint(lock, root)}\n"
        f"{HEADER_END}{body_fingerprint(body)}\n"
    )
    return header + body


def compile_lock(lock: Lock, uv: str, upgrade: list[str]) -> None:
    """Run ``uv pip compile`` for ``lock`` (keeping its pins) and write it with its header."""
    target = ROOT / lock.path
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out.txt"
        fields, body = split(target.read_text()) if target.exists() else ({}, "")
        if "lock-sha256" in fields:  # uv keeps the pins of the file it writes to
            out.write_text(body)
        inputs, extras = list(lock.inputs), list(lock.extras)
        if lock.sandbox:  # uv cannot read the sandbox's pyproject: it names the product
            wanted, others = sandbox_requirements()
            extras += [extra for extra in wanted if extra not in extras]
            SANDBOX_INPUT.parent.mkdir(parents=True, exist_ok=True)
            SANDBOX_INPUT.write_text("".join(f"{line}\n" for line in others))
            inputs.append(str(SANDBOX_INPUT.relative_to(ROOT)))
        command = [
            uv, "pip", "compile", "--quiet", "--no-header", "--generate-hashes",
            "--python-version", PYTHON_VERSION, "--python-platform", UV_PLATFORM,
            "--output-file", str(out), "pyproject.toml", *inputs,
        ]  # fmt: skip
        for extra in extras:
            command += ["--extra", extra]
        for constraint in lock.constraints:
            command += ["--constraints", constraint]
        command += upgrade
        subprocess.run(command, cwd=ROOT, check=True)
        body = out.read_text().replace(
            f"-r {SANDBOX_INPUT.relative_to(ROOT)}", f"writeback-sandbox ({SANDBOX})"
        )
    target.write_text(render(lock, body))
    print(f"lock: {lock.path}: {len(pins(body))} pinned distributions", flush=True)


def pins(text: str) -> dict[str, str]:
    """Normalized name -> pinned version, from a compiled file."""
    found = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", text, re.MULTILINE)
    return {normalize(name): version for name, version in found}


def unhashed(body: str) -> list[str]:
    """The requirement lines of a compiled body that carry no ``--hash``."""
    entries = re.split(r"\n(?=[^\s#])", body)
    return [entry.split()[0] for entry in entries if entry.strip() and "--hash=" not in entry]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(lock: Lock, root: Path = ROOT) -> list[Requirement]:
    """The requirements ``lock`` must satisfy: the core, its extras (self-references
    followed), and its other inputs."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    found = [Requirement(text) for text in project.get("dependencies", [])]
    todo, seen = list(lock.extras), set()
    if lock.sandbox:
        wanted, others = sandbox_requirements(root)
        todo += wanted
        found += [Requirement(text) for text in others]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in extras.get(extra, []):
            requirement = Requirement(text)
            if normalize(requirement.name) == normalize(project["name"]):
                todo.extend(requirement.extras)
            else:
                found.append(requirement)
    for name in lock.inputs:
        found += [Requirement(line) for line in requirement_lines((root / name).read_text())]
    return found


def problems(root: Path = ROOT) -> list[str]:
    """Why the compiled files do not match pyproject.toml (empty when they do)."""
    found: list[str] = []
    rerun = "run scripts/lock"
    texts = {}
    for lock in LOCKS:
        path = root / lock.path
        text = texts[lock.path] = path.read_text() if path.exists() else ""
        fields, body = split(text)
        if "lock-sha256" not in fields:
            found.append(f"{lock.path} was not compiled by scripts/lock: {rerun}")
            continue
        if fields.get("inputs-sha256") != inputs_fingerprint(lock, root):
            found.append(f"{lock.path} is older than pyproject.toml's dependencies: {rerun}")
        if fields["lock-sha256"] != body_fingerprint(body):
            found.append(f"{lock.path} was edited by hand: change pyproject.toml and {rerun}")
        pinned = pins(body)
        for requirement in declared(lock, root):
            version = pinned.get(normalize(requirement.name))
            if version is None:
                found.append(f"{lock.path} does not pin {requirement.name}: {rerun}")
            elif not requirement.specifier.contains(version, prereleases=True):
                found.append(
                    f"{lock.path} pins {requirement.name}=={version}, "
                    f"outside {requirement}: {rerun}"
                )
        found += [f"{lock.path}: {entry} has no hash" for entry in unhashed(body)]
    shipped = pins(split(texts[FUNCTIONS.path])[1])
    developed = pins(split(texts[DEV.path])[1])
    for name, version in sorted(shipped.items()):
        if name in developed and developed[name] != version:
            found.append(
                f"{DEV.path} has {name}=={developed[name]}, {FUNCTIONS.path} {version}: {rerun}"
            )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lock", description=__doc__.splitlines()[0])
    parser.add_argument("--upgrade", action="store_true", help="re-resolve every pin")
    parser.add_argument("--upgrade-package", action="append", default=[], metavar="NAME")
    parser.add_argument(
        "--check", action="store_true", help="only say whether the files match pyproject.toml"
    )
    args = parser.parse_args(argv)
    if args.check:
        for problem in problems():
            print(problem, file=sys.stderr)
        return 1 if problems() else 0
    uv = str(Path(sys.executable).with_name("uv"))
    upgrade = ["--upgrade"] if args.upgrade else []
    for name in args.upgrade_package:
        upgrade += ["--upgrade-package", name]
    for lock in LOCKS:  # requirements.txt first: the dev file is held to it
        compile_lock(lock, uv, upgrade)
    return 0


if __name__ == "__main__":
    sys.exit(main())
