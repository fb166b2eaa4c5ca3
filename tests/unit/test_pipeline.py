"""The pipeline's rules on in-memory ports (tests/support/memory), through its public API.

How an event becomes a write (coalescing, one write per group, covered
messages), how failures settle (in-process retries, redelivery delays,
dead-letter reasons, the delete budget, pause, configuration errors,
unexpected exceptions, settle failures), control messages, the reconcile
schedule and the subscription upkeep. The same rules run against Samba, the
Graph stand-in and LocalQueue in tests/integration; here each takes
milliseconds.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from tests.support.memory.world import MemoryWorld, memory_world, object_id
from writeback.adapters.directory import LdapRefused
from writeback.domain.events import CONTROL_SESSION, ControlRequest
from writeback.domain.mapping import MappingOptions
from writeback.domain.naming import sam_account_name_for
from writeback.errors import (
    ConfigError,
    GraphThrottled,
    GraphUnavailable,
    LdapUnavailable,
    QueueUnavailable,
)
from writeback.ports import OutgoingMessage
from writeback.service.handle_event import DELTA_MIN_MEMBERS, EventOutcome
from writeback.service.notifications import MISSED, REAUTHORIZATION_REQUIRED, SUBSCRIPTION_REMOVED
from writeback.service.pipeline import LATENCY_BUCKETS, SettlementFailed
from writeback.service.reconcile import SyncPolicy
from writeback.service.subscriptions import Action

SUBSCRIBED: dict[str, Any] = {
    "notification_url": "https://writeback.example/api/notifications?code=key",
    "lifecycle_url": "https://writeback.example/api/lifecycle?code=key",
    "client_state": "client-state-for-tests",
}


@pytest.fixture
def world() -> MemoryWorld:
    return memory_world(**SUBSCRIBED)


def reads(world: MemoryWorld) -> int:
    """Group reads from the cloud, full or by member delta."""
    return world.cloud.calls["get_group"] + world.cloud.calls["group_delta"]


def settled(world: MemoryWorld, action: str) -> list[str]:
    return [s.message_id for s in world.queue.settlements if s.action == action]


def delays(world: MemoryWorld, action: str = "abandon") -> list[float]:
    return [s.delay for s in world.queue.settlements if s.action == action]


def dead(world: MemoryWorld) -> list[tuple[str, str]]:
    return [(d.reason, d.description) for d in world.queue.dead_letters()]


def converged(world: MemoryWorld, name: str, *members: str) -> str:
    """A group with these (synced) members, written to AD by one event."""
    gid = world.group(name, world.users(*members))
    world.notify(gid)
    world.drain()
    assert world.ad_members(gid) == set(members)
    return gid


def empty(world: MemoryWorld) -> bool:
    return world.queue.depth() == 0 and world.queue.scheduled_count() == 0


def confirmed(world: MemoryWorld) -> list[EventOutcome]:
    """Let the settle interval pass until no confirmation read is left to make."""
    outcomes: list[EventOutcome] = []
    for _ in range(10):
        if not world.queue.scheduled_count():
            break
        outcomes += world.later(world.config.settle)
    return outcomes


# =========================================================================== coalescing


def test_a_burst_for_one_group_is_one_batch_one_read_one_write(world: MemoryWorld) -> None:
    gid = world.group("Sales", world.users("ann", "bob"))
    world.queue.send([world.event(gid) for _ in range(25)])

    outcomes = world.drain()

    assert [(o.group_id, o.messages, o.settlement) for o in outcomes] == [(gid, 25, "completed")]
    assert world.directory.calls["apply"] == 1
    assert world.cloud.calls["get_group"] == 1
    assert world.ad_members(gid) == {"ann", "bob"}
    stats = world.pipeline.stats
    assert (stats.events, stats.batches, stats.operations) == (25, 1, {"add": 1})
    assert len(settled(world, "complete")) == 25
    assert world.queue.scheduled_count() == 1  # one confirmation read for the burst
    (check,) = confirmed(world)
    assert (check.notifications, check.operation) == (0, None)  # it agreed: nothing written
    assert world.cloud.calls["get_group"] == 2 and world.directory.calls["apply"] == 1
    assert empty(world) and dead(world) == []


def test_each_group_of_a_batch_gets_one_operation(world: MemoryWorld) -> None:
    gids = [world.group(f"G{i}", world.users(f"u{i}")) for i in range(3)]
    world.queue.send([world.event(gid) for _ in range(4) for gid in gids])  # interleaved
    received = [m for _ in gids for m in world.queue.receive_session(100, 0)]
    assert {m.session_id for m in received} == set(gids)

    outcomes = world.pipeline.handle(world.queue, received)

    assert sorted((o.group_id, o.messages, o.settlement) for o in outcomes) == sorted(
        (gid, 4, "completed") for gid in gids
    )
    assert world.directory.calls["apply"] == 3
    assert all(world.ad(gid) is not None for gid in gids)
    assert world.queue.depth() == 0


def test_a_converged_group_is_not_written_again_and_a_change_is_one_write(
    world: MemoryWorld,
) -> None:
    gid = converged(world, "Team", "ann", "bob")
    writes = world.directory.calls["apply"]

    world.notify(gid)  # a duplicate, a replay, a stale event: nothing to do
    (again,) = world.drain()
    assert (again.settlement, again.operation) == ("completed", None)
    assert world.directory.calls["apply"] == writes
    assert world.pipeline.stats.unchanged == 1

    carl = world.user("carl")
    world.cloud.add_members(gid, [carl])
    world.cloud.update_group(gid, description="now with Carl")
    world.queue.send([world.event(gid) for _ in range(5)])
    (change,) = world.drain()
    assert change.operation is not None and change.operation.kind == "modify"
    assert world.directory.calls["apply"] == writes + 1
    assert world.ad_members(gid) == {"ann", "bob", "carl"}
    entry = world.ad(gid)
    assert entry is not None and entry.get("description") == ("now with Carl",)


def test_messages_accepted_before_a_completed_read_need_no_read_of_their_own(
    world: MemoryWorld,
) -> None:
    gid = world.group("Covered", world.users("ann"))
    before = world.clock() - 5
    world.queue.send([world.event(gid, received_at=before + i) for i in range(3)])

    first = world.pipeline.handle_next(world.queue, max_messages=1, wait=0)
    assert first is not None and first[0].settlement == "completed"
    read_once = reads(world)
    later = world.drain(max_messages=1)  # the two others, one batch each, accepted before

    assert [o.settlement for o in later] == ["completed", "completed"]
    assert reads(world) == read_once
    assert world.pipeline.stats.covered == 2
    assert world.queue.depth() == 0

    world.notify(gid, received_at=world.clock() + 1)  # accepted after that read
    world.drain()
    assert reads(world) == read_once + 1
    assert world.pipeline.stats.covered == 2


def test_member_changes_of_a_large_group_are_read_as_deltas_after_a_full_read(
    world: MemoryWorld,
) -> None:
    """A group of DELTA_MIN_MEMBERS members or more: its first full read takes a delta
    link, which its confirmation (a full read that finds nothing to write) proves;
    from then on a member change, and its confirmation, cost a delta round each."""
    names = [f"m{i}" for i in range(DELTA_MIN_MEMBERS)]
    gid = converged(world, "Delta", *names)
    link = world.links.get(gid)
    assert link is not None and link.delta_link and not link.trusted
    confirmed(world)
    proved = world.links.get(gid)
    assert proved is not None and proved.trusted and proved.delta_link == link.delta_link
    full_reads = world.cloud.calls["get_group"]
    assert full_reads == 2
    world.cloud.remove_members(gid, [object_id("user:m0")])
    world.cloud.add_members(gid, [world.user("carl")])

    world.notify(gid)
    world.drain()

    assert world.cloud.calls["get_group"] == full_reads  # no full read for the event
    assert world.cloud.calls["group_delta"] == 1
    assert world.ad_members(gid) == {*names[1:], "carl"}
    confirmed(world)  # the confirmation goes by delta too (the link is trusted)
    assert (world.cloud.calls["get_group"], world.cloud.calls["group_delta"]) == (full_reads, 2)


def test_a_lagging_full_read_never_leaves_a_trusted_link_ahead_of_it(world: MemoryWorld) -> None:
    """The link Graph gives as of now may be ahead of the replica that served the full
    read; a change in between would never show in a delta from it. The confirmation's
    full read catches the change and does not trust that link."""
    names = [f"m{i}" for i in range(DELTA_MIN_MEMBERS)]
    gid = world.group("Lagging big", world.users(*names))
    world.cloud.lag(gid)  # the first read answers as now...
    world.cloud.add_members(gid, [world.user("late")])  # ...missing this member
    world.notify(gid)
    world.drain()
    assert "late" not in world.ad_members(gid)
    confirmed(world)
    assert "late" in world.ad_members(gid)
    link = world.links.get(gid)
    assert link is not None and link.trusted  # proved by the confirmation that agreed


def test_a_small_group_is_read_in_full_and_keeps_no_delta_link(world: MemoryWorld) -> None:
    gid = converged(world, "Small", "ann", "bob")
    world.cloud.add_members(gid, [world.user("carl")])
    world.notify(gid)
    world.drain()
    assert world.cloud.calls["group_delta"] == 0 and world.cloud.calls["group_delta_links"] == 1
    assert world.ad_members(gid) == {"ann", "bob", "carl"}


# =========================================================================== retries


def test_transient_faults_are_retried_in_process_up_to_attempts(world: MemoryWorld) -> None:
    gid = world.group("Flaky", world.users("ann"))
    world.directory.faults.fail("apply", LdapUnavailable("DC busy"), times=2)
    world.notify(gid)

    (outcome,) = world.drain()

    assert outcome.settlement == "completed"
    assert world.directory.calls["apply"] == 3  # attempts
    assert [(s.action, s.delivery_count) for s in world.queue.settlements] == [("complete", 1)]
    assert world.ad_members(gid) == {"ann"}


def test_after_the_attempts_it_waits_in_the_queue_longer_each_time_up_to_a_cap(
    world: MemoryWorld,
) -> None:
    gid = world.group("Down", world.users("ann"))
    world.cloud.faults.fail("get_group", GraphUnavailable("Graph answered 503"), times=None)
    world.notify(gid)

    world.drain()
    for _ in range(7):
        world.later(delays(world)[-1])

    # scale * 2**deliveries, capped at max_redelivery_delay (60 s here)
    assert delays(world) == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert [s.delivery_count for s in world.queue.settlements] == list(range(1, 9))
    assert world.cloud.calls["get_group"] == 8 * 3  # every delivery retried in process
    assert world.ad(gid) is None


def test_a_retry_after_is_never_cut_short(world: MemoryWorld) -> None:
    gid = world.group("Throttled", world.users("ann"))
    world.cloud.faults.fail("get_group", GraphThrottled("429", retry_after=600.0), times=3)
    world.notify(gid)
    world.drain()
    assert delays(world) == [600.0]  # beyond the 60 s cap: Graph asked for it
    assert world.later(599) == []

    world.cloud.faults.fail("get_group", GraphThrottled("429", retry_after=0.5), times=3)
    world.later(1)
    assert delays(world) == [600.0, 4.0]  # a short Retry-After does not shorten the backoff
    world.later(4)
    assert world.ad_members(gid) == {"ann"}


def test_redelivered_until_the_fault_ends_and_nothing_is_lost(world: MemoryWorld) -> None:
    gids = [world.group(f"G{i}", world.users(f"u{i}a", f"u{i}b")) for i in range(3)]
    world.directory.faults.fail("apply", LdapUnavailable("DC down"), times=None)  # an outage
    for gid in gids:
        world.queue.send([world.event(gid) for _ in range(3)])
    world.drain()
    world.later(2)
    assert all(world.ad(gid) is None for gid in gids)

    world.directory.faults.clear()  # the DC is back
    world.later(60)

    for i, gid in enumerate(gids):
        assert world.ad_members(gid) == {f"u{i}a", f"u{i}b"}
    confirmed(world)
    assert empty(world) and dead(world) == []
    assert world.pipeline.stats.events == 9
    assert world.pipeline.stats.operations == {"add": 3}


def test_a_write_whose_answer_was_lost_is_not_made_twice(world: MemoryWorld) -> None:
    gid = world.group("Lost answer", world.users("ann"))
    world.directory.faults.fail_after("apply", LdapUnavailable("connection reset"), times=1)
    world.notify(gid)

    (outcome,) = world.drain()

    assert outcome.settlement == "completed"  # the retry read it back: converged
    assert world.directory.calls["apply"] == 1
    assert world.ad_members(gid) == {"ann"}


def test_one_lagging_read_after_a_restore_does_not_delete_the_kept_object(
    world: MemoryWorld,
) -> None:
    gid = converged(world, "Restored", "ann")
    entry = world.ad(gid)
    assert entry is not None
    world.cloud.soft_delete_group(gid)
    world.notify(gid)
    world.drain()
    assert world.ad(gid) is not None  # kept while in the recycle bin, SID and all

    world.cloud.lag(gid)  # the replica that answers next has not seen the restore
    world.cloud.restore_group(gid)
    world.notify(gid)
    world.drain()

    after = world.ad(gid)
    assert after is not None and after.object_sid == entry.object_sid


def test_a_group_gone_is_deleted_only_after_a_second_read_a_settle_interval_later(
    world: MemoryWorld,
) -> None:
    gid = converged(world, "Doomed", "ann")
    confirmed(world)
    world.cloud.hard_delete_group(gid)
    world.notify(gid)
    (first,) = world.drain()
    assert first.pending_delete and world.ad(gid) is not None
    assert world.later(world.config.settle / 2) == []  # not due yet
    assert world.ad(gid) is not None
    confirmed(world)
    assert world.ad(gid) is None
    assert world.pipeline.stats.operations == {"add": 1, "delete": 1}


def test_a_group_created_while_graph_still_answers_404_reaches_ad_on_its_confirmation(
    world: MemoryWorld,
) -> None:
    gid = object_id("group:Brand new")
    world.cloud.lag(gid)  # the next read answers as now: no such group yet
    world.group("Brand new", world.users("ann"))
    world.notify(gid)
    (first,) = world.drain()
    assert first.operation is None and first.confirmation and world.ad(gid) is None
    confirmed(world)
    assert world.ad_members(gid) == {"ann"}


def test_a_stale_read_is_repaired_by_the_confirmation_without_a_new_notification(
    world: MemoryWorld,
) -> None:
    gid = converged(world, "Stale", "ann")
    confirmed(world)
    world.cloud.lag(gid)  # the event's read answers from before the change
    world.cloud.add_members(gid, [world.user("bob")])
    world.cloud.update_group(gid, display_name="Stale renamed")
    world.notify(gid)
    (event,) = world.drain()
    assert event.operation is None and world.ad_members(gid) == {"ann"}
    confirmed(world)
    assert world.ad_members(gid) == {"ann", "bob"}
    entry = world.ad(gid)
    assert entry is not None and entry.get("displayName") == ("Stale renamed",)


def test_confirmations_of_one_group_are_coalesced(world: MemoryWorld) -> None:
    gid = converged(world, "Busy", "ann")
    confirmed(world)
    for name in ("bob", "carl", "dan"):
        world.cloud.add_members(gid, [world.user(name)])
        world.notify(gid)
        world.drain()
        world.clock.advance(1.0)  # a few seconds apart: one quarter-settle slot
    assert world.queue.scheduled_count() == 1


def test_a_refused_delta_link_is_dropped_and_the_group_read_in_full(world: MemoryWorld) -> None:
    names = [f"m{i}" for i in range(DELTA_MIN_MEMBERS)]
    gid = converged(world, "Expired link", *names)
    confirmed(world)
    world.cloud.expire_delta_tokens()
    world.cloud.add_members(gid, [world.user("carl")])
    full_reads = world.cloud.calls["get_group"]
    world.notify(gid)
    (outcome,) = world.drain()
    assert outcome.settlement == "completed" and dead(world) == []
    assert world.cloud.calls["get_group"] == full_reads + 1
    assert "carl" in world.ad_members(gid)


def test_a_delta_link_older_than_a_delta_token_lives_is_not_used(world: MemoryWorld) -> None:
    names = [f"m{i}" for i in range(DELTA_MIN_MEMBERS)]
    gid = converged(world, "Old link", *names)
    confirmed(world)
    world.clock.advance(7 * 86400)
    deltas = world.cloud.calls["group_delta"]
    world.notify(gid)
    world.drain()
    assert world.cloud.calls["group_delta"] == deltas  # read in full instead


# =========================================================================== dead letters


def test_bad_bodies_are_dead_lettered_as_poison_and_the_rest_converges(
    world: MemoryWorld,
) -> None:
    gid = world.group("Mixed", world.users("ann"))
    other = world.group("Other")
    bad = [
        OutgoingMessage(b"{not json", "bad-json", gid),
        OutgoingMessage(json.dumps({"version": 99}).encode(), "bad-version", gid),
        world.event(other, session_id=gid, notification_id="wrong-session"),
    ]
    world.queue.send([world.event(gid), *bad])

    (outcome,) = world.drain()

    assert outcome.settlement == "completed"
    assert world.ad_members(gid) == {"ann"}
    letters = {d.message_id: (d.reason, d.description) for d in world.queue.dead_letters()}
    assert set(letters) == {"bad-json", "bad-version", "wrong-session"}
    assert {reason for reason, _ in letters.values()} == {"PoisonEvent"}
    assert "not JSON" in letters["bad-json"][1]
    assert "version" in letters["bad-version"][1]
    assert "does not match session" in letters["wrong-session"][1]


def test_a_batch_of_poison_only_is_dead_lettered_without_a_read(world: MemoryWorld) -> None:
    gid = world.group("Poisoned")
    world.queue.send([OutgoingMessage(b"\xff\xfe", "m1", gid), OutgoingMessage(b"[]", "m2", gid)])
    (outcome,) = world.drain()
    assert outcome.settlement == "dead-lettered"
    assert reads(world) == 0 and world.directory.calls["apply"] == 0
    assert [reason for reason, _ in dead(world)] == ["PoisonEvent", "PoisonEvent"]


def test_a_group_over_the_member_limit_is_dead_lettered_and_never_truncated() -> None:
    world = memory_world(member_limit=3)
    gid = world.group("Big", world.users("a", "b", "c"))
    world.notify(gid)
    world.drain()
    assert world.ad_members(gid) == {"a", "b", "c"}

    world.cloud.add_members(gid, [world.user("d")])
    world.notify(gid)
    world.drain()

    ((reason, description),) = dead(world)
    assert reason == "OverMemberLimit"
    assert "4 members, limit 3" in description
    assert world.ad_members(gid) == {"a", "b", "c"}  # left as it was


def test_an_object_repurposed_between_read_and_write_is_policy_refused(
    world: MemoryWorld,
) -> None:
    gid = converged(world, "Repurposed", "ann")
    entry = world.ad(gid)
    assert entry is not None
    world.cloud.update_group(gid, description="changed in the cloud")
    world.directory.faults.run(  # an admin re-uses the object just before the write
        "apply", lambda: world.forest.admin_set(entry.dn, "adminDescription", ["Owned by Ops"])
    )
    world.notify(gid)
    world.drain()

    ((reason, description),) = dead(world)
    assert reason == "PolicyRefused"
    assert "Owned by Ops" in description
    after = world.forest.entry(entry.dn)
    assert after is not None and after.get("description") == entry.get("description")


def test_a_write_the_directory_refuses_is_dead_lettered_with_its_reason(
    world: MemoryWorld,
) -> None:
    gid = world.group("Clash", world.users("ann"))
    elsewhere = world.forest.add_ou("Elsewhere")  # sAMAccountName is unique domain-wide
    world.forest.admin_add_group(
        f"CN=Someone else,{elsewhere}", attributes={"sAMAccountName": (sam_account_name_for(gid),)}
    )
    world.notify(gid)
    world.drain()

    ((reason, description),) = dead(world)
    assert reason == "DirectoryRefused"
    assert "sAMAccountName" in description
    assert world.ad(gid) is None


def test_a_dc_refusal_has_one_reason_whichever_adapter_reports_it(world: MemoryWorld) -> None:
    """LdapDirectory raises its own LdapRefused; the relay, DirectoryRefused: both are
    dead-lettered as the documented DirectoryRefused (what ``replay --reason`` filters on)."""
    gid = world.group("Refused", world.users("ann"))
    world.directory.faults.fail(
        "apply", LdapRefused("LDAP add: constraintViolation (19)", code=19), times=1
    )
    world.notify(gid)
    world.drain()
    ((reason, description),) = dead(world)
    assert reason == "DirectoryRefused"
    assert "constraintViolation" in description


def test_transient_faults_outliving_every_delivery_are_max_delivery_count_exceeded() -> None:
    world = memory_world(max_delivery_count=3)
    gid = world.group("Never", world.users("ann"))
    world.directory.faults.fail("apply", LdapUnavailable("DC down"), times=None)
    world.notify(gid)

    world.drain()
    world.later(2)
    world.later(4)

    ((reason, _),) = dead(world)
    assert reason == "MaxDeliveryCountExceeded"
    assert world.queue.dead_letters()[0].delivery_count == 3
    assert empty(world)
    assert world.ad(gid) is None


def test_a_dead_letter_replayed_after_the_cause_is_fixed_converges() -> None:
    world = memory_world(member_limit=1)
    gid = world.group("Grown", world.users("a", "b"))
    world.notify(gid)
    world.drain()
    (letter,) = world.queue.dead_letters()
    assert letter.reason == "OverMemberLimit"

    pipeline = world.restart(options=MappingOptions(world.target, member_limit=5))
    world.queue.resubmit(letter)
    world.drain()

    assert pipeline.stats.events == 1
    assert world.ad_members(gid) == {"a", "b"}
    assert world.queue.dead_letters() == []


# =========================================================================== the delete budget


def test_event_deletes_are_capped_by_the_delete_threshold() -> None:
    world = memory_world(policy=SyncPolicy(delete_threshold=2))
    gids = [world.group(f"G{i}", world.users(f"u{i}")) for i in range(4)]
    world.notify(*gids)
    world.drain()
    recycled, *doomed = gids
    world.cloud.soft_delete_group(recycled)
    for gid in doomed:
        world.cloud.hard_delete_group(gid)

    world.notify(*gids)
    world.drain()
    assert all(world.ad(gid) is not None for gid in gids)  # gone once is not gone yet
    confirmed(world)  # still gone a settle interval later: now deleted, within the cap

    assert world.ad(recycled) is not None  # soft-deleted: kept, and no delete counted
    assert [world.ad(gid) is None for gid in doomed] == [True, True, False]
    # The refused group's confirmations (of its add, and of it gone) wait in the dead letters.
    assert {letter.session_id for letter in world.queue.dead_letters()} == {doomed[2]}
    for reason, description in dead(world):
        assert reason == "PolicyRefused"
        assert "WRITEBACK_DELETE_THRESHOLD" in description
    assert world.pipeline.stats.operations == {"add": 4, "delete": 2}


def test_a_delete_retried_in_process_counts_once_against_the_budget() -> None:
    world = memory_world(policy=SyncPolicy(delete_threshold=1))
    gid = world.group("Doomed", world.users("ann"))
    world.notify(gid)
    world.drain()
    world.cloud.hard_delete_group(gid)
    world.directory.faults.fail("apply", LdapUnavailable("DC busy"), times=1)

    world.notify(gid)
    world.drain()
    confirmed(world)  # the delete is made by the confirming read

    assert dead(world) == []
    assert world.ad(gid) is None  # one delete made: within a budget of one
    assert world.directory.calls["apply"] == 3  # add, the failed delete, the delete


# =========================================================================== pause, configuration


def test_paused_events_are_parked_uncounted_and_applied_after_resume() -> None:
    world = memory_world(paused=True, **SUBSCRIBED)  # WRITEBACK_PAUSED=true
    gid = world.group("Held", world.users("ann"))
    world.notify(gid)

    world.drain()
    for _ in range(12):  # longer than the queue's 10 deliveries would last
        world.later(world.config.pause_delay)

    assert world.ad(gid) is None and world.directory.calls["apply"] == 0
    assert set(delays(world, "park")) == {world.config.pause_delay}
    assert {s.delivery_count for s in world.queue.settlements} == {1}  # never counted
    assert world.pipeline.reconcile_due() is None

    world.restart(paused=False)  # the setting switched off
    world.later(world.config.pause_delay)
    assert world.ad_members(gid) == {"ann"}
    assert dead(world) == []


def test_pause_holds_the_reconcile_and_records_it(world: MemoryWorld) -> None:
    world.pipeline.pause()  # what serve does while its workers stop taking events
    assert world.state.read()["paused"] is True
    assert world.pipeline.reconcile_due() is None
    world.pipeline.resume()
    assert world.state.read()["paused"] is False
    assert world.pipeline.reconcile_due() is not None  # none has run yet


def test_a_configuration_error_parks_events_without_counting_them() -> None:
    world = memory_world(config_retry_delay=30.0)
    gid = world.group("Misconfigured", world.users("ann"))
    refusal = ConfigError("LDAP bind refused: invalidCredentials (WRITEBACK_LDAP_PASSWORD)")
    world.directory.faults.fail("schema_attributes", refusal, times=15)
    world.notify(gid)

    world.drain()
    for _ in range(14):
        world.later(30)

    assert world.ad(gid) is None
    assert set(delays(world, "park")) == {30.0}
    assert {s.delivery_count for s in world.queue.settlements} == {1}
    world.later(30)
    assert world.ad_members(gid) == {"ann"}
    assert dead(world) == []


def test_a_configuration_error_while_converging_parks_too(world: MemoryWorld) -> None:
    gid = world.group("Untrusted", world.users("ann"))
    world.directory.faults.fail("apply", ConfigError("TLS certificate not trusted"), times=1)
    world.notify(gid)

    (outcome,) = world.drain()

    assert outcome.settlement == "parked"
    (parked,) = [s for s in world.queue.settlements if s.action == "park"]
    assert parked.delay > 0
    world.later(parked.delay)
    assert world.ad_members(gid) == {"ann"}
    assert {s.delivery_count for s in world.queue.settlements} == {1}


# =========================================================================== unexpected failures


def test_an_unexpected_exception_puts_the_batch_back_and_it_is_applied_later(
    world: MemoryWorld,
) -> None:
    gid = world.group("Buggy", world.users("ann"))
    world.directory.faults.fail("apply", RuntimeError("an unmapped library error"), times=1)
    world.queue.send([world.event(gid), OutgoingMessage(b"poison", "poison", gid)])

    (outcome,) = world.drain()

    assert (outcome.settlement, outcome.error) == ("abandoned", "RuntimeError")
    assert world.pipeline.stats.errors == 1
    assert [reason for reason, _ in dead(world)] == ["PoisonEvent"]  # settled as it was
    (delay,) = delays(world)
    world.later(delay)
    assert world.ad_members(gid) == {"ann"}


def test_a_settle_call_that_fails_is_raised_to_the_host_and_redelivered(
    world: MemoryWorld,
) -> None:
    gid = world.group("Unsettled", world.users("ann"))
    world.queue.faults.fail("complete", QueueUnavailable("Service Bus unreachable"), times=1)
    world.notify(gid)

    with pytest.raises(SettlementFailed):
        world.pipeline.handle_next(world.queue, wait=0)
    (retry,) = world.drain()  # released by handle_next: back at once

    assert (retry.settlement, retry.operation) == ("completed", None)  # written once
    assert world.directory.calls["apply"] == 1
    assert world.ad_members(gid) == {"ann"}
    assert world.queue.settlements[-1].delivery_count == 2
    confirmed(world)
    assert empty(world)


# =========================================================================== control messages


def control(world: MemoryWorld, *messages: OutgoingMessage) -> None:
    world.queue.send(list(messages))
    world.drain()


def test_lifecycle_missed_requests_a_reconcile_and_never_runs_one_in_handle(
    world: MemoryWorld,
) -> None:
    control(world, world.lifecycle(object_id("sub"), MISSED))

    assert world.pipeline.requested_reconcile() == "lifecycle missed"
    assert world.pipeline.stats.reconciles == 0
    assert world.cloud.calls["snapshot"] == 0 and world.directory.calls["iter_groups"] == 0
    assert settled(world, "complete") and empty(world)


def test_subscription_removed_recreates_it_and_requests_a_reconcile(world: MemoryWorld) -> None:
    first = world.pipeline.subscription_upkeep().subscription
    world.pipeline.reconcile()  # answers the creation's request
    world.cloud.remove_subscription(first.id)

    control(world, world.lifecycle(first.id, SUBSCRIPTION_REMOVED))

    (now,) = world.cloud.subscriptions()
    assert now.id != first.id
    assert now.notification_url == SUBSCRIBED["notification_url"]
    assert now.client_state == SUBSCRIBED["client_state"]
    assert world.pipeline.requested_reconcile() == "lifecycle subscriptionRemoved"
    assert world.pipeline.stats.reconciles == 1  # the one above, none inside handle


def test_reauthorization_required_reauthorizes_once_per_batch(world: MemoryWorld) -> None:
    subscription = world.pipeline.subscription_upkeep().subscription
    world.pipeline.reconcile()
    event = world.lifecycle(subscription.id, REAUTHORIZATION_REQUIRED)
    twice = OutgoingMessage(event.body, "graph-retried-it", CONTROL_SESSION)

    control(world, event, twice)

    assert world.cloud.reauthorizations(subscription.id) == 1
    assert world.pipeline.requested_reconcile() is None
    assert len(settled(world, "complete")) == 2


def test_control_messages_ask_for_a_reconcile(world: MemoryWorld) -> None:
    control(world, world.reconcile_request("an operator asked"))
    assert world.pipeline.requested_reconcile() == "requested: an operator asked"
    assert world.pipeline.stats.reconciles == 0


def test_poison_control_bodies_are_dead_lettered(world: MemoryWorld) -> None:
    bodies = [
        b"nope",
        b'"a string"',
        json.dumps({"kind": "explode"}).encode(),
        json.dumps({"kind": "lifecycle", "event": MISSED}).encode(),  # no subscription
    ]
    control(world, *(OutgoingMessage(b, f"c{i}", CONTROL_SESSION) for i, b in enumerate(bodies)))

    assert [reason for reason, _ in dead(world)] == ["PoisonEvent"] * 4
    assert world.pipeline.requested_reconcile() is None


def test_an_unknown_lifecycle_event_is_dead_lettered_as_poison(world: MemoryWorld) -> None:
    body = ControlRequest(
        "lifecycle", event="somethingNew", subscription_id=object_id("sub"), received_at=1.0
    ).to_json()
    message = OutgoingMessage(body, "lc-new", CONTROL_SESSION)

    control(world, message, world.reconcile_request("alongside"))

    assert [reason for reason, _ in dead(world)] == ["PoisonEvent"]
    assert world.pipeline.requested_reconcile() == "requested: alongside"
    assert empty(world)


def test_a_transient_graph_error_abandons_control_messages(world: MemoryWorld) -> None:
    subscription = world.pipeline.subscription_upkeep().subscription
    world.cloud.faults.fail(
        "reauthorize_subscription", GraphThrottled("429", retry_after=20.0), times=1
    )

    control(world, world.lifecycle(subscription.id, REAUTHORIZATION_REQUIRED))
    assert delays(world) == [20.0]
    assert world.cloud.reauthorizations(subscription.id) == 0

    world.later(20)
    assert world.cloud.reauthorizations(subscription.id) == 1
    assert empty(world) and dead(world) == []


def test_an_unexpected_exception_in_a_control_call_puts_it_back(world: MemoryWorld) -> None:
    subscription = world.pipeline.subscription_upkeep().subscription
    world.cloud.faults.fail("reauthorize_subscription", RuntimeError("SDK bug"), times=1)

    control(world, world.lifecycle(subscription.id, REAUTHORIZATION_REQUIRED))  # does not raise

    assert world.pipeline.stats.errors == 1
    (delay,) = delays(world)
    world.later(delay)
    assert world.cloud.reauthorizations(subscription.id) == 1
    assert empty(world) and dead(world) == []


def test_lifecycle_events_without_subscription_settings_are_parked() -> None:
    world = memory_world(config_retry_delay=45.0)  # no notification URL, no clientState
    control(world, world.lifecycle(object_id("sub"), MISSED))
    assert delays(world, "park") == [45.0]
    assert {s.delivery_count for s in world.queue.settlements} == {1}
    assert world.pipeline.requested_reconcile() is None


# =========================================================================== the reconcile


def test_a_reconcile_is_due_first_then_on_the_interval_or_when_requested() -> None:
    world = memory_world(reconcile_interval=1800.0)
    pipeline = world.pipeline
    assert pipeline.reconcile_due() == "no reconcile recorded yet"
    assert pipeline.reconcile_if_due() is not None
    assert pipeline.reconcile_due() is None
    assert pipeline.reconcile_if_due() is None

    world.clock.advance(1800 - 61)  # a timer may fire a minute early
    assert pipeline.reconcile_due() is None
    world.clock.advance(2)
    assert pipeline.reconcile_due() == "schedule"
    pipeline.reconcile()

    pipeline.request_reconcile("lifecycle missed")
    assert pipeline.reconcile_due() == "lifecycle missed"
    assert pipeline.next_reconcile_in() == 0
    pipeline.reconcile_if_due()
    assert pipeline.requested_reconcile() is None and pipeline.reconcile_due() is None
    record = world.state.read()["last_reconcile"]
    assert (record["reason"], record["error"]) == ("lifecycle missed", None)


def test_after_a_failed_reconcile_the_next_is_due_after_retry_delay() -> None:
    world = memory_world(reconcile_interval=1800.0, retry_delay=30.0)
    world.cloud.faults.fail("snapshot", GraphUnavailable("Graph answered 503"), times=1)

    assert world.pipeline.reconcile() is None
    assert world.pipeline.stats.reconcile_failures == 1
    assert world.pipeline.last_reconcile_error is not None
    assert "GraphUnavailable" in world.state.read()["last_reconcile"]["error"]
    world.clock.advance(29)
    assert world.pipeline.reconcile_due() is None
    world.clock.advance(2)
    assert world.pipeline.reconcile_due() == "schedule"
    assert world.pipeline.reconcile_if_due() is not None
    assert world.state.read()["last_reconcile"]["error"] is None


def test_a_request_made_during_a_reconcile_is_not_lost() -> None:
    world = memory_world()
    pipeline = world.pipeline
    pipeline.reconcile()

    def missed_meanwhile() -> None:
        world.clock.advance(1)
        pipeline.request_reconcile("lifecycle missed")

    world.cloud.faults.run("snapshot", missed_meanwhile)
    world.clock.advance(10)
    assert pipeline.reconcile() is not None
    assert pipeline.reconcile_due() == "lifecycle missed"

    # the same when a request was already pending as the reconcile began
    pipeline.reconcile()
    world.clock.advance(10)
    pipeline.request_reconcile("subscription created")
    world.clock.advance(1)
    world.cloud.faults.run("snapshot", missed_meanwhile)
    assert pipeline.reconcile_if_due() is not None
    due = pipeline.reconcile_due()
    assert due is not None and "lifecycle missed" in due


def test_a_reconcile_repairs_drift_and_forgets_the_member_links_of_what_it_wrote(
    world: MemoryWorld,
) -> None:
    drifted = converged(world, "Drifted", "ann", "bob")
    untouched = converged(world, "Untouched", "carl")
    assert world.links.get(drifted) is not None and world.links.get(untouched) is not None
    entry = world.ad(drifted)
    assert entry is not None
    world.forest.admin_members(entry.dn, remove=[world.sids["bob"]])  # by hand, in ADUC

    result = world.pipeline.reconcile()

    assert result is not None and result.applied == {"modify": 1}
    assert world.ad_members(drifted) == {"ann", "bob"}
    assert world.links.get(drifted) is None
    assert world.links.get(untouched) is not None
    assert world.pipeline.stats.reconcile_writes == result.ldap_requests
    full_reads = world.cloud.calls["get_group"]
    world.notify(drifted)
    world.drain()
    assert world.cloud.calls["get_group"] == full_reads + 1  # read in full again


def test_an_incremental_reconcile_reads_only_what_changed() -> None:
    world = memory_world(incremental=True)
    gids = [world.group(f"G{i}", world.users(f"u{i}")) for i in range(5)]
    first = world.pipeline.reconcile()
    assert first is not None and first.applied == {"add": 5}
    assert world.pipeline.last_incremental is not None
    assert world.pipeline.last_incremental.mode == "full"

    world.cloud.update_group(gids[2], display_name="Renamed")
    world.clock.advance(1800)
    second = world.pipeline.reconcile()

    assert second is not None and second.applied == {"modify": 1}
    incremental = world.pipeline.last_incremental
    assert incremental is not None and (incremental.mode, incremental.changed) == ("incremental", 1)
    assert world.cloud.calls["snapshot"] == 1
    entry = world.ad(gids[2])
    assert entry is not None and entry.get("displayName") == ("Renamed",)


# =========================================================================== subscription upkeep


def test_upkeep_creates_the_subscription_and_requests_a_reconcile(world: MemoryWorld) -> None:
    status = world.pipeline.subscription_upkeep()

    assert status.action is Action.CREATED
    (subscription,) = world.cloud.subscriptions()
    assert subscription.client_state == SUBSCRIBED["client_state"]
    assert subscription.lifecycle_url == SUBSCRIBED["lifecycle_url"]
    record = world.state.read()["subscription"]
    assert (record["id"], record["action"], record["error"]) == (subscription.id, "created", None)
    assert "code=" not in record["endpoint"]  # the function key stays out of the state
    assert world.pipeline.requested_reconcile() == "subscription created"

    world.pipeline.reconcile_if_due()
    assert world.pipeline.subscription_upkeep().action is Action.UNCHANGED
    assert world.pipeline.requested_reconcile() is None


def test_upkeep_renews_before_expiry_and_recreates_a_lapsed_one(world: MemoryWorld) -> None:
    created = world.pipeline.subscription_upkeep().subscription
    world.pipeline.reconcile()

    world.clock.advance(timedelta(days=15).total_seconds())  # within renew_before (14 days)
    renewed = world.pipeline.subscription_upkeep()
    assert renewed.action is Action.RENEWED
    assert renewed.subscription.id == created.id
    assert renewed.subscription.expiration > created.expiration
    assert world.pipeline.requested_reconcile() is None

    world.clock.advance(timedelta(days=29).total_seconds())  # no upkeep ran: it lapsed
    recreated = world.pipeline.subscription_upkeep()
    assert recreated.action is Action.CREATED  # Graph had dropped the lapsed one
    assert world.pipeline.requested_reconcile() == "subscription created"


def test_upkeep_without_settings_fails_and_records_why() -> None:
    world = memory_world()
    with pytest.raises(ConfigError):
        world.pipeline.subscription_upkeep()
    record = world.state.read()["subscription"]
    assert record["action"] == "failed"
    assert "WRITEBACK_NOTIFICATION_URL" in record["error"]


# =========================================================================== switches


def test_with_writeback_disabled_events_are_consumed_and_nothing_is_written() -> None:
    world = memory_world(policy=SyncPolicy(enabled=False))
    gid = world.group("Off", world.users("ann"))
    world.notify(gid)
    (outcome,) = world.drain()
    assert (outcome.settlement, outcome.operation) == ("completed", None)
    assert world.ad(gid) is None and world.directory.calls["apply"] == 0
    assert empty(world) and dead(world) == []


# =========================================================================== counters


def test_latencies_are_kept_for_the_latest_events_and_counted_for_all(world: MemoryWorld) -> None:
    pipeline = world.restart(latency_window=3)
    ages = [0.01, 0.04, 0.2, 3.0, 2000.0]  # seconds from the webhook to the write
    for n, age in enumerate(ages):
        gid = world.group(f"Timed{n}", world.users(f"timed{n}"))
        world.notify(gid, received_at=world.clock() - age)
        world.drain()

    stats = pipeline.stats
    assert stats.latencies == pytest.approx(ages[-3:])  # the window: the latest, in order
    assert stats.events == stats.latency_count == 5  # the counts: every one
    assert stats.latency_sum == pytest.approx(sum(ages))
    per_bucket = dict(zip((*LATENCY_BUCKETS, "above"), stats.latency_buckets, strict=True))
    assert {bound: n for bound, n in per_bucket.items() if n} == {
        0.025: 1,
        0.05: 1,
        0.25: 1,
        5.0: 1,
        "above": 1,
    }
    confirmed(world)  # confirmation reads are not notifications: no latency of their own
    assert pipeline.stats.latency_count == 5
