"""Cold imports from the deployment zip, byte-compiled as scripts/package ships it or not.

A run-from-package Function app is mounted read-only: Python cannot write its
``__pycache__``, so without the ``.pyc`` files in the zip every cold start
compiles every module it imports. This unpacks ``dist/writeback-functionapp.zip``
twice, once as built and once without its ``__pycache__`` folders, and times in
fresh interpreters (``-I -S -B``: the zip's folders alone on ``sys.path``, no
bytecode written), best of N, alternating: the worker's indexing (``import
function_app``) and what the first invocation of each function adds (the
handlers' modules, the Graph and Service Bus SDKs, the Azure Monitor exporter).

    .venv/bin/python -m bench.package_import --repeat 5
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

from tools import package
from writeback.report import markdown_table

CASES = {
    "import function_app (indexing)": "import function_app",
    "+ the handlers' first call": (
        "import function_app, writeback.hosting.functions, writeback.adapters.graph, "
        "writeback.adapters.servicebus, writeback.adapters.relay, azure.monitor.opentelemetry\n"
        "from msgraph import GraphServiceClient"
    ),
}
_PROBE = """
import sys, time
sys.path[:0] = [sys.argv[2], sys.argv[1]]
started = time.perf_counter()
exec(sys.argv[3])
print(time.perf_counter() - started)
"""


def unpack(zip_path: Path, target: Path, *, bytecode: bool) -> Path:
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(target)
    if not bytecode:
        for cache in list(target.rglob("__pycache__")):
            shutil.rmtree(cache)
    return target


def once(app: Path, statement: str) -> tuple[float, float]:
    """(process seconds, import seconds) of one fresh interpreter."""
    site = app / package.SITE_PACKAGES
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-B", "-c", _PROBE, str(app), str(site), statement],
        capture_output=True,
        text=True,
        check=True,
        cwd=app,
    )
    return time.perf_counter() - started, float(done.stdout.strip())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if package.zip_fingerprint(package.ZIP) != package.fingerprint():
        package.build()
    with tempfile.TemporaryDirectory() as scratch:
        apps = {
            "with .pyc": unpack(package.ZIP, Path(scratch) / "pyc", bytecode=True),
            "without .pyc": unpack(package.ZIP, Path(scratch) / "src", bytecode=False),
        }
        best: dict[tuple[str, str], tuple[float, float]] = {}
        for _ in range(args.repeat):
            for case, statement in CASES.items():
                for kind, app in apps.items():
                    figures = once(app, statement)
                    key = (case, kind)
                    best[key] = min(best.get(key, figures), figures, key=lambda f: f[1])
    rows = []
    for case in CASES:
        with_pyc, without = best[(case, "with .pyc")], best[(case, "without .pyc")]
        rows.append(
            (
                f"{case}: process ms / import ms, with .pyc (as shipped)",
                f"{with_pyc[0] * 1000:.0f} / {with_pyc[1] * 1000:.0f}",
            )
        )
        rows.append(
            (
                f"{case}: process ms / import ms, without .pyc",
                f"{without[0] * 1000:.0f} / {without[1] * 1000:.0f}",
            )
        )
        rows.append((f"{case}: ratio without / with (import)", f"{without[1] / with_pyc[1]:.2f}"))
    size = package.ZIP.stat().st_size / 1e6
    rows.append(("zip size, MB (with .pyc)", f"{size:.1f}"))
    print()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
