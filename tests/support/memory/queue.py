"""An in-memory session queue with the rules of LocalQueue and Service Bus (the EventQueue port).

The same rules as :class:`writeback.adapters.local_queue.LocalQueue`, held in
a few dicts instead of a SQLite file:

* FIFO per session; :meth:`MemoryQueue.receive_session` locks the session with
  the oldest available message and takes up to ``max_messages`` of it; a held
  session is given to no other receive until it is released or its lock
  (``lock_duration``, on the queue's ``clock``) expires;
* peek-lock: a message stays until completed, abandoned, parked or
  dead-lettered; settling with a lock that expired, was released or was
  already used raises :class:`~writeback.errors.LockLost`;
* ``delivery_count`` counts deliveries including the current one; a message
  abandoned on its ``max_delivery_count``-th delivery, or whose lock ran out
  on it, is dead-lettered as ``MaxDeliveryCountExceeded``; ``park`` takes back
  the delivery its receive counted;
* a ``message_id`` seen within ``duplicate_window`` seconds (counted from its
  first send) is dropped on send; a resubmitted dead letter is not;
* ids of 1 to 128 characters and bodies up to ``max_message_size`` bytes, or
  :class:`~writeback.errors.MessageRejected` for the whole batch.

Kinder than the real queues: nothing is ever lost or slow, settling cannot
fail unless a fault is scheduled (``faults``, by method name), a delayed
abandon is one atomic step (Service Bus completes and re-sends a copy), and
there is no process boundary (``receiver()`` gives another receiver on the
same messages, as a second process opening LocalQueue's file would be).

For assertions: :attr:`MemoryQueue.settlements` lists every settle call in
order, with its delay or dead-letter reason.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field

from tests.support.memory.faults import Faults
from writeback.adapters.local_queue import MAX_DELIVERY_COUNT_EXCEEDED, MAX_ID_LENGTH
from writeback.errors import (
    ConfigError,
    DeadLetterNotFound,
    LockLost,
    MessageRejected,
    PermanentError,
)
from writeback.ports import DeadLetter, OutgoingMessage, ReceivedMessage, ReplayStep

DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024


@dataclass(frozen=True)
class MemoryLock:
    """Settlement handle of a received message: its sequence number and session lock token."""

    seq: int
    token: str


@dataclass(frozen=True)
class Settled:
    """One settle call as the queue saw it (for assertions on delays and reasons)."""

    action: str  # "complete" | "abandon" | "park" | "dead_letter"
    message_id: str
    session_id: str
    delivery_count: int
    at: float
    delay: float = 0.0
    reason: str = ""
    description: str = ""


@dataclass
class _Message:
    seq: int
    message_id: str
    session_id: str
    body: bytes
    properties: dict[str, str] | None
    enqueued_at: float
    available_at: float
    delivery_count: int = 0
    lock_token: str | None = None


@dataclass
class _SessionLock:
    token: str
    until: float


@dataclass
class _Broker:
    """What every receiver of one queue shares."""

    messages: dict[int, _Message] = field(default_factory=dict)
    locks: dict[str, _SessionLock] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)  # message id -> window end
    #: seq -> the dead letter and the application properties it was sent with.
    dead: dict[int, tuple[DeadLetter, dict[str, str] | None]] = field(default_factory=dict)
    settlements: list[Settled] = field(default_factory=list)
    next_seq: int = 1
    condition: threading.Condition = field(default_factory=threading.Condition)


class MemoryQueue:
    """A session queue in memory (see the module docstring). Thread-safe."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        lock_duration: float = 60.0,
        max_delivery_count: int = 10,
        duplicate_window: float = 600.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        _broker: _Broker | None = None,
    ) -> None:
        if lock_duration <= 0 or max_delivery_count < 1 or duplicate_window < 0:
            raise ConfigError(
                "MemoryQueue needs lock_duration > 0, max_delivery_count >= 1 "
                "and duplicate_window >= 0"
            )
        self.lock_duration = lock_duration
        self.max_delivery_count = max_delivery_count
        self.duplicate_window = duplicate_window
        self.max_message_size = max_message_size
        self.faults = Faults()
        self._clock = clock
        self._broker = _broker or _Broker()
        self._held: dict[str, str] = {}  # session id -> lock token, for release_session

    def receiver(self) -> MemoryQueue:
        """Another receiver of the same queue (its own held sessions, shared messages)."""
        return MemoryQueue(
            clock=self._clock,
            lock_duration=self.lock_duration,
            max_delivery_count=self.max_delivery_count,
            duplicate_window=self.duplicate_window,
            max_message_size=self.max_message_size,
            _broker=self._broker,
        )

    # -- sending ---------------------------------------------------------------

    def send(self, messages: list[OutgoingMessage]) -> None:
        """Enqueue a batch, all or nothing; duplicates of a recent message_id are dropped."""
        self.faults.before("send")
        for message in messages:
            self._validate(message)
        broker = self._broker
        with broker.condition:
            now = self._clock()
            for message_id in [m for m, until in broker.seen.items() if until <= now]:
                del broker.seen[message_id]
            for message in messages:
                if self.duplicate_window > 0:
                    if message.message_id in broker.seen:
                        continue
                    broker.seen[message.message_id] = now + self.duplicate_window
                self._insert(
                    message.message_id,
                    message.session_id,
                    message.body,
                    dict(message.application_properties or {}) or None,
                    now,
                    available_at=max(now, message.not_before or 0.0),
                )
            broker.condition.notify_all()
        self.faults.after("send")

    def _validate(self, message: OutgoingMessage) -> None:
        for name, value in (("message_id", message.message_id), ("session_id", message.session_id)):
            if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
                raise MessageRejected(f"{name} must be 1 to {MAX_ID_LENGTH} characters: {value!r}")
        if not isinstance(message.body, bytes):
            raise MessageRejected(f"body of {message.message_id} is not bytes")
        properties = message.application_properties
        size = len(message.body) + (
            len(json.dumps(properties, separators=(",", ":"), sort_keys=True)) if properties else 0
        )
        if size > self.max_message_size:
            raise MessageRejected(
                f"message {message.message_id} is {size} bytes, over {self.max_message_size}"
            )

    def _insert(
        self,
        message_id: str,
        session_id: str,
        body: bytes,
        properties: dict[str, str] | None,
        now: float,
        *,
        available_at: float | None = None,
    ) -> None:
        broker = self._broker
        seq = broker.next_seq
        broker.next_seq += 1
        due = now if available_at is None else available_at
        broker.messages[seq] = _Message(seq, message_id, session_id, body, properties, now, due)

    # -- receiving -------------------------------------------------------------

    def receive_session(self, max_messages: int, wait: float) -> list[ReceivedMessage]:
        """Lock the session with the oldest available message and take up to
        ``max_messages`` of it in order; ``[]`` once ``wait`` real seconds pass with none."""
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self.faults.before("receive_session")
        deadline = time.monotonic() + max(wait, 0.0)
        broker = self._broker
        with broker.condition:
            while True:
                batch = self._claim(max_messages)
                if batch:
                    return batch
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                # Polls too: with a hand-driven clock, "due" changes without a notify.
                broker.condition.wait(min(remaining, 0.05))

    def receive_sessions(
        self, max_sessions: int, max_messages: int, wait: float
    ) -> list[list[ReceivedMessage]]:
        """Up to ``max_sessions`` sessions, as :meth:`receive_session` takes one; waits
        for the first only."""
        first = self.receive_session(max_messages, wait)
        if not first:
            return []
        batches = [first]
        with self._broker.condition:
            while len(batches) < max_sessions and (batch := self._claim(max_messages)):
                batches.append(batch)
        return batches

    def _claim(self, max_messages: int) -> list[ReceivedMessage]:
        broker = self._broker
        now = self._clock()
        self._dead_letter_exhausted(now)
        ready = sorted(
            (m for m in broker.messages.values() if m.available_at <= now),
            key=lambda m: m.seq,
        )
        session = next((m.session_id for m in ready if not self._locked(m.session_id, now)), None)
        if session is None:
            return []
        token = uuid.uuid4().hex
        broker.locks[session] = _SessionLock(token, now + self.lock_duration)
        self._held[session] = token
        taken = [m for m in ready if m.session_id == session][:max_messages]
        for message in taken:
            message.delivery_count += 1
            message.lock_token = token
        return [
            ReceivedMessage(
                body=m.body,
                message_id=m.message_id,
                session_id=m.session_id,
                delivery_count=m.delivery_count,
                enqueued_at=m.enqueued_at,
                lock=MemoryLock(m.seq, token),
            )
            for m in taken
        ]

    def _locked(self, session_id: str, now: float) -> bool:
        lock = self._broker.locks.get(session_id)
        return lock is not None and lock.until > now

    def _dead_letter_exhausted(self, now: float) -> None:
        """Dead-letter unlocked messages whose last allowed delivery was never settled."""
        for message in sorted(self._broker.messages.values(), key=lambda m: m.seq):
            if message.delivery_count >= self.max_delivery_count and not self._locked(
                message.session_id, now
            ):
                self._move_to_dead_letters(
                    message,
                    now,
                    MAX_DELIVERY_COUNT_EXCEEDED,
                    f"Message could not be consumed after {message.delivery_count} "
                    "delivery attempts.",
                )

    # -- settling --------------------------------------------------------------

    def complete(self, message: ReceivedMessage) -> None:
        self.faults.before("complete")
        with self._broker.condition:
            held, now = self._check(message)
            self._record("complete", held, now)
            del self._broker.messages[held.seq]
        self.faults.after("complete")

    def complete_all(self, messages: Sequence[ReceivedMessage]) -> None:
        """All or none, like the embedded queue's one transaction."""
        self.faults.before("complete")
        with self._broker.condition:
            checked = [self._check(message) for message in messages]
            for held, now in checked:
                self._record("complete", held, now)
                del self._broker.messages[held.seq]
        self.faults.after("complete")

    def abandon(self, message: ReceivedMessage, *, delay: float = 0.0) -> None:
        """Give a message back for redelivery after ``delay`` seconds; on its last
        allowed delivery it goes to the dead letters (``MaxDeliveryCountExceeded``)."""
        self.faults.before("abandon")
        broker = self._broker
        with broker.condition:
            held, now = self._check(message)
            self._record("abandon", held, now, delay=delay)
            if held.delivery_count >= self.max_delivery_count:
                self._move_to_dead_letters(
                    held,
                    now,
                    MAX_DELIVERY_COUNT_EXCEEDED,
                    f"Message could not be consumed after {held.delivery_count} delivery attempts.",
                )
            else:
                held.lock_token = None
                held.available_at = now + max(delay, 0.0)
            broker.condition.notify_all()
        self.faults.after("abandon")

    def park(self, message: ReceivedMessage, *, delay: float) -> None:
        """Give a message back for ``delay`` seconds without counting the delivery."""
        self.faults.before("park")
        broker = self._broker
        with broker.condition:
            held, now = self._check(message)
            self._record("park", held, now, delay=delay)
            held.lock_token = None
            held.available_at = now + max(delay, 0.0)
            held.delivery_count = max(held.delivery_count - 1, 0)
            broker.condition.notify_all()
        self.faults.after("park")

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        self.faults.before("dead_letter")
        with self._broker.condition:
            held, now = self._check(message)
            self._record("dead_letter", held, now, reason=reason, description=description)
            self._move_to_dead_letters(held, now, reason, description)
        self.faults.after("dead_letter")

    def renew_session_lock(self, session_id: str) -> float:
        """Extend a held session lock by ``lock_duration``; returns the new expiry."""
        with self._broker.condition:
            now = self._clock()
            lock = self._broker.locks.get(session_id)
            if lock is None or lock.token != self._held.get(session_id) or lock.until <= now:
                raise LockLost(f"session {session_id} is not held by this receiver")
            lock.until = now + self.lock_duration
            return lock.until

    def release_session(self, session_id: str) -> None:
        """Unlock a session; its unsettled messages become available again at once."""
        self.faults.before("release_session")
        broker = self._broker
        with broker.condition:
            token = self._held.pop(session_id, None)
            lock = broker.locks.get(session_id)
            if token is not None and lock is not None and lock.token == token:
                del broker.locks[session_id]
            broker.condition.notify_all()

    def _check(self, message: ReceivedMessage) -> tuple[_Message, float]:
        lock = message.lock
        if not isinstance(lock, MemoryLock):
            raise LockLost("this message was not received from a MemoryQueue")
        now = self._clock()
        held = self._broker.messages.get(lock.seq)
        session = self._broker.locks.get(message.session_id)
        if (
            held is None
            or held.lock_token != lock.token
            or session is None
            or session.token != lock.token
            or session.until <= now
        ):
            raise LockLost(
                "the message lock expired, was released or the message was already settled"
            )
        return held, now

    def _record(
        self,
        action: str,
        held: _Message,
        now: float,
        *,
        delay: float = 0.0,
        reason: str = "",
        description: str = "",
    ) -> None:
        self._broker.settlements.append(
            Settled(
                action,
                held.message_id,
                held.session_id,
                held.delivery_count,
                now,
                delay=delay,
                reason=reason,
                description=description,
            )
        )

    def _move_to_dead_letters(
        self, message: _Message, now: float, reason: str, description: str
    ) -> None:
        broker = self._broker
        del broker.messages[message.seq]
        broker.dead[message.seq] = (
            DeadLetter(
                body=message.body,
                message_id=message.message_id,
                session_id=message.session_id,
                reason=reason,
                description=description,
                dead_lettered_at=now,
                lock=message.seq,
                delivery_count=message.delivery_count,
                enqueued_at=message.enqueued_at,
            ),
            message.properties,
        )

    # -- dead letters and stats ------------------------------------------------

    @property
    def settlements(self) -> list[Settled]:
        """Every settle call so far, in order (a copy)."""
        with self._broker.condition:
            return list(self._broker.settlements)

    def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        """Dead letters, oldest first."""
        with self._broker.condition:
            return [self._broker.dead[seq][0] for seq in sorted(self._broker.dead)][:limit]

    def iter_dead_letters(self, *, page_size: int = 500) -> Iterator[DeadLetter]:
        """Every dead letter, oldest first (a copy of the list: one page in memory)."""
        yield from self.dead_letters(limit=len(self._broker.dead))

    def replay_dead_letters(
        self, choose: Callable[[DeadLetter], bool]
    ) -> Generator[ReplayStep, None, None]:
        """One pass, oldest first, moving back what ``choose`` picks as it goes."""
        for letter in list(self.iter_dead_letters()):
            if not choose(letter):
                yield letter, False, None
                continue
            try:
                self.resubmit(letter)
            except PermanentError as error:
                yield letter, True, error
                continue
            yield letter, True, None

    def resubmit(self, dead_letter: DeadLetter) -> None:
        """Move one dead letter back to the end of the queue with a fresh delivery
        count; never dropped as a duplicate."""
        if not isinstance(dead_letter.lock, int):
            raise DeadLetterNotFound("this dead letter did not come from MemoryQueue.dead_letters")
        broker = self._broker
        with broker.condition:
            found = broker.dead.pop(dead_letter.lock, None)
            if found is None:
                raise DeadLetterNotFound(
                    f"dead letter {dead_letter.message_id} is gone (already resubmitted?)"
                )
            letter, properties = found
            now = self._clock()
            self._insert(letter.message_id, letter.session_id, letter.body, properties, now)
            broker.condition.notify_all()

    def depth(self) -> int:
        """Active messages: due now, locked or not (scheduled ones are not counted)."""
        with self._broker.condition:
            now = self._clock()
            return sum(1 for m in self._broker.messages.values() if m.available_at <= now)

    def scheduled_count(self) -> int:
        """Messages abandoned or parked with a delay that is not over yet."""
        with self._broker.condition:
            now = self._clock()
            return sum(1 for m in self._broker.messages.values() if m.available_at > now)

    def dead_letter_count_by_reason(self) -> dict[str, int]:
        with self._broker.condition:
            reasons = Counter(letter.reason for letter, _ in self._broker.dead.values())
            return dict(sorted(reasons.items()))

    def close(self) -> None:
        """Nothing to release; the messages stay for other receivers."""
