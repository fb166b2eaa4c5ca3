"""The EventQueue contract: every queue implementation keeps the same session-queue rules.

Each implementation is a *rig* (:class:`QueueRig`): the queue, and how to move
its time. The rules are asserted through the port only, with times taken from
the rig (``lock_duration``, ``max_delivery_count``, ``duplicate_window``), so a
queue on a real clock (an emulator) runs the same tests by sleeping in
``advance``. To add an implementation, write a factory (a context manager
taking the pytest request, for the fixtures it needs) and add one line to
:data:`QUEUES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import pytest

from tests.support.memory import ManualClock, MemoryQueue
from writeback.adapters.local_queue import MAX_DELIVERY_COUNT_EXCEEDED, LocalQueue
from writeback.errors import DeadLetterNotFound, LockLost, MessageRejected
from writeback.ports import EventQueue, OutgoingMessage, ReceivedMessage


@dataclass(frozen=True)
class QueueRig:
    """One queue under test, its settings, and how its time moves."""

    queue: EventQueue
    #: Another receiver of the same queue (another process or instance).
    another: Callable[[], EventQueue]
    advance: Callable[[float], None]
    lock_duration: float
    max_delivery_count: int
    duplicate_window: float


LOCK, DELIVERIES, WINDOW = 30.0, 3, 600.0


@contextmanager
def local_queue(request: pytest.FixtureRequest) -> Iterator[QueueRig]:
    """LocalQueue on a real SQLite file in the test's tmp_path, on a hand-driven clock."""
    clock = ManualClock()
    path = request.getfixturevalue("tmp_path") / "queue.sqlite3"
    opened: list[LocalQueue] = []

    def open_queue() -> LocalQueue:
        queue = LocalQueue(
            path,
            lock_duration=LOCK,
            max_delivery_count=DELIVERIES,
            duplicate_window=WINDOW,
            clock=clock,
        )
        opened.append(queue)
        return queue

    try:
        yield QueueRig(open_queue(), open_queue, clock.advance, LOCK, DELIVERIES, WINDOW)
    finally:
        for queue in opened:
            queue.close()


@contextmanager
def memory_queue(request: pytest.FixtureRequest) -> Iterator[QueueRig]:
    clock = ManualClock()
    queue = MemoryQueue(
        clock=clock, lock_duration=LOCK, max_delivery_count=DELIVERIES, duplicate_window=WINDOW
    )
    yield QueueRig(queue, queue.receiver, clock.advance, LOCK, DELIVERIES, WINDOW)


#: Every queue implementation the contract runs against, by test id.
QUEUES: dict[str, Callable[[pytest.FixtureRequest], AbstractContextManager[QueueRig]]] = {
    "local": local_queue,
    "memory": memory_queue,
}


@pytest.fixture(params=sorted(QUEUES))
def rig(request: pytest.FixtureRequest) -> Iterator[QueueRig]:
    with QUEUES[request.param](request) as made:
        yield made


def msg(message_id: str, session_id: str, body: bytes | None = None) -> OutgoingMessage:
    body = body if body is not None else message_id.encode()
    return OutgoingMessage(body, message_id, session_id)


def ids(messages: list[ReceivedMessage]) -> list[str]:
    return [m.message_id for m in messages]


def receive(rig: QueueRig, max_messages: int = 10) -> list[ReceivedMessage]:
    return rig.queue.receive_session(max_messages, 0)


def settle_all(rig: QueueRig, batch: list[ReceivedMessage]) -> None:
    for message in batch:
        rig.queue.complete(message)
    if batch:
        rig.queue.release_session(batch[0].session_id)


# -- sessions and order -------------------------------------------------------------


def test_fifo_per_session_oldest_session_first(rig: QueueRig) -> None:
    rig.queue.send([msg("b1", "B"), msg("a1", "A"), msg("b2", "B"), msg("c1", "C")])
    rig.queue.send([msg("a2", "A"), msg("b3", "B")])

    first = receive(rig)
    assert ids(first) == ["b1", "b2", "b3"]
    assert {m.session_id for m in first} == {"B"}
    assert [m.delivery_count for m in first] == [1, 1, 1]
    assert ids(receive(rig)) == ["a1", "a2"]
    assert ids(receive(rig)) == ["c1"]
    assert receive(rig) == []  # every session with work is held


