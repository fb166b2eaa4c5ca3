"""Single-machine pipeline benchmark against one throwaway Samba AD DC.

In one run, on the same DC:

1. bursts: one membership change on each of ``--sizes`` distinct groups (1,000
   and 5,000 by default), made in the stand-in's process as fast as the tenant
   takes them (not from this process: its GIL is the pipeline's), with every
   Graph request answered ``--latencies`` late (30 ms, then none); the Graph
   stand-in POSTs the notifications to the webhook, which enqueues them in the
   LocalQueue; the workers take up to 40 sessions a step, read them from Graph
   (JSON batches) and AD together, and write. Events per second and LDAP writes
   per second are measured from the first change to the last write (the
   confirmation reads come ``--settle`` seconds later and are waited out before
   the next phase); latency is per event, from the webhook accepting the
   notification to its write completing; CPU is per event, for this process
   and for the stand-in's. Each burst runs ``--repeat`` times (5); the table
   shows the run with the median ratio (below) and lists every run's ratio;
2. a plain ldap3 loop making the same kind of write (one modify adding one
   member value to a group) on copies of the groups in another OU, timed on the
   same DC right before each burst and again right after its confirmation reads
   (the speed of a shared VM drifts within minutes); the ratio of each burst's
   LDAP write rate to the mean of the two;
3. paced: ``--paced`` changes at ``--rate`` per second with Graph latency (a load
   the pipeline keeps up with) and the confirmation reads running, for the
   latency of an unqueued event;
4. the relay path (``WRITEBACK_DIRECTORY=relay``): the Relay stand-in and an agent
   in a child process (the agent is another machine in production), then the same
   burst through it, and a sequential loop of single writes and reads through the
   relay next to the same calls made directly, for the time the relay adds per
   operation;
5. a very large group (``--big`` members): its creation, then one member added
   to it and one removed, with the Graph requests (counted by the stand-in: the
   event's and its confirmation's, ``$batch`` envelopes included), the LDAP
   values written and read, and the time, next to the same figures for a small
   group. After its first event the worker holds the group's delta link, so these
   events read the group's properties, the member changes and the new members'
   SIDs from Graph, and the AD object without its ``member`` values: no page of
   the member list, which is what "proportional" checks.

The Graph stand-in runs in a child process (forked with the tenant), as Graph
is another machine in production: its CPU does not compete with the pipeline's
for this process's GIL. Tenant changes are sent to it over a pipe.

    .venv/bin/python -m bench.pipeline --sizes 1000,5000 --latencies 0.030,0 --big 50000
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import random
import resource
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from ldap3 import MODIFY_ADD

from bench.standin import RemoteStandIn, cpu_seconds
from writeback.adapters.agent_state import AgentStateStore
from writeback.adapters.directory import LdapDirectory, ObjectGuids
from writeback.adapters.graph import GraphCloud
from writeback.adapters.hybrid_connection import (
    HybridConnectionListener,
    HybridConnectionSender,
    RelayEndpoint,
)
from writeback.adapters.local_queue import LocalQueue
from writeback.adapters.relay import RelayDirectory
from writeback.agent_protocol import audience
from writeback.domain.guard import Ancestry, Principal
from writeback.domain.mapping import MappingOptions
from writeback.domain.model import Add, Changes, DirectoryGroup, Modify, Operation, Rename
from writeback.domain.policy import AgentPolicy
from writeback.errors import WritebackError
from writeback.hosting.agent import AgentService, relay_handler
from writeback.hosting.serve import ServeConfig, Server, ServerStats
from writeback.ports import Directory
from writeback.report import markdown_table
from writeback_sandbox.graph_standin import Tenant
from writeback_sandbox.relay_standin import RelayStandIn, SasRule
from writeback_sandbox.samba import SambaDC, running_dc

CLIENT_STATE = "bench-client-state"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--sizes", default="1000,5000", help="bursts: distinct groups changed once, per burst"
    )
    parser.add_argument(
        "--latencies", default="0.030,0", help="seconds added to every Graph request, per round"
    )
    parser.add_argument("--settle", type=float, default=2.0, help="WRITEBACK_SETTLE_SECONDS")
    parser.add_argument("--repeat", type=int, default=5, help="bursts of each size and latency")
    parser.add_argument("--paced", type=int, default=200, help="paced changes")
    parser.add_argument("--rate", type=float, default=40.0, help="paced changes per second")
    parser.add_argument("--members", type=int, default=10, help="members per ordinary group")
    parser.add_argument("--users", type=int, default=2000, help="users for ordinary groups")
    parser.add_argument("--big", type=int, default=50_000, help="members of the large group")
    parser.add_argument(
        "--workers", type=int, default=4, help="WRITEBACK_WORKERS (serve's default)"
    )
    parser.add_argument(
        "--sessions", type=int, default=40, help="sessions a worker takes a step (serve's default)"
    )
    parser.add_argument("--batch", type=int, default=10, help="notifications per Graph POST")
    parser.add_argument("--address", default="127.0.0.31")
    parser.add_argument(
        "--relay-ops", type=int, default=300, help="relay: sequential single writes and reads"
    )
    args = parser.parse_args(argv)
    with running_dc(address=args.address) as dc, tempfile.TemporaryDirectory() as tmp:
        Bench(dc, args, Path(tmp)).run()


# --------------------------------------------------------------------------- counting


@dataclass
class Tally:
    """LDAP values the workers wrote and read, across every thread."""

    written: int = 0
    read: int = 0
    operations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Every adapter the workers opened, for their LDAP requests by kind.
    directories: list[LdapDirectory] = field(default_factory=list)

    def requests(self) -> Counter[str]:
        with self.lock:
            return sum((Counter(d.request_counts) for d in self.directories), Counter())

    def reset(self) -> None:
        with self.lock:
            self.written = self.read = 0
            self.operations.clear()


class CountingDirectory:
    """LdapDirectory with the values of each write and read counted."""

    def __init__(self, inner: LdapDirectory, tally: Tally) -> None:
        self._inner = inner
        self._tally = tally
        with tally.lock:
            tally.directories.append(inner)

    def schema_attributes(self) -> frozenset[str]:
        return self._inner.schema_attributes()

    def find_group(self, group_id: str) -> DirectoryGroup | None:
        return self._counted(lambda: self._inner.find_group(group_id))

    def find_group_attributes(self, group_id: str) -> DirectoryGroup | None:
        return self._counted(lambda: self._inner.find_group_attributes(group_id))

    def _counted(self, read: Callable[[], DirectoryGroup | None]) -> DirectoryGroup | None:
        before = self._inner.member_values_read
        group = read()
        with self._tally.lock:
            self._tally.read += self._inner.member_values_read - before
        return group

    def find_groups(
        self, group_ids: Sequence[str], *, members: bool = True
    ) -> dict[str, DirectoryGroup]:
        return self._inner.find_groups(group_ids, members=members)

    def iter_groups(self) -> Iterator[DirectoryGroup]:
        return self._inner.iter_groups()

    def resolve_sids(self, sids: Sequence[str]) -> dict[str, Principal]:
        return self._inner.resolve_sids(sids)

    def group_ancestry(self) -> Ancestry:
        return self._inner.group_ancestry()

    def apply_all(self, operations: Sequence[Operation]) -> list[int | WritebackError]:
        before = self._inner.member_values_read
        results = self._inner.apply_all(operations)
        with self._tally.lock:
            self._tally.read += self._inner.member_values_read - before
            for operation, result in zip(operations, results, strict=True):
                if not isinstance(result, WritebackError):
                    self._tally.written += values_written(operation)
                    self._tally.operations.append(operation.kind)
        return results

    def apply(self, operation: Operation) -> int:
        before = self._inner.member_values_read  # a conflict read-back reads members
        requests = self._inner.apply(operation)
        with self._tally.lock:
            self._tally.read += self._inner.member_values_read - before
            self._tally.written += values_written(operation)
            self._tally.operations.append(operation.kind)
        return requests

    def close(self) -> None:
        self._inner.close()


def values_written(operation: Operation) -> int:
    if isinstance(operation, Add):
        return sum(len(v) for v in operation.attributes.values()) + len(operation.members)
    if isinstance(operation, Modify | Rename):
        changes = operation.changes
        values = sum(len(v) or 1 for v in changes.replace.values())
        return values + len(changes.add_members) + len(changes.remove_members)
    return 1  # a delete: the object


# --------------------------------------------------------------------------- the remote stand-in


class RemoteRelay:
    """The Relay stand-in and one agent (4 handler threads) in a forked child process.

    In production the relay is Azure's and the agent another machine; here they
    get their own process so their CPU does not compete with the cloud side's GIL.
    """

    PATH = "bench-agent"

    def __init__(self, dc: SambaDC, target_ou: str) -> None:
        self.caller_key = uuid.uuid4().hex + uuid.uuid4().hex
        self.send = SasRule("send", uuid.uuid4().hex, frozenset({"Send"}))
        listen = SasRule("listen", uuid.uuid4().hex, frozenset({"Listen"}))
        context = multiprocessing.get_context("fork")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve_relay,
            args=(dc, target_ou, self.caller_key, (self.send, listen), child),
            daemon=True,
        )
        self._process.start()
        namespace, ca_file = self._conn.recv()
        self.endpoint = RelayEndpoint(namespace=namespace, path=self.PATH, ca_file=ca_file)

    def directory(self, target_ou: str) -> RelayDirectory:
        sender = HybridConnectionSender(self.endpoint, self.send.name, self.send.key)
        return RelayDirectory(sender, self.caller_key, target_ou=target_ou)

    def cpu(self) -> float:
        self._conn.send("cpu")
        return float(self._conn.recv())

    def agent_writes(self) -> tuple[list[float], dict[str, int]]:
        """The agent's own time per ``apply`` (ms) since the last call, and how each
        write's target was checked (against its reading, or read again)."""
        self._conn.send("writes")
        times, checks = self._conn.recv()
        return list(times), dict(checks)

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(10)


