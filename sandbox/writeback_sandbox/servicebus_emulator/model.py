"""The broker's state: queues, their dead-letter sub-queues, messages, locks and sessions.

No AMQP here: the protocol layer (``amqp.py``) turns frames into calls on
:class:`Broker` and its entities, under the broker's lock, and the admin endpoint
reads counts the same way. Times are Unix seconds from the broker's clock.

The rules are Service Bus's, taken from its documentation:

* every message gets the queue's next sequence number when it is stored; a
  scheduled message gets one when scheduled (to cancel it by) and a *new* one
  when it becomes active at its time, going to the tail of its session;
* peek-lock: a message is locked for ``lock_duration`` with a lock token; a lock
  that lapses, or an abandon, counts a failed delivery (the AMQP header's
  ``delivery-count``); a message whose count reaches ``max_delivery_count`` is
  dead-lettered with ``MaxDeliveryCountExceeded``. In a session entity the
  messages are locked by the session lock: when it lapses, or the receiver goes
  away, every message it held unsettled counts a failed delivery;
* duplicate detection drops, silently, a message whose id was stored within the
  window; time to live is the message's own or the queue's default, whichever is
  shorter, and an expired message is dead-lettered (``TTLExpiredException``) or
  dropped; a deferred message is delivered only when asked for by sequence number.
"""

from __future__ import annotations

import bisect
import heapq
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

MAX_DELIVERY_COUNT_EXCEEDED: Final = "MaxDeliveryCountExceeded"
TTL_EXPIRED: Final = "TTLExpiredException"
DEAD_LETTER_QUEUE: Final = "$deadletterqueue"


class MessageState(IntEnum):
    """As in the ``x-opt-message-state`` annotation the SDK reads."""

    ACTIVE = 0
    DEFERRED = 1
    SCHEDULED = 2