def test_a_held_session_goes_to_no_other_receive_until_released(rig: QueueRig) -> None:
    rig.queue.send([msg("g1", "G"), msg("g2", "G"), msg("g3", "G")])
    head = receive(rig, max_messages=1)
    assert ids(head) == ["g1"]
    rig.queue.send([msg("g4", "G"), msg("h1", "H")])
    assert ids(receive(rig)) == ["h1"]  # G has work, but it is held
    assert receive(rig) == []
    settle_all(rig, head)
    assert ids(receive(rig)) == ["g2", "g3", "g4"]


def test_a_session_held_by_one_receiver_is_not_given_to_another(rig: QueueRig) -> None:
    other = rig.another()
    rig.queue.send([msg("g1", "G"), msg("h1", "H")])
    held = receive(rig)
    assert ids(held) == ["g1"]
    rig.queue.send([msg("g2", "G")])
    assert ids(other.receive_session(10, 0)) == ["h1"]
    assert other.receive_session(10, 0) == []  # G is still held by the first
    settle_all(rig, held)
    again = other.receive_session(10, 0)
    assert ids(again) == ["g2"]
    other.complete(again[0])
    other.release_session("G")


def test_release_gives_back_unsettled_messages_in_order_counted(rig: QueueRig) -> None:
    rig.queue.send([msg("m1", "G"), msg("m2", "G"), msg("m3", "G")])
    batch = receive(rig)
    rig.queue.complete(batch[1])
    rig.queue.release_session("G")
    again = receive(rig)
    assert ids(again) == ["m1", "m3"]
    assert [m.delivery_count for m in again] == [2, 2]
    with pytest.raises(LockLost):
        rig.queue.complete(batch[0])  # its lock died with the release
    settle_all(rig, again)
    assert rig.queue.depth() == 0


# -- peek-lock ------------------------------------------------------------------------


def test_an_expired_lock_redelivers_with_one_more_delivery(rig: QueueRig) -> None:
    rig.queue.send([msg("m1", "G")])
    first = receive(rig)
    assert [m.delivery_count for m in first] == [1]
    rig.advance(rig.lock_duration + 1)  # the worker died: nobody settled
    second = receive(rig)
    assert ids(second) == ["m1"]
    assert second[0].delivery_count == 2
    with pytest.raises(LockLost):
        rig.queue.complete(first[0])
    settle_all(rig, second)
    assert rig.queue.depth() == 0
    assert rig.queue.dead_letters() == []


def test_settling_twice_is_lock_lost(rig: QueueRig) -> None:
    rig.queue.send([msg("m1", "G")])
    (message,) = receive(rig)
    rig.queue.complete(message)
    with pytest.raises(LockLost):
        rig.queue.complete(message)
    with pytest.raises(LockLost):
        rig.queue.abandon(message)
    with pytest.raises(LockLost):
        rig.queue.dead_letter(message, "R", "d")


def test_an_abandoned_message_waits_its_delay_and_counts_a_delivery(rig: QueueRig) -> None:
    rig.queue.send([msg("m1", "G"), msg("m2", "G")])
    first, second = receive(rig)
    rig.queue.abandon(first, delay=10)
    rig.queue.complete(second)
    rig.queue.release_session("G")
    assert receive(rig) == []
    assert rig.queue.depth() == 0  # a scheduled message is not active
    rig.advance(10.5)
    (again,) = receive(rig)
    assert (again.message_id, again.delivery_count) == ("m1", 2)


def test_an_abandon_without_delay_is_available_once_the_session_is_released(
    rig: QueueRig,
) -> None:
    rig.queue.send([msg("m1", "G")])
    (first,) = receive(rig)
    rig.queue.abandon(first)
    rig.queue.release_session("G")
    (again,) = receive(rig)
    assert (again.message_id, again.delivery_count) == ("m1", 2)


def test_parking_waits_its_delay_without_counting_a_delivery(rig: QueueRig) -> None:
    rig.queue.send([msg("m1", "G")])
    for _ in range(rig.max_delivery_count + 2):  # more than the deliveries allowed
        (message,) = receive(rig)
        assert message.delivery_count == 1
        rig.queue.park(message, delay=5)
        rig.queue.release_session("G")
        assert receive(rig) == []
        rig.advance(5.5)
    (message,) = receive(rig)
    assert (message.message_id, message.delivery_count) == ("m1", 1)
    assert rig.queue.dead_letters() == []


