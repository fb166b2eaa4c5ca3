"""LocalQueue against a real SQLite file: Service Bus session-queue rules, crash safety,
exclusivity across threads and processes, and a model-based test of the whole API."""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from writeback.adapters.local_queue import (
    MAX_DELIVERY_COUNT_EXCEEDED,
    LocalLock,
    LocalQueue,
)
from writeback.errors import (
    ConfigError,
    DeadLetterNotFound,
    LockLost,
    MessageRejected,
    PermanentError,
    TransientError,
)
from writeback.ports import EventQueue, OutgoingMessage, ReceivedMessage

REPO = Path(__file__).resolve().parents[2]


class Clock:
    """A hand-driven wall clock, so lock expiry and the duplicate window are exact."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def msg(message_id: str, session_id: str, body: bytes | None = None) -> OutgoingMessage:
    return OutgoingMessage(
        body if body is not None else message_id.encode(), message_id, session_id
    )


def ids(messages: list[ReceivedMessage]) -> list[str]:
    return [m.message_id for m in messages]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


@pytest.fixture
def queue(path: Path, clock: Clock) -> Iterator[LocalQueue]:
    with LocalQueue(path, lock_duration=30, max_delivery_count=3, clock=clock) as q:
        yield q


def test_satisfies_the_port(queue: LocalQueue) -> None:
    port: EventQueue = queue
    assert port.depth() == 0


# -- group commit --------------------------------------------------------------------


class CountingQueue(LocalQueue):
    """The real queue, counting its durable commits of sends."""

    commits = 0

    def _commit_sends(self, batch: list[Any]) -> None:
        type(self).commits += 1
        super()._commit_sends(batch)


def test_concurrent_sends_share_durable_commits_and_lose_nothing(path: Path) -> None:
    threads, per_thread = 8, 40
    CountingQueue.commits = 0
    with CountingQueue(path, lock_duration=30) as queue:
        start = threading.Barrier(threads)

        def sender(n: int) -> None:
            start.wait()
            for i in range(per_thread):
                # every thread also sends one id the others send: kept once
                queue.send([msg(f"t{n}-{i}", f"S{n}"), msg(f"shared-{i}", "shared")])

        workers = [threading.Thread(target=sender, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert queue.depth() == threads * per_thread + per_thread
        sessions: dict[str, list[str]] = {}
        while batch := queue.receive_session(1000, 0):
            sessions[batch[0].session_id] = ids(batch)
        for n in range(threads):
            assert sessions[f"S{n}"] == [f"t{n}-{i}" for i in range(per_thread)], "FIFO"
        assert sorted(sessions["shared"]) == sorted(f"shared-{i}" for i in range(per_thread))
    # Each send waited for one commit, and some commits carried several sends.
    assert 0 < CountingQueue.commits < threads * per_thread


def test_a_send_before_settle_does_not_wait_for_the_disk_but_a_durable_one_does(
    path: Path,
) -> None:
    class Recording(LocalQueue):
        commits: ClassVar[list[bool]] = []

        @contextmanager
        def _write_locked(self, *, durable: bool) -> Iterator[float]:
            self.commits.append(durable)
            with super()._write_locked(durable=durable) as now:
                yield now

    with Recording(path, lock_duration=30) as queue:
        queue.before_settle().send([msg("c1", "A")])
        queue.send([msg("w1", "B")])
        assert Recording.commits == [False, True]
        assert sorted(ids(queue.receive_session(10, 0) + queue.receive_session(10, 0))) == [
            "c1",
            "w1",
        ]


# -- ordering and sessions ---------------------------------------------------------


def test_takes_the_session_with_the_oldest_message_in_fifo_order(queue: LocalQueue) -> None:
    queue.send([msg("b1", "B"), msg("a1", "A"), msg("b2", "B"), msg("c1", "C"), msg("a2", "A")])
    queue.send([msg("b3", "B")])

    first = queue.receive_session(10, 0)
    assert ids(first) == ["b1", "b2", "b3"]
    assert {m.session_id for m in first} == {"B"}
    assert [m.delivery_count for m in first] == [1, 1, 1]
    second = queue.receive_session(10, 0)
    assert ids(second) == ["a1", "a2"]
    third = queue.receive_session(10, 0)
    assert ids(third) == ["c1"]
    assert queue.receive_session(10, 0) == []  # every session is held


def test_the_session_whose_message_waited_longest_goes_first(
    queue: LocalQueue, clock: Clock
) -> None:
    # A confirmation sent first but due later, or a message put back a moment ago,
    # does not go ahead of one that has been waiting.
    queue.send([OutgoingMessage(b"c", "confirm", "C", not_before=clock.now + 60)])
    queue.send([msg("a1", "A"), msg("b1", "B")])
    clock.now += 5
    (a1,) = queue.receive_session(1, 0)
    assert ids([a1]) == ["a1"]
    queue.abandon(a1)
    queue.release_session("A")
    b = queue.receive_session(1, 0)
    a = queue.receive_session(1, 0)
    assert (ids(b), ids(a)) == (["b1"], ["a1"])
    queue.complete_all([*b, *a])
    assert queue.receive_session(1, 0) == []  # the confirmation is not due
    clock.now += 60
    assert ids(queue.receive_session(1, 0)) == ["confirm"]


def test_a_claim_of_many_sessions_takes_each_once_in_order_past_those_held(
    queue: LocalQueue, path: Path, clock: Clock
) -> None:
    # One walk of the due messages serves the whole claim: a session with several
    # messages is taken once with all of them, sessions another receiver holds
    # are stepped over, and the claim stops at max_sessions.
    queue.send([msg("a1", "A"), msg("b1", "B"), msg("a2", "A"), msg("c1", "C")])
    queue.send([msg("b2", "B"), msg("d1", "D"), msg("e1", "E"), msg("f1", "F")])
    with LocalQueue(path, lock_duration=30, clock=clock) as other:
        assert [b[0].session_id for b in other.receive_sessions(1, 10, 0)] == ["A"]
        batches = queue.receive_sessions(3, 10, 0)
        assert [ids(batch) for batch in batches] == [["b1", "b2"], ["c1"], ["d1"]]
        rest = queue.receive_sessions(10, 10, 0)
        assert [ids(batch) for batch in rest] == [["e1"], ["f1"]]
        assert queue.receive_sessions(10, 10, 0) == []


def test_max_messages_and_the_rest_of_the_session_after_release(queue: LocalQueue) -> None:
    queue.send([msg(f"m{i}", "G") for i in range(5)])
    head = queue.receive_session(2, 0)
    assert ids(head) == ["m0", "m1"]
    assert queue.receive_session(10, 0) == []  # the rest waits for the session lock
    for m in head:
        queue.complete(m)
    queue.release_session("G")
    assert ids(queue.receive_session(10, 0)) == ["m2", "m3", "m4"]


def test_released_session_gives_back_unsettled_messages_in_order(queue: LocalQueue) -> None:
    queue.send([msg("m1", "G"), msg("m2", "G"), msg("m3", "G")])
    batch = queue.receive_session(3, 0)
    queue.complete(batch[1])
    queue.release_session("G")
    again = queue.receive_session(3, 0)
    assert ids(again) == ["m1", "m3"]
    assert [m.delivery_count for m in again] == [2, 2]
    with pytest.raises(LockLost):
        queue.complete(batch[0])  # the old lock died with the release


def test_messages_sent_to_a_held_session_wait_for_its_release(queue: LocalQueue) -> None:
    queue.send([msg("m1", "G")])
    held = queue.receive_session(10, 0)
    queue.send([msg("m2", "G"), msg("x1", "H")])
    assert ids(queue.receive_session(10, 0)) == ["x1"]
    queue.complete(held[0])
    queue.release_session("G")
    assert ids(queue.receive_session(10, 0)) == ["m2"]


def test_a_held_session_gives_its_next_messages_then_nothing(queue: LocalQueue) -> None:
    """A session receiver keeps its session: new messages, and abandoned ones at once."""
    queue.send([msg("m1", "G"), msg("m2", "G"), msg("x1", "H")])
    first = queue.receive_session(1, 0)
    assert ids(first) == ["m1"]
    assert ids(queue.receive_from_session("G", 10, 0)) == ["m2"]
    assert queue.receive_from_session("G", 10, 0) == []  # in flight are not handed out twice
    queue.send([msg("m3", "G")])
    queue.abandon(first[0])
    again = queue.receive_from_session("G", 10, 0)
    assert [(m.message_id, m.delivery_count) for m in again] == [("m1", 2), ("m3", 1)]
    assert ids(queue.receive_session(10, 0)) == ["x1"]  # G stays held all along


def test_receiving_from_a_session_not_held_is_lock_lost(queue: LocalQueue, clock: Clock) -> None:
    queue.send([msg("m1", "G"), msg("m2", "G")])
    with pytest.raises(LockLost):
        queue.receive_from_session("G", 1, 0)
    queue.receive_session(1, 0)
    clock.advance(31)
    with pytest.raises(LockLost):
        queue.receive_from_session("G", 1, 0)
    assert ids(queue.receive_session(1, 0)) == ["m1"]
    queue.release_session("G")
    with pytest.raises(LockLost):
        queue.receive_from_session("G", 1, 0)


def test_receiving_from_a_held_session_waits_for_a_sender(path: Path) -> None:
    with LocalQueue(path) as receiver, LocalQueue(path) as sender:
        sender.send([msg("m1", "G")])
        receiver.receive_session(1, 0)
        threading.Timer(0.2, lambda: sender.send([msg("m2", "G")])).start()
        started = time.monotonic()
        assert ids(receiver.receive_from_session("G", 5, 5)) == ["m2"]
        assert time.monotonic() - started < 4
        started = time.monotonic()
        assert receiver.receive_from_session("G", 5, 0.3) == []
        assert time.monotonic() - started >= 0.3


def test_session_lock_expiry_follows_the_lock(queue: LocalQueue, clock: Clock) -> None:
    queue.send([msg("m1", "G")])
    assert queue.session_lock_expiry("G") is None
    queue.receive_session(1, 0)
    assert queue.session_lock_expiry("G") == clock.now + 30
    clock.advance(10)
    queue.renew_session_lock("G")
    assert queue.session_lock_expiry("G") == clock.now + 30
    clock.advance(30)
    assert queue.session_lock_expiry("G") is None
    assert ids(queue.receive_session(1, 0)) == ["m1"]
    queue.release_session("G")
    assert queue.session_lock_expiry("G") is None


def test_application_properties_come_back_on_the_lock(queue: LocalQueue) -> None:
    properties = {"writeback-message-id": "orig", "trace": "ünï"}
    queue.send([OutgoingMessage(b"a", "m1", "G", properties), msg("m2", "G")])
    first, second = queue.receive_session(5, 0)
    assert isinstance(first.lock, LocalLock) and isinstance(second.lock, LocalLock)
    assert first.lock.properties == properties
    assert second.lock.properties == {}
    assert first.lock == LocalLock(first.lock.seq, first.lock.token)  # not part of identity


# -- peek-lock, lock expiry, delivery count ----------------------------------------


def test_lock_expiry_redelivers_with_a_higher_delivery_count(
    queue: LocalQueue, clock: Clock
) -> None:
    queue.send([msg("m1", "G")])
    first = queue.receive_session(1, 0)
    clock.advance(29.9)
    assert queue.receive_session(1, 0) == []
    clock.advance(0.2)
    second = queue.receive_session(1, 0)
    assert ids(second) == ["m1"]
    assert second[0].delivery_count == 2
    with pytest.raises(LockLost):
        queue.complete(first[0])
    queue.complete(second[0])
    assert queue.depth() == 0


def test_renewing_the_session_lock_keeps_it(queue: LocalQueue, clock: Clock) -> None:
    queue.send([msg("m1", "G")])
    batch = queue.receive_session(1, 0)
    clock.advance(20)
    assert queue.renew_session_lock("G") == clock.now + 30
    clock.advance(20)
    assert queue.receive_session(1, 0) == []
    queue.complete(batch[0])
    clock.advance(31)
    with pytest.raises(LockLost):
        queue.renew_session_lock("G")


def test_settling_twice_or_a_foreign_message_is_lock_lost(queue: LocalQueue) -> None:
    queue.send([msg("m1", "G")])
    (m,) = queue.receive_session(1, 0)
    queue.complete(m)
    with pytest.raises(LockLost):
        queue.complete(m)
    with pytest.raises(LockLost):
        queue.abandon(m)
    foreign = ReceivedMessage(b"", "x", "G", 1, 0.0, lock="token")
    with pytest.raises(LockLost):
        queue.dead_letter(foreign, "r", "d")
    assert issubclass(LockLost, TransientError)


def test_abandon_counts_deliveries_then_dead_letters_at_the_maximum(
    queue: LocalQueue, clock: Clock
) -> None:
    queue.send([msg("m1", "G", b"poison")])
    counts = []
    for _ in range(3):
        (m,) = queue.receive_session(1, 0)
        counts.append(m.delivery_count)
        queue.abandon(m)
        queue.release_session("G")
    assert counts == [1, 2, 3]
    assert queue.depth() == 0
    (dead,) = queue.dead_letters()
    assert dead.reason == MAX_DELIVERY_COUNT_EXCEEDED
    assert dead.delivery_count == 3
    assert dead.body == b"poison"
    assert dead.message_id == "m1"
    assert dead.session_id == "G"
    assert dead.dead_lettered_at == clock.now
    assert queue.dead_letter_count_by_reason() == {MAX_DELIVERY_COUNT_EXCEEDED: 1}


def test_lock_expiring_on_the_last_delivery_dead_letters(queue: LocalQueue, clock: Clock) -> None:
    """A message that crashes its worker every time must not loop forever."""
    queue.send([msg("m1", "G"), msg("m2", "G")])
    for _ in range(3):
        batch = queue.receive_session(1, 0)
        assert ids(batch) == ["m1"]
        clock.advance(31)  # the worker died: nobody settles, the lock expires
    survivor = queue.receive_session(5, 0)
    assert ids(survivor) == ["m2"]
    (dead,) = queue.dead_letters()
    assert (dead.message_id, dead.reason, dead.delivery_count) == (
        "m1",
        MAX_DELIVERY_COUNT_EXCEEDED,
        3,
    )
    assert "3 delivery attempts" in dead.description


def test_explicit_dead_letter_keeps_everything(queue: LocalQueue, clock: Clock) -> None:
    enqueued = clock.now
    queue.send([msg("m1", "G", b'{"bad":')])
    clock.advance(5)
    (m,) = queue.receive_session(1, 0)
    queue.dead_letter(m, "PoisonEvent", "body is not JSON: Expecting value")
    assert queue.depth() == 0
    (dead,) = queue.dead_letters()
    assert dead.body == b'{"bad":'
    assert (dead.message_id, dead.session_id) == ("m1", "G")
    assert (dead.reason, dead.description) == ("PoisonEvent", "body is not JSON: Expecting value")
    assert dead.delivery_count == 1
    assert dead.enqueued_at == enqueued
    assert dead.dead_lettered_at == enqueued + 5


def test_dead_letters_are_listed_oldest_first_with_a_limit(queue: LocalQueue) -> None:
    queue.send([msg(f"m{i}", f"G{i}") for i in range(4)])
    for _ in range(4):
        (m,) = queue.receive_session(1, 0)
        queue.dead_letter(m, "R" if m.message_id != "m2" else "S", "")
    assert ids(queue.dead_letters()) == ["m0", "m1", "m2", "m3"]  # type: ignore[arg-type]
    assert [d.message_id for d in queue.dead_letters(limit=2)] == ["m0", "m1"]
    assert queue.dead_letter_count_by_reason() == {"R": 3, "S": 1}


def test_resubmit_brings_a_dead_letter_back_once_despite_duplicate_detection(
    queue: LocalQueue,
) -> None:
    queue.send([OutgoingMessage(b"body", "m1", "G", {"trace": "t1"})])
    (m,) = queue.receive_session(1, 0)
    queue.dead_letter(m, "GraphRefused", "403")
    queue.release_session("G")
    (dead,) = queue.dead_letters()

    queue.resubmit(dead)  # well inside the duplicate window of m1
    assert queue.dead_letters() == []
    assert queue.depth() == 1
    with pytest.raises(DeadLetterNotFound):
        queue.resubmit(dead)
    assert queue.depth() == 1

    (again,) = queue.receive_session(5, 0)
    assert (again.message_id, again.session_id, again.body) == ("m1", "G", b"body")
    assert again.delivery_count == 1
    queue.complete(again)
    assert queue.depth() == 0
    queue.send([msg("m1", "G")])  # the original is still a duplicate afterwards
    assert queue.depth() == 0


def test_resubmitted_message_goes_behind_newer_ones(queue: LocalQueue) -> None:
    queue.send([msg("old", "G")])
    (m,) = queue.receive_session(1, 0)
    queue.dead_letter(m, "R", "")
    queue.release_session("G")
    queue.send([msg("new", "G")])
    queue.resubmit(queue.dead_letters()[0])
    assert ids(queue.receive_session(5, 0)) == ["new", "old"]


# -- sending --------------------------------------------------------------------


def test_duplicates_inside_the_window_are_dropped(queue: LocalQueue, clock: Clock) -> None:
    queue.send([msg("n1", "G", b"first"), msg("n1", "G", b"same batch")])
    queue.send([msg("n1", "H", b"later")])
    assert queue.depth() == 1
    clock.advance(599)
    queue.send([msg("n1", "G", b"still inside")])
    assert queue.depth() == 1
    clock.advance(2)  # the window counts from the first send, duplicates do not extend it
    queue.send([msg("n1", "G", b"outside")])
    assert queue.depth() == 2
    batch = queue.receive_session(5, 0)
    assert [m.body for m in batch] == [b"first", b"outside"]


def test_completed_message_id_is_still_a_duplicate(queue: LocalQueue) -> None:
    queue.send([msg("n1", "G")])
    (m,) = queue.receive_session(1, 0)
    queue.complete(m)
    queue.send([msg("n1", "G")])
    assert queue.depth() == 0


def test_send_is_all_or_nothing(queue: LocalQueue) -> None:
    with pytest.raises(MessageRejected):
        queue.send([msg("ok", "G"), msg("x" * 129, "G")])
    with pytest.raises(MessageRejected):
        queue.send([msg("ok", "G"), msg("m2", "")])
    with pytest.raises(MessageRejected):
        queue.send([msg("ok", "G"), msg("big", "G", b"x" * (256 * 1024 + 1))])
    assert queue.depth() == 0
    queue.send([msg("ok", "G")])  # nothing was recorded for duplicate detection either
    assert queue.depth() == 1
    assert issubclass(MessageRejected, PermanentError)


def test_abandon_with_delay_schedules_redelivery(queue: LocalQueue, clock: Clock) -> None:
    queue.send([msg("m1", "G"), msg("m2", "G")])
    first, second = queue.receive_session(2, 0)
    queue.abandon(first, delay=10)
    queue.complete(second)
    queue.release_session("G")
    assert queue.receive_session(5, 0) == []
    assert queue.depth() == 0
    assert queue.scheduled_count() == 1
    clock.advance(10)
    (again,) = queue.receive_session(5, 0)
    assert (again.message_id, again.delivery_count) == ("m1", 2)
    assert queue.depth() == 1
    assert queue.scheduled_count() == 0


def test_depth_counts_active_messages_locked_or_not(queue: LocalQueue) -> None:
    assert queue.depth() == 0
    queue.send([msg("a", "G"), msg("b", "G"), msg("c", "H")])
    assert queue.depth() == 3
    batch = queue.receive_session(5, 0)
    assert queue.depth() == 3
    queue.complete(batch[0])
    assert queue.depth() == 2
    queue.dead_letter(batch[1], "R", "")
    assert queue.depth() == 1


def test_everything_survives_reopening_the_file(path: Path, clock: Clock) -> None:
    with LocalQueue(path, lock_duration=30, clock=clock) as q:
        q.send([msg("m1", "G"), msg("m2", "G"), OutgoingMessage(b"p", "m3", "H", {"k": "v"})])
        (first,) = q.receive_session(1, 0)
        q.complete(first)
        q.release_session("G")
        (poison,) = q.receive_session(1, 0)
        q.dead_letter(poison, "R", "D")
        (held,) = q.receive_session(1, 0)  # m3 stays locked when the process goes away
        assert (first.message_id, poison.message_id, held.message_id) == ("m1", "m2", "m3")
    with LocalQueue(path, lock_duration=30, clock=clock) as q:
        assert q.depth() == 1
        assert q.receive_session(5, 0) == []  # the lock is in the file, not in memory
        clock.advance(31)
        (again,) = q.receive_session(5, 0)
        assert (again.message_id, again.body, again.delivery_count) == ("m3", b"p", 2)
        assert [(d.message_id, d.reason, d.description) for d in q.dead_letters()] == [
            ("m2", "R", "D")
        ]
        q.send([msg("m1", "G")])  # duplicate detection survives too
        assert q.depth() == 1


def test_a_file_that_is_not_a_queue_is_a_config_error(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-db"
    bogus.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError):
        LocalQueue(bogus)


def test_receive_waits_and_wakes_up_for_a_sender(path: Path) -> None:
    with LocalQueue(path) as receiver, LocalQueue(path) as sender:
        started = time.monotonic()
        assert receiver.receive_session(1, 0.2) == []
        assert 0.2 <= time.monotonic() - started < 1.0

        threading.Timer(0.1, lambda: sender.send([msg("m1", "G")])).start()
        started = time.monotonic()
        got = receiver.receive_session(1, 5)
        assert ids(got) == ["m1"]
        assert time.monotonic() - started < 1.0


# -- concurrency ----------------------------------------------------------------


def _interleaved(sessions: int, per_session: int) -> list[OutgoingMessage]:
    return [msg(f"s{s}-{i}", f"s{s}") for i in range(per_session) for s in range(sessions)]


def test_one_receiver_per_session_across_threads(path: Path) -> None:
    sessions, per_session = 12, 15
    with LocalQueue(path, lock_duration=30) as q:
        q.send(_interleaved(sessions, per_session))
        holding: set[str] = set()
        guard = threading.Lock()
        violations: list[str] = []
        seen: dict[str, list[str]] = collections.defaultdict(list)

        def worker() -> None:
            while True:
                batch = q.receive_session(4, 0.2)
                if not batch:
                    if q.depth() == 0:
                        return
                    continue
                session = batch[0].session_id
                with guard:
                    if session in holding:
                        violations.append(session)
                    holding.add(session)
                    seen[session].extend(ids(batch))
                time.sleep(0.001)
                for m in batch:
                    q.complete(m)
                with guard:
                    holding.discard(session)
                q.release_session(session)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert violations == []
        for s in range(sessions):
            assert seen[f"s{s}"] == [f"s{s}-{i}" for i in range(per_session)]


_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from writeback.adapters.local_queue import LocalQueue
    path, markers, out = sys.argv[1:4]
    q = LocalQueue(path, lock_duration=30)
    open(out + ".ready", "w").close()
    while not os.path.exists(os.path.join(markers, "..", "go")):
        time.sleep(0.005)
    idle = 0
    with open(out, "w") as log:
        while idle < 3:
            batch = q.receive_session(3, 0.1)
            if not batch:
                idle = idle + 1 if q.depth() == 0 else 0
                continue
            idle = 0
            session = batch[0].session_id
            claimed = time.monotonic_ns()
            try:
                fd = os.open(os.path.join(markers, session), os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                print(json.dumps({"violation": session}), file=log, flush=True)
                fd = None
            time.sleep(0.005)
            for m in batch:
                q.complete(m)
            print(json.dumps({"session": session, "t": claimed, "pid": os.getpid(),
                              "ids": [m.message_id for m in batch]}), file=log, flush=True)
            if fd is not None:
                os.close(fd)
                os.unlink(os.path.join(markers, session))
            q.release_session(session)
    """
)


