"""The Function app's deployment zip (scripts/package), checked as Azure would take it.

The zip is unpacked into an empty directory and nothing more is installed: the
app must index there with the Functions worker's own code (``azure-functions-
runtime`` in ``.venv-functions``, with the zip's ``.python_packages`` on its
path, as the worker puts it), and import on CPython 3.11 with nothing but the
standard library and the zip's contents on ``sys.path``, every native extension
in it loaded. What a deployment must never carry (tests, the sandbox, bench,
docs, infra, scripts, tools, local settings) is not in it, and no native library
in it needs a newer glibc than the Python 3.11 image's (2.31).

CI builds the zip first (scripts/test runs scripts/package, which lists it);
run alone, the fixture builds it when it is missing or older than its inputs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from tests.support.settings import ROOT
from tests.unit.test_functions_runtime import FUNCTIONS, PROBE, _runtime_python
from tools import package
from tools.lock import GLIBC

ELF_X86_64 = 62


@pytest.fixture(scope="module")
def built() -> Path:
    if package.zip_fingerprint(package.ZIP) != package.fingerprint():
        package.build()
    return package.ZIP


@pytest.fixture(scope="module")
def unpacked(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("wwwroot")
    assert list(target.iterdir()) == []
    with zipfile.ZipFile(built) as archive:
        archive.extractall(target)
    return target


def names(built: Path) -> list[str]:
    with zipfile.ZipFile(built) as archive:
        return archive.namelist()


def test_the_zip_holds_the_app_and_its_dependencies_and_nothing_else(built: Path) -> None:
    entries = names(built)
    roots = {PurePosixPath(name).parts[0] for name in entries}
    assert roots == {"function_app.py", "host.json", "requirements.txt", "writeback",
                     ".python_packages", "__pycache__"}  # fmt: skip
    assert {"function_app.py", "host.json", "writeback/cli.py"} <= set(entries)
    site = package.SITE_PACKAGES.parts
    for name in entries:
        parts = PurePosixPath(name).parts
        if parts[: len(site)] == site:  # a dependency: none of ours, under any name
            top = parts[len(site)]
            assert top not in {*package.EXCLUDED, "writeback", "writeback.py"}, name
        else:
            assert not set(parts) & set(package.EXCLUDED), name
        assert not name.endswith(("local.settings.json", ".sqlite3", ".log")), name
    app_code = [name for name in entries if name.startswith("writeback/")]
    sources = {f"{p.as_posix()}" for p in package.app_sources() if p.parts[0] == "writeback"}
    assert {name for name in app_code if name.endswith(".py")} == sources


def test_the_dependencies_are_requirements_txt_exactly(built: Path) -> None:
    from tools.lock import normalize, pins

    site = f"{package.SITE_PACKAGES}/"
    installed = {}
    for name in names(built):
        match = re.match(re.escape(site) + r"([^/]+)-([^/-]+)\.dist-info/METADATA$", name)
        if match:
            installed[normalize(match.group(1))] = match.group(2)
    assert installed == pins((ROOT / "requirements.txt").read_text())
    assert "writeback-sandbox" not in installed and "pytest" not in installed


def native_libraries(root: Path) -> Iterator[Path]:
    yield from (path for path in root.rglob("*.so*") if path.is_file())


def test_no_native_library_needs_a_newer_glibc_than_the_image(unpacked: Path) -> None:
    libraries = list(native_libraries(unpacked))
    assert len(libraries) >= 10  # cryptography, cffi, aiohttp, yarl... (a zip without them
    newest = (0, 0)  # was not built for Linux at all)
    for library in libraries:
        data = library.read_bytes()
        assert data[:4] == b"\x7fELF", library
        assert int.from_bytes(data[18:20], "little") == ELF_X86_64, library
        for major, minor in re.findall(rb"GLIBC_(\d+)\.(\d+)", data):
            version = (int(major), int(minor))
            assert version <= GLIBC, f"{library.name} needs GLIBC_{major.decode()}.{minor.decode()}"
            newest = max(newest, version)
    assert newest >= (2, 17)


def test_the_worker_indexes_the_unpacked_app(unpacked: Path) -> None:
    """The Functions worker's own indexing, the zip's packages first on its path."""
    site = unpacked / package.SITE_PACKAGES
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(
        [str(_runtime_python()), str(PROBE), str(unpacked)],
        capture_output=True,
        text=True,
        env=env,
        cwd=unpacked,
        timeout=120,
        check=False,
    )
    answer: dict[str, Any] = json.loads(done.stdout or "{}")
    assert done.returncode == 0 and answer.get("ok"), done.stdout[-3000:] + done.stderr[-3000:]
    assert {f["name"] for f in answer["functions"]} == FUNCTIONS
    assert answer["loaded_from"]["function_app"] == str(unpacked / "function_app.py")
    assert str(answer["loaded_from"]["azure.functions"]).startswith(str(site))


#: Run by CPython 3.11 with -I -S -B: no site-packages, environment, current directory or
#: bytecode writes (a run-from-package app is read-only).
IMPORT_CHECK = r"""
import json, sys
app, site = sys.argv[1], sys.argv[2]
sys.path[:0] = [site, app]  # the worker's order on Premium plans: packages, then the app
import function_app
names = sorted(f.get_function_name() for f in function_app.app.get_functions())
import writeback.hosting.functions, writeback.adapters.graph, writeback.adapters.servicebus
import writeback.adapters.relay, writeback.adapters.directory, writeback.logging_setup
import writeback.adapters.functions_settlement, azure.monitor.opentelemetry
from msgraph import GraphServiceClient
from azure.servicebus import ServiceBusClient
from azure.identity import ManagedIdentityCredential
from cryptography.hazmat.primitives.asymmetric import ec
ec.generate_private_key(ec.SECP256R1())  # the native binding, not only its import
native = []
for module in sys.argv[3:]:
    __import__(module)
    native.append(module)
files = {name: getattr(mod, "__file__", None) for name, mod in sys.modules.items()}
outside = sorted(
    name for name, file in files.items()
    if file and not file.startswith((app, sys.base_prefix))
)
print(json.dumps({"functions": names, "native": native, "outside": outside,
                  "version": list(sys.version_info[:2])}))
"""


def test_the_app_imports_on_python_311_from_the_unpacked_zip_alone(unpacked: Path) -> None:
    site = unpacked / package.SITE_PACKAGES
    native = sorted(
        ".".join(path.relative_to(site).with_name(path.name.split(".")[0]).parts)
        for path in native_libraries(site)
        if ".cpython-311-" in path.name or ".abi3." in path.name
    )
    native = [name for name in native if not name.endswith("_testcapi")]
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-B", "-c", IMPORT_CHECK, str(unpacked), str(site), *native],
        capture_output=True,
        text=True,
        cwd=unpacked,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert result["version"] == [3, 11]
    assert set(result["functions"]) == FUNCTIONS
    assert "cryptography.hazmat.bindings._rust" in result["native"]
    assert len(result["native"]) == len(native) >= 10
    assert result["outside"] == []  # every module came from the zip or the standard library


def test_funcignore_leaves_out_what_the_zip_leaves_out() -> None:
    """For anyone who publishes with Core Tools instead: the same exclusions."""
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".funcignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    expected = set(package.EXCLUDED) - {"writeback_sandbox", ".funcignore"}
    assert expected <= ignored, expected - ignored
    assert not {"writeback", "function_app.py", "host.json", "requirements.txt"} & ignored
