"""The embedded durable session queue for single-machine mode, on one SQLite file.

Plain sqlite3 because no maintained queue library (persist-queue, litequeue) has
sessions with exclusive session locks, peek-lock with lock expiry, delivery counts
and a dead-letter queue together; those are what this module adds, with the same
rules as a Service Bus session queue:

* FIFO per session (enqueue sequence), one receiver per session at a time, across
  threads and across processes sharing the file (claims run under ``BEGIN
  IMMEDIATE``, so two processes cannot lock the same session);
* peek-lock: a received message stays in the file, locked by its session lock,
  until it is completed, abandoned or dead-lettered; a lock that is not settled
  (crashed worker) expires after ``lock_duration`` and the message comes back;
  while the lock is held, :meth:`LocalQueue.receive_from_session` takes the
  session's next messages (new ones, and abandoned ones again at once), as a
  Service Bus session receiver does until its session is closed;
* ``delivery_count`` counts deliveries including the current one (1 on first
  receive, like the .NET SDK; the Service Bus adapter normalises to the same);
  a message delivered ``max_delivery_count`` times and then abandoned, or whose
  lock expired again, is dead-lettered with reason ``MaxDeliveryCountExceeded``;
* a ``message_id`` seen within ``duplicate_window`` seconds is dropped on send;
  a replay from the dead-letter table bypasses that check;
* dead letters are read in pages (``iter_dead_letters``) with no cap, and
  ``replay_dead_letters`` moves the chosen ones back in the same single pass.

Times are wall-clock Unix seconds (they are shared between processes and survive a
restart); ``clock`` can be replaced in tests.

The file holds every pending event (group ids, when they were noticed) and the dead
letters with their reasons, so it is private to the process's user: created mode
0600 (SQLite gives its ``-wal`` and ``-shm`` files the mode of the database), an
existing one narrowed to 0600, and opened by its absolute path, which is logged.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, cast

from writeback.errors import (
    ConfigError,
    DeadLetterNotFound,
    LockLost,
    MessageRejected,
    PermanentError,
    QueueUnavailable,
    WritebackError,
)
from writeback.ports import DeadLetter, MessageSender, OutgoingMessage, ReceivedMessage

log = logging.getLogger(__name__)

MAX_DELIVERY_COUNT_EXCEEDED: Final = "MaxDeliveryCountExceeded"
MAX_ID_LENGTH: Final = 128  # Service Bus limit for message and session ids
DEFAULT_MAX_MESSAGE_SIZE: Final = 256 * 1024  # Service Bus Standard tier


@dataclass(frozen=True)
class LocalLock:
    """Settlement handle of a received message: its row and the session lock token.

    ``properties`` are the message's application properties as sent (the port's
    ReceivedMessage has no field for them; a Service Bus message carries them).
    """

    seq: int
    token: str
    properties: dict[str, str] = field(default_factory=dict, compare=False)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    body BLOB NOT NULL,
    properties TEXT,
    enqueued_at REAL NOT NULL,
    available_at REAL NOT NULL,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    lock_token TEXT
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session_id, seq);
CREATE INDEX IF NOT EXISTS messages_by_availability ON messages (available_at, seq);
CREATE INDEX IF NOT EXISTS messages_by_deliveries ON messages (delivery_count);
CREATE TABLE IF NOT EXISTS session_locks (
    session_id TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    locked_until REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen_ids (
    message_id TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_ids_by_expiry ON seen_ids (expires_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    body BLOB NOT NULL,
    properties TEXT,
    enqueued_at REAL NOT NULL,
    delivery_count INTEGER NOT NULL,
    dead_lettered_at REAL NOT NULL,
    reason TEXT NOT NULL,
    description TEXT NOT NULL
);
"""