def _python(*args: str) -> list[str]:
    return [sys.executable, "-c", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_one_receiver_per_session_across_processes(path: Path, tmp_path: Path) -> None:
    sessions, per_session = 10, 12
    with LocalQueue(path) as q:
        q.send(_interleaved(sessions, per_session))
    markers = tmp_path / "held"
    markers.mkdir()
    outs = [tmp_path / f"worker{n}.jsonl" for n in range(2)]
    workers = [
        subprocess.Popen(_python(_WORKER, str(path), str(markers), str(out)), env=_env())
        for out in outs
    ]
    deadline = time.monotonic() + 30
    while not all(Path(f"{out}.ready").exists() for out in outs):
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.01)
    (tmp_path / "go").touch()  # both start together, so both get sessions
    for w in workers:
        assert w.wait(60) == 0
    records = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
    assert [r for r in records if "violation" in r] == []
    assert len({r["pid"] for r in records}) == 2, "both processes should have taken sessions"
    by_session: dict[str, list[str]] = collections.defaultdict(list)
    for record in sorted(records, key=lambda r: r["t"]):
        by_session[record["session"]].extend(record["ids"])
    for s in range(sessions):
        assert by_session[f"s{s}"] == [f"s{s}-{i}" for i in range(per_session)]


_RECEIVE_THEN_HANG = textwrap.dedent(
    """
    import json, sys, time
    from writeback.adapters.local_queue import LocalQueue
    q = LocalQueue(sys.argv[1], lock_duration=float(sys.argv[2]))
    batch = q.receive_session(10, 5)
    print(json.dumps([m.message_id for m in batch]), flush=True)
    time.sleep(60)
    """
)