# -- dead letters -------------------------------------------------------------------


def test_a_dead_letter_keeps_body_ids_reason_and_description(rig: QueueRig) -> None:
    rig.queue.send([msg("m1", "G", b'{"bad":')])
    (message,) = receive(rig)
    rig.queue.dead_letter(message, "PoisonEvent", "body is not JSON: Expecting value")
    rig.queue.release_session("G")
    assert rig.queue.depth() == 0
    assert receive(rig) == []
    (dead,) = rig.queue.dead_letters()
    assert dead.body == b'{"bad":'
    assert (dead.message_id, dead.session_id) == ("m1", "G")
    assert (dead.reason, dead.description) == ("PoisonEvent", "body is not JSON: Expecting value")
    assert dead.delivery_count == 1


def test_abandoned_on_its_last_delivery_it_is_dead_lettered(rig: QueueRig) -> None:
    rig.queue.send([msg("m1", "G", b"keeps failing")])
    counts = []
    for _ in range(rig.max_delivery_count):
        (message,) = receive(rig)
        counts.append(message.delivery_count)
        rig.queue.abandon(message)
        rig.queue.release_session("G")
    assert counts == list(range(1, rig.max_delivery_count + 1))
    assert receive(rig) == []
    (dead,) = rig.queue.dead_letters()
    assert dead.reason == MAX_DELIVERY_COUNT_EXCEEDED
    assert (dead.message_id, dead.body) == ("m1", b"keeps failing")
    assert dead.delivery_count == rig.max_delivery_count


def test_a_lock_that_runs_out_on_the_last_delivery_dead_letters(rig: QueueRig) -> None:
    """A message that crashes its worker every time must not come back forever."""
    rig.queue.send([msg("m1", "G"), msg("m2", "G")])
    for _ in range(rig.max_delivery_count):
        assert ids(receive(rig, max_messages=1)) == ["m1"]
        rig.advance(rig.lock_duration + 1)
    assert ids(receive(rig)) == ["m2"]
    (dead,) = rig.queue.dead_letters()
    assert (dead.message_id, dead.reason) == ("m1", MAX_DELIVERY_COUNT_EXCEEDED)


def test_resubmit_brings_a_dead_letter_back_once_with_a_fresh_count(rig: QueueRig) -> None:
    rig.queue.send([msg("m1", "G", b"body")])
    (message,) = receive(rig)
    rig.queue.dead_letter(message, "GraphRefused", "403")
    rig.queue.release_session("G")
    (dead,) = rig.queue.dead_letters()

    rig.queue.resubmit(dead)  # inside the duplicate window of m1: a replay is never dropped
    assert rig.queue.dead_letters() == []
    with pytest.raises(DeadLetterNotFound):
        rig.queue.resubmit(dead)
    (again,) = receive(rig)
    assert (again.message_id, again.session_id, again.body) == ("m1", "G", b"body")
    assert again.delivery_count == 1
    settle_all(rig, [again])
    assert rig.queue.depth() == 0


# -- sending --------------------------------------------------------------------------


def test_duplicates_of_a_message_id_inside_the_window_are_dropped(rig: QueueRig) -> None:
    rig.queue.send([msg("n1", "G", b"first"), msg("n1", "G", b"same batch")])
    rig.queue.send([msg("n1", "G", b"later")])
    assert rig.queue.depth() == 1
    (message,) = receive(rig)
    assert message.body == b"first"
    settle_all(rig, [message])
    rig.queue.send([msg("n1", "G", b"after completion")])  # still inside the window
    assert rig.queue.depth() == 0
    rig.advance(rig.duplicate_window + 1)
    rig.queue.send([msg("n1", "G", b"outside the window")])
    assert [m.body for m in receive(rig)] == [b"outside the window"]


def test_a_batch_with_an_invalid_message_is_rejected_whole(rig: QueueRig) -> None:
    for bad in (msg("x" * 129, "G"), msg("m2", ""), msg("big", "G", b"x" * (256 * 1024 + 1))):
        with pytest.raises(MessageRejected):
            rig.queue.send([msg("ok", "G"), bad])
    assert rig.queue.depth() == 0
    rig.queue.send([msg("ok", "G")])  # nothing was recorded for duplicate detection either
    assert rig.queue.depth() == 1