# A message is available when it is due and its session is not held by a live lock.
# The one available longest goes first, found through messages_by_availability: in
# order of seq, every scheduled message (a confirmation due a minute later) sent
# before it would be stepped over, at every claim. A claim walks this once for all
# the sessions it takes (see LocalQueue._due_sessions).
_DUE_SESSIONS = """
SELECT m.session_id FROM messages AS m
WHERE m.available_at <= :now
  AND NOT EXISTS (SELECT 1 FROM session_locks AS l
                  WHERE l.session_id = m.session_id AND l.locked_until > :now)
ORDER BY m.available_at, m.seq
"""
# Messages whose last allowed delivery ended without settlement (lock expired/released).
_EXHAUSTED = """
SELECT m.seq, m.delivery_count FROM messages AS m
WHERE m.delivery_count >= :max
  AND NOT EXISTS (SELECT 1 FROM session_locks AS l
                  WHERE l.session_id = m.session_id AND l.locked_until > :now)
ORDER BY m.seq
"""
_MOVE_TO_DEAD_LETTERS = """
INSERT INTO dead_letters (message_id, session_id, body, properties, enqueued_at,
                          delivery_count, dead_lettered_at, reason, description)
SELECT message_id, session_id, body, properties, enqueued_at, delivery_count, :now,
       :reason, :description
FROM messages WHERE seq = :seq
"""


class _Signal:
    """Wakes receivers of this process when a sender of this process adds work."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.generation = 0

    def notify(self) -> None:
        with self.condition:
            self.generation += 1
            self.condition.notify_all()


@dataclass
class _Send:
    """One caller's validated messages, waiting to be committed."""

    rows: list[tuple[OutgoingMessage, str | None]]
    durable: bool = True
    done: bool = False
    error: BaseException | None = None


_signals: dict[str, _Signal] = {}
_signals_lock = threading.Lock()