class _AgentWrites(logging.Handler):
    """Collects the agent's audit lines for ``apply``: time and how it was checked."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: list[float] = []
        self.checks: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "call", "") == "apply" and getattr(record, "status", 0) == 200:
            self.times.append(float(getattr(record, "ms", 0.0)))
            checked = str(getattr(record, "checked", "-"))
            self.checks[checked] = self.checks.get(checked, 0) + 1


def _serve_relay(
    dc: SambaDC,
    target_ou: str,
    caller_key: str,
    rules: tuple[SasRule, SasRule],
    conn: Connection,
) -> None:
    with (
        RelayStandIn({RemoteRelay.PATH: list(rules)}) as relay,
        tempfile.TemporaryDirectory() as tmp,
    ):
        state = AgentStateStore(Path(tmp) / "agent-state.sqlite3")
        service = AgentService(
            lambda: dc.directory(target_ou),
            AgentPolicy(target_ou=target_ou),
            caller_key,
            audience=audience(relay.namespace, RemoteRelay.PATH),
            state=state,
        )
        listener = HybridConnectionListener(
            relay.endpoint(RemoteRelay.PATH), rules[1].name, rules[1].key, relay_handler(service)
        )
        writes = _AgentWrites()
        audit = logging.getLogger("writeback.audit")
        audit.addHandler(writes)
        audit.setLevel(logging.INFO)
        audit.propagate = False
        with listener:
            assert listener.connected.wait(30), "the bench agent did not connect"
            conn.send((relay.namespace, relay.ca_file))
            while (message := conn.recv()) is not None:
                if message == "writes":
                    conn.send((writes.times, writes.checks))
                    writes.times, writes.checks = [], {}
                else:
                    conn.send(cpu_seconds() if message == "cpu" else None)
        service.close()
        state.close()


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, dc: SambaDC, args: argparse.Namespace, tmp: Path) -> None:
        self.dc = dc
        self.args = args
        self.tmp = tmp
        self.rng = random.Random(42)
        self.tally = Tally()
        self.rows: list[tuple[str, str]] = []
        self.small_sids: dict[str, str] = {}
        self.small_users: list[str] = []
        #: The median run of each burst at Graph 0 ms, by size: (writes/s, its stats),
        #: the relay's reference.
        self.direct_bursts: dict[int, tuple[float, ServerStats]] = {}
        #: SIDs the single-call loop added, so it never adds one twice.
        self.member_sids_added: dict[str, set[str]] = {}
        self.finding = ""
        #: The plain loop's groups: each one's DN and the SIDs not yet added to it.
        self.plain_groups: list[tuple[str, list[str]]] = []

    def run(self) -> None:
        args = self.args
        users_ou = self.dc.create_ou("BenchUsers")
        big_ou = self.dc.create_ou("BenchBigUsers")
        started = time.monotonic()
        small = self.dc.create_users(users_ou, [f"u{i}" for i in range(args.users)])
        big = self.dc.create_users(big_ou, [f"b{i}" for i in range(args.big + 1)])
        print(f"setup: {args.users + args.big + 1} users in {time.monotonic() - started:.1f} s")
        tenant = Tenant()
        for name, sid in {**small, **big}.items():
            tenant.add_user(uid(name), sid=sid, synced=True)
        self.small_sids = small
        self.small_users = sorted(small)
        sizes = [int(n) for n in args.sizes.split(",") if n.strip()]
        latencies = [float(x) for x in args.latencies.split(",") if x.strip()]
        groups = [gid(n) for n in range(max(sizes))]
        for n, group in enumerate(groups):
            members = self.rng.sample(self.small_users, args.members)
            tenant.add_group(group, display_name=f"Bench {n}", members=[uid(m) for m in members])
        target = self.dc.create_ou("BenchGroups")
        # Each group's members, mirrored here so a change never needs to ask the child.
        self.members = {group: set(tenant.member_ids(group)) for group in groups}
        standin = RemoteStandIn(
            tenant,
            page_size=999,
            delivery_batch_size=args.batch,
            delivery_batch_window=0.005,
            delivery_retry_delays=(0.5, 1.0, 2.0),
        )
        relay = RemoteRelay(self.dc, target)
        try:
            server = self.server(standin.url, target)
            try:
                started = time.monotonic()
                assert server.wait_ready(900), "initial reconcile did not finish"
                result = server.last_reconcile
                assert result is not None and not result.failures
                print(
                    f"initial reconcile: {result.applied} in {time.monotonic() - started:.1f} s; "
                    f"subscription {server.subscription_id}"
                )
                self.plain_setup(min(sizes))
                for latency in latencies:
                    standin.set("latency", latency)
                    for size in sizes:
                        self.bursts(standin, server, groups[:size], latency)
                    if latency > 0:
                        self.paced(standin, server, groups, latency)
                standin.set("latency", 0.0)
                self.large_group(standin, server, sorted(big))
            finally:
                server.stop()
            self.relay_path(standin, relay, target, groups[: min(sizes)])
        finally:
            relay.close()
            standin.close()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.rows.append(("peak RSS of this process, MB", f"{peak_mb:.0f}"))
        print_table(self.rows)
        print()
        print(self.finding)

    def server(
        self, graph_url: str, target: str, directory: Callable[[], Directory] | None = None
    ) -> Server:
        dc, tally = self.dc, self.tally
        guids = ObjectGuids()  # shared by the workers' adapters, as bootstrap does

        def counted() -> Directory:
            return CountingDirectory(dc.directory(target, guids=guids), tally)

        cloud = GraphCloud(base_url=graph_url)
        queue = LocalQueue(
            self.tmp / f"queue-{uuid.uuid4().hex}.sqlite3", lock_duration=600, max_delivery_count=20
        )
        server = Server(
            queue=queue,
            cloud=cloud,
            directory_factory=directory or counted,
            options=MappingOptions(target_ou=target, member_limit=250_000),
            client_states=[CLIENT_STATE],
            config=ServeConfig(
                workers=self.args.workers,
                max_sessions=self.args.sessions,
                settle=self.args.settle,
                state_path=str(self.tmp / f"state-{uuid.uuid4().hex}.json"),
                reconcile_interval=86400,
                subscription_interval=86400,
                receive_wait=0.2,
            ),
            owned=[queue, cloud],
        )
        return server.start()

    # ----------------------------------------------------------------- phases

    def bursts(
        self, standin: RemoteStandIn, server: Server, groups: list[str], latency: float
    ) -> None:
        """``--repeat`` bursts over ``groups``; the rows of the one whose ratio is
        the median, and every run's ratio (a burst of 1,000 lasts about two
        seconds, within which a shared VM's speed can swing by a third)."""
        runs = sorted(
            (self.burst(standin, server, groups, latency) for _ in range(self.args.repeat)),
            key=lambda run: run.ratio,
        )
        median = runs[len(runs) // 2]
        if latency == 0:
            self.direct_bursts[len(groups)] = (median.rate, median.stats)
        name = burst_name(len(groups), latency)
        self.rows += [
            *median.rows,
            (
                f"{name}: ÷ plain loop in each of {len(runs)} runs (rows above: the median)",
                ", ".join(f"{run.ratio:.2f}" for run in runs),
            ),
        ]

    def burst(
        self,
        standin: RemoteStandIn,
        server: Server,
        groups: list[str],
        latency: float,
    ) -> BurstRun:
        """One burst: its LDAP write rate ÷ the plain loop's around it, and its rows."""
        print(f"burst over {len(groups)} groups, Graph {latency * 1000:.0f} ms", flush=True)
        plain_before, dc_ms_before = self.plain_round()
        before = server.stats
        order = groups[:]
        self.rng.shuffle(order)
        requests_before = self.tally.requests()
        cpu_before, child_before, dc_before = cpu_seconds(), standin.cpu(), self.dc.cpu_seconds()
        changes = [(group, self.new_member(group)) for group in order]
        started = time.monotonic()
        standin.add_members_each(changes)  # one notification, one write each
        made = time.monotonic() - started
        # Until the last write: the confirmations, due --settle seconds later, not yet.
        assert standin.standin("wait_idle", 600) and server.wait_idle(600, include_scheduled=False)
        seconds = time.monotonic() - started
        cpu, child_cpu = cpu_seconds() - cpu_before, standin.cpu() - child_before
        dc_cpu = self.dc.cpu_seconds() - dc_before
        requests = self.tally.requests() - requests_before
        delta = diff(before, server.stats)
        rate = delta.writes / seconds
        name = burst_name(len(order), latency)
        events = max(delta.events, 1)
        assert server.wait_idle(600), "the confirmation reads did not finish"
        plain_after, dc_ms_after = self.plain_round()
        plain_rate = (plain_before + plain_after) / 2
        rows = [
            (f"{name}: events applied / batches", f"{delta.events} / {delta.batches}"),
            (
                f"{name}: operations (changes made in)",
                f"{fmt_ops(delta.operations)} ({made:.1f} s)",
            ),
            (f"{name}: events/s, first change to last write", f"{delta.events / seconds:.0f}"),
            (
                f"{name}: plain ldap3 loop before / after, adds/s (DC CPU ms per modify)",
                f"{plain_before:.0f} / {plain_after:.0f} ({dc_ms_before:.2f} / {dc_ms_after:.2f})",
            ),
            (f"{name}: LDAP writes/s (÷ plain loop)", f"{rate:.0f} ({rate / plain_rate:.2f})"),
            (f"{name}: latency p50 / p99, ms", fmt_latency(delta)),
            (
                f"{name}: CPU ms per event, pipeline / Graph stand-in / DC",
                f"{cpu * 1000 / events:.1f} / {child_cpu * 1000 / events:.1f} / "
                f"{dc_cpu * 1000 / events:.1f}",
            ),
            (
                f"{name}: LDAP requests per event, by kind",
                ", ".join(f"{k} {v / events:.2f}" for k, v in sorted(requests.items())),
            ),
            (f"{name}: dead letters", f"{delta.dead_lettered}"),
        ]
        return BurstRun(rate / plain_rate, rows, rate, delta)

    def paced(
        self, standin: RemoteStandIn, server: Server, groups: list[str], latency: float
    ) -> None:
        before = server.stats
        interval = 1.0 / self.args.rate
        started = time.monotonic()
        for n in range(self.args.paced):
            group = groups[n % len(groups)]
            self.add_member(standin, group)
            time.sleep(max(0.0, started + (n + 1) * interval - time.monotonic()))
        assert standin.standin("wait_idle", 120) and server.wait_idle(120)
        delta = diff(before, server.stats)
        name = f"paced {self.args.paced} at {self.args.rate:g}/s, Graph {latency * 1000:.0f} ms"
        self.rows += [
            (f"{name}: events / confirmation reads", f"{delta.events} / {delta.confirmations}"),
            (f"{name}: notification to write p50 / p99, ms", fmt_latency(delta)),
        ]

    def plain_setup(self, count: int) -> None:
        """Copies of the groups for the plain loop, in another OU (made untimed)."""
        ou = self.dc.create_ou("BenchPlain")
        conn = self.dc.connection()
        sids = [self.small_sids[name] for name in self.small_users]
        for n in range(count):
            dn = f"CN=plain{n},{ou}"
            members = self.rng.sample(sids, self.args.members)
            member_values = [f"<SID={sid}>" for sid in members]
            conn.add(dn, ["top", "group"], {"sAMAccountName": f"plain{n}", "member": member_values})
            taken = set(members)
            others = [sid for sid in sids if sid not in taken]
            self.rng.shuffle(others)
            self.plain_groups.append((dn, others))
        conn.unbind()

    def plain_round(self) -> tuple[float, float]:
        """The same kind of write as a bare ldap3 loop: one modify adding one new
        member to each of the plain groups; modifies/s and DC CPU ms per modify."""
        conn = self.dc.connection()
        planned = [(dn, f"<SID={others.pop()}>") for dn, others in self.plain_groups]
        dc_before = self.dc.cpu_seconds()
        started = time.monotonic()
        for dn, value in planned:
            if not conn.modify(dn, {"member": [(MODIFY_ADD, [value])]}):
                raise RuntimeError(f"plain modify failed: {conn.result}")
        seconds = time.monotonic() - started
        conn.unbind()
        dc_ms = (self.dc.cpu_seconds() - dc_before) * 1000 / len(planned)
        return len(planned) / seconds, dc_ms

    def large_group(self, standin: RemoteStandIn, server: Server, names: list[str]) -> None:
        size = self.args.big
        big_group = str(uuid.uuid5(uuid.NAMESPACE_URL, "bench-big-group"))
        everyone = [uid(n) for n in names[:size]]
        created = self.one_event(
            standin,
            server,
            lambda: standin.tenant(
                "add_group", big_group, display_name="Everyone", members=everyone
            ),
        )
        grown = self.one_event(
            standin,
            server,
            lambda: standin.tenant("add_members", big_group, [uid(names[size])]),
        )
        shrunk = self.one_event(
            standin,
            server,
            lambda: standin.tenant("remove_members", big_group, [uid(names[0])]),
        )
        small = self.one_event(standin, server, lambda: self.add_member(standin, gid(0)))
        per_page = 999
        self.rows += [
            (f"large group ({size} members) created: operations", created.ops),
            ("  Graph requests / LDAP values written / seconds", created.figures),
            ("  LDAP member values read (current state)", f"{created.read}"),
            ("large group, 1 member added: operations", grown.ops),
            ("  Graph requests", f"{grown.graph}"),
            ("  LDAP values written", f"{grown.written}"),
            ("  LDAP member values read (current state)", f"{grown.read}"),
            ("  seconds, notification to write", f"{grown.seconds:.2f}"),
            ("large group, 1 member removed: operations", shrunk.ops),
            ("  Graph requests / LDAP values written / seconds", shrunk.figures),
            ("  LDAP member values read (current state)", f"{shrunk.read}"),
            (f"small group ({self.args.members} members), 1 member added", small.ops),
            ("  Graph requests / LDAP values written / seconds", small.figures),
            ("  LDAP member values read (current state)", f"{small.read}"),
        ]
        full_read = 2 + math.ceil((size + 1) / per_page)
        events = (grown, shrunk)
        # Independent of the size: no page of the member list read, by the event or
        # its confirmation (the request count itself includes both reads and the
        # $batch envelopes, so it is not compared with a small group's full read).
        proportional_graph = all(e.member_pages == 0 for e in events)
        proportional_ldap = all(e.written == small.written and e.read == 0 for e in events)
        self.finding = (
            f"Finding, large group: one member added to a group of {size} members cost "
            f"{grown.graph} Graph requests ({grown.member_pages} pages of its member list), "
            f"{grown.read} LDAP member values read and {grown.written} written; one removed "
            f"cost {shrunk.graph} requests ({shrunk.member_pages} member pages), "
            f"{shrunk.read} values read and {shrunk.written} written (a small group's "
            f"event: {small.graph} requests, {small.read} read, {small.written} written; "
            f"a full read of the large group: {full_read} Graph requests and {size + 1} "
            "member values from AD). "
            + (
                "Proportional to what changed on both sides: the worker reads the group's "
                "properties, its member delta since the stored link and the new members' SIDs "
                "from Graph, and the AD object without its members."
                if proportional_graph and proportional_ldap
                else "NOT proportional: see the figures above."
            )
        )

    def relay_path(
        self, standin: RemoteStandIn, relay: RemoteRelay, target: str, groups: list[str]
    ) -> None:
        """The same burst with WRITEBACK_DIRECTORY=relay, then single calls side by side."""
        server = self.server(standin.url, target, lambda: relay.directory(target))
        try:
            assert server.wait_ready(600), "relay: initial reconcile did not finish"
            order = groups[:]
            self.rng.shuffle(order)
            before, agent_cpu = server.stats, relay.cpu()
            changes = [(group, self.new_member(group)) for group in order]
            started = time.monotonic()
            standin.add_members_each(changes)
            # Until the last write, as the direct burst: the confirmations come later.
            assert standin.standin("wait_idle", 600)
            assert server.wait_idle(600, include_scheduled=False)
            seconds = time.monotonic() - started
            delta, agent_cpu = diff(before, server.stats), relay.cpu() - agent_cpu
            assert server.wait_idle(600), "relay: the confirmation reads did not finish"
        finally:
            server.stop()
        rate = delta.writes / seconds
        direct_rate, direct = self.direct_bursts.get(len(groups), (0.0, ServerStats()))
        self.rows += [
            (
                "relay: burst, events applied / dead letters",
                f"{delta.events} / {delta.dead_lettered}",
            ),
            ("relay: burst, LDAP writes per second", f"{rate:.0f}"),
            (
                "relay: burst writes/s vs direct burst (ratio)",
                f"{rate:.0f} vs {direct_rate:.0f} ({rate / direct_rate:.2f})"
                if direct_rate
                else f"{rate:.0f} (no direct burst at Graph 0 ms in this run)",
            ),
            (
                "relay: burst latency p50 / p99, ms (direct)",
                f"{fmt_latency(delta)} ({fmt_latency(direct)})",
            ),
            ("relay: CPU seconds, relay stand-in + agent process", f"{agent_cpu:.2f}"),
        ]
        self.single_calls(relay, target, groups)

    def single_calls(self, relay: RemoteRelay, target: str, groups: list[str]) -> None:
        """One thread, one call at a time: what the relay adds to each operation."""
        count = min(self.args.relay_ops, len(groups))
        sids = [self.small_sids[name] for name in self.small_users]
        timings: dict[str, list[float]] = {}
        relay.agent_writes()  # forget the burst's
        for path, directory in (
            ("direct", self.dc.directory(target)),
            ("relay", relay.directory(target)),
        ):
            reads, writes = [], []
            for group in groups[:count]:
                started = time.perf_counter()
                current = directory.find_group_attributes(group)
                reads.append(time.perf_counter() - started)
                assert current is not None
                value = f"<SID={self.rng.choice(sids)}>"
                while value[5:-1] in self.members_sids(group):
                    value = f"<SID={self.rng.choice(sids)}>"
                self.member_sids_added.setdefault(group, set()).add(value[5:-1])
                started = time.perf_counter()
                directory.apply(Modify(group, current.dn, Changes(add_members=(value,))))
                writes.append(time.perf_counter() - started)
            directory.close()
            timings[f"{path} read"], timings[f"{path} write"] = reads, writes
        labels = {"read": "one group read (no members)", "write": "one write (one member added)"}
        for kind, label in labels.items():
            direct, through = median(timings[f"direct {kind}"]), median(timings[f"relay {kind}"])
            self.rows.append(
                (
                    f"relay: {label}, p50 ms, relay vs direct (added)",
                    f"{through * 1000:.1f} vs {direct * 1000:.1f} "
                    f"(+{(through - direct) * 1000:.1f})",
                )
            )
        agent_ms, checks = relay.agent_writes()
        self.rows.append(
            (
                "relay: the agent's own time per write, p50 ms (target checked: how)",
                f"{median(agent_ms):.1f} "
                f"({', '.join(f'{n} {how}' for how, n in sorted(checks.items()))})",
            )
        )
        writes_per_second = count / sum(timings["relay write"])
        direct_per_second = count / sum(timings["direct write"])
        self.rows.append(
            (
                f"relay: sequential writes/s, {count} ops (direct, ratio)",
                f"{writes_per_second:.0f} ({direct_per_second:.0f}, "
                f"{writes_per_second / direct_per_second:.2f})",
            )
        )

    def members_sids(self, group: str) -> set[str]:
        return self.member_sids_added.get(group, set())

    # ----------------------------------------------------------------- helpers

    def one_event(
        self, standin: RemoteStandIn, server: Server, change: Callable[[], object]
    ) -> EventCost:
        assert standin.standin("wait_idle", 60) and server.wait_idle(60)
        self.tally.reset()
        standin.standin("reset_log")
        before = server.stats
        started = time.monotonic()
        change()
        assert standin.standin("wait_idle", 600) and server.wait_idle(600)
        delta = diff(before, server.stats)
        requests: list[tuple[str, str, int]] = standin.standin("requests")
        graph = sum(1 for _, target, _ in requests if "/subscriptions" not in target)
        return EventCost(
            ops=f"{fmt_ops(delta.operations)} in {delta.events} event(s), {delta.writes} requests",
            graph=graph,
            member_pages=sum(1 for _, target, _ in requests if _lists_members(target)),
            written=self.tally.written,
            read=self.tally.read,
            seconds=delta.latencies[-1] if delta.latencies else time.monotonic() - started,
        )

    def add_member(self, standin: RemoteStandIn, group: str) -> None:
        """Add one user who is not a member yet to ``group``, in the cloud."""
        standin.tenant("add_members", group, [self.new_member(group)])

    def new_member(self, group: str) -> str:
        """A user who is not a member of ``group`` yet, counted as one from now."""
        present = self.members[group]
        while True:
            member = uid(self.small_users[self.rng.randrange(len(self.small_users))])
            if member not in present:
                break
        present.add(member)
        return member


def _lists_members(target: str) -> bool:
    """A request for a page of a group's member list (not its member delta)."""
    path = target.split("?", 1)[0]
    return "/members" in path and "delta" not in path


@dataclass(frozen=True)
class EventCost:
    ops: str
    graph: int
    #: Pages of the group's member list read (a full read); 0 when only deltas were.
    member_pages: int
    written: int
    read: int
    seconds: float

    @property
    def figures(self) -> str:
        return f"{self.graph} / {self.written} / {self.seconds:.2f}"


def diff(before: ServerStats, after: ServerStats) -> ServerStats:
    pairs = zip(after.latency_buckets, before.latency_buckets, strict=True)
    buckets = tuple(a - b for a, b in pairs)
    new_latencies = min(sum(buckets), len(after.latencies))
    operations = {
        kind: n - before.operations.get(kind, 0)
        for kind, n in after.operations.items()
        if n != before.operations.get(kind, 0)
    }
    return ServerStats(
        enqueued=after.enqueued - before.enqueued,
        events=after.events - before.events,
        confirmations=after.confirmations - before.confirmations,
        batches=after.batches - before.batches,
        operations=operations,
        writes=after.writes - before.writes,
        dead_lettered=after.dead_lettered - before.dead_lettered,
        # The pipeline keeps its latest latencies only: the new ones are the last ones.
        latencies=after.latencies[len(after.latencies) - new_latencies :],
        latency_sum=after.latency_sum - before.latency_sum,
        latency_buckets=buckets,
    )


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def fmt_ops(operations: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(operations.items())) or "none"


@dataclass(frozen=True)
class BurstRun:
    """One run of a burst: its write rate ÷ the plain loop's, its rows, its rate and stats."""

    ratio: float
    rows: list[tuple[str, str]]
    rate: float
    stats: ServerStats


def burst_name(size: int, latency: float) -> str:
    return f"burst {size} groups, Graph {latency * 1000:.0f} ms"


def fmt_latency(stats: ServerStats) -> str:
    p50, p99 = stats.percentile(50), stats.percentile(99)
    if p50 is None or p99 is None:
        return "n/a"
    return f"{p50 * 1000:.0f} / {p99 * 1000:.0f}"


def uid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench-user:{name}"))


def gid(n: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench-pipeline-group:{n}"))


def print_table(rows: list[tuple[str, str]]) -> None:
    print()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
