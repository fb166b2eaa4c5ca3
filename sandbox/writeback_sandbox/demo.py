"""The embedded default: the whole near-real-time pipeline with no Azure tenant.

A throwaway Samba AD DC on loopback, the sample tenant served by the Graph
stand-in, and single-machine mode (:class:`~writeback.hosting.serve.Server`)
between them, with its queue in a temporary directory: the real GraphCloud
subscribes to group changes (the stand-in validates our webhook), a full sync
writes the tenant, then a stream of cloud changes (creates, renames, member
adds and removes, soft and hard deletes) is notified to the webhook by the
stand-in and applied to AD by the workers, one LDAP operation per change.
Progress is shown live; the summary gives events, LDAP writes, skipped
members, dead letters and the latency from notification to completed write.
It ends by checking that a full sync would now write nothing.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from writeback import report
from writeback.adapters.directory import LdapDirectory
from writeback.adapters.graph import GraphCloud
from writeback.adapters.local_queue import LocalQueue
from writeback.domain.mapping import MappingOptions
from writeback.domain.naming import DnFormat
from writeback.hosting.serve import ServeConfig, Server, ServerStats
from writeback.service.reconcile import SyncPolicy, plan_sync
from writeback_sandbox.graph_standin import GraphStandIn, Tenant
from writeback_sandbox.samba import SambaDC, running_dc
from writeback_sandbox.sample_tenant import build_sample_tenant, object_id, user_id_for

DEMO_ADDRESS = "127.0.0.20"
#: Seconds between an event's read and its confirmation in the demo (60 in production).
DEMO_SETTLE = 1.5
SAMPLE_USERS = 40
#: The demo's own clientState; it never leaves this process and loopback.
DEMO_CLIENT_STATE = "writeback-demo-client-state"
#: Seconds between two cloud changes of the stream (it looks like a stream, not a batch).
CHANGE_PACE = 0.04

Say = Callable[[str], None]


def run_demo(out: TextIO, *, keep: bool = False) -> int:
    say = _printer(out)
    say("Starting a throwaway Samba AD DC on loopback (seconds; the first run provisions it)...")
    started = time.monotonic()
    with running_dc(address=DEMO_ADDRESS, exchange_schema=True, keep=keep) as dc:
        say(f"  DC {dc.realm} at {dc.ldaps_url} ready in {time.monotonic() - started:.1f} s")
        users_ou = dc.create_ou("Synced Users")
        target_ou = dc.create_ou("M365 Groups")
        names = [f"user{i:02d}" for i in range(SAMPLE_USERS)]
        sids = dc.create_users(users_ou, names)
        say(f"  {len(sids)} on-premises users in {users_ou}; target OU {target_ou}")
        tenant = build_sample_tenant(sids)
        standin = GraphStandIn(
            tenant,
            delivery_retry_delays=(0.5, 2.0, 5.0),
            delivery_batch_size=5,
            delivery_batch_window=0.02,
        )
        with standin, tempfile.TemporaryDirectory(prefix="writeback-demo-") as tmp:
            say(f"Sample tenant served by the Graph stand-in at {standin.url}")
            return _pipeline(dc, target_ou, standin, Path(tmp), say)


def _pipeline(dc: SambaDC, target_ou: str, standin: GraphStandIn, tmp: Path, say: Say) -> int:
    tenant = standin.tenant
    options = MappingOptions(target_ou=target_ou, dn_format=DnFormat.DISPLAY_NAME)

    def directory() -> LdapDirectory:
        return dc.directory(target_ou)

    cloud = GraphCloud(base_url=standin.url)
    queue = LocalQueue(tmp / "queue.sqlite3", lock_duration=60, max_delivery_count=20)
    server = Server(
        queue=queue,
        cloud=cloud,
        directory_factory=directory,
        options=options,
        client_states=[DEMO_CLIENT_STATE],
        config=ServeConfig(
            workers=2,
            state_path=str(tmp / "state.json"),
            reconcile_interval=3600,
            subscription_interval=3600,
            redelivery_scale=0.1,
            max_redelivery_delay=2.0,
            receive_wait=0.2,
            # A deleted group is deleted once a read this much later confirms it
            # (60 s in production: Graph is eventually consistent).
            settle=DEMO_SETTLE,
        ),
        owned=[queue, cloud],
    )
    say("\n1. Single-machine mode: webhook, queue (SQLite), 2 workers, timers")
    server.start()
    try:
        if not server.wait_ready(60):
            say("  the start-up subscription and full sync did not finish in time")
            return 1
        say(f"  webhook listening at {server.url}/api/notifications")
        say(f"  subscription {server.subscription_id} created through Graph (webhook validated)")
        failures = _initial_sync(server, say)
        say("\n2. A stream of cloud changes, notified to the webhook by Graph")
        changes = _stream_of_changes(tenant, say, server)
        say(f"  {changes} changes made in the cloud; waiting for the last writes...")
        standin.wait_idle(30)
        server.wait_idle(30)
        _progress_line(server.stats, say, final=True)
        dead_letters = len(queue.dead_letters())
    finally:
        server.stop()
    _summary(server.stats, dead_letters, say)
    nothing_left = _check(cloud_url=standin.url, directory=directory(), options=options, say=say)
    ok = failures == 0 and not dead_letters and nothing_left
    say("Done." if ok else "Done, with problems (see above).")
    return 0 if ok else 1


def _initial_sync(server: Server, say: Say) -> int:
    result = server.last_reconcile
    if result is None:
        say(f"  initial full sync FAILED: {server.last_reconcile_error}")
        return 1
    say("  initial full sync:")
    for operation in result.plan.operations:
        say("    " + report.describe(operation))
    applied = ", ".join(f"{n} {k}" for k, n in sorted(result.applied.items())) or "no writes"
    say(f"  => {applied}; {result.ldap_requests} LDAP requests in {result.seconds:.2f} s")
    for operation, error in result.failures:
        say(f"  FAILED {operation.kind} {operation.dn}: {error}")
    return len(result.failures)


class _Stream:
    """Makes cloud changes at a steady pace and counts them."""

    def __init__(self) -> None:
        self.made = 0

    def change(self, action: Callable[..., None], *args: Any, **fields: Any) -> None:
        action(*args, **fields)
        self.made += 1
        time.sleep(CHANGE_PACE)


def _stream_of_changes(tenant: Tenant, say: Say, server: Server) -> int:
    """A few dozen changes a tenant sees in a busy minute, made while progress shows."""
    stop = threading.Event()
    reporter = threading.Thread(
        target=_report_progress, args=(server, say, stop), name="demo-progress", daemon=True
    )
    reporter.start()
    try:
        return _make_changes(tenant)
    finally:
        stop.set()
        reporter.join()


def _make_changes(tenant: Tenant) -> int:
    rng = random.Random(2024)
    synced = [user_id_for(f"user{i:02d}") for i in range(SAMPLE_USERS)]
    stream = _Stream()
    existing = tenant.unified_group_ids()
    created = []
    for n in range(1, 7):  # new teams
        gid = object_id("group", f"demo-new:{n}")
        stream.change(
            tenant.add_group,
            gid,
            display_name=f"Project Team {n}",
            mail=f"project{n}@contoso.com",
            mail_nickname=f"project{n}",
            proxy_addresses=[f"SMTP:project{n}@contoso.com"],
            members=rng.sample(synced, rng.randint(2, 8)),
        )
        created.append(gid)
    for gid in existing[4:8]:  # renames (a modify-DN in the display-name DN format)
        name = tenant.group_properties(gid)["displayName"].strip()
        stream.change(tenant.update_group, gid, display_name=f"{name} 2")
    for gid in existing[:10] + created[:3]:  # people join
        joining = rng.sample([u for u in synced if u not in tenant.member_ids(gid)], 2)
        stream.change(tenant.add_members, gid, joining)
    for gid in existing[2:9]:  # people leave
        stream.change(tenant.remove_members, gid, tenant.member_ids(gid)[:1])
    burst = created[3]  # a burst of edits to one group, notified together: one write
    for n in range(1, 5):
        tenant.update_group(burst, description=f"Status update {n}")
        stream.made += 1
    time.sleep(CHANGE_PACE)
    stream.change(tenant.soft_delete_group, existing[9])  # kept until purged
    stream.change(tenant.soft_delete_group, existing[10])
    stream.change(tenant.hard_delete_group, existing[10])  # purged from the recycle bin
    stream.change(tenant.hard_delete_group, created[5])  # deleted for good
    return stream.made


def _report_progress(server: Server, say: Say, stop: threading.Event) -> None:
    last: tuple[int, int, int] | None = None
    while not stop.wait(0.25):
        stats = server.stats
        now = (stats.enqueued, stats.events, stats.writes)
        if now != last:
            _progress_line(stats, say)
            last = now


def _progress_line(stats: ServerStats, say: Say, *, final: bool = False) -> None:
    operations = ", ".join(f"{n} {k}" for k, n in sorted(stats.operations.items())) or "none yet"
    say(
        f"  {'=>' if final else '..'} events received {stats.enqueued}, applied {stats.events}; "
        f"operations {operations}; LDAP writes {stats.writes}"
    )


def _summary(stats: ServerStats, dead_letters: int, say: Say) -> None:
    p50, p99 = stats.percentile(50), stats.percentile(99)
    latency = (
        f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms over {len(stats.latencies)} events"
        if p50 is not None and p99 is not None
        else "no events"
    )
    operations = ", ".join(f"{n} {k}" for k, n in sorted(stats.operations.items())) or "none"
    say("\n3. Summary of the event stream")
    say(f"  events: {stats.enqueued} received, {stats.events} applied in {stats.batches} batches")
    say(f"  LDAP operations: {operations}; LDAP writes (requests): {stats.writes}")
    say(
        f"  events that needed no write: {stats.unchanged} batches "
        "(already converged, or a soft-deleted group kept until it is purged)"
    )
    say(f"  skipped members: {stats.skipped_members} (cloud-only users, nested groups)")
    say(f"  dead letters: {dead_letters}")
    say(f"  latency from notification to completed write: {latency}")


def _check(*, cloud_url: str, directory: LdapDirectory, options: MappingOptions, say: Say) -> bool:
    cloud = GraphCloud(base_url=cloud_url)
    try:
        plan = plan_sync(cloud, directory, options, SyncPolicy())
    finally:
        cloud.close()
        directory.close()
    if not plan.operations:
        say("\nCheck: a full sync now finds nothing to write (AD matches the cloud).")
        return True
    say(f"\nCheck FAILED: a full sync would still make {len(plan.operations)} operations:")
    for operation in plan.operations:
        say("  " + report.describe(operation))
    return False


def _printer(out: TextIO) -> Say:
    def say(line: str) -> None:
        print(line, file=out, flush=True)

    return say