def _private_file(path: str) -> None:
    """Create ``path`` mode 0600 if it is not there, and narrow it to 0600 if it is."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
            log.warning("queue file %s was readable by others; now mode 0600", path)
    finally:
        os.close(fd)


def _signal_for(path: str) -> _Signal:
    with _signals_lock:
        return _signals.setdefault(path, _Signal())


class LocalQueue:
    """A Service Bus-like session queue in one SQLite file (see the module docstring).

    Safe to share between threads (one connection behind a lock) and between
    processes opening the same file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lock_duration: float = 60.0,
        max_delivery_count: int = 10,
        duplicate_window: float = 600.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        durable_commits: bool = True,
        busy_timeout: float = 10.0,
        poll_interval: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lock_duration <= 0 or max_delivery_count < 1 or duplicate_window < 0:
            raise ConfigError(
                "LocalQueue needs lock_duration > 0, max_delivery_count >= 1 "
                "and duplicate_window >= 0"
            )
        self.path = os.path.realpath(path)
        self.lock_duration = lock_duration
        self.max_delivery_count = max_delivery_count
        self.duplicate_window = duplicate_window
        self.max_message_size = max_message_size
        self._poll_interval = poll_interval
        self._durable_commits = durable_commits
        self._clock = clock
        self._lock = threading.Lock()
        #: Sends waiting for the write lock; whoever takes it commits them all.
        self._pending: list[_Send] = []
        self._pending_lock = threading.Lock()
        self._held: dict[str, str] = {}  # session id -> lock token, for release_session
        self._signal = _signal_for(self.path)
        try:
            _private_file(self.path)
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._synchronous = "NORMAL"  # the connection's mode, set again only to change it
            with self._transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
        except sqlite3.Error as error:
            raise _map_sqlite_error(error, f"cannot open queue file {self.path}") from error
        except OSError as error:
            raise ConfigError(f"cannot open queue file {self.path}: {error}") from None
        log.info("local queue at %s", self.path)

    def now(self) -> float:
        """The queue's clock (Unix seconds; tests move it)."""
        return self._clock()

    # -- sending ---------------------------------------------------------------

    def send(self, messages: list[OutgoingMessage], *, durable: bool = True) -> None:
        """Enqueue a batch in one transaction; duplicates of a recent message_id are dropped.

        ``durable=False``: the commit does not wait for the disk. Only for messages
        that a later commit of this queue stands on (a confirmation sent before the
        completion of the message it follows): WAL commits reach the disk in order,
        so a power loss that undoes this send undoes that completion too, and the
        message comes back (:meth:`before_settle` gives such a sender)."""
        if not messages:
            return
        mine = _Send([self._validated(message) for message in messages], durable)
        with self._pending_lock:
            self._pending.append(mine)
        with self._lock:  # the write lock: one thread at a time commits every waiting send
            if not mine.done:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                try:
                    self._commit_sends(batch)
                except BaseException as error:
                    for send in batch:
                        send.done, send.error = True, error
                else:
                    for send in batch:
                        send.done = True
        if mine.error is not None:
            raise mine.error
        self._signal.notify()

    def before_settle(self) -> MessageSender:
        """A sender for the worker's confirmations, which are always sent before the
        messages they follow are completed: see ``durable`` in :meth:`send`."""
        return _SendBeforeSettle(self)

    def _commit_sends(self, batch: list[_Send]) -> None:
        """Every waiting send in one transaction, durable if one of them must be:
        under a burst of webhook requests one fsync stands for many (group
        commit), instead of each request holding the write lock through its own."""
        durable = any(send.durable for send in batch)
        with self._write_locked(durable=durable) as now:
            self._db.execute("DELETE FROM seen_ids WHERE expires_at <= ?", (now,))
            for message, properties in (row for send in batch for row in send.rows):
                if self.duplicate_window > 0:
                    seen = self._db.execute(
                        "SELECT 1 FROM seen_ids WHERE message_id = ? AND expires_at > ?",
                        (message.message_id, now),
                    ).fetchone()
                    if seen:
                        continue
                    self._db.execute(
                        "INSERT OR REPLACE INTO seen_ids (message_id, expires_at) VALUES (?, ?)",
                        (message.message_id, now + self.duplicate_window),
                    )
                available = max(now, message.not_before or 0.0)
                self._insert(
                    message.message_id,
                    message.session_id,
                    message.body,
                    properties,
                    now,
                    available_at=available,
                )

    def _validated(self, message: OutgoingMessage) -> tuple[OutgoingMessage, str | None]:
        for name, value in (("message_id", message.message_id), ("session_id", message.session_id)):
            if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
                raise MessageRejected(f"{name} must be 1 to {MAX_ID_LENGTH} characters: {value!r}")
        if not isinstance(message.body, bytes):
            raise MessageRejected(f"body of {message.message_id} is not bytes")
        properties = (
            json.dumps(message.application_properties, separators=(",", ":"), sort_keys=True)
            if message.application_properties
            else None
        )
        size = len(message.body) + len(properties or "")
        if size > self.max_message_size:
            raise MessageRejected(
                f"message {message.message_id} is {size} bytes, over {self.max_message_size}"
            )
        return message, properties

    def _insert(
        self,
        message_id: str,
        session_id: str,
        body: bytes,
        properties: str | None,
        now: float,
        *,
        available_at: float | None = None,
    ) -> None:
        self._db.execute(
            "INSERT INTO messages (message_id, session_id, body, properties, enqueued_at,"
            " available_at) VALUES (?, ?, ?, ?, ?, ?)",
            (
                message_id,
                session_id,
                body,
                properties,
                now,
                now if available_at is None else available_at,
            ),
        )

    # -- receiving -------------------------------------------------------------

    def receive_session(self, max_messages: int, wait: float) -> list[ReceivedMessage]:
        """Lock the session whose message has been available longest and take up to
        ``max_messages`` of it in order; ``[]`` once ``wait`` seconds pass with none."""
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            with self._signal.condition:
                generation = self._signal.generation
            batch = self._claim(max_messages)
            if batch:
                return batch
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            with self._signal.condition:
                if self._signal.generation == generation:
                    self._signal.condition.wait(min(remaining, self._poll_interval))

    def receive_sessions(
        self, max_sessions: int, max_messages: int, wait: float
    ) -> list[list[ReceivedMessage]]:
        """Up to ``max_sessions`` sessions, each locked and batched as by
        :meth:`receive_session`; waits up to ``wait`` for the first only."""
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        first = self.receive_session(max_messages, wait)
        if not first or max_sessions == 1:
            return [first] if first else []
        return [first, *self._claim_many(max_sessions - 1, max_messages)]

    def _claim(self, max_messages: int) -> list[ReceivedMessage]:
        claimed = self._claim_many(1, max_messages)
        return claimed[0] if claimed else []

    def _claim_many(self, max_sessions: int, max_messages: int) -> list[list[ReceivedMessage]]:
        """Lock up to ``max_sessions`` sessions with due messages in one transaction."""
        batches: list[list[ReceivedMessage]] = []
        with self._write() as now:
            self._dead_letter_exhausted(now)
            for session_id in self._due_sessions(now, max_sessions):
                token = uuid.uuid4().hex
                self._db.execute(
                    "INSERT INTO session_locks (session_id, token, locked_until) VALUES (?, ?, ?)"
                    " ON CONFLICT (session_id) DO UPDATE"
                    " SET token = excluded.token, locked_until = excluded.locked_until",
                    (session_id, token, now + self.lock_duration),
                )
                rows = self._lock_messages(session_id, token, now, max_messages)
                self._held[session_id] = token
                batches.append(_received(session_id, token, rows))
        return batches

    def _due_sessions(self, now: float, limit: int) -> list[str]:
        """Up to ``limit`` distinct sessions with due messages and no live lock, in
        the order their messages became available: one walk of the index, done
        before any session is locked. Asking for one session at a time stepped
        over every message of the sessions locked so far, the other workers'
        among them, again for each session taken."""
        cursor = self._db.execute(_DUE_SESSIONS, {"now": now})
        chosen: dict[str, None] = {}
        try:
            while len(chosen) < limit and (rows := cursor.fetchmany(limit)):
                for (session_id,) in rows:
                    chosen[session_id] = None
                    if len(chosen) == limit:
                        break
        finally:
            cursor.close()
        return list(chosen)

    def receive_from_session(
        self, session_id: str, max_messages: int, wait: float
    ) -> list[ReceivedMessage]:
        """The next messages of a session this receiver holds, in order: ones sent
        since, and abandoned ones again at once (delivery count + 1); ``[]`` once
        ``wait`` seconds pass with none. Raises LockLost when the session lock
        expired or was released (a Service Bus session receiver's SessionLockLost)."""
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            with self._signal.condition:
                generation = self._signal.generation
            with self._write() as now:
                token = self._live_token(session_id, now)
                rows = self._lock_messages(session_id, token, now, max_messages)
            if rows:
                return _received(session_id, token, rows)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            with self._signal.condition:
                if self._signal.generation == generation:
                    self._signal.condition.wait(min(remaining, self._poll_interval))

    def session_lock_expiry(self, session_id: str) -> float | None:
        """When this receiver's lock on the session expires; None if it holds none."""
        with self._read() as db:
            row = db.execute(
                "SELECT locked_until FROM session_locks"
                " WHERE session_id = ? AND token = ? AND locked_until > ?",
                (session_id, self._held.get(session_id), self._clock()),
            ).fetchone()
        return None if row is None else float(row[0])

    def _live_token(self, session_id: str, now: float) -> str:
        token = self._held.get(session_id)
        row = self._db.execute(
            "SELECT 1 FROM session_locks WHERE session_id = ? AND token = ? AND locked_until > ?",
            (session_id, token, now),
        ).fetchone()
        if token is None or row is None:
            raise LockLost(f"the lock on session {session_id} expired or was released")
        return token

    def _lock_messages(
        self, session_id: str, token: str, now: float, limit: int
    ) -> list[tuple[int, str, bytes, float, int, str | None]]:
        """Lock the session's due messages not yet delivered under ``token``."""
        rows: list[tuple[int, str, bytes, float, int, str | None]] = self._db.execute(
            "UPDATE messages SET delivery_count = delivery_count + 1, lock_token = :token"
            " WHERE seq IN (SELECT seq FROM messages WHERE session_id = :session"
            " AND available_at <= :now AND (lock_token IS NULL OR lock_token != :token)"
            " ORDER BY seq LIMIT :limit)"
            " RETURNING seq, message_id, body, enqueued_at, delivery_count, properties",
            {"token": token, "session": session_id, "now": now, "limit": limit},
        ).fetchall()
        rows.sort()
        return rows

    def _dead_letter_exhausted(self, now: float) -> None:
        """Dead-letter unlocked messages whose last allowed delivery was never settled."""
        rows = self._db.execute(_EXHAUSTED, {"max": self.max_delivery_count, "now": now}).fetchall()
        for seq, count in rows:
            self._move_to_dead_letters(
                seq,
                now,
                MAX_DELIVERY_COUNT_EXCEEDED,
                f"Message could not be consumed after {count} delivery attempts.",
            )

    # -- settling --------------------------------------------------------------

    def complete(self, message: ReceivedMessage) -> None:
        """Remove a received message for good."""
        lock = _lock_of(message)
        with self._write() as now:
            self._check_lock(lock, now)
            self._db.execute("DELETE FROM messages WHERE seq = ?", (lock.seq,))

    def complete_all(self, messages: Sequence[ReceivedMessage]) -> None:
        """Remove many received messages for good, in one transaction: all or none
        (LockLost when any lock expired; the caller's messages then come back)."""
        locks = [_lock_of(message) for message in messages]
        if not locks:
            return
        with self._write() as now:
            for lock in locks:
                self._check_lock(lock, now)
            self._db.executemany("DELETE FROM messages WHERE seq = ?", [(k.seq,) for k in locks])

    def abandon(self, message: ReceivedMessage, *, delay: float = 0.0) -> None:
        """Give a message back for redelivery, after ``delay`` seconds if given.

        A message already delivered ``max_delivery_count`` times goes to the
        dead letters instead, with reason ``MaxDeliveryCountExceeded``.
        """
        lock = _lock_of(message)
        with self._write() as now:
            count = self._check_lock(lock, now)
            if count >= self.max_delivery_count:
                self._move_to_dead_letters(
                    lock.seq,
                    now,
                    MAX_DELIVERY_COUNT_EXCEEDED,
                    f"Message could not be consumed after {count} delivery attempts.",
                )
            else:
                self._db.execute(
                    "UPDATE messages SET lock_token = NULL, available_at = ? WHERE seq = ?",
                    (now + max(delay, 0.0), lock.seq),
                )
        self._signal.notify()

    def park(self, message: ReceivedMessage, *, delay: float) -> None:
        """Give a message back for ``delay`` seconds and take back the delivery its
        receive counted: the pause switch and configuration errors are not the
        event's fault, so waiting them out never brings it nearer the dead letters."""
        lock = _lock_of(message)
        with self._write() as now:
            self._check_lock(lock, now)
            self._db.execute(
                "UPDATE messages SET lock_token = NULL, available_at = ?,"
                " delivery_count = MAX(delivery_count - 1, 0) WHERE seq = ?",
                (now + max(delay, 0.0), lock.seq),
            )
        self._signal.notify()

    def dead_letter_copy(
        self,
        message: OutgoingMessage,
        reason: str,
        description: str,
        *,
        delivery_count: int,
        enqueued_at: float,
    ) -> None:
        """Write a copy of a message straight into the dead letters (the Functions
        host's settlement: the host itself completes the message it delivered)."""
        with self._write(durable=True) as now:
            self._db.execute(
                "INSERT INTO dead_letters (message_id, session_id, body, properties,"
                " enqueued_at, delivery_count, dead_lettered_at, reason, description)"
                " VALUES (?, ?, ?, NULL, ?, ?, ?, ?, ?)",
                (
                    message.message_id,
                    message.session_id,
                    message.body,
                    enqueued_at,
                    delivery_count,
                    now,
                    reason,
                    description,
                ),
            )

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        """Move a received message to the dead letters with the reason a person will read."""
        lock = _lock_of(message)
        with self._write() as now:
            self._check_lock(lock, now)
            self._move_to_dead_letters(lock.seq, now, reason, description)

    def renew_session_lock(self, session_id: str) -> float:
        """Extend a held session lock by ``lock_duration``; returns the new expiry."""
        with self._write() as now:
            token = self._held.get(session_id)
            until = now + self.lock_duration
            updated = self._db.execute(
                "UPDATE session_locks SET locked_until = ?"
                " WHERE session_id = ? AND token = ? AND locked_until > ?",
                (until, session_id, token, now),
            ).rowcount
            if not updated:
                raise LockLost(f"session {session_id} is not held by this receiver")
        return until

    def release_session(self, session_id: str) -> None:
        """Unlock a session; its unsettled messages become available again at once."""
        with self._write():
            token = self._held.pop(session_id, None)
            if token is not None:
                self._db.execute(
                    "DELETE FROM session_locks WHERE session_id = ? AND token = ?",
                    (session_id, token),
                )
        self._signal.notify()

    def _check_lock(self, lock: LocalLock, now: float) -> int:
        row = self._db.execute(
            "SELECT m.delivery_count FROM messages AS m"
            " JOIN session_locks AS l ON l.session_id = m.session_id"
            " WHERE m.seq = ? AND m.lock_token = ? AND l.token = ? AND l.locked_until > ?",
            (lock.seq, lock.token, lock.token, now),
        ).fetchone()
        if row is None:
            raise LockLost(
                "the message lock expired, was released or the message was already settled"
            )
        count: int = row[0]
        return count

    def _move_to_dead_letters(self, seq: int, now: float, reason: str, description: str) -> None:
        self._db.execute(
            _MOVE_TO_DEAD_LETTERS,
            {"seq": seq, "now": now, "reason": reason, "description": description},
        )
        self._db.execute("DELETE FROM messages WHERE seq = ?", (seq,))

    # -- dead letters and stats ------------------------------------------------

    def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters."""
        return self._dead_letter_page(0, max(limit, 0))

    def iter_dead_letters(self, *, page_size: int = 500) -> Iterator[DeadLetter]:
        """Every dead letter, oldest first, read page by page (keyset on the sequence)."""
        after = 0
        while True:
            page = self._dead_letter_page(after, page_size)
            yield from page
            if len(page) < page_size:
                return
            after = cast(int, page[-1].lock)

    def replay_dead_letters(
        self, choose: Callable[[DeadLetter], bool]
    ) -> Generator[tuple[DeadLetter, bool, WritebackError | None], None, None]:
        """One pass over the dead letters, oldest first, moving back what ``choose``
        picks as it goes; yields ``(letter, chosen, error)`` for each one looked at
        (``error``: the PermanentError that kept a chosen one from moving)."""
        for letter in self.iter_dead_letters():
            if not choose(letter):
                yield letter, False, None
                continue
            try:
                self.resubmit(letter)
            except PermanentError as error:
                yield letter, True, error
                continue
            yield letter, True, None

    def _dead_letter_page(self, after: int, limit: int) -> list[DeadLetter]:
        with self._read() as db:
            rows = db.execute(
                "SELECT seq, body, message_id, session_id, reason, description,"
                " dead_lettered_at, delivery_count, enqueued_at"
                " FROM dead_letters WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [
            DeadLetter(
                body=bytes(body),
                message_id=message_id,
                session_id=session_id,
                reason=reason,
                description=description,
                dead_lettered_at=dead_lettered_at,
                delivery_count=delivery_count,
                enqueued_at=enqueued_at,
                lock=seq,
            )
            for (
                seq,
                body,
                message_id,
                session_id,
                reason,
                description,
                dead_lettered_at,
                delivery_count,
                enqueued_at,
            ) in rows
        ]

    def resubmit(self, dead_letter: DeadLetter) -> None:
        """Move one dead letter back to the end of the queue with a fresh delivery count.

        Not subject to duplicate detection: a replay is never dropped.
        """
        if not isinstance(dead_letter.lock, int):
            raise DeadLetterNotFound("this dead letter did not come from LocalQueue.dead_letters")
        with self._write() as now:
            row = self._db.execute(
                "SELECT message_id, session_id, body, properties FROM dead_letters WHERE seq = ?",
                (dead_letter.lock,),
            ).fetchone()
            if row is None:
                raise DeadLetterNotFound(
                    f"dead letter {dead_letter.message_id} is gone (already resubmitted?)"
                )
            self._db.execute("DELETE FROM dead_letters WHERE seq = ?", (dead_letter.lock,))
            self._insert(row[0], row[1], bytes(row[2]), row[3], now)
        self._signal.notify()

    def depth(self) -> int:
        """Active messages: due now, locked or not (scheduled ones are not counted)."""
        with self._read() as db:
            count: int = db.execute(
                "SELECT count(*) FROM messages WHERE available_at <= ?", (self._clock(),)
            ).fetchone()[0]
        return count

    def scheduled_count(self) -> int:
        """Messages abandoned with a delay that is not over yet."""
        with self._read() as db:
            count: int = db.execute(
                "SELECT count(*) FROM messages WHERE available_at > ?", (self._clock(),)
            ).fetchone()[0]
        return count

    def dead_letter_count_by_reason(self) -> dict[str, int]:
        with self._read() as db:
            rows = db.execute(
                "SELECT reason, count(*) FROM dead_letters GROUP BY reason ORDER BY reason"
            ).fetchall()
        return {reason: count for reason, count in rows}

    # -- plumbing --------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> LocalQueue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def _write(self, *, durable: bool = False) -> Iterator[float]:
        """One write transaction, taken before reading so no other process interleaves.

        ``durable``: the commit is on disk before it returns (fsync), for what a
        crash must not lose: a message the webhook has acknowledged to Graph, a
        copy that stands for one the host completes. Settling, claiming and
        rescheduling commit without waiting for the disk: after a power loss they
        are at worst undone, and the message comes back (the worker is idempotent).
        A later durable commit makes every earlier one durable too (one WAL)."""
        with self._lock, self._write_locked(durable=durable) as now:
            yield now

    @contextmanager
    def _write_locked(self, *, durable: bool) -> Iterator[float]:
        """:meth:`_write` for a caller that holds the write lock already."""
        try:
            mode = self._sync_mode(durable)
            if mode != self._synchronous:
                self._db.execute(f"PRAGMA synchronous={mode}")
                self._synchronous = mode
            with self._transaction():
                yield self._clock()
        except sqlite3.Error as error:
            raise _map_sqlite_error(error, f"queue file {self.path}") from error

    def _sync_mode(self, durable: bool) -> str:
        return "FULL" if durable and self._durable_commits else "NORMAL"

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as error:
                raise _map_sqlite_error(error, f"queue file {self.path}") from error


def _received(
    session_id: str, token: str, rows: list[tuple[int, str, bytes, float, int, str | None]]
) -> list[ReceivedMessage]:
    return [
        ReceivedMessage(
            body=bytes(body),
            message_id=message_id,
            session_id=session_id,
            delivery_count=delivery_count,
            enqueued_at=enqueued_at,
            lock=LocalLock(seq, token, json.loads(properties) if properties else {}),
        )
        for seq, message_id, body, enqueued_at, delivery_count, properties in rows
    ]


def _lock_of(message: ReceivedMessage) -> LocalLock:
    if not isinstance(message.lock, LocalLock):
        raise LockLost("this message was not received from a LocalQueue")
    return message.lock


def _map_sqlite_error(error: sqlite3.Error, where: str) -> Exception:
    """Busy, locked, I/O and disk-full are worth retrying; a foreign file is not."""
    if isinstance(error, sqlite3.DatabaseError) and "not a database" in str(error):
        return ConfigError(f"{where} is not a writeback queue: {error}")
    if isinstance(error, sqlite3.OperationalError | sqlite3.DatabaseError):
        return QueueUnavailable(f"{where}: {error}")
    return ConfigError(f"{where}: {error}")


class _SendBeforeSettle:
    """:meth:`LocalQueue.send` without waiting for the disk (:meth:`LocalQueue.before_settle`)."""

    def __init__(self, queue: LocalQueue) -> None:
        self._queue = queue

    def send(self, messages: list[OutgoingMessage]) -> None:
        self._queue.send(messages, durable=False)
