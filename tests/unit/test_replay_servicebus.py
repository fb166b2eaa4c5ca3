"""``replay`` and ``status`` on Service Bus: the product's adapter through the real SDK
against the emulator (TLS, SAS rules with and without Manage)."""

from __future__ import annotations

import time

from tests.support.servicebus import (
    adapter,
    dead_letter_directly,
    hand_off_dead_letter,
    new_queue,
    queue_name,
    sb,
    sdk_client,
)
from writeback.adapters.servicebus import ORIGINAL_MESSAGE_ID
from writeback.domain.events import HANDOFF_SESSION_PROPERTY
from writeback.ports import DeadLetter
from writeback.service.replay import ReplayFilter, format_report, replay
from writeback.service.status import collect_status, format_status
from writeback_sandbox.servicebus_emulator import APP_RULE, ServiceBusEmulator

__all__ = ["queue_name", "sb"]  # fixtures

GROUP = "3a5c3221-c465-48c0-95b8-e9305786a271"
OTHER = "0b9c2f4e-0000-4000-8000-00000000000b"


def test_a_replayed_hand_off_dead_letter_lands_in_the_groups_own_session(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    with sdk_client(sb) as client:
        hand_off_dead_letter(client, queue_name, GROUP, "n-1")
    with adapter(sb, queue_name) as queue:
        report = replay(queue, ReplayFilter(group=GROUP))
        assert (report.moved, report.failed) == (1, 0)
        assert queue.dead_letters() == []
    with (
        sdk_client(sb) as client,
        client.get_queue_receiver(queue_name, session_id=GROUP, max_wait_time=2) as receiver,
    ):
        [replayed] = receiver.receive_messages(max_message_count=5, max_wait_time=2)
        properties = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in (replayed.application_properties or {}).items()
        }
        assert replayed.session_id == GROUP  # one worker per group: the group's session
        assert replayed.message_id not in ("n-1", None) and "#x" not in replayed.message_id
        assert properties[ORIGINAL_MESSAGE_ID] == "n-1"
        assert HANDOFF_SESSION_PROPERTY not in properties
        receiver.complete_message(replayed)


def test_a_hand_off_dead_letter_is_listed_as_its_groups(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    with sdk_client(sb) as client:
        session = hand_off_dead_letter(client, queue_name, GROUP, "n-1")
    with adapter(sb, queue_name) as queue:
        [listed] = queue.dead_letters()
    assert (listed.message_id, listed.session_id, listed.reason) == ("n-1", GROUP, "PolicyRefused")
    assert sb.messages(f"{queue_name}/$DeadLetterQueue")[0].session_id == session


def test_2500_dead_letters_replay_completely_in_one_pass(sb: ServiceBusEmulator) -> None:
    name = new_queue(sb, lock_duration=30.0)
    items = [(f"m{i}", f"g{i % 10}") for i in range(2500)]
    with sdk_client(sb) as client:
        dead_letter_directly(client, name, items, "OverMemberLimit")
    assert sb.counts(name)["dead_lettered"] == 2500
    with adapter(sb, name, dead_letter_wait=1.0) as queue:
        started = time.monotonic()
        report = replay(queue, ReplayFilter(reason="OverMemberLimit"))
        elapsed = time.monotonic() - started
    assert (report.scanned, report.moved, report.failed) == (2500, 2500, 0), elapsed
    counts = sb.counts(name)
    assert (counts["active"], counts["dead_lettered"]) == (2500, 0)
    with sb.lock:
        sessions = {m.session_id for m in sb.queue(name).iter_messages()}
    assert sessions == {f"g{i}" for i in range(10)}


def test_a_letter_refused_again_during_the_pass_is_not_moved_in_a_circle(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    """A worker dead-letters the replayed copy of a poison event while the pass still
    reads the dead-letter queue: the pass passes over it rather than moving it back
    again (and again, for as long as the worker keeps refusing it)."""
    consulted: list[str] = []
    with sdk_client(sb) as client:
        dead_letter_directly(client, queue_name, [("n-1", GROUP), ("n-2", OTHER)], "PoisonEvent")

        def choose(letter: DeadLetter) -> bool:
            consulted.append(letter.message_id)
            if letter.message_id == "n-2":  # meanwhile a worker refuses n-1's copy
                with client.get_queue_receiver(
                    queue_name, session_id=GROUP, max_wait_time=2
                ) as receiver:
                    [copy] = receiver.receive_messages(max_message_count=1, max_wait_time=2)
                    receiver.dead_letter_message(
                        copy, reason="PoisonEvent", error_description="still not JSON"
                    )
                return False
            return True

        with adapter(sb, queue_name, dead_letter_wait=1.0) as queue:
            seen = [
                (letter.message_id, chosen)
                for letter, chosen, _ in queue.replay_dead_letters(choose)
            ]
            assert seen == [("n-1", True), ("n-2", False), ("n-1", False)]
            assert consulted == ["n-1", "n-2"]
            assert sorted(d.message_id for d in queue.dead_letters()) == ["n-1", "n-2"]
    assert sb.counts(queue_name)["active"] == 0


def test_filters_dry_run_and_max_leave_the_rest_in_place(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    with sdk_client(sb) as client:
        dead_letter_directly(client, queue_name, [("a", GROUP), ("b", OTHER)], "PoisonEvent")
        dead_letter_directly(client, queue_name, [("c", GROUP), ("d", GROUP)], "OverMemberLimit")
    with adapter(sb, queue_name, dead_letter_wait=0.5) as queue:
        dry = replay(queue, ReplayFilter(group=GROUP.upper()), dry_run=True)
        assert [i.letter.message_id for i in dry.items] == ["a", "c", "d"]
        assert format_report(dry)[-1] == "would move 3 of 4 dead letters"
        assert len(queue.dead_letters()) == 4
        limited = replay(queue, ReplayFilter(reason="OverMemberLimit", limit=1))
        assert [i.letter.message_id for i in limited.items if i.moved] == ["c"]
        assert limited.stopped_at_limit
        assert [d.message_id for d in queue.dead_letters()] == ["a", "b", "d"]
        again = replay(queue, ReplayFilter(reason="OverMemberLimit"))
        assert [i.letter.message_id for i in again.items if i.moved] == ["d"]
        assert [d.message_id for d in queue.dead_letters()] == ["a", "b"]


def test_status_shows_dead_letters_by_reason_when_depth_cannot_be_read(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    with sdk_client(sb) as client:
        dead_letter_directly(client, queue_name, [("a", GROUP), ("b", OTHER)], "PoisonEvent")
        dead_letter_directly(client, queue_name, [("c", GROUP)], "OverMemberLimit")
    with adapter(sb, queue_name, rule=APP_RULE) as queue:  # Send and Listen, no Manage
        status = collect_status(queue, {})
    assert status.dead_letters == {"OverMemberLimit": 1, "PoisonEvent": 2}
    assert status.queue_depth is None and status.depth_error is not None
    assert "QueueRefused" in status.depth_error and "Manage" in status.depth_error
    assert status.dead_letters == {"OverMemberLimit": 1, "PoisonEvent": 2}
    lines = format_status(status)
    assert lines[0].startswith("queue: depth unknown (QueueRefused:")
    assert lines[1] == "dead letters: 3 (OverMemberLimit 1, PoisonEvent 2)"
    with adapter(sb, queue_name) as queue:  # with Manage: everything
        full = collect_status(queue, {})
    assert (full.queue_depth, full.scheduled, full.queue_error) == (0, 0, None)
    assert format_status(full)[0] == "queue: 0 messages"