def test_a_killed_receiver_loses_its_lock_and_the_messages_come_back(path: Path) -> None:
    lock_duration = 1.5
    with LocalQueue(path, lock_duration=lock_duration) as q:
        q.send([msg("m1", "G"), msg("m2", "G")])
        child = subprocess.Popen(
            _python(_RECEIVE_THEN_HANG, str(path), str(lock_duration)),
            env=_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert json.loads(child.stdout.readline()) == ["m1", "m2"]
        received = time.monotonic()
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL

        early = q.receive_session(10, 0)
        if time.monotonic() - received < lock_duration:
            assert early == [], "the dead receiver's lock must hold until it expires"
        again = early or q.receive_session(10, 10)
        assert ids(again) == ["m1", "m2"]
        assert [m.delivery_count for m in again] == [2, 2]
        assert time.monotonic() - received < lock_duration + 2
        for m in again:
            q.complete(m)
        assert q.depth() == 0


# -- model-based test -------------------------------------------------------------


@dataclass
class Modelled:
    body: bytes
    message_id: str
    session_id: str
    order: int
    count: int = 0
    available_at: float = 0.0
    token: str | None = None


@dataclass
class Model:
    now: float
    lock_duration: float
    max_deliveries: int
    window: float
    order: int = 0
    messages: dict[bytes, Modelled] = field(default_factory=dict)
    locks: dict[str, tuple[str, float]] = field(default_factory=dict)
    held: dict[str, str] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)
    dead: list[tuple[bytes, str, int]] = field(default_factory=list)
    completed: set[bytes] = field(default_factory=set)
    sent: set[bytes] = field(default_factory=set)

    def locked(self, session: str) -> bool:
        return session in self.locks and self.locks[session][1] > self.now

    def add(self, body: bytes, message_id: str, session: str) -> None:
        self.order += 1
        self.messages[body] = Modelled(body, message_id, session, self.order, 0, self.now)

    def lock_valid(self, body: bytes, token: str) -> bool:
        m = self.messages.get(body)
        return (
            m is not None
            and m.token == token
            and self.locked(m.session_id)
            and self.locks[m.session_id][0] == token
        )

    def to_dead(self, body: bytes, reason: str) -> None:
        m = self.messages.pop(body)
        self.dead.append((body, reason, m.count))


