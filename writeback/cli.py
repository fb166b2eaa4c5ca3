"""Command line: ``python -m writeback plan | sync | demo``.

Exit codes: 0 done, 1 some operations failed, 2 bad configuration,
3 deletes held back by a safety rule (the delete threshold).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TextIO

from writeback import report
from writeback.config import Settings, load_settings
from writeback.errors import ConfigError, WritebackError
from writeback.service.reconcile import SyncPolicy, apply_plan, plan_sync

if TYPE_CHECKING:
    from writeback.adapters.directory import LdapDirectory
    from writeback.adapters.graph import GraphCloud

EXIT_OK, EXIT_FAILURES, EXIT_CONFIG, EXIT_THRESHOLD = 0, 1, 2, 3


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = _parser().parse_args(argv)
    out = out or sys.stdout
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.run(args, out)
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except WritebackError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURES
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m writeback",
        description="Write Microsoft 365 groups from Microsoft Entra ID back to Active Directory.",
    )
    verbs = parser.add_subparsers(required=True, metavar="VERB")
    plan = verbs.add_parser("plan", help="show what a sync would change, change nothing")
    plan.add_argument("--json", action="store_true", help="one JSON object per line")
    plan.set_defaults(run=_plan)
    sync = verbs.add_parser("sync", help="full sync: converge the target OU to the cloud")
    sync.add_argument(
        "--allow-deletes", action="store_true", help="delete even beyond the delete threshold"
    )
    sync.set_defaults(run=_sync)
    demo = verbs.add_parser(
        "demo", help="full sync of a sample tenant into a throwaway local Samba AD DC"
    )
    demo.add_argument("--keep", action="store_true", help="leave the DC's files for inspection")
    demo.set_defaults(run=_demo)
    return parser


def _plan(args: argparse.Namespace, out: TextIO) -> int:
    settings = load_settings()
    with _adapters(settings) as (cloud, directory):
        plan = plan_sync(cloud, directory, settings.mapping(), SyncPolicy.from_settings(settings))
    if args.json:
        for line in report.plan_json_lines(plan):
            print(line, file=out)
    else:
        report.print_plan(plan, out)
    return EXIT_THRESHOLD if plan.deletes_blocked else EXIT_OK


def _sync(args: argparse.Namespace, out: TextIO) -> int:
    settings = load_settings()
    with _adapters(settings) as (cloud, directory):
        plan = plan_sync(
            cloud,
            directory,
            settings.mapping(),
            SyncPolicy.from_settings(settings, allow_deletes=args.allow_deletes),
        )
        result = apply_plan(plan, directory, progress=report.ProgressBar())
    report.print_result(result, out)
    return exit_code(result.failures != [], result.plan.deletes_blocked is not None)


def exit_code(failed: bool, deletes_blocked: bool) -> int:
    if failed:
        return EXIT_FAILURES
    return EXIT_THRESHOLD if deletes_blocked else EXIT_OK


def _demo(args: argparse.Namespace, out: TextIO) -> int:
    from writeback.sandbox.demo import run_demo

    return run_demo(out, keep=args.keep)


@contextmanager
def _adapters(settings: Settings) -> Iterator[tuple[GraphCloud, LdapDirectory]]:
    """Graph and LDAP adapters for one command, both closed after it."""
    from writeback.wiring import build_cloud, build_directory

    cloud = build_cloud(settings)
    try:
        directory = build_directory(settings)
        try:
            yield cloud, directory
        finally:
            directory.close()
    finally:
        cloud.close()
