"""An event for a large group costs what changed, not the group's size.

Real Samba DC, real Graph stand-in, real LocalQueue and worker: after a first
event (full read, which stores the group's delta link), a one-member change to
a group of 3,000 members costs at most 3 Graph requests, reads no ``member``
value from AD, and writes one value; an expired link falls back to the full
read; a duplicate writes nothing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.support.worker import run_once
from tests.support.world import EXTENDED_DN, group_id, user_id
from writeback.adapters.delta_store import MemoryDeltaLinks, SqliteDeltaLinks
from writeback.adapters.directory import LdapDirectory
from writeback.adapters.graph import GraphCloud
from writeback.adapters.local_queue import LocalQueue
from writeback.domain.events import Change, GroupChanged
from writeback.domain.mapping import MappingOptions
from writeback.domain.model import Modify
from writeback.ports import OutgoingMessage, StoredLink
from writeback.service.handle_event import EventOutcome, WorkerContext
from writeback_sandbox.graph_standin import GraphStandIn, Tenant
from writeback_sandbox.samba import SambaDC

SIZE = 3000


@dataclass
class Big:
    dc: SambaDC
    ou: str
    sids: dict[str, str]
    standin: GraphStandIn
    cloud: GraphCloud
    directory: LdapDirectory
    options: MappingOptions
    token: str

    @property
    def tenant(self) -> Tenant:
        return self.standin.tenant

    def uid(self, n: int) -> str:
        return user_id(f"{self.token}:big{n}")

    def sid(self, n: int) -> str:
        return self.sids[f"{self.token}b{n}"]

    def ad_member_sids(self, gid: str) -> set[str]:
        conn = self.dc.connection()
        try:
            conn.search(
                self.ou, f"(adminDescription=Group_{gid})", attributes=["member"],
                controls=[EXTENDED_DN],
            )  # fmt: skip
            if not conn.entries:
                return set()
            values = conn.entries[0].entry_attributes_as_dict.get("member", [])
            return {
                part[5:-1]
                for value in values
                for part in str(value).split(";")
                if part.startswith("<SID=")
            }
        finally:
            conn.unbind()


@pytest.fixture(scope="module")
def big(samba_dc: SambaDC) -> Iterator[Big]:
    if not samba_dc.is_running():
        samba_dc.start()
    token = uuid.uuid4().hex[:6]
    root = samba_dc.create_ou(f"t-proportional-{token}")
    users_ou = samba_dc.create_ou("Users", root)
    names = [f"{token}b{n}" for n in range(SIZE + 5)]
    sids = samba_dc.create_users(users_ou, names, offline=False)
    tenant = Tenant()
    for n in range(SIZE + 5):
        tenant.add_user(user_id(f"{token}:big{n}"), sid=sids[f"{token}b{n}"], synced=True)
    groups_ou = samba_dc.create_ou("Writeback", root)
    directory = samba_dc.directory(groups_ou)
    with GraphStandIn(tenant) as standin:
        cloud = GraphCloud(base_url=standin.url)
        options = MappingOptions(
            target_ou=groups_ou, schema_attributes=directory.schema_attributes()
        )
        try:
            yield Big(samba_dc, groups_ou, sids, standin, cloud, directory, options, token)
        finally:
            cloud.close()
            directory.close()


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[LocalQueue]:
    with LocalQueue(tmp_path / "q.sqlite3", lock_duration=5, max_delivery_count=50) as q:
        yield q


_counter = iter(range(10**9))


def event(queue: LocalQueue, ctx: WorkerContext, gid: str) -> EventOutcome:
    n = next(_counter)
    body = GroupChanged(gid, Change.UPDATED, time.time(), f"p{n}").to_json()
    queue.send([OutgoingMessage(body, f"p{n}", gid)])
    outcome = run_once(queue, ctx, wait=0.05)
    assert outcome is not None and outcome.settlement == "completed", outcome
    return outcome


@dataclass(frozen=True)
class Cost:
    outcome: EventOutcome
    graph: int
    member_values_read: int

    @property
    def values_written(self) -> int:
        op = self.outcome.operation
        assert op is None or isinstance(op, Modify), op
        if op is None:
            return 0
        changes = op.changes
        return len(changes.add_members) + len(changes.remove_members) + len(changes.replace)


def measured(big: Big, queue: LocalQueue, ctx: WorkerContext, gid: str) -> Cost:
    big.standin.reset_log()
    before = big.directory.member_values_read
    outcome = event(queue, ctx, gid)
    return Cost(outcome, big.standin.count(), big.directory.member_values_read - before)


def make_group(big: Big, n: int) -> str:
    gid = group_id(n, f"proportional-{big.token}")
    big.tenant.add_group(gid, display_name=f"Big {n}", members=[big.uid(i) for i in range(SIZE)])
    return gid


SETTLE = 0.2


def context(big: Big, queue: LocalQueue) -> WorkerContext:
    """A worker that confirms its reads into ``queue`` ``SETTLE`` seconds later."""
    return WorkerContext(
        big.cloud, big.directory, big.options, attempts=1, sender=queue, settle=SETTLE
    )


def established(big: Big, queue: LocalQueue, ctx: WorkerContext, gid: str) -> Cost:
    """The group's first event (a full read, taking a delta link) and its confirmation
    (a full read that finds nothing to write, so the link is trusted from then on)."""
    first = measured(big, queue, ctx, gid)
    time.sleep(SETTLE * 1.5)
    confirmation = run_once(queue, ctx, wait=1.0)
    assert confirmation is not None and confirmation.settlement == "completed"
    assert confirmation.operation is None and confirmation.notifications == 0
    return first


def test_one_member_added_or_removed_costs_what_changed(big: Big, queue: LocalQueue) -> None:
    ctx = context(big, queue)
    gid = make_group(big, 1)
    first = established(big, queue, ctx, gid)
    assert first.outcome.operation is not None and first.outcome.operation.kind == "add"
    assert len(big.ad_member_sids(gid)) == SIZE

    big.tenant.add_members(gid, [big.uid(SIZE)])
    added = measured(big, queue, ctx, gid)
    assert added.graph <= 3, big.standin.requests
    assert added.member_values_read == 0
    assert added.values_written == 1
    assert added.outcome.ldap_requests == 1
    assert big.sid(SIZE) in big.ad_member_sids(gid)

    big.tenant.remove_members(gid, [big.uid(7)])
    removed = measured(big, queue, ctx, gid)
    assert removed.graph <= 3, big.standin.requests
    assert (removed.member_values_read, removed.values_written) == (0, 1)
    members = big.ad_member_sids(gid)
    assert big.sid(7) not in members and len(members) == SIZE

    duplicate = measured(big, queue, ctx, gid)
    assert duplicate.outcome.operation is None
    assert (duplicate.outcome.ldap_requests, duplicate.member_values_read) == (0, 0)
    assert duplicate.graph <= 2


def test_properties_and_members_together_are_one_modify(big: Big, queue: LocalQueue) -> None:
    ctx = context(big, queue)
    gid = make_group(big, 2)
    established(big, queue, ctx, gid)
    big.tenant.update_group(gid, description="described now")
    big.tenant.add_members(gid, [big.uid(SIZE + 1), big.uid(SIZE + 2)])
    big.tenant.remove_members(gid, [big.uid(0)])
    cost = measured(big, queue, ctx, gid)
    assert cost.graph <= 3 and cost.member_values_read == 0
    assert cost.outcome.ldap_requests == 1
    assert cost.values_written == 4  # description + 2 adds + 1 removal
    members = big.ad_member_sids(gid)
    assert {big.sid(SIZE + 1), big.sid(SIZE + 2)} <= members and big.sid(0) not in members


def test_an_expired_link_falls_back_to_the_full_read(big: Big, queue: LocalQueue) -> None:
    ctx = context(big, queue)
    gid = make_group(big, 3)
    established(big, queue, ctx, gid)
    big.tenant.expire_delta_tokens()
    big.tenant.add_members(gid, [big.uid(SIZE + 3)])
    full = measured(big, queue, ctx, gid)
    assert full.member_values_read >= SIZE  # read in full again
    assert full.values_written == 1
    assert big.sid(SIZE + 3) in big.ad_member_sids(gid)
    # ...and, once its confirmation proves the link it stored, the next change is cheap.
    time.sleep(SETTLE * 1.5)
    proved = run_once(queue, ctx, wait=1.0)
    assert proved is not None and proved.operation is None
    big.tenant.remove_members(gid, [big.uid(SIZE + 3)])
    cheap = measured(big, queue, ctx, gid)
    assert (cheap.member_values_read, cheap.values_written) == (0, 1)
    assert cheap.graph <= 3
    assert big.sid(SIZE + 3) not in big.ad_member_sids(gid)


def test_a_member_already_in_ad_is_not_written_twice(big: Big, queue: LocalQueue) -> None:
    """A replayed delta (its write done, the link not yet stored) converges without error."""
    links = MemoryDeltaLinks()
    ctx = replace(context(big, queue), links=links)
    gid = make_group(big, 4)
    established(big, queue, ctx, gid)
    stale = links.get(gid)
    assert stale is not None
    big.tenant.add_members(gid, [big.uid(SIZE + 4)])
    event(queue, ctx, gid)
    links.put(gid, stale)  # as if the link had not been stored after the write
    again = measured(big, queue, ctx, gid)
    assert again.outcome.settlement == "completed"
    members = big.ad_member_sids(gid)
    assert big.sid(SIZE + 4) in members and len(members) == SIZE + 1


def test_near_the_member_limit_the_full_read_decides(big: Big, queue: LocalQueue) -> None:
    ctx = replace(context(big, queue), options=replace(big.options, member_limit=SIZE))
    gid = make_group(big, 5)
    event(queue, ctx, gid)
    big.tenant.add_members(gid, [big.uid(SIZE)])
    n = next(_counter)
    body = GroupChanged(gid, Change.UPDATED, time.time(), f"p{n}").to_json()
    queue.send([OutgoingMessage(body, f"p{n}", gid)])
    outcome = run_once(queue, ctx, wait=0.05)
    assert outcome is not None and outcome.settlement == "dead-lettered"
    assert outcome.error is not None and "OverMemberLimit" in outcome.error
    assert len(big.ad_member_sids(gid)) == SIZE


def test_without_a_link_store_every_event_reads_in_full(big: Big, queue: LocalQueue) -> None:
    ctx = replace(context(big, queue), links=None)
    gid = make_group(big, 6)
    event(queue, ctx, gid)
    big.tenant.add_members(gid, [big.uid(SIZE)])
    cost = measured(big, queue, ctx, gid)
    assert cost.member_values_read >= SIZE and cost.values_written == 1


def test_standin_filters_a_groups_delta_to_one_group(big: Big) -> None:
    gid = make_group(big, 7)
    other = make_group(big, 8)
    link = big.cloud.group_delta_link(gid)
    assert link is not None
    big.tenant.add_members(gid, [big.uid(SIZE)])
    big.tenant.add_members(other, [big.uid(SIZE)])
    delta = big.cloud.group_delta(gid, link)
    assert delta is not None and delta.group is not None
    assert [m.id for m in delta.added] == [big.uid(SIZE)] and delta.removed == ()
    assert delta.group.display_name == "Big 7"
    users = big.cloud.resolve_users([big.uid(i) for i in range(40)] + ["no-such-user"])
    assert len(users) == 40 and users[big.uid(3)].sid == big.sid(3)
    big.tenant.expire_delta_tokens()
    assert big.cloud.group_delta(gid, link) is None


def test_link_stores_keep_and_forget(tmp_path: Path) -> None:
    memory = MemoryDeltaLinks(capacity=2)
    for n in range(3):
        memory.put(f"g{n}", StoredLink(f"link{n}", n))
    assert memory.get("g0") is None and memory.get("g2") == StoredLink("link2", 2)
    with SqliteDeltaLinks(tmp_path / "links.sqlite3") as store:
        store.put("g", StoredLink("a", 1))
        store.put("g", StoredLink("b", 2))
        assert store.get("g") == StoredLink("b", 2)
        store.forget("g")
        assert store.get("g") is None
    with SqliteDeltaLinks(tmp_path / "links.sqlite3") as reopened:
        reopened.put("h", StoredLink("c", 3))
    with SqliteDeltaLinks(tmp_path / "links.sqlite3") as reopened:
        assert reopened.get("h") == StoredLink("c", 3)


def test_a_full_read_asks_for_a_delta_link_only_where_the_group_may_be_large(
    big: Big, queue: LocalQueue
) -> None:
    """A link costs a Graph request and a round trip before the read, and a small
    group throws it away: with nothing stored (after a restart, or after a
    reconcile wrote the group), AD's size decides; a group AD lacks may be large."""
    small = group_id(9, f"proportional-{big.token}")
    big.tenant.add_group(small, display_name="Small", members=[big.uid(i) for i in range(5)])
    large = make_group(big, 10)

    def fresh() -> WorkerContext:
        return replace(context(big, queue), links=MemoryDeltaLinks())

    for gid in (small, large):
        new = measured(big, queue, fresh(), gid)
        assert new.outcome.operation is not None and new.outcome.operation.kind == "add"
        assert big.standin.count("/groups/delta") == 1  # not in AD yet: its size unknown

    big.tenant.add_members(small, [big.uid(SIZE)])
    known_small = measured(big, queue, fresh(), small)
    assert big.standin.count("/groups/delta") == 0, big.standin.requests
    assert known_small.values_written == 1 and big.sid(SIZE) in big.ad_member_sids(small)

    big.tenant.add_members(large, [big.uid(SIZE)])
    known_large = measured(big, queue, fresh(), large)
    assert big.standin.count("/groups/delta") == 1
    assert known_large.values_written == 1 and big.sid(SIZE) in big.ad_member_sids(large)
