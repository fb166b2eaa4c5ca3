"""``scripts/package``: the Function app's deployment zip, built without Core Tools.

The zip is what ``az functionapp deployment source config-zip`` (or a
run-from-package URL) deploys, laid out as the Functions Python worker expects
a locally built app: at its root ``function_app.py``, ``host.json``, the
``writeback`` package and ``requirements.txt``, and the dependencies installed
for the Functions Linux Python 3.11 image in ``.python_packages/lib/site-packages``
(the worker puts that folder on ``sys.path``). Nothing else: no tests, sandbox,
benchmarks, docs, infrastructure, scripts or tools.

The dependencies are exactly requirements.txt (compiled from pyproject.toml,
every distribution hashed), installed with ``pip install --target`` for another
platform: CPython 3.11, manylinux wheels for x86_64 up to glibc 2.31 (the
Python 3.11 image runs Debian 11; a wheel built for a newer glibc fails there at
import time, as cryptography's did: Azure/azure-functions-python-worker#1651),
binary wheels only, so nothing is compiled on this machine. Python files are
byte-compiled (checked-hash ``.pyc``, valid whatever the files' dates): a
run-from-package app is mounted read-only, where Python cannot write its cache
and would compile every module it imports at each cold start.

The zip is reproducible: entries sorted, fixed dates and modes, so the same
inputs give the same bytes. Its comment holds the fingerprint of those inputs;
when it matches, the existing zip is kept (``--force`` builds anyway). A listing
of every entry is written beside it (``.txt``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path, PurePosixPath

from tools.lock import GLIBC, PYTHON_VERSION

ROOT = Path(__file__).resolve().parents[1]
ZIP = ROOT / "dist" / "writeback-functionapp.zip"
STAGING = ROOT / "build" / "functionapp"
SITE_PACKAGES = PurePosixPath(".python_packages/lib/site-packages")
#: The app's own files at the zip's root (besides the dependencies).
APP_FILES = ("function_app.py", "host.json", "requirements.txt")
APP_PACKAGE = "writeback"
#: What a deployment never carries (checked again by tests/integration/test_deploy_package.py).
EXCLUDED = (
    "tests",
    "sandbox",
    "writeback_sandbox",
    "bench",
    "docs",
    "infra",
    "scripts",
    "tools",
    ".venv",
    "local.settings.json",
    "local.settings.sample.json",
    ".funcignore",
    ".git",
)
#: pip's --platform takes exact tags: every manylinux tag the image's glibc accepts.
PLATFORMS = (
    "manylinux2014_x86_64",
    *(f"manylinux_2_{minor}_x86_64" for minor in range(17, GLIBC[1] + 1)),
)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
FORMAT = 1


def app_sources(root: Path = ROOT) -> list[Path]:
    """The app's own files, relative to ``root``, in a stable order."""
    files = [Path(name) for name in APP_FILES]
    package = root / APP_PACKAGE
    files += sorted(p.relative_to(root) for p in package.rglob("*.py"))
    return files


def fingerprint(root: Path = ROOT) -> str:
    """What the zip is built from: the app's files, the lock, the target."""
    digest = hashlib.sha256()
    target = {"format": FORMAT, "python": PYTHON_VERSION, "platforms": PLATFORMS}
    digest.update(json.dumps(target, sort_keys=True).encode())
    for path in app_sources(root):
        digest.update(f"\0{path.as_posix()}\0".encode())
        digest.update((root / path).read_bytes())
    return digest.hexdigest()


def zip_fingerprint(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            comment = archive.comment.decode()
    except (OSError, zipfile.BadZipFile):
        return None
    prefix = "writeback-functionapp inputs-sha256="
    return comment[len(prefix) :] if comment.startswith(prefix) else None


def stage(root: Path = ROOT, staging: Path = STAGING) -> Path:
    """Lay the app out in ``staging`` with its dependencies installed for the image."""
    if sys.version_info[:2] != (3, 11):
        raise SystemExit("scripts/package runs on Python 3.11 (it byte-compiles for the image)")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in app_sources(root):
        (staging / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / path, staging / path)
    site = staging / SITE_PACKAGES
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "--target", str(site), "--python-version", PYTHON_VERSION, "--implementation", "cp",
        "--only-binary=:all:", "--no-deps", "--no-compile", "--require-hashes",
        "-r", str(root / "requirements.txt"),
    ]  # fmt: skip
    for platform in PLATFORMS:
        command += ["--platform", platform]
    _run(command)
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts: nothing runs them
    _run([
        sys.executable, "-m", "compileall", "-q", "-j", "0",
        "--invalidation-mode", "checked-hash", str(staging),
    ])  # fmt: skip
    return staging


def _run(command: list[str]) -> None:
    """Run a build step; its output is shown only when it fails (pip is chatty)."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"scripts/package: {' '.join(command[:4])} ... failed")


def write_zip(staging: Path, out: Path, inputs: str) -> list[tuple[str, int]]:
    """Zip ``staging`` reproducibly; returns (name, size) of every entry."""
    entries = sorted(
        (p.relative_to(staging).as_posix(), p) for p in staging.rglob("*") if p.is_file()
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for name, path in entries:
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes())
        archive.comment = f"writeback-functionapp inputs-sha256={inputs}".encode()
    partial.replace(out)
    return [(name, path.stat().st_size) for name, path in entries]


def summary(out: Path, entries: list[tuple[str, int]]) -> list[str]:
    """What the zip holds: its root, the distributions under .python_packages, its size."""
    tops: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for name, size in entries:
        parts = PurePosixPath(name).parts
        top = str(SITE_PACKAGES) if name.startswith(f"{SITE_PACKAGES}/") else parts[0]
        tops[top] += 1
        sizes[top] += size
    distributions = sorted(
        PurePosixPath(name).parts[3].removesuffix(".dist-info")
        for name, _ in entries
        if name.startswith(f"{SITE_PACKAGES}/") and name.endswith(".dist-info/METADATA")
    )
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    lines = [f"{out.relative_to(ROOT)}: {out.stat().st_size / 1e6:.1f} MB, sha256 {digest}"]
    lines.append(f"  {len(entries)} files, {sum(s for _, s in entries) / 1e6:.1f} MB unpacked:")
    for top in sorted(tops):
        lines.append(f"    {top:40} {tops[top]:6} files {sizes[top] / 1e6:8.1f} MB")
    lines.append(f"  {len(distributions)} distributions in {SITE_PACKAGES}:")
    lines += [f"    {name}" for name in distributions]
    return lines


def build(*, force: bool = False, out: Path = ZIP) -> list[str]:
    """Build the zip (unless it is current); returns the summary lines."""
    inputs = fingerprint()
    if not force and out.exists() and zip_fingerprint(out) == inputs:
        with zipfile.ZipFile(out) as archive:
            entries = [(i.filename, i.file_size) for i in archive.infolist()]
        return ["(up to date)", *summary(out, entries)]
    staging = stage()
    entries = write_zip(staging, out, inputs)
    out.with_suffix(".txt").write_text("".join(f"{size:10} {name}\n" for name, size in entries))
    return summary(out, entries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/package", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="build even when it is current")
    args = parser.parse_args(argv)
    for line in build(force=args.force):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
