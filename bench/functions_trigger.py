"""The Function app's Service Bus trigger, batch with sessions vs single dispatch, measured.

One run, one throwaway Samba DC, the Graph stand-in in a child process with a
latency added to every request (30 ms by default: real Graph round trips are
tens of milliseconds). For each trigger mode, a burst of one event on each of
``--groups`` distinct groups is put on the app's queue (the embedded queue
file, ``WRITEBACK_QUEUE=local``) and the app's own ``worker`` function drains it
under :class:`tests.support.functions_host.FunctionsHost`, the reproduction of
the Service Bus extension's trigger loop (see its docstring for what each mode
does), as one Function app instance:

* batch with sessions (``cardinality=many``): one session at a time; a session
  is held until a receive comes back empty after ``sessionIdleTimeout``;
* single dispatch with sessions (``cardinality=one``): ``maxConcurrentSessions``
  session receivers, one message per invocation, session locks renewed.

Printed: events per second per instance, invocations, Graph requests per event,
CPU seconds of this process (the instance), and the ratio between the modes.
Every group is written once (an add) in each mode; confirmation reads fall
outside the measurement (the settle interval is longer than the run).

    .venv/bin/python -m bench.functions_trigger --groups 1000 --latency 0.030
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from bench.pipeline import gid, uid
from bench.standin import RemoteStandIn, cpu_seconds
from tests.support.functions_host import FunctionsHost, one_at_a_time
from writeback.adapters.local_queue import LocalQueue
from writeback.domain.events import Change, GroupChanged
from writeback.hosting import functions
from writeback.ports import OutgoingMessage
from writeback.report import markdown_table
from writeback_sandbox.graph_standin import Tenant
from writeback_sandbox.samba import SambaDC, running_dc

CLIENT_STATE = "bench-functions-client-state"
MODES = ("many", "one")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--groups", type=int, default=1000, help="distinct groups in the burst")
    parser.add_argument("--members", type=int, default=5, help="members per group")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.030, help="seconds per Graph request")
    parser.add_argument("--sessions", type=int, default=16, help="maxConcurrentSessions (single)")
    parser.add_argument("--idle", type=float, default=0.1, help="sessionIdleTimeout, seconds")
    parser.add_argument("--address", default="127.0.0.33")
    args = parser.parse_args(argv)
    with running_dc(address=args.address) as dc, tempfile.TemporaryDirectory() as tmp:
        run(dc, args, Path(tmp))


def run(dc: SambaDC, args: argparse.Namespace, tmp: Path) -> None:
    users_ou = dc.create_ou("TriggerUsers")
    sids = dc.create_users(users_ou, [f"u{i}" for i in range(args.users)])
    names = sorted(sids)
    tenant = Tenant()
    for name, sid in sids.items():
        tenant.add_user(uid(name), sid=sid, synced=True)
    # Two sets of groups, one per mode (sAMAccountName is unique in the domain).
    sets = {
        mode: [gid(n + i * args.groups) for n in range(args.groups)] for i, mode in enumerate(MODES)
    }
    for n, group in enumerate(g for groups in sets.values() for g in groups):
        members = [uid(names[(n + k) % len(names)]) for k in range(args.members)]
        tenant.add_group(group, display_name=f"Trigger {n}", members=members)
    standin = RemoteStandIn(tenant, page_size=999)
    rows: list[tuple[str, str]] = [
        ("Graph latency per request", f"{args.latency * 1000:.0f} ms"),
        ("burst", f"{args.groups} distinct groups, one event each"),
        ("sessionIdleTimeout (both modes)", f"{args.idle:g} s"),
    ]
    try:
        if args.latency > 0:
            standin.standin("inject_delay", args.latency, times=10**9)
        rates = {}
        for mode in MODES:
            rate, mode_rows = measure(dc, standin, sets[mode], args, tmp=tmp, mode=mode)
            rates[mode] = rate
            rows += mode_rows
        rows.append(("single dispatch ÷ batch (events/s)", f"{rates['one'] / rates['many']:.1f}"))
    finally:
        standin.close()
    print(markdown_table(rows))


def measure(
    dc: SambaDC,
    standin: RemoteStandIn,
    groups: list[str],
    args: argparse.Namespace,
    *,
    tmp: Path,
    mode: str,
) -> tuple[float, list[tuple[str, str]]]:
    target = dc.create_ou(f"Trigger-{mode}")
    queue_path = tmp / f"queue-{mode}.sqlite3"
    os.environ.update(
        {
            "WRITEBACK_QUEUE": "local",
            "WRITEBACK_QUEUE_PATH": str(queue_path),
            "WRITEBACK_TARGET_OU": target,
            "WRITEBACK_LDAP_URL": dc.ldaps_url,
            "WRITEBACK_LDAP_USER": dc.admin_dn,
            "WRITEBACK_LDAP_PASSWORD": dc.admin_password,
            "WRITEBACK_LDAP_CA_FILE": str(dc.ca_file),
            "WRITEBACK_GRAPH_URL": standin.url,
            "WRITEBACK_GRAPH_AUTH": "none",
            "WRITEBACK_CLIENT_STATE": CLIENT_STATE,
            "WRITEBACK_SETTLE_SECONDS": "3600",  # confirmations after the measurement
            "WRITEBACK_MAX_DELIVERY_COUNT": "100",
            "WRITEBACK_LOG_LEVEL": "WARNING",
        }
    )
    os.environ.pop("WRITEBACK_STATE_PATH", None)
    functions.reset()
    with LocalQueue(queue_path) as queue:
        now = time.time()
        queue.send(
            [
                OutgoingMessage(
                    GroupChanged(group, Change.UPDATED, now, f"n-{uuid.uuid4().hex}").to_json(),
                    f"m-{uuid.uuid4().hex}",
                    group,
                )
                for group in groups
            ]
        )
    if mode == "one":
        host = FunctionsHost.for_app(
            queue_path,
            function=one_at_a_time(functions.run_worker),
            session_idle_timeout=args.idle,
            cardinality="one",
            max_concurrent_sessions=args.sessions,
        )
    else:
        host = FunctionsHost.for_app(
            queue_path,
            function=functions.run_worker,
            session_idle_timeout=args.idle,
            cardinality="many",
        )
    requests_before = len(standin.standin("requests"))
    cpu_before = cpu_seconds()
    started = time.monotonic()
    try:
        stats = host.run_until_idle(timeout=3600)
    finally:
        host.close()
    seconds = time.monotonic() - started
    cpu = cpu_seconds() - cpu_before
    requests = len(standin.standin("requests")) - requests_before
    pipeline = functions._runtime._pipeline
    operations = pipeline.stats.operations if pipeline is not None else {}
    rate = len(groups) / seconds
    label = "batch" if mode == "many" else f"single dispatch ({args.sessions} sessions)"
    rows = [
        (f"{label}: events/s per instance", f"{rate:.1f}"),
        (f"{label}: seconds for the burst", f"{seconds:.1f}"),
        (
            f"{label}: invocations / most concurrent",
            f"{stats.invocations} / {stats.max_concurrent_invocations}",
        ),
        (f"{label}: Graph requests per event", f"{requests / len(groups):.2f}"),
        (f"{label}: CPU ms per event (this process)", f"{cpu * 1000 / len(groups):.1f}"),
        (f"{label}: lock losses / overlaps", f"{stats.lock_losses} / {stats.overlaps}"),
    ]
    rows.append((f"{label}: operations", ", ".join(f"{n} {k}" for k, n in operations.items())))
    functions.reset()
    return rate, rows


if __name__ == "__main__":
    main()
