"""Every benchmark, one after the other, each in a fresh process with its own DC.

Streams each benchmark's output, collects the table it prints, measures the
peak RSS of its process (``wait4``), and writes ``bench/results.md``; the README's
Benchmarks section shows the same tables (between the ``bench:results`` markers,
rewritten by this command).

    ./scripts/bench            # full sizes (about 40 minutes on 2 cores)
    ./scripts/bench --quick    # small sizes, to check the harness
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from writeback.report import markdown_table
from writeback_sandbox.samba import free_loopback_address

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- bench:results:begin -->", "<!-- bench:results:end -->"
_ROW = re.compile(r"^\| (.+?) +\| (.*) \|$")


@dataclass(frozen=True)
class Bench:
    title: str
    command: tuple[str, ...]
    full: tuple[str, ...]
    quick: tuple[str, ...]
    #: Preferred loopback address of its DC (a free one is taken if it is in use).
    address: str | None = None


BENCHES = (
    Bench(
        "Cold import of function_app",
        ("-m", "bench.import_time"),
        ("--repeat", "7"),
        ("--repeat", "3"),
    ),
    Bench(
        "Cold imports from the deployment zip, with and without its .pyc",
        ("-m", "bench.package_import"),
        ("--repeat", "5"),
        ("--repeat", "2"),
    ),
    Bench(
        "Reconcile: full sync from empty, then a no-op re-sync",
        ("-m", "bench.reconcile"),
        ("--groups", "20000", "--memberships", "400000", "--users", "5000"),
        ("--groups", "300", "--memberships", "3000", "--users", "500"),
        "127.0.0.30",
    ),
    Bench(
        "LDAP clients: ldap3 and python-ldap on the same DC",
        ("bench/ldap_client.py",),
        ("--groups", "20000", "--memberships", "400000", "--users", "5000"),
        ("--groups", "500", "--memberships", "5000", "--users", "500", "--modifies", "300"),
        "127.0.0.33",
    ),
    Bench(
        "One group of 250,000 members",
        ("-m", "bench.large_group"),
        ("--members", "250000"),
        ("--members", "3000"),
        "127.0.0.32",
    ),
    Bench(
        "Function app trigger: batch with sessions vs single dispatch (30 ms Graph latency)",
        ("-m", "bench.functions_trigger"),
        ("--groups", "1000"),
        ("--groups", "60", "--users", "50"),
        "127.0.0.33",
    ),
    Bench(
        "Single-machine pipeline (bench/pipeline.py)",
        ("-m", "bench.pipeline"),
        # Confirmations due after the bursts, as in production (settle 60 s by default);
        # at the harness's 2 s they would land inside a 5,000-group burst and double it.
        ("--settle", "20"),
        ("--sizes", "200", "--paced", "40", "--big", "3000", "--users", "500"),
        "127.0.0.31",
    ),
    Bench(
        "Service Bus through the SDK against the emulator, next to the local queue",
        ("bench/servicebus.py",),
        ("--replay", "1000,10000"),
        ("--replay", "100,1000", "--messages", "300", "--sessions", "5", "--single", "5"),
    ),
)


@dataclass(frozen=True)
class Outcome:
    bench: Bench
    arguments: tuple[str, ...]
    rows: list[tuple[str, str]]
    seconds: float
    peak_mb: float


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--only", help="run only benchmarks whose title contains this")
    parser.add_argument("--note", default="", help="a line about the conditions of the run")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    args = parser.parse_args(argv)
    chosen = [b for b in BENCHES if not args.only or args.only.lower() in b.title.lower()]
    outcomes = [run(bench, quick=args.quick) for bench in chosen]
    text = render(outcomes, args.note, quick=args.quick)
    RESULTS.write_text(text)
    if not args.no_readme and not args.quick and not args.only:
        update_readme(text)
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 0


def run(bench: Bench, *, quick: bool) -> Outcome:
    """Run one benchmark in a child process, echo its output, keep its table."""
    arguments = bench.quick if quick else bench.full
    if bench.address is not None:
        arguments = (*arguments, "--address", free_loopback_address(bench.address))
    print(f"\n== {bench.title}: {' '.join(bench.command + arguments)}", flush=True)
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, *bench.command, *arguments],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    rows = []
    for line in child.stdout:
        print(line, end="", flush=True)
        match = _ROW.match(line.rstrip("\n"))
        if match and match.group(1) != "figure" and not match.group(1).startswith("-"):
            rows.append((match.group(1).strip(), match.group(2).strip()))
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{bench.title} failed with exit code {child.returncode}")
    return Outcome(bench, arguments, rows, time.monotonic() - started, usage.ru_maxrss / 1024)


def render(outcomes: list[Outcome], note: str, *, quick: bool) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    samba = subprocess.run(["samba", "--version"], capture_output=True, text=True, check=False)
    lines = [
        f"Measured {when} by `python -m bench.all{' --quick' if quick else ''}` on "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{samba.stdout.strip() or 'Samba'}." + (f" {note}" if note else ""),
    ]
    for outcome in outcomes:
        command = " ".join(("python", *outcome.bench.command, *_without_address(outcome.arguments)))
        rows = [
            *outcome.rows,
            (
                "peak RSS of the largest process of its tree (its DC too), MB",
                f"{outcome.peak_mb:.0f}",
            ),
            ("benchmark wall time, s (setup included)", f"{outcome.seconds:.0f}"),
        ]
        lines += ["", f"#### {outcome.bench.title}", "", f"`{command}`", "", markdown_table(rows)]
    return "\n".join(lines) + "\n"


def _without_address(arguments: tuple[str, ...]) -> tuple[str, ...]:
    if "--address" not in arguments:
        return arguments
    at = arguments.index("--address")
    return arguments[:at] + arguments[at + 2 :]


def update_readme(text: str) -> None:
    """Put the tables between the markers of README's Benchmarks section."""
    readme = README.read_text()
    begin, end = readme.find(BEGIN), readme.find(END)
    if begin < 0 or end < begin:
        print(f"README.md has no {BEGIN} ... {END} markers; left alone")
        return
    README.write_text(readme[: begin + len(BEGIN)] + "\n" + text + readme[end:])


if __name__ == "__main__":
    sys.exit(main())