class QueueMachine(RuleBasedStateMachine):
    """Random sends, receives, settlements, releases, replays and clock jumps, checked
    step by step against a model: nothing is lost, duplicated or delivered out of turn."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="local-queue-"))
        self.clock = Clock()
        self.queue = LocalQueue(
            self.directory / "q.db",
            lock_duration=10,
            max_delivery_count=3,
            duplicate_window=30,
            clock=self.clock,
        )
        self.model = Model(self.clock.now, 10, 3, 30)
        self.inflight: list[ReceivedMessage] = []
        #: Which modelled message each delivery was (a resubmitted copy has the same body).
        self.origin: dict[int, Modelled] = {}
        self.ids: list[str] = []

    def teardown(self) -> None:
        self.queue.close()
        for child in self.directory.iterdir():
            child.unlink()
        self.directory.rmdir()

    @initialize()
    def start(self) -> None:
        pass

    @rule(
        batch=st.lists(
            st.tuples(st.sampled_from("ABCD"), st.none() | st.integers(0, 100)),
            min_size=1,
            max_size=4,
        )
    )
    def send(self, batch: list[tuple[str, int | None]]) -> None:
        """Fresh message ids, or (an int) a repeat of an earlier one."""
        model = self.model
        outgoing = []
        for session, repeat in batch:
            body = uuid.uuid4().bytes
            if repeat is not None and self.ids:
                message_id = self.ids[-1 - repeat % len(self.ids)]
            else:
                message_id = f"n{len(self.ids)}"
                self.ids.append(message_id)
            outgoing.append(msg(message_id, session, body))
        self.queue.send(outgoing)
        model.seen = {k: v for k, v in model.seen.items() if v > model.now}
        for m in outgoing:
            if m.message_id in model.seen:
                continue
            model.seen[m.message_id] = model.now + model.window
            model.add(m.body, m.message_id, m.session_id)
            model.sent.add(m.body)

    @rule(max_messages=st.integers(1, 4))
    def receive(self, max_messages: int) -> None:
        model = self.model
        for m in sorted(model.messages.values(), key=lambda m: m.order):
            if m.count >= model.max_deliveries and not model.locked(m.session_id):
                model.to_dead(m.body, MAX_DELIVERY_COUNT_EXCEEDED)
        due = [
            m
            for m in sorted(model.messages.values(), key=lambda m: m.order)
            if m.available_at <= model.now
        ]
        # The session of the message available longest (ties: the one sent first).
        free = sorted(
            (m for m in due if not model.locked(m.session_id)),
            key=lambda m: (m.available_at, m.order),
        )
        got = self.queue.receive_session(max_messages, 0)
        if not free:
            assert got == []
            return
        session = free[0].session_id
        expected = [m for m in due if m.session_id == session][:max_messages]
        assert [m.body for m in got] == [m.body for m in expected]
        token = _token(got[0])
        model.locks[session] = (token, model.now + model.lock_duration)
        model.held[session] = token
        for m, r in zip(expected, got, strict=True):
            m.count += 1
            m.token = token
            self.origin[id(r)] = m
            assert (r.message_id, r.session_id, r.delivery_count) == (
                m.message_id,
                m.session_id,
                m.count,
            )
        self.inflight.extend(got)

    @precondition(lambda self: self.model.held)
    @rule(index=st.integers(0, 100), max_messages=st.integers(1, 4))
    def receive_more(self, index: int, max_messages: int) -> None:
        """The next receive of a session receiver that kept its session."""
        model = self.model
        session = sorted(model.held)[index % len(model.held)]
        token = model.held[session]
        if not (model.locked(session) and model.locks[session][0] == token):
            with pytest.raises(LockLost):
                self.queue.receive_from_session(session, max_messages, 0)
            return
        expected = [
            m
            for m in sorted(model.messages.values(), key=lambda m: m.order)
            if m.session_id == session and m.available_at <= model.now and m.token != token
        ][:max_messages]
        got = self.queue.receive_from_session(session, max_messages, 0)
        assert [m.body for m in got] == [m.body for m in expected]
        for m, r in zip(expected, got, strict=True):
            m.count += 1
            m.token = token
            self.origin[id(r)] = m
            assert r.delivery_count == m.count
        self.inflight.extend(got)

    def _settle(self, index: int) -> tuple[ReceivedMessage, bool]:
        r = self.inflight[index % len(self.inflight)]
        same = self.model.messages.get(r.body) is self.origin[id(r)]
        return r, same and self.model.lock_valid(r.body, _token(r))

    @precondition(lambda self: self.inflight)
    @rule(index=st.integers(0, 100))
    def complete(self, index: int) -> None:
        r, valid = self._settle(index)
        if not valid:
            with pytest.raises(LockLost):
                self.queue.complete(r)
            return
        self.queue.complete(r)
        del self.model.messages[r.body]
        self.model.completed.add(r.body)

    @precondition(lambda self: self.inflight)
    @rule(index=st.integers(0, 100), delay=st.sampled_from([0.0, 0.0, 5.0]))
    def abandon(self, index: int, delay: float) -> None:
        r, valid = self._settle(index)
        if not valid:
            with pytest.raises(LockLost):
                self.queue.abandon(r, delay=delay)
            return
        self.queue.abandon(r, delay=delay)
        m = self.model.messages[r.body]
        if m.count >= self.model.max_deliveries:
            self.model.to_dead(r.body, MAX_DELIVERY_COUNT_EXCEEDED)
        else:
            m.token = None
            m.available_at = self.model.now + delay

    @precondition(lambda self: self.inflight)
    @rule(index=st.integers(0, 100))
    def dead_letter(self, index: int) -> None:
        r, valid = self._settle(index)
        if not valid:
            with pytest.raises(LockLost):
                self.queue.dead_letter(r, "Poison", "d")
            return
        self.queue.dead_letter(r, "Poison", "d")
        self.model.to_dead(r.body, "Poison")

    @precondition(lambda self: self.model.held)
    @rule(index=st.integers(0, 100))
    def release(self, index: int) -> None:
        session = sorted(self.model.held)[index % len(self.model.held)]
        self.queue.release_session(session)
        token = self.model.held.pop(session)
        if session in self.model.locks and self.model.locks[session][0] == token:
            del self.model.locks[session]

    @precondition(lambda self: self.model.dead)
    @rule(index=st.integers(0, 100))
    def resubmit(self, index: int) -> None:
        letters = self.queue.dead_letters()
        letter = letters[index % len(letters)]
        self.queue.resubmit(letter)
        position = [body for body, _, _ in self.model.dead].index(letter.body)
        self.model.dead.pop(position)
        self.model.add(letter.body, letter.message_id, letter.session_id)

    @rule(seconds=st.sampled_from([1.0, 4.0, 11.0, 31.0]))
    def tick(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.model.now = self.clock.now

    @invariant()
    def matches_the_model(self) -> None:
        model = self.model
        due = sum(1 for m in model.messages.values() if m.available_at <= model.now)
        assert self.queue.depth() == due
        assert self.queue.scheduled_count() == len(model.messages) - due
        letters = self.queue.dead_letters(limit=10_000)
        assert [(d.body, d.reason, d.delivery_count) for d in letters] == model.dead
        with sqlite3.connect(self.directory / "q.db") as db:
            stored = [bytes(row[0]) for row in db.execute("SELECT body FROM messages")]
        assert sorted(stored) == sorted(model.messages)
        # Conservation: every accepted send is in exactly one place.
        places = [set(model.messages), model.completed, {body for body, _, _ in model.dead}]
        assert sum(len(p) for p in places) == len(model.sent)
        assert set().union(*places) == model.sent


def _token(message: ReceivedMessage) -> str:
    assert isinstance(message.lock, LocalLock)
    return message.lock.token


TestQueueMachine = QueueMachine.TestCase
TestQueueMachine.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