class BrokerError(Exception):
    """An operation the broker refuses; ``condition`` is the AMQP error symbol."""

    def __init__(self, condition: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.condition = condition
        self.description = description
        self.status = status


def lock_lost(what: str = "message") -> BrokerError:
    if what == "session":
        return BrokerError(
            "com.microsoft:session-lock-lost",
            "The session lock has expired on the MessageSession. Accept a new MessageSession.",
            410,
        )
    return BrokerError(
        "com.microsoft:message-lock-lost",
        "The lock supplied is invalid. Either the lock expired, or the message has already "
        "been removed from the queue.",
        410,
    )


@dataclass(frozen=True)
class QueueSettings:
    """What ``Microsoft.ServiceBus/namespaces/queues`` properties say, in seconds."""

    requires_session: bool = True
    lock_duration: float = 60.0
    max_delivery_count: int = 10
    #: None: no duplicate detection.
    duplicate_detection_window: float | None = 600.0
    default_message_ttl: float = 14 * 86400.0
    dead_lettering_on_message_expiration: bool = True
    #: 256 KB on the Standard tier (1 MB on Premium).
    max_message_size: int = 256 * 1024


@dataclass
class Stored:
    """One message in an entity. ``payload`` is the decoded AMQP message as sent."""

    seq: int
    payload: Any
    message_id: str | None
    session_id: str | None
    enqueued_at: float
    size: int
    expires_at: float | None = None
    state: MessageState = MessageState.ACTIVE
    available_at: float = 0.0
    #: Failed deliveries so far: the AMQP header's delivery-count.
    deliveries: int = 0
    lock_token: uuid.UUID | None = None
    locked_until: float = 0.0
    #: The receiver holding the lock (None for a lock taken through $management).
    holder: Receiver | None = None
    dead_letter_reason: str | None = None
    dead_letter_description: str | None = None
    scheduled_for: float | None = None


@dataclass(eq=False)
class Receiver:
    """A receiver link as the broker sees it; ``session`` is set once one is locked."""

    entity: Entity
    peek_lock: bool
    session: Session | None = None
    #: Sequence numbers of the messages locked to this receiver.
    held: set[int] = field(default_factory=set)
    #: True once the session lock was lost: nothing more is delivered or settled.
    lost: bool = False
    closed: bool = False


@dataclass(eq=False)
class Session:
    session_id: str
    ready: list[int] = field(default_factory=list)  # heap of sequence numbers
    holder: Receiver | None = None
    locked_until: float = 0.0
    generation: int = 0
    state: bytes | None = None
    #: Messages of this session in the entity, in any state.
    count: int = 0


class Entity:
    """A queue or a dead-letter sub-queue."""

    def __init__(
        self,
        broker: Broker,
        path: str,
        settings: QueueSettings,
        *,
        sessions: bool,
        parent: Entity | None = None,
    ) -> None:
        self.broker = broker
        self.path = path
        self.settings = settings
        self.sessions = sessions
        self.parent = parent
        self.dead_letters: Entity | None = None
        self.messages: dict[int, Stored] = {}
        self._order: list[int] = []  # sorted sequence numbers, with deleted ones left in
        self._garbage = 0
        self._ready: list[int] = []  # heap, non-session entities
        self._session_map: dict[str, Session] = {}
        self._scheduled: list[tuple[float, int]] = []
        self._expiring: list[tuple[float, int]] = []
        self._locks: list[tuple[float, int, uuid.UUID]] = []
        self._session_locks: list[tuple[float, str, int]] = []
        self._tokens: dict[uuid.UUID, int] = {}
        self._seen_ids: OrderedDict[str, float] = OrderedDict()

    @property
    def is_dead_letter_queue(self) -> bool:
        return self.parent is not None

    # -- storing ---------------------------------------------------------------

    def enqueue(
        self,
        payload: Any,
        *,
        message_id: str | None,
        session_id: str | None,
        size: int,
        ttl: float | None,
        scheduled_for: float | None,
        now: float,
    ) -> int | None:
        """Store a sent message; its sequence number, or None when it was a duplicate."""
        self.check_sendable(message_id, session_id, size)
        window = self.settings.duplicate_detection_window
        if window is not None and message_id is not None:
            self._forget_ids(now - window)
            if message_id in self._seen_ids:
                return None
            self._seen_ids[message_id] = now
        lifetime = self.settings.default_message_ttl
        if ttl is not None and ttl > 0:
            lifetime = min(lifetime, ttl)
        stored = Stored(
            seq=self.broker.next_sequence(),
            payload=payload,
            message_id=message_id,
            session_id=session_id,
            enqueued_at=now,
            size=size,
            expires_at=now + lifetime,
        )
        if scheduled_for is not None and scheduled_for > now:
            stored.state = MessageState.SCHEDULED
            stored.scheduled_for = scheduled_for
            stored.available_at = scheduled_for
            self._add(stored)
            heapq.heappush(self._scheduled, (scheduled_for, stored.seq))
            return stored.seq
        self._add(stored)
        self._make_ready(stored)
        return stored.seq

    def check_sendable(self, message_id: str | None, session_id: str | None, size: int) -> None:
        """Raise BrokerError for a message the entity refuses (size, ids, no session)."""
        if size > self.settings.max_message_size:
            raise BrokerError(
                "amqp:link:message-size-exceeded",
                f"The received message (size {size} bytes) exceeds the limit "
                f"({self.settings.max_message_size} bytes) of the entity {self.path}.",
            )
        if message_id is not None and len(message_id) > 128:
            raise BrokerError("amqp:invalid-field", "The MessageId is longer than 128 characters.")
        if self.sessions and not session_id:
            raise BrokerError(
                "amqp:not-allowed",
                "The SessionId was not set on a message, and it cannot be sent to the entity. "
                "Entities that have session support enabled can only receive messages that "
                "have the SessionId set to a valid value.",
            )
        if session_id is not None and len(session_id) > 128:
            raise BrokerError("amqp:invalid-field", "The SessionId is longer than 128 characters.")

    def _forget_ids(self, before: float) -> None:
        while self._seen_ids:
            oldest, at = next(iter(self._seen_ids.items()))
            if at >= before:
                return
            del self._seen_ids[oldest]

    def _add(self, stored: Stored) -> None:
        self.messages[stored.seq] = stored
        if self.sessions:
            self.session(stored.session_id or "").count += 1
        if not self._order or stored.seq > self._order[-1]:
            self._order.append(stored.seq)
        else:
            bisect.insort(self._order, stored.seq)
        if stored.expires_at is not None and not self.is_dead_letter_queue:
            heapq.heappush(self._expiring, (stored.expires_at, stored.seq))

    def _remove(self, stored: Stored) -> None:
        if self.messages.pop(stored.seq, None) is None:
            return
        self._unlock(stored)
        if self.sessions:
            session = self._session_map.get(stored.session_id or "")
            if session is not None:
                session.count -= 1
                self._forget_if_idle(session)
        self._garbage += 1
        if self._garbage > 1024 and self._garbage > len(self._order) // 2:
            self._order = [seq for seq in self._order if seq in self.messages]
            self._garbage = 0

    def _unlock(self, stored: Stored) -> None:
        if stored.lock_token is not None:
            self._tokens.pop(stored.lock_token, None)
        if stored.holder is not None:
            stored.holder.held.discard(stored.seq)
        stored.lock_token = None
        stored.holder = None

    def _forget_if_idle(self, session: Session) -> None:
        if session.count <= 0 and session.holder is None and session.state is None:
            self._session_map.pop(session.session_id, None)

    def _make_ready(self, stored: Stored) -> None:
        self._unlock(stored)
        stored.state = MessageState.ACTIVE
        if self.sessions:
            session = self.session(stored.session_id or "")
            heapq.heappush(session.ready, stored.seq)
        else:
            heapq.heappush(self._ready, stored.seq)
        self.broker.changed()

    def session(self, session_id: str) -> Session:
        session = self._session_map.get(session_id)
        if session is None:
            session = self._session_map[session_id] = Session(session_id)
        return session

    # -- time ------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Activate due scheduled messages, let lapsed locks go, expire messages."""
        while self._scheduled and self._scheduled[0][0] <= now:
            _, seq = heapq.heappop(self._scheduled)
            stored = self.messages.get(seq)
            if stored is None or stored.state is not MessageState.SCHEDULED:
                continue
            self._remove(stored)
            stored.seq = self.broker.next_sequence()
            stored.enqueued_at = now
            stored.scheduled_for = None
            self._add(stored)
            self._make_ready(stored)
        while self._locks and self._locks[0][0] <= now:
            _, seq, token = heapq.heappop(self._locks)
            stored = self.messages.get(seq)
            if stored is not None and stored.lock_token == token and stored.locked_until <= now:
                self._failed_delivery(stored, now)
        while self._session_locks and self._session_locks[0][0] <= now:
            _, session_id, generation = heapq.heappop(self._session_locks)
            session = self._session_map.get(session_id)
            if (
                session is not None
                and session.generation == generation
                and session.holder is not None
                and session.locked_until <= now
            ):
                session.holder.lost = True
                self.release_session(session, now)
        while self._expiring and self._expiring[0][0] <= now:
            _, seq = heapq.heappop(self._expiring)
            stored = self.messages.get(seq)
            if stored is None or stored.lock_token is not None:
                continue  # a locked message expires when its lock goes
            if stored.expires_at is not None and stored.expires_at <= now:
                self._expire(stored, now)

    def _expire(self, stored: Stored, now: float) -> None:
        if self.settings.dead_lettering_on_message_expiration:
            self.dead_letter(stored, TTL_EXPIRED, "The message expired and was dead lettered.", now)
        else:
            self._remove(stored)

    def _failed_delivery(self, stored: Stored, now: float) -> None:
        """A delivery that did not end in a settlement: count it, then redeliver or DLQ."""
        self._unlock(stored)
        stored.deliveries += 1
        limit = self.settings.max_delivery_count
        if not self.is_dead_letter_queue and stored.deliveries >= limit:
            self.dead_letter(
                stored,
                MAX_DELIVERY_COUNT_EXCEEDED,
                f"Message could not be consumed after {limit} delivery attempts.",
                now,
            )
            return
        if stored.expires_at is not None and stored.expires_at <= now:
            self._expire(stored, now)
            return
        if stored.state is MessageState.ACTIVE:
            self._make_ready(stored)

    # -- receiving -------------------------------------------------------------

    def accept_session(self, receiver: Receiver, wanted: str | None, now: float) -> str | None:
        """Lock ``wanted`` (empty or not), or the next session with a message ready;
        None when none is free. A named session held by another receiver is refused."""
        if wanted is not None:
            session = self.session(wanted)
            if session.holder is not None and session.locked_until > now:
                raise BrokerError(
                    "com.microsoft:session-cannot-be-locked",
                    f"The requested session '{wanted}' cannot be accepted. It may be locked "
                    "by another receiver.",
                )
            self._lock_session(session, receiver, now)
            return wanted
        for session in self._session_map.values():
            if session.holder is not None and session.locked_until > now:
                continue
            if self._head(session, now) is not None:
                self._lock_session(session, receiver, now)
                return session.session_id
        return None

    def _lock_session(self, session: Session, receiver: Receiver, now: float) -> None:
        if session.holder is not None:  # a lapsed lock not yet swept
            session.holder.lost = True
            self.release_session(session, now)
        session.holder = receiver
        session.generation += 1
        session.locked_until = now + self.settings.lock_duration
        heapq.heappush(
            self._session_locks, (session.locked_until, session.session_id, session.generation)
        )
        receiver.session = session

    def renew_session(self, receiver: Receiver | None, session_id: str, now: float) -> float:
        session = self._session_map.get(session_id)
        if session is None or session.holder is None or session.locked_until <= now:
            raise lock_lost("session")
        if receiver is not None and session.holder is not receiver:
            raise lock_lost("session")
        session.locked_until = now + self.settings.lock_duration
        heapq.heappush(
            self._session_locks, (session.locked_until, session.session_id, session.generation)
        )
        return session.locked_until

    def held_session(self, session_id: str, now: float) -> Session:
        session = self._session_map.get(session_id)
        if session is None or session.holder is None or session.locked_until <= now:
            raise lock_lost("session")
        return session

    def release_session(self, session: Session, now: float) -> None:
        """The session's receiver went away (or its lock lapsed): unsettled messages
        come back, each with a failed delivery counted."""
        holder = session.holder
        session.holder = None
        session.locked_until = 0.0
        session.generation += 1
        if holder is not None:
            for seq in sorted(holder.held):
                stored = self.messages.get(seq)
                if stored is not None and stored.session_id == session.session_id:
                    self._failed_delivery(stored, now)
        self.broker.changed()
        self._forget_if_idle(session)

    def _head(self, session: Session, now: float) -> Stored | None:
        while session.ready:
            stored = self.messages.get(session.ready[0])
            if (
                stored is None
                or stored.state is not MessageState.ACTIVE
                or stored.lock_token is not None
            ):
                heapq.heappop(session.ready)
                continue
            if stored.expires_at is not None and stored.expires_at <= now:
                heapq.heappop(session.ready)
                self._expire(stored, now)
                continue
            return stored
        return None

    def next_delivery(self, receiver: Receiver, now: float) -> Stored | None:
        """The next message for this receiver, locked to it (peek-lock) or removed."""
        if receiver.lost or receiver.closed:
            return None
        if self.sessions:
            session = receiver.session
            if session is None or session.holder is not receiver:
                return None
            stored = self._head(session, now)
            if stored is None:
                return None
            heapq.heappop(session.ready)
            until = session.locked_until
        else:
            stored = self._next_ready(now)
            if stored is None:
                return None
            until = now + self.settings.lock_duration
        if not receiver.peek_lock:
            self._remove(stored)
            return stored
        self.lock(stored, receiver, until)
        return stored

    def _next_ready(self, now: float) -> Stored | None:
        while self._ready:
            seq = heapq.heappop(self._ready)
            stored = self.messages.get(seq)
            if stored is None or stored.state is not MessageState.ACTIVE:
                continue
            if stored.lock_token is not None:
                continue
            expired = stored.expires_at is not None and stored.expires_at <= now
            if expired and not self.is_dead_letter_queue:
                self._expire(stored, now)
                continue
            return stored
        return None

    def lock(self, stored: Stored, receiver: Receiver | None, until: float) -> uuid.UUID:
        token = uuid.uuid4()
        stored.lock_token = token
        stored.locked_until = until
        stored.holder = receiver
        if receiver is not None:
            receiver.held.add(stored.seq)
        self._tokens[token] = stored.seq
        if not self.sessions:
            heapq.heappush(self._locks, (until, stored.seq, token))
        return token

    # -- settling --------------------------------------------------------------

    def locked(self, token: uuid.UUID, receiver: Receiver | None, now: float) -> Stored:
        """The message this lock token holds, if the lock is still good."""
        if receiver is not None and receiver.lost:
            raise lock_lost("session")
        seq = self._tokens.get(token)
        stored = self.messages.get(seq) if seq is not None else None
        if stored is None or stored.lock_token != token:
            raise lock_lost("session" if self.sessions else "message")
        if self.sessions:
            session = self._session_map.get(stored.session_id or "")
            if session is None or session.holder is None or session.locked_until <= now:
                raise lock_lost("session")
            if receiver is not None and session.holder is not receiver:
                raise lock_lost("session")
        elif stored.locked_until <= now:
            raise lock_lost()
        return stored

    def complete(self, stored: Stored) -> None:
        self._remove(stored)

    def abandon(self, stored: Stored, now: float) -> None:
        self._failed_delivery(stored, now)

    def release(self, stored: Stored) -> None:
        """AMQP ``released``: not delivered after all, so not counted."""
        self._make_ready(stored)

    def defer(self, stored: Stored) -> None:
        self._unlock(stored)
        stored.state = MessageState.DEFERRED

    def renew_lock(self, token: uuid.UUID, now: float) -> float:
        stored = self.locked(token, None, now)
        if self.sessions:
            raise BrokerError(
                "amqp:not-allowed", "Renew lock is not supported for session messages."
            )
        stored.locked_until = now + self.settings.lock_duration
        heapq.heappush(self._locks, (stored.locked_until, stored.seq, token))
        return stored.locked_until

    def dead_letter(self, stored: Stored, reason: str, description: str, now: float) -> None:
        """Move a message to the dead-letter sub-queue, keeping its sequence number."""
        if self.dead_letters is None:  # already in a dead-letter queue: it stays
            self._remove(stored)
            return
        self._remove(stored)
        stored.state = MessageState.ACTIVE
        stored.dead_letter_reason = reason
        stored.dead_letter_description = description
        stored.expires_at = None
        self.dead_letters._add(stored)
        self.dead_letters._make_ready(stored)

    def deferred(self, seq: int, session_id: str | None) -> Stored:
        stored = self.messages.get(seq)
        if stored is None or stored.state is not MessageState.DEFERRED:
            raise BrokerError(
                "com.microsoft:message-not-found",
                f"Failed to retrieve deferred message with sequence number {seq}.",
                404,
            )
        if self.sessions and stored.session_id != session_id:
            raise BrokerError(
                "com.microsoft:message-not-found",
                f"The deferred message {seq} is not in session {session_id}.",
                404,
            )
        return stored

    def cancel_scheduled(self, seq: int) -> None:
        stored = self.messages.get(seq)
        if stored is None or stored.state is not MessageState.SCHEDULED:
            raise BrokerError(
                "com.microsoft:message-not-found",
                f"The scheduled message with sequence number {seq} was not found.",
                404,
            )
        self._remove(stored)

    # -- browsing and counting -------------------------------------------------

    def peek(self, from_seq: int, count: int, session_id: str | None) -> list[Stored]:
        found: list[Stored] = []
        start = bisect.bisect_left(self._order, from_seq)
        for seq in self._order[start:]:
            stored = self.messages.get(seq)
            if stored is None:
                continue
            if session_id is not None and stored.session_id != session_id:
                continue
            found.append(stored)
            if len(found) >= count:
                break
        return found

    def counts(self) -> dict[str, int]:
        active = scheduled = deferred = 0
        for stored in self.messages.values():
            if stored.state is MessageState.SCHEDULED:
                scheduled += 1
            elif stored.state is MessageState.DEFERRED:
                deferred += 1
            else:
                active += 1
        return {"active": active, "scheduled": scheduled, "deferred": deferred}

    def size_in_bytes(self) -> int:
        return sum(m.size for m in self.messages.values())

    def iter_messages(self) -> Iterator[Stored]:
        for seq in list(self._order):
            stored = self.messages.get(seq)
            if stored is not None:
                yield stored


class Broker:
    """The namespace: queues by name (case-insensitive, like Service Bus)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.lock = threading.RLock()
        self.queues: dict[str, Entity] = {}
        self._sequence = 0
        self._listeners: list[Callable[[], None]] = []

    def next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def changed(self) -> None:
        for listener in self._listeners:
            listener()

    def create_queue(self, name: str, settings: QueueSettings) -> Entity:
        with self.lock:
            key = name.lower()
            if key in self.queues:
                raise BrokerError(
                    "com.microsoft:entity-already-exists", f"Queue {name} exists.", 409
                )
            queue = Entity(self, name, settings, sessions=settings.requires_session)
            queue.dead_letters = Entity(
                self, f"{name}/$DeadLetterQueue", settings, sessions=False, parent=queue
            )
            self.queues[key] = queue
            return queue

    def entity(self, path: str) -> Entity:
        """``queue`` or ``queue/$DeadLetterQueue`` (case-insensitive)."""
        parts = [part for part in path.strip("/").split("/") if part]
        queue = self.queues.get(parts[0].lower()) if parts else None
        if queue is None or len(parts) > 2:
            raise BrokerError(
                "amqp:not-found",
                f"The messaging entity '{path}' could not be found.",
                404,
            )
        if len(parts) == 2:
            if parts[1].lower() != DEAD_LETTER_QUEUE or queue.dead_letters is None:
                raise BrokerError(
                    "amqp:not-found", f"The messaging entity '{path}' could not be found.", 404
                )
            return queue.dead_letters
        return queue

    def tick(self, now: float) -> None:
        for queue in self.queues.values():
            queue.tick(now)
            if queue.dead_letters is not None:
                queue.dead_letters.tick(now)
