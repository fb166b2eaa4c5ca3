"""Command line: ``python -m writeback plan | sync | demo | serve | agent | replay | status``.

Exit codes: 0 done, 1 some operations failed, 2 bad configuration,
3 deletes held back by a safety rule (the delete threshold).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TextIO

from writeback import report
from writeback.config import Settings, load_permissions_settings, load_settings
from writeback.errors import ConfigError, WritebackError
from writeback.service.reconcile import SyncPolicy, apply_plan, plan_sync

if TYPE_CHECKING:
    from writeback.adapters.directory import LdapDirectory
    from writeback.adapters.graph import GraphCloud
    from writeback.adapters.local_queue import LocalQueue
    from writeback.adapters.relay import RelayDirectory
    from writeback.adapters.servicebus import ServiceBusQueue

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
        "demo",
        help="the pipeline on a sample tenant: Graph stand-in notifications, webhook, "
        "queue and workers writing to a throwaway local Samba AD DC",
    )
    demo.add_argument("--keep", action="store_true", help="leave the DC's files for inspection")
    demo.set_defaults(run=_demo)
    serve = verbs.add_parser(
        "serve", help="single-machine mode: webhook, workers and timers in one process"
    )
    serve.set_defaults(run=_serve)
    replay = verbs.add_parser("replay", help="move dead-lettered events back to the queue")
    replay.add_argument("--dry-run", action="store_true", help="only list what would move")
    replay.add_argument("--reason", help="only dead letters with this reason")
    replay.add_argument("--group", metavar="ID", help="only events of this group id")
    replay.add_argument(
        "--since", metavar="ISO8601", help="only dead-lettered at or after this time (UTC)"
    )
    replay.add_argument("--max", type=int, metavar="N", help="move at most N (oldest first)")
    replay.set_defaults(run=_replay)
    status = verbs.add_parser(
        "status", help="queue depth, dead letters, subscription expiry, last reconcile"
    )
    status.set_defaults(run=_status)
    agent = verbs.add_parser(
        "agent",
        help="on-premises relay agent: listen on the Azure Relay Hybrid Connection and "
        "serve the cloud side's directory calls under the local policy",
    )
    agent.set_defaults(run=_agent)
    _add_permissions(verbs)
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
    try:
        from writeback_sandbox.demo import run_demo
    except ModuleNotFoundError as error:
        if error.name != "writeback_sandbox":
            raise
        raise ConfigError(
            "the demo needs the sandbox package (a throwaway Samba DC and a Graph stand-in), "
            "which the product does not ship: from a checkout of the repository run "
            "./scripts/demo, or pip install ./sandbox beside the product"
        ) from None
    return run_demo(out, keep=args.keep)


def _serve(args: argparse.Namespace, out: TextIO) -> int:
    from writeback.bootstrap import require_extra
    from writeback.config import Host, load_pipeline_settings
    from writeback.hosting.serve import Server, run_until_signalled

    settings = load_settings()
    require_extra("serve", "prometheus_client")  # its /metrics
    pipeline = load_pipeline_settings(host=Host.SERVE)
    logging.getLogger("writeback").setLevel(logging.INFO)
    return run_until_signalled(Server.from_settings(settings, pipeline), out)


def _agent(args: argparse.Namespace, out: TextIO) -> int:
    import signal
    import threading

    from writeback.config import load_agent_settings
    from writeback.hosting.agent import run_agent
    from writeback.logging_setup import configure_logging

    settings = load_agent_settings()
    configure_logging(stream_handler=True)
    logging.getLogger("writeback").setLevel(logging.INFO)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(
        f"writeback agent: {settings.relay.namespace}/{settings.relay.path} -> "
        f"{settings.directory.target_ou}",
        file=out,
        flush=True,
    )
    run_agent(settings, stop)
    print("writeback agent: stopped", file=out, flush=True)
    return EXIT_OK


def _replay(args: argparse.Namespace, out: TextIO) -> int:
    from writeback.service.replay import ReplayFilter, format_report, parse_since, replay

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if args.max is not None and args.max < 1:
        raise ConfigError("--max must be at least 1")
    where = ReplayFilter(reason=args.reason, group=args.group, since=since, limit=args.max)
    with _queue() as queue:
        report = replay(queue, where, dry_run=args.dry_run)
    for line in format_report(report):
        print(line, file=out)
    return EXIT_FAILURES if report.failed else EXIT_OK


def _status(args: argparse.Namespace, out: TextIO) -> int:
    from writeback.adapters.state import StateFile
    from writeback.config import Host, load_pipeline_settings
    from writeback.service.status import collect_status, format_status

    pipeline = load_pipeline_settings(require_client_state=False, host=Host.TOOL)
    state = StateFile(pipeline.state_path).read() if pipeline.state_path else {}
    with _queue() as queue:
        status = collect_status(queue, state)
    for line in format_status(status):
        print(line, file=out)
    agent_ok = _print_agent_status(out)
    # Any figure that could not be read (depth, dead letters) makes the exit code 1,
    # the line that says which and why is printed above; the rest still shows.
    return EXIT_FAILURES if status.queue_error or not agent_ok else EXIT_OK


def _print_agent_status(out: TextIO) -> bool:
    """With WRITEBACK_DIRECTORY=relay: whether the agent answers a signed call."""
    import time

    from writeback.bootstrap import build_directory
    from writeback.config import DirectoryKind, load_directory_kind

    if load_directory_kind() is not DirectoryKind.RELAY:
        return True
    settings = load_settings()
    if settings.relay is None:
        return True
    where = f"{settings.relay.namespace}/{settings.relay.path}"
    started = time.monotonic()
    try:
        directory = build_directory(settings)
        try:
            directory.schema_attributes()
        finally:
            directory.close()
    except WritebackError as error:
        print(f"relay agent: {where} FAILED: {type(error).__name__}: {error}", file=out)
        return False
    elapsed = (time.monotonic() - started) * 1000
    print(f"relay agent: {where} answered a signed call in {elapsed:.0f} ms", file=out)
    return True


def _add_permissions(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    permissions = verbs.add_parser(
        "permissions",
        help="the service account's least-privilege delegation on the target OU "
        "(dsacls and PowerShell), or write it with --apply",
    )
    permissions.add_argument("--account", required=True, metavar="DN", help="service account")
    permissions.add_argument("--ou", metavar="DN", help="target OU (default: WRITEBACK_TARGET_OU)")
    permissions.add_argument(
        "--deny-deletes",
        action="store_true",
        help="instead: deny --account deleting groups in the OU (Entra Connect's AD DS "
        "connector account, before its group writeback is turned off; docs/migration.md)",
    )
    permissions.add_argument("--revoke", action="store_true", help="remove the ACEs instead")
    permissions.add_argument(
        "--apply",
        action="store_true",
        help="write the change into the OU over LDAP (WRITEBACK_LDAP_URL, WRITEBACK_LDAP_CA_FILE) "
        "as --admin-user, whose password is read from standard input",
    )
    permissions.add_argument("--admin-user", metavar="DN|UPN", help="who may change the OU's DACL")
    permissions.add_argument(
        "--force",
        action="store_true",
        help="with --apply: grant even though the OU already holds groups that are not "
        "writeback's (no Group_<objectId> anchor) or are protected (adminCount=1)",
    )
    permissions.set_defaults(run=_permissions)


def _permissions(args: argparse.Namespace, out: TextIO) -> int:
    """Print the ACEs and the commands that set them; with --apply, write them.

    A grant (and a deletion guard) needs an OU of the domain's own, never a
    default container or the domain root (writeback/domain/target.py); a revoke
    is allowed anywhere, so a grant made on such a target can be taken back.
    """
    from writeback.domain.target import TargetRefused, check_target_ou
    from writeback.permissions import UnsafeName, check_printable, describe

    ou = args.ou or load_permissions_settings().target_ou
    if not ou:
        raise ConfigError("--ou or WRITEBACK_TARGET_OU is required")
    try:
        check_printable("--account", args.account)
        check_printable("--ou", ou)
        if not args.revoke:
            check_target_ou(ou)
    except TargetRefused as refused:
        raise ConfigError(f"--ou {ou!r} {refused}; the target must be an OU of your own") from None
    except UnsafeName as unsafe:
        raise ConfigError(str(unsafe)) from None
    sid = _apply_permissions(args, ou) if args.apply else None
    lines = describe(ou, args.account, sid, guard=args.deny_deletes, revoke=args.revoke)
    for line in lines:
        print(line, file=out)
    return EXIT_OK


def _apply_permissions(args: argparse.Namespace, ou: str) -> str:
    import getpass

    from writeback.adapters.acl import update_dacl
    from writeback.permissions import delegation, deletion_guard

    settings = load_permissions_settings()
    url = settings.ldap_url
    if not url or not args.admin_user:
        raise ConfigError("--apply needs WRITEBACK_LDAP_URL and --admin-user")
    password = (
        getpass.getpass(f"password of {args.admin_user}: ")
        if sys.stdin.isatty()
        else sys.stdin.readline().rstrip("\r\n")
    )
    done = update_dacl(
        url=url,
        admin_user=args.admin_user,
        admin_password=password,
        target_ou=ou,
        account_dn=args.account,
        aces_for=deletion_guard if args.deny_deletes else delegation,
        revoke=args.revoke,
        force=args.force,
        ca_file=settings.ldap_ca_file,
    )
    verb = "removed" if args.revoke else "added"
    print(f"applied: {done.changed} ACE(s) {verb}, {done.unchanged} already so", file=sys.stderr)
    return done.sid


@contextmanager
def _queue() -> Iterator[LocalQueue | ServiceBusQueue]:
    """The queue the settings name (Service Bus where one is configured, else local)."""
    from writeback.bootstrap import build_queue
    from writeback.config import Host, QueueKind, load_pipeline_settings

    pipeline = load_pipeline_settings(require_client_state=False, host=Host.TOOL)
    if pipeline.queue is QueueKind.LOCAL and not os.path.exists(pipeline.queue_path):
        raise ConfigError(
            f"WRITEBACK_QUEUE_PATH={pipeline.queue_path!r}: no queue file there "
            "(is this where serve runs?)"
        )
    queue = build_queue(pipeline)
    try:
        yield queue
    finally:
        queue.close()


@contextmanager
def _adapters(
    settings: Settings,
) -> Iterator[tuple[GraphCloud, LdapDirectory | RelayDirectory]]:
    """Graph and directory adapters for one command, both closed after it."""
    from writeback.bootstrap import build_cloud, build_directory

    cloud = build_cloud(settings)
    try:
        directory = build_directory(settings)
        try:
            yield cloud, directory
        finally:
            directory.close()
    finally:
        cloud.close()
