"""The worker on its own: real LocalQueue, real Graph stand-in, real Samba DC.

Each test enqueues envelopes as the webhook would and runs the worker until
the queue is idle, then reads AD back independently.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support.worker import run_once
from tests.support.world import World, make_world
from writeback.adapters.local_queue import LocalQueue
from writeback.domain.events import Change, GroupChanged
from writeback.ports import OutgoingMessage
from writeback.service.handle_event import EventOutcome, WorkerContext, event_deletes
from writeback_sandbox.samba import SambaDC


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with make_world(samba_dc, make_ou(samba_dc)) as w:
        yield w


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[LocalQueue]:
    with LocalQueue(tmp_path / "q.sqlite3", lock_duration=5, max_delivery_count=50) as q:
        yield q


_counter = iter(range(10**9))


def enqueue(queue: LocalQueue, gid: str, *, times: int = 1, body: bytes | None = None) -> None:
    messages = []
    for _ in range(times):
        n = next(_counter)
        event = GroupChanged(gid, Change.UPDATED, time.time(), f"n{n}")
        messages.append(OutgoingMessage(body or event.to_json(), f"m{n}", gid))
    queue.send(messages)


def drain(queue: LocalQueue, ctx: WorkerContext) -> list[EventOutcome]:
    outcomes = []
    while (outcome := run_once(queue, ctx, wait=0.05)) is not None:
        outcomes.append(outcome)
    return outcomes


def context(world: World) -> WorkerContext:
    return WorkerContext(world.cloud, world.directory, world.options, attempts=1)


SETTLE = 0.2


def confirming(world: World, queue: LocalQueue) -> WorkerContext:
    """A context that schedules its confirmation reads into ``queue``, ``SETTLE`` s ahead."""
    return replace(context(world), sender=queue, settle=SETTLE)


def drain_confirmed(queue: LocalQueue, ctx: WorkerContext) -> list[EventOutcome]:
    """Drain, confirmation reads included (they fall due ``SETTLE`` seconds later)."""
    outcomes = drain(queue, ctx)
    deadline = time.monotonic() + 10
    while queue.scheduled_count() and time.monotonic() < deadline:
        time.sleep(SETTLE / 4)
        outcomes += drain(queue, ctx)
    return outcomes


def test_a_burst_for_one_group_is_one_write(world: World, queue: LocalQueue) -> None:
    gid = world.add_group(1, "Burst", ["user0", "user1"])
    enqueue(queue, gid, times=5)
    [outcome] = drain(queue, context(world))
    assert (outcome.messages, outcome.settlement, outcome.ldap_requests) == (5, "completed", 1)
    assert outcome.latency is not None and outcome.latency >= 0
    entry = world.ad_entry(gid)
    assert entry is not None
    assert entry["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}
    assert queue.depth() == 0


def test_duplicates_and_replays_of_a_converged_group_write_nothing(
    world: World, queue: LocalQueue
) -> None:
    gid = world.add_group(2, "Steady", ["user0"])
    enqueue(queue, gid)
    drain(queue, context(world))
    enqueue(queue, gid, times=3)
    [outcome] = drain(queue, context(world))
    assert outcome.operation is None
    assert outcome.ldap_requests == 0


def test_each_change_is_one_operation_of_the_right_kind(world: World, queue: LocalQueue) -> None:
    ctx = confirming(world, queue)
    gid = world.add_group(3, "Lifecycle", ["user0"])
    kinds = []
    changes: list[Callable[[], None]] = [
        lambda: None,
        lambda: world.tenant.update_group(gid, description="now described"),
        lambda: world.tenant.add_members(gid, [world.uid("user2")]),
        lambda: world.tenant.hard_delete_group(gid),
    ]
    for change in changes:
        change()
        enqueue(queue, gid)
        outcomes = drain_confirmed(queue, ctx)
        assert {o.settlement for o in outcomes} == {"completed"}
        kinds.append([o.operation.kind for o in outcomes if o.operation])
    # The delete waits for a read SETTLE seconds later that finds the group still gone.
    assert kinds == [["add"], ["modify"], ["modify"], ["delete"]]
    assert world.ad_entry(gid) is None


def test_soft_deleted_group_keeps_its_object(world: World, queue: LocalQueue) -> None:
    gid = world.add_group(4, "Soft", ["user0"])
    enqueue(queue, gid)
    drain(queue, context(world))
    world.tenant.soft_delete_group(gid)
    enqueue(queue, gid)
    [outcome] = drain(queue, context(world))
    assert outcome.operation is None
    assert world.ad_entry(gid) is not None


def test_poison_and_over_limit_events_are_dead_lettered_with_reasons(
    world: World, queue: LocalQueue
) -> None:
    gid = world.add_group(5, "Big", ["user0", "user1", "user2"])
    enqueue(queue, gid, body=b"\xff not json")
    enqueue(queue, gid)
    ctx = replace(context(world), options=replace(world.options, member_limit=2))
    drain(queue, ctx)
    reasons = sorted(d.reason for d in queue.dead_letters())
    assert reasons == ["OverMemberLimit", "PoisonEvent"]
    assert world.ad_entry(gid) is None
    [over] = [d for d in queue.dead_letters() if d.reason == "OverMemberLimit"]
    assert "3 members, limit 2" in over.description
    queue.resubmit(over)
    drain(queue, context(world))
    assert world.ad_entry(gid) is not None


def test_ldap_down_abandons_and_nothing_is_lost(world: World, queue: LocalQueue) -> None:
    gid = world.add_group(6, "Outage", ["user0"])
    world.dc.stop()
    try:
        enqueue(queue, gid)
        [outcome] = drain(queue, context(world))
        assert outcome.settlement == "abandoned"
        assert outcome.error is not None and "LdapUnavailable" in outcome.error
        assert queue.dead_letters() == []
        assert queue.scheduled_count() == 1
    finally:
        world.dc.start()
    deadline = time.monotonic() + 30
    applied: list[EventOutcome] = []
    while not applied and time.monotonic() < deadline:
        applied = [o for o in drain(queue, context(world)) if o.settlement == "completed"]
        time.sleep(0.2)
    assert applied and applied[0].operation is not None
    assert world.ad_entry(gid) is not None
    assert queue.dead_letters() == []


def test_disabled_writeback_consumes_events_without_writing(
    world: World, queue: LocalQueue
) -> None:
    gid = world.add_group(7, "Off", ["user0"])
    enqueue(queue, gid)
    [outcome] = drain(queue, replace(context(world), enabled=False))
    assert outcome.settlement == "completed" and outcome.ldap_requests == 0
    assert world.ad_entry(gid) is None


def test_event_deletes_past_the_threshold_are_dead_lettered_not_made(
    world: World, queue: LocalQueue
) -> None:
    """Graph answering "gone" for live groups (a fault) deletes at most the threshold
    per 24 hours through events; the rest wait in the dead letters with the reason."""
    gids = [world.add_group(n, f"G{n}", ["user0"]) for n in range(3)]
    world.sync()
    for gid in gids:
        world.tenant.hard_delete_group(gid)
        enqueue(queue, gid)
    ctx = replace(confirming(world, queue), deletes=event_deletes(2))
    outcomes = [o for o in drain_confirmed(queue, ctx) if o.notifications == 0]  # confirmations
    assert sorted(o.settlement for o in outcomes) == ["completed", "completed", "dead-lettered"]
    [letter] = queue.dead_letters()
    assert letter.reason == "PolicyRefused"
    assert "delete limit reached" in letter.description
    assert "WRITEBACK_DELETE_THRESHOLD" in letter.description
    assert [world.ad_entry(gid) is None for gid in gids].count(True) == 2
