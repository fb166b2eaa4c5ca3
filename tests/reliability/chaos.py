"""A stream of cloud changes through single-machine mode while faults are injected.

Everything is real: the Graph stand-in POSTs change notifications to the
server's HTTP webhook, the SQLite queue holds them, worker threads write to a
Samba DC. Faults come from the test side only:

* Graph answers 429 (with Retry-After) and 503 on a share of calls (stand-in
  fault hooks);
* the DC is stopped mid-stream and started again;
* notifications are POSTed again (duplicates) and late, older ones are POSTed
  after newer ones (reordered);
* workers crash between the LDAP write and the acknowledgement, two ways: a
  worker in a child process SIGKILLed right after its write (its lock has to
  expire), and an error raised in-process after ``directory.apply`` and before
  ``queue.complete`` (the server puts the batch back);
* poison messages go straight into the queue, and a few groups are over the
  member limit (dead-lettered until the limit is raised and they are replayed).

Afterwards AD is read over the harness's own admin connection and compared
with the tenant group by group. :func:`run_chaos` returns the figures;
``tests/reliability/test_chaos.py`` asserts on them.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ldap3 import SUBTREE

from tests.reliability.crash_worker import AfterWrite
from tests.support.world import EXTENDED_DN, World, user_id
from writeback.adapters.directory import LdapDirectory
from writeback.adapters.graph import GraphCloud
from writeback.adapters.local_queue import LocalQueue
from writeback.domain.model import Operation
from writeback.hosting.serve import ServeConfig, Server
from writeback.ports import Directory, OutgoingMessage
from writeback.service.reconcile import SyncPolicy, plan_sync
from writeback.service.replay import ReplayFilter, replay

CLIENT_STATE = "chaos-client-state-for-tests"
LOCK_SECONDS = 4.0
MAX_DELIVERIES = 60
#: Dead-letter reasons this run may leave behind: the poison messages and the
#: groups over the member limit. Anything else means a fault was not absorbed.
EXPECTED_REASONS = frozenset({"PoisonEvent", "OverMemberLimit"})
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

FAST = ServeConfig(
    settle=0.3,
    workers=2,
    reconcile_at_start=False,
    reconcile_interval=3600,
    subscription_interval=3600,
    retry_delay=0.2,
    attempts=2,
    max_wait=0.2,
    redelivery_scale=0.05,
    max_redelivery_delay=0.5,
    receive_wait=0.1,
)


@dataclass(frozen=True)
class ChaosConfig:
    events: int = 300
    groups: int = 100
    seed: int = 7
    #: Cloud changes per second while streaming (the queue absorbs the rest).
    rate: float = 150.0
    member_limit: int = 12
    over_limit_groups: int = 2
    throttle_rate: float = 0.08
    unavailable_rate: float = 0.04
    dc_outage_seconds: float = 3.0
    crashes: int = 2
    errors_after_write: int = 3
    poison: int = 3
    duplicate_every: int = 15
    reorder_every: int = 20


@dataclass
class ChaosReport:
    events: int = 0
    notifications_posted: int = 0
    enqueued: int = 0
    events_completed: int = 0
    ldap_writes: int = 0
    #: Messages put back with a delay after a fault (DC down, Graph retries exhausted).
    put_back: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    groups_checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    dead_letters: Counter[str] = field(default_factory=Counter)
    dead_letters_without_reason: int = 0
    replayed: int = 0
    mismatches_after_replay: list[str] = field(default_factory=list)
    dead_letters_after_replay: Counter[str] = field(default_factory=Counter)
    writes_planned_after: int = -1
    seconds: float = 0.0

    def lines(self) -> list[str]:
        faults = ", ".join(f"{kind} {n}" for kind, n in sorted(self.faults.items()))
        return [
            f"events (cloud changes): {self.events}; notification POSTs by the stand-in: "
            f"{self.notifications_posted}; messages enqueued: {self.enqueued}; "
            f"events completed: {self.events_completed}; LDAP writes: {self.ldap_writes}; "
            f"messages put back after a fault: {self.put_back}",
            f"faults injected: {faults}",
            f"groups checked: {self.groups_checked}; mismatches: {len(self.mismatches)}",
            f"dead letters: {_counts(self.dead_letters)}",
            f"replayed after raising the member limit: {self.replayed}; mismatches then: "
            f"{len(self.mismatches_after_replay)}; dead letters then: "
            f"{_counts(self.dead_letters_after_replay)}",
            f"writes a full sync plans afterwards: {self.writes_planned_after}",
            f"seconds: {self.seconds:.1f}",
            *(f"mismatch: {line}" for line in self.mismatches[:5]),
            *(f"mismatch after replay: {line}" for line in self.mismatches_after_replay[:5]),
        ]


def _counts(counter: Counter[str]) -> str:
    total = sum(counter.values())
    return f"{total} ({', '.join(f'{k} {n}' for k, n in sorted(counter.items())) or 'none'})"


# --------------------------------------------------------------------------- injected crashes


class ErrorAfterWrite(AfterWrite):
    """Chosen writes raise after they reached AD, before the acknowledgement."""

    def __init__(self, inner: LdapDirectory, budget: _Budget) -> None:
        super().__init__(inner)
        self.budget = budget

    def after_write(self, operation: Operation) -> None:
        if self.budget.take():
            raise InjectedCrash(f"injected after the write to {operation.group_id}")


class InjectedCrash(RuntimeError):
    """Stands for the process dying between the LDAP write and the acknowledgement."""


class _Budget:
    """Every ``every``-th write fails, ``total`` times at most (thread-safe)."""

    def __init__(self, total: int, every: int) -> None:
        self._left, self._every, self._seen = total, every, 0
        self._lock = threading.Lock()
        self.spent = 0

    def take(self) -> bool:
        with self._lock:
            self._seen += 1
            if self._left <= 0 or self._seen % self._every:
                return False
            self._left -= 1
            self.spent += 1
            return True


# --------------------------------------------------------------------------- the run


class Chaos:
    """One run: a server under faults, the check, then the limit raised and a replay.

    ``members`` mirrors what the tenant holds per group, so every change the
    stream makes is a real one (one notification each)."""

    def __init__(self, world: World, tmp: Path, config: ChaosConfig) -> None:
        self.world = world
        self.tmp = tmp
        self.config = config
        self.rng = random.Random(config.seed)
        self.report = ChaosReport()
        self.budget = _Budget(config.errors_after_write, every=11)
        self.users = sorted(world.sids)
        self.members: dict[str, set[str]] = {}
        self.deleted: set[str] = set()
        self.crasher: threading.Thread | None = None
        self.children: list[subprocess.Popen[bytes]] = []
        self.graph_url = world.standin.url

    @property
    def queue_path(self) -> Path:
        return self.tmp / "queue.sqlite3"

    def gid(self, n: int) -> str:
        return self.world.gid(n)

    def start(self, member_limit: int) -> Server:
        world, budget = self.world, self.budget
        queue = LocalQueue(
            self.queue_path, lock_duration=LOCK_SECONDS, max_delivery_count=MAX_DELIVERIES
        )
        cloud = GraphCloud(base_url=self.graph_url, backoff=0.05, max_wait=1.0)

        def directory() -> Directory:
            return ErrorAfterWrite(world.dc.directory(world.ou), budget)

        server = Server(
            queue=queue,
            cloud=cloud,
            directory_factory=directory,
            options=replace(world.options, member_limit=member_limit),
            client_states=[CLIENT_STATE],
            config=replace(FAST, state_path=str(self.tmp / "state.json")),
            owned=[queue, cloud],
        )
        server.start()
        assert server.wait_ready(60), "the server did not start"
        return server

    def run(self) -> ChaosReport:
        started = time.monotonic()
        server = self.start(self.config.member_limit)
        try:
            self.children = [self.spawn_crash_worker() for _ in range(self.config.crashes)]
            self.stream(server)
            self.settle(server)
            self.check(server)
        finally:
            for child in self.children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
            server.stop()
            self.world.standin.clear_faults()
        server = self.start(self.config.member_limit * 100)
        try:
            self.fix_and_replay(server)
        finally:
            server.stop()
        self.report.seconds = time.monotonic() - started
        return self.report

    # ----------------------------------------------------------------- stream

    def stream(self, server: Server) -> None:
        config, standin = self.config, self.world.standin
        standin.inject(429, rate=config.throttle_rate, retry_after=0.05, seed=config.seed)
        standin.inject(503, rate=config.unavailable_rate, seed=config.seed + 1)
        for n in range(config.over_limit_groups):
            self.create(config.groups + n, size=config.member_limit + 2)
        stop_at, start_at = int(config.events * 0.4), int(config.events * 0.7)
        crash_at = _while_up(config, stop_at, start_at)
        interval, begun = 1.0 / config.rate, time.monotonic()
        down_since = 0.0
        for n in range(config.over_limit_groups, config.events):
            if n in crash_at:
                self.crash_a_worker(server)
            if n == stop_at:
                self.world.dc.stop()
                down_since = time.monotonic()
                self.report.faults["DC stopped and restarted"] += 1
            if n == start_at:
                time.sleep(max(0.0, down_since + config.dc_outage_seconds - time.monotonic()))
                self.world.dc.start()
            if n == config.events // 2:
                self.send_poison(server)
            self.change()
            self.disturb_delivery(server, n)
            time.sleep(max(0.0, begun + (n + 1) * interval - time.monotonic()))
        self.report.events = config.events

    def change(self) -> None:
        """One real change in the tenant (so exactly one notification)."""
        n = self.rng.randrange(self.config.groups)
        gid = self.gid(n)
        if gid in self.deleted:
            n = (n + 1) % self.config.groups
            gid = self.gid(n)
        if gid in self.deleted:
            return self.change()
        if gid not in self.members:
            return self.create(n, size=self.rng.randint(1, 4))
        roll = self.rng.random()
        present = self.members[gid]
        if roll < 0.35 and len(present) < self.config.member_limit - 2:
            return self.add_member(gid)
        if roll < 0.6 and present:
            member = self.rng.choice(sorted(present))
            present.discard(member)
            return self.world.tenant.remove_members(gid, [member])
        if roll < 0.97 or len(self.deleted) >= self.config.groups // 20:
            field_name = "display_name" if roll < 0.8 else "description"
            value = f'{field_name} {self.rng.randrange(10**9)} ,+"<>;#é'
            return self.world.tenant.update_group(gid, **{field_name: value})
        self.deleted.add(gid)
        return self.world.tenant.hard_delete_group(gid)

    def create(self, n: int, *, size: int) -> None:
        gid = self.gid(n)
        names = self.rng.sample(self.users, size)
        self.members[gid] = {user_id(name) for name in names}
        cloud_only = [user_id("cloudonly")] if self.rng.random() < 0.3 else []
        self.world.tenant.add_group(
            gid,
            display_name=f"Chaos {n}",
            description=f"group {n}",
            members=[*self.members[gid], *cloud_only],
        )

    def add_member(self, gid: str) -> None:
        present = self.members[gid]
        candidates = [u for u in self.users if user_id(u) not in present]
        member = user_id(self.rng.choice(candidates))
        present.add(member)
        self.world.tenant.add_members(gid, [member])

    # ----------------------------------------------------------------- disturbances

    def disturb_delivery(self, server: Server, n: int) -> None:
        """Now and then POST an earlier notification again, or an older one late."""
        config = self.config
        delivered = [
            d
            for d in list(self.world.standin.deliveries)
            if d.kind == "notification" and d.status == 202
        ]
        if not delivered:
            return
        if n % config.duplicate_every == 0:
            body = self.rng.choice(delivered).body
            self.post(server, body, "duplicate notification POSTs")
        if n % config.reorder_every == 0:
            document = json.loads(self.rng.choice(delivered).body)
            for item in document["value"]:
                data = item["resourceData"]
                data["eventTime"] = "2001-01-01T00:00:00.0000000Z"  # older than any change
                data["sequenceNumber"] = -n
            self.post(server, json.dumps(document).encode(), "late, out-of-order notifications")

    def post(self, server: Server, body: bytes, kind: str) -> None:
        request = urllib.request.Request(  # noqa: S310 - loopback http in tests
            server.notification_url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with _OPENER.open(request, timeout=5) as answer:
                status = int(answer.status)
        except urllib.error.HTTPError as error:
            error.close()
            status = error.code
        assert status == 202, f"the webhook answered {status} to a {kind} POST"
        self.report.faults[kind] += 1

    def send_poison(self, server: Server) -> None:
        gid = self.gid(0)
        bodies = [b"\x00not json", b'{"version": 99}', b'{"version": 1, "group_id": 5}']
        for n in range(self.config.poison):
            body = bodies[n % len(bodies)]
            server.queue.send([OutgoingMessage(body, f"poison-{n}", gid)])
        self.report.faults["poison messages"] += self.config.poison

    def crash_a_worker(self, server: Server) -> None:
        """In the background: hold the server's workers so the next waiting child-process
        worker (connected already) takes the next sessions and dies after its first write."""
        if self.crasher is not None:
            self.crasher.join()
        child = next(child for child in self.children if child.stdin and not child.stdin.closed)

        def crash() -> None:
            server.pause()
            try:
                assert child.stdin is not None
                child.stdin.write(b"go\n")
                child.stdin.close()
                child.wait(60)
            finally:
                server.resume()
            if child.returncode == -9:
                self.report.faults["worker killed after its LDAP write (child process)"] += 1

        self.crasher = threading.Thread(target=crash, name="chaos-crasher", daemon=True)
        self.crasher.start()

    def spawn_crash_worker(self) -> subprocess.Popen[bytes]:
        """A worker in a child process, connected and waiting for its ``go``."""
        dc, world = self.world.dc, self.world
        spec = {
            "queue": str(self.queue_path),
            "lock_duration": LOCK_SECONDS,
            "max_delivery_count": MAX_DELIVERIES,
            "graph_url": self.graph_url,
            "member_limit": self.config.member_limit,
            "seconds": 120,
            "ldap": {
                "url": dc.ldaps_url,
                "user": dc.admin_dn,
                "password": dc.admin_password,
                "target_ou": world.ou,
                "ca_file": dc.ca_file,
            },
        }
        with (self.tmp / "crash-worker.log").open("ab") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "tests.reliability.crash_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps(spec).encode() + b"\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == b"ready", "the crash worker did not connect"
        return child

    # ----------------------------------------------------------------- the end

    def settle(self, server: Server) -> None:
        if not self.world.dc.is_running():
            self.world.dc.start()
        assert self.world.standin.wait_idle(120), "the stand-in still has notifications"
        if self.crasher is not None:
            self.crasher.join(90)
        assert server.wait_idle(180), "the pipeline did not go idle"
        stats = server.stats
        self.report.notifications_posted = sum(
            1 for d in self.world.standin.deliveries if d.kind == "notification"
        )
        self.report.enqueued = stats.enqueued
        self.report.events_completed = stats.events
        self.report.ldap_writes = stats.writes
        self.report.put_back = stats.abandoned
        statuses = Counter(status for _, _, status in self.world.standin.requests)
        self.report.faults["Graph 429 with Retry-After"] = statuses[429]
        self.report.faults["Graph 503"] = statuses[503]
        self.report.faults["error after LDAP write, before ack (in process)"] = self.budget.spent
        self.report.faults[f"groups over the member limit ({self.config.member_limit})"] = (
            self.config.over_limit_groups
        )

    def check(self, server: Server) -> None:
        over = {self.gid(self.config.groups + n) for n in range(self.config.over_limit_groups)}
        self.report.groups_checked = len(self.members)
        self.report.mismatches = compare(self.world, skip=over)
        written = over & set(ad_groups(self.world))
        self.report.mismatches += [f"{gid}: over the member limit but written" for gid in written]
        letters = server.queue.dead_letters()
        self.report.dead_letters = Counter(letter.reason for letter in letters)
        self.report.dead_letters_without_reason = sum(1 for d in letters if not d.description)

    def fix_and_replay(self, server: Server) -> None:
        """The member limit raised and every dead letter replayed: all converges,
        only the poison messages come back to the dead letters."""
        moved = replay(server.queue, ReplayFilter())
        self.report.replayed = sum(1 for item in moved.items if item.moved)
        assert server.wait_idle(120), "the replayed events did not settle"
        self.report.mismatches_after_replay = compare(self.world)
        letters = server.queue.dead_letters()
        self.report.dead_letters_after_replay = Counter(d.reason for d in letters)
        options = replace(self.world.options, member_limit=self.config.member_limit * 100)
        directory = self.world.dc.directory(self.world.ou)  # the world's own saw the DC stop
        try:
            plan = plan_sync(self.world.cloud, directory, options, SyncPolicy())
        finally:
            directory.close()
        self.report.writes_planned_after = len(plan.operations)


def _while_up(config: ChaosConfig, stop_at: int, start_at: int) -> set[int]:
    """Where the child workers start: spread over the stream outside the DC outage,
    so the generator (which starts the DC again) never waits on a child that waits
    for the DC."""
    uptime = config.events - (start_at - stop_at)
    points = set()
    for k in range(config.crashes):
        at = uptime * (k + 1) // (config.crashes + 1)
        points.add(at if at < stop_at else at + start_at - stop_at + 1)
    return points


# --------------------------------------------------------------------------- comparison


def ad_groups(world: World) -> dict[str, dict[str, Any]]:
    """Every anchored object under the OU, read over the harness's admin connection."""
    conn = world.dc.connection()
    try:
        entries = conn.extend.standard.paged_search(
            world.ou,
            "(adminDescription=Group_*)",
            SUBTREE,
            attributes=["adminDescription", "displayName", "description", "member"],
            controls=[EXTENDED_DN],
            paged_size=500,
            generator=False,
        )
        found = {}
        for entry in entries:
            attributes = entry.get("attributes", {})
            anchor = str(_single(attributes["adminDescription"]))
            sids = {
                part[5:-1]
                for value in attributes.get("member", [])
                for part in str(value).split(";")
                if part.startswith("<SID=")
            }
            found[anchor.removeprefix("Group_")] = {
                "displayName": _single(attributes.get("displayName")),
                "description": _single(attributes.get("description")),
                "member_sids": sids,
            }
        return found
    finally:
        conn.unbind()


def _single(value: object) -> str | None:
    if isinstance(value, list):
        return str(value[0]) if value else None
    return None if value is None else str(value)


def cloud_groups(world: World) -> dict[str, dict[str, Any]]:
    """What AD should hold for every live group of the tenant."""
    sid_of_user = {user_id(name): sid for name, sid in world.sids.items()}
    wanted = {}
    for gid in world.tenant.unified_group_ids():
        props = world.tenant.group_properties(gid)
        members = world.tenant.member_ids(gid)
        wanted[gid] = {
            "displayName": props["displayName"],
            "description": props["description"],
            "member_sids": {sid_of_user[m] for m in members if m in sid_of_user},
        }
    return wanted


def compare(world: World, *, skip: set[str] | None = None) -> list[str]:
    """One line per group whose AD object differs from the cloud (or should not exist)."""
    skip = skip or set()
    have, want = ad_groups(world), cloud_groups(world)
    mismatches = []
    for gid in sorted((set(have) | set(want)) - skip):
        if have.get(gid) != want.get(gid):
            mismatches.append(f"{gid}: AD {have.get(gid)!r} != cloud {want.get(gid)!r}")
    return mismatches
