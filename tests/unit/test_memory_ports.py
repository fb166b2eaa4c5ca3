"""What the in-memory ports do beyond the contracts they share with the real adapters:
fault scheduling, a lagging replica, Graph's subscription limits, the admin's hand,
and the records tests assert on."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.support.memory import Faults, ManualClock, MemoryCloud, MemoryForest, MemoryQueue
from writeback.domain.model import Add, Changes, Modify, anchor_for
from writeback.domain.naming import dn_for
from writeback.errors import GraphNotFound, GraphRefused, LdapUnavailable, LockLost
from writeback.ports import GroupGone, OutgoingMessage

GID = "0b7e4c43-27d9-4a4e-9a47-ec4c33b1d2a1"


# -- faults ------------------------------------------------------------------------------


def test_faults_fire_in_order_for_as_many_calls_as_scheduled() -> None:
    faults = Faults()
    calls: list[str] = []
    faults.run("read", lambda: calls.append("ran"))
    faults.fail("read", LdapUnavailable("one"), times=2)
    faults.fail("read", KeyError("forever"), times=None)

    faults.before("read")
    for _ in range(2):
        with pytest.raises(LdapUnavailable):
            faults.before("read")
    for _ in range(3):
        with pytest.raises(KeyError):
            faults.before("read")
    assert calls == ["ran"]
    assert faults.pending("read") == 1
    faults.clear()
    faults.before("read")  # nothing left
    faults.before("other")
    with pytest.raises(ValueError):
        faults.fail("read", LdapUnavailable("x"), times=0)


def test_a_fault_after_a_write_leaves_the_write_made() -> None:
    forest = MemoryForest()
    target = forest.add_ou("Target")
    directory = forest.directory(target)
    directory.faults.fail_after("apply", LdapUnavailable("connection reset"))
    dn = dn_for("Made", target)
    attributes = {"objectClass": ("top", "group"), "adminDescription": (anchor_for(GID),)}
    with pytest.raises(LdapUnavailable):
        directory.apply(Add(GID, dn, attributes))
    entry = forest.entry(dn)
    assert entry is not None and entry.get("adminDescription") == (anchor_for(GID),)
    assert directory.find_group(GID) is not None
    assert directory.calls == {"apply": 1, "find_group": 1}
    assert directory.requests == 2


# -- the cloud ---------------------------------------------------------------------------


def test_a_lagging_replica_answers_as_the_group_was() -> None:
    cloud = MemoryCloud()
    cloud.add_user("u1", sid="S-1-5-21-1-2-3-1001", synced=True)
    cloud.add_group(GID, display_name="Before", members=["u1"])
    cloud.lag(GID, reads=2)
    cloud.update_group(GID, display_name="After")
    cloud.remove_members(GID, ["u1"])

    for _ in range(2):
        stale = cloud.get_group(GID)
        assert stale is not None and stale.display_name == "Before" and len(stale.members) == 1
    fresh = cloud.get_group(GID)
    assert fresh is not None and (fresh.display_name, fresh.members) == ("After", ())

    cloud.lag("not-yet")  # a replica that has not seen a group created since
    cloud.add_group("not-yet", display_name="New")
    assert cloud.get_groups(["not-yet"]) == {"not-yet": GroupGone(soft_deleted=False)}
    found = cloud.get_group("not-yet")
    assert found is not None and found.display_name == "New"
    assert cloud.calls["get_group"] == 5


def test_subscriptions_keep_graphs_limits() -> None:
    clock = ManualClock()
    cloud = MemoryCloud(clock=clock.now)
    now = clock.now()
    url = "https://writeback.example/api/notifications"
    with pytest.raises(GraphRefused):
        cloud.create_subscription(url, None, "state", now + timedelta(minutes=41_761))
    with pytest.raises(GraphRefused):
        cloud.create_subscription(url, None, "state", now - timedelta(seconds=1))
    with pytest.raises(GraphRefused):
        cloud.create_subscription(url, None, "x" * 129, now + timedelta(days=1))

    made = cloud.create_subscription(url, None, "state", now + timedelta(days=1))
    assert made.client_state == "state"  # echoed on creation only
    (listed,) = cloud.list_subscriptions()
    assert (listed.id, listed.client_state) == (made.id, None)
    cloud.reauthorize_subscription(made.id)
    assert cloud.reauthorizations(made.id) == 1
    renewed = cloud.renew_subscription(made.id, now + timedelta(days=2))
    assert renewed.expiration == now + timedelta(days=2)

    clock.advance(timedelta(days=2).total_seconds())  # lapsed: Graph drops it
    assert cloud.list_subscriptions() == []
    for call in (
        lambda: cloud.renew_subscription(made.id, clock.now() + timedelta(days=1)),
        lambda: cloud.reauthorize_subscription(made.id),
        lambda: cloud.delete_subscription(made.id),
    ):
        with pytest.raises(GraphNotFound):
            call()


def test_a_closed_cloud_refuses_calls() -> None:
    cloud = MemoryCloud()
    cloud.close()
    with pytest.raises(RuntimeError):
        cloud.get_group(GID)


# -- the directory -----------------------------------------------------------------------


def test_the_admins_hand_moves_objects_the_adapter_then_finds_where_they_are() -> None:
    forest = MemoryForest()
    target = forest.add_ou("Target")
    child = forest.add_ou("Child", target)
    directory = forest.directory(target)
    forest.admin_add_group(dn_for("Original", target), anchor=anchor_for(GID))
    forest.admin_move(dn_for("Original", target), dn_for("Moved", child))

    group = directory.find_group(GID)
    assert group is not None and group.dn == dn_for("Moved", child)
    assert directory.apply(Modify(GID, group.dn, Changes(replace={"info": ("x",)}))) == 1
    assert [e.dn for e in forest.entries(target)] == [dn_for("Moved", child)]


# -- the queue ---------------------------------------------------------------------------


def test_the_queue_records_every_settlement_and_counts_what_waits() -> None:
    clock = ManualClock()
    queue = MemoryQueue(clock=clock, lock_duration=30)
    queue.send([OutgoingMessage(b"a", f"m{i}", "G") for i in range(4)])
    first, second, third, fourth = queue.receive_session(10, 0)
    queue.complete(first)
    queue.abandon(second, delay=10)
    queue.park(third, delay=20)
    queue.dead_letter(fourth, "PoisonEvent", "not JSON")
    assert [(s.action, s.message_id, s.delay, s.reason) for s in queue.settlements] == [
        ("complete", "m0", 0.0, ""),
        ("abandon", "m1", 10.0, ""),
        ("park", "m2", 20.0, ""),
        ("dead_letter", "m3", 0.0, "PoisonEvent"),
    ]
    assert (queue.depth(), queue.scheduled_count()) == (0, 2)
    assert queue.dead_letter_count_by_reason() == {"PoisonEvent": 1}

    clock.advance(20)
    assert queue.renew_session_lock("G") == clock() + 30
    queue.release_session("G")
    with pytest.raises(LockLost):
        queue.renew_session_lock("G")
    assert [m.message_id for m in queue.receive_session(10, 0)] == ["m1", "m2"]
