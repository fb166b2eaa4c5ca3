"""Cold import of ``function_app`` (what an Azure Functions cold start pays before the
first request), in fresh interpreters, best of N.

Next to it, in the same run: a bare interpreter and one that imports only
``azure.functions`` (the floor any Python function app pays), so the figure says
what writeback itself adds. Peak RSS is each child's own.

    .venv/bin/python -m bench.import_time --repeat 7
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from writeback.report import markdown_table

ROOT = Path(__file__).resolve().parent.parent
_PROBE = """
import json, resource, time
started = time.perf_counter()
{statement}
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"seconds": seconds, "peak_mb": peak}}))
"""
CASES = {
    "bare interpreter": "pass",
    "import azure.functions": "import azure.functions",
    "import function_app": "import function_app",
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    best = {name: measure(statement, args.repeat) for name, statement in CASES.items()}
    app, floor = best["import function_app"], best["import azure.functions"]
    rows = [
        (f"{name}: process ms / import ms / peak RSS MB, best of {args.repeat}", _fmt(figures))
        for name, figures in best.items()
    ]
    rows.append(("ratio function_app / azure.functions (import)", f"{app[1] / floor[1]:.2f}"))
    print()
    print(markdown_table(rows))


def measure(statement: str, repeat: int) -> tuple[float, float, float]:
    """The fastest of ``repeat`` fresh interpreters: its whole run (start-up and
    import), the import alone, and its peak RSS."""
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", _PROBE.format(statement=statement)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - started
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append((wall, float(figures["seconds"]), float(figures["peak_mb"])))
    return min(runs)


def _fmt(figures: tuple[float, float, float]) -> str:
    wall, imported, peak = figures
    return f"{wall * 1000:.0f} / {imported * 1000:.0f} / {peak:.0f}"


if __name__ == "__main__":
    main()
