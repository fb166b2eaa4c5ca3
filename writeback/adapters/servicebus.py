"""The EventQueue port over Azure Service Bus (azure-servicebus, sync API).

The queue must have sessions enabled (session id = group id) and, ideally,
duplicate detection (message id = notification id). The SDK is imported lazily so
single-machine mode and ``--help`` never pay for it.

What Service Bus does not do by itself, done here so both queues keep one contract:

* ``delivery_count`` is deliveries including the current one (1 on first receive).
  The Python SDK exposes the raw AMQP header, which is one lower; we add 1.
* ``abandon(message, delay=...)``: Service Bus cannot delay an abandon, so a copy is
  scheduled for later and the original completed (not atomic: a crash in between
  gives a duplicate, which the idempotent worker absorbs). The copy carries the
  deliveries so far and the original message id in application properties, so
  ``delivery_count``, ``message_id`` and the max-delivery rule carry on.
* ``resubmit`` and ``replay_dead_letters`` send a copy under a message id derived
  from the dead letter's sequence number (fresh, so duplicate detection cannot
  drop a replay, yet the same for a retried replay of the same letter, which the
  window then drops), then complete the dead letter (not atomic either). A dead
  letter of the Functions host's hand-off session (``<group>#dl-<random>``, the
  group's session in ``writeback-session-id``) is reported, filtered and
  replayed as its group's: the copy goes to the group's own session.
* Dead letters are read in pages, with no cap: ``iter_dead_letters`` peeks
  (nothing locked), ``replay_dead_letters`` moves the chosen in one pass over the
  dead-letter queue in peek-lock, holding the letters it passes over until the
  pass ends (then abandoned; Service Bus counts that as a delivery of the dead
  letter, which only shows in its ``delivery_count``).

Errors come out as writeback's own: ``QueueUnavailable`` (try later), ``LockLost``
(the message will be redelivered), ``MessageRejected`` and ``QueueRefused``
(a person has to look).

Known SDK limits: a peer that accepts TCP but never speaks AMQP blocks the SDK's
connection handshake without a timeout; ``depth()`` and ``scheduled_count()`` need
Manage rights (the administration API, "Azure Service Bus Data Owner" with Entra
ID) because a session queue cannot be browsed without a session, whereas the
dead letters need only Listen ("Azure Service Bus Data Receiver").
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import logging
import math
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from writeback.adapters.local_queue import MAX_DELIVERY_COUNT_EXCEEDED, MAX_ID_LENGTH
from writeback.domain.events import HANDOFF_SESSION_PROPERTY, group_session
from writeback.errors import (
    DeadLetterNotFound,
    LockLost,
    MessageRejected,
    QueueRefused,
    QueueUnavailable,
    WritebackError,
)
from writeback.ports import DeadLetter, OutgoingMessage, ReceivedMessage

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.servicebus import (
        ServiceBusClient,
        ServiceBusMessage,
        ServiceBusReceivedMessage,
        ServiceBusReceiver,
        ServiceBusSender,
    )
    from azure.servicebus.management import ServiceBusAdministrationClient

__all__ = [
    "ORIGINAL_MESSAGE_ID",
    "PRIOR_DELIVERIES",
    "DeadLetterNotFound",
    "LockLost",
    "MessageRejected",
    "QueueRefused",
    "QueueUnavailable",
    "ServiceBusQueue",
    "dead_letter_from_servicebus_message",
    "derived_message_id",
    "from_servicebus_message",
    "map_servicebus_error",
    "to_servicebus_message",
]

_log = logging.getLogger(__name__)

#: Application property: deliveries the message had before it was re-sent by us.
PRIOR_DELIVERIES: Final = "writeback-prior-deliveries"
#: Application property: the message id it had before it was re-sent under a new one.
ORIGINAL_MESSAGE_ID: Final = "writeback-message-id"
_OWN_PROPERTIES: Final = frozenset(
    {PRIOR_DELIVERIES, ORIGINAL_MESSAGE_ID, HANDOFF_SESSION_PROPERTY}
)
_BROKER_PROPERTIES: Final = frozenset({"DeadLetterReason", "DeadLetterErrorDescription"})
#: Session receivers accepting sessions ahead of the callers (:class:`_Acceptors`).
CONCURRENT_ACCEPTS: Final = 8
#: How long one accept waits on the broker for a session with a message.
ACCEPT_WAIT: Final = 10.0
#: How long an accepted session waits for a caller before it is given back.
READY_FOR: Final = 1.0
#: How long the messages of an accepted session may take to come down its link.
_RECEIVE_WAIT: Final = 2.0
#: A session whose lock lapses sooner than this is not handed out.
_LOCK_MARGIN: Final = 0.25
#: After a session was accepted, the other accepting threads join in this long.
_BURST_WINDOW: Final = 2.0
#: How soon after ``depth()`` a ``scheduled_count()`` reads the same snapshot.
_SAME_COUNT: Final = 0.5
_MAX_BATCH: Final = 100  # messages per send, the Service Bus per-transaction limit
_MAX_DEAD_LETTER_TEXT: Final = 4096


# -- pure conversions --------------------------------------------------------------


def to_servicebus_message(
    message: OutgoingMessage, *, scheduled_at: datetime.datetime | None = None
) -> ServiceBusMessage:
    """The SDK message for one outgoing message; invalid ids are rejected up front."""
    from azure.servicebus import ServiceBusMessage

    for name, value in (("message_id", message.message_id), ("session_id", message.session_id)):
        if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
            raise MessageRejected(f"{name} must be 1 to {MAX_ID_LENGTH} characters: {value!r}")
    if not isinstance(message.body, bytes):
        raise MessageRejected(f"body of {message.message_id} is not bytes")
    properties: dict[str | bytes, Any] | None = None
    if message.application_properties:
        properties = {key: value for key, value in message.application_properties.items()}
    return ServiceBusMessage(
        message.body,
        message_id=message.message_id,
        session_id=message.session_id,
        application_properties=properties,
        scheduled_enqueue_time_utc=scheduled_at,
    )


def _scheduled(message: OutgoingMessage) -> datetime.datetime | None:
    """A message due later is sent with a scheduled enqueue time (Service Bus holds it)."""
    if message.not_before is None:
        return None
    return datetime.datetime.fromtimestamp(message.not_before, datetime.UTC)


def from_servicebus_message(message: ServiceBusReceivedMessage) -> ReceivedMessage:
    """Our view of a received message; ``lock`` is the SDK message, for settling."""
    properties = _text_properties(message)
    return ReceivedMessage(
        body=_body_bytes(message),
        message_id=properties.get(ORIGINAL_MESSAGE_ID) or message.message_id or "",
        session_id=message.session_id or "",
        delivery_count=_deliveries(message, properties),
        enqueued_at=_timestamp(message.enqueued_time_utc),
        lock=message,
    )


def dead_letter_from_servicebus_message(message: ServiceBusReceivedMessage) -> DeadLetter:
    """A dead letter as peeked from the DLQ; ``lock`` is its sequence number there.

    ``session_id`` is the group's session, also for a letter dead-lettered from a
    hand-off session. Service Bus records no dead-lettering time; the DLQ
    message's enqueued time (when it entered the queue) is the closest it offers.
    """
    properties = _text_properties(message)
    enqueued_at = _timestamp(message.enqueued_time_utc)
    return DeadLetter(
        body=_body_bytes(message),
        message_id=properties.get(ORIGINAL_MESSAGE_ID) or message.message_id or "",
        session_id=group_session(message.session_id or "", properties),
        reason=message.dead_letter_reason or "",
        description=message.dead_letter_error_description or "",
        dead_lettered_at=enqueued_at,
        lock=message.sequence_number,
        delivery_count=_deliveries(message, properties),
        enqueued_at=enqueued_at,
    )


def derived_message_id(message_id: str, tag: str) -> str:
    """A new message id for a re-sent copy (delayed abandon, replay), at most 128 chars."""
    candidate = f"{message_id}#{tag}"
    if len(candidate) <= MAX_ID_LENGTH:
        return candidate
    digest = hashlib.sha256(message_id.encode()).hexdigest()
    return f"{digest}#{tag}"[:MAX_ID_LENGTH]


def _text_properties(message: ServiceBusReceivedMessage) -> dict[str, str]:
    def text(value: object) -> str:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    return {text(k): text(v) for k, v in (message.application_properties or {}).items()}


def _deliveries(message: ServiceBusReceivedMessage, properties: dict[str, str]) -> int:
    try:
        prior = int(properties.get(PRIOR_DELIVERIES, "0"))
    except ValueError:
        prior = 0
    return (message.delivery_count or 0) + 1 + prior


def _body_bytes(message: ServiceBusReceivedMessage) -> bytes:
    """DATA bodies as sent; anything else (sent by another tool) as text, for the
    worker to reject as a poison event with the content visible."""
    from azure.servicebus.amqp import AmqpMessageBodyType

    body = message.body
    if message.body_type == AmqpMessageBodyType.DATA:
        return body if isinstance(body, bytes) else b"".join(body)
    if isinstance(body, bytes):
        return body
    return str(body).encode()


def _timestamp(value: datetime.datetime | None) -> float:
    return value.timestamp() if value is not None else 0.0


def _outgoing_copy(
    received: ServiceBusReceivedMessage, message_id: str, tag: str, prior_deliveries: int
) -> OutgoingMessage:
    """A copy to send again, into the group's own session (never a hand-off session)."""
    original = _text_properties(received)
    properties = {
        k: v for k, v in original.items() if k not in _OWN_PROPERTIES | _BROKER_PROPERTIES
    }
    properties[ORIGINAL_MESSAGE_ID] = message_id
    if prior_deliveries:
        properties[PRIOR_DELIVERIES] = str(prior_deliveries)
    return OutgoingMessage(
        body=_body_bytes(received),
        message_id=derived_message_id(message_id, tag),
        session_id=group_session(received.session_id or "", original),
        application_properties=properties,
    )


# -- errors ------------------------------------------------------------------------


def map_servicebus_error(error: BaseException, action: str) -> WritebackError | None:
    """writeback's error for an SDK (or azure-core/azure-identity) exception, or None
    for one that is not about the queue (a bug: let it propagate)."""
    from azure.core.exceptions import AzureError, HttpResponseError

    if isinstance(error, WritebackError):
        return error
    text = f"Service Bus {action} failed: {type(error).__name__}: {error}"
    for types, kind in _error_kinds():
        if isinstance(error, types):
            return kind(text)
    if isinstance(error, HttpResponseError):  # the administration API (HTTPS)
        status = error.status_code or 0
        refused = 400 <= status < 500 and status not in (408, 429)
        return QueueRefused(text) if refused else QueueUnavailable(text)
    if isinstance(error, AzureError | OSError):
        return QueueUnavailable(text)
    if isinstance(error, ValueError | TypeError):
        return MessageRejected(text)  # the SDK refused to build or send the message
    return None


def _error_kinds() -> list[tuple[tuple[type[BaseException], ...], type[WritebackError]]]:
    """First match wins, so the specific SDK errors come before their base class."""
    from azure.core import exceptions as core
    from azure.identity import CredentialUnavailableError
    from azure.servicebus import exceptions as sb

    return [
        ((sb.MessageSizeExceededError,), MessageRejected),
        (
            (
                sb.MessageLockLostError,
                sb.SessionLockLostError,
                sb.MessageAlreadySettled,
                sb.AutoLockRenewFailed,
                sb.AutoLockRenewTimeout,
            ),
            LockLost,
        ),
        (
            (
                sb.ServiceBusAuthenticationError,
                sb.ServiceBusAuthorizationError,
                sb.MessagingEntityNotFoundError,
                sb.MessageNotFoundError,
                CredentialUnavailableError,
                core.ResourceNotFoundError,
            ),
            QueueRefused,
        ),
        # Connection, communication, timeout, server busy, quota (queue full), entity
        # disabled, session cannot be locked, anything new; and token endpoint trouble
        # when a credential is configured: try later.
        ((sb.ServiceBusError, core.ClientAuthenticationError), QueueUnavailable),
    ]


@contextmanager
def translated_errors(action: str) -> Iterator[None]:
    """Re-raise Service Bus SDK errors as writeback's own (transient or permanent)."""
    try:
        yield
    except Exception as error:
        mapped = map_servicebus_error(error, action)
        if mapped is None or mapped is error:
            raise
        raise mapped from error


# -- accepting sessions ------------------------------------------------------------


class _Closer:
    """Closes SDK handlers on threads of their own: a receiver's close waits up to a
    second for its keep-alive thread (which sleeps in 1 s steps), which no caller
    should wait for; its detach, which gives the session back, goes out first."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def close(self, handler: Any) -> None:
        thread = threading.Thread(
            target=ServiceBusQueue._close_quietly,
            args=(handler,),
            name="servicebus-close",
            daemon=True,
        )
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            thread.start()
            self._threads.append(thread)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Acceptors:
    """Session receivers that accept the next available session ahead of the callers.

    Accepting a session costs the SDK a connection, a token put and a link attach:
    about 0.5 s on loopback, most of it the SDK's own 50 ms sleeps between frames
    while the link opens (``ServiceBusReceiver._open``), and a receive's wait budget
    is the accept's too, so a short wait never accepts anything. So accepts run on
    threads of their own while a caller waits (or did within ``ready_for``), each
    parked on the broker (up to ``accept_wait``) until a session has a message
    ready: one thread on an idle queue, all ``count`` while sessions are being
    accepted (for ``_BURST_WINDOW`` after each). Accepting asks for no message
    (``receive_messages(max_message_count=None)``: the link opens with no credit),
    so a session nobody takes (within ``ready_for``, or accepted once nobody asks)
    is given back with nothing delivered and nothing counted. An accept that fails
    other than by its wait (the namespace unreachable, a right missing) is what the
    callers get, until one succeeds.
    """

    def __init__(
        self,
        open_receiver: Callable[[float], ServiceBusReceiver],
        closer: _Closer,
        *,
        count: int,
        accept_wait: float,
        ready_for: float,
    ) -> None:
        if count < 1:
            raise ValueError("at least one session receiver must accept")
        self._open = open_receiver
        self._closer = closer
        self._count = count
        self._accept_wait = accept_wait
        self._ready_for = ready_for
        self._condition = threading.Condition()
        #: (accepted or given back at, receiver, given back)
        self._ready: deque[tuple[float, ServiceBusReceiver, bool]] = deque()
        self._waiting = 0
        self._wanted_until = 0.0
        self._threads: list[threading.Thread] = []
        self._sweeper: threading.Thread | None = None
        self._closed = False
        self._error: WritebackError | None = None
        #: Threads inside an accept (the SDK's open, which must not be closed under it).
        self._accepting = 0
        self._last_accepted = -math.inf

    @property
    def accepting(self) -> bool:
        with self._condition:
            return self._accepting > 0

    def take(self, most: int, wait: float) -> list[tuple[ServiceBusReceiver, bool]]:
        """Up to ``most`` accepted sessions' receivers, waiting up to ``wait`` for one;
        each with whether it was given back (a session whose messages may be gone)
        rather than accepted with a message ready."""
        deadline = time.monotonic() + max(wait, 0.0)
        with self._condition:
            if self._closed:
                raise QueueUnavailable("the Service Bus queue was closed")
            self._start()
            self._waiting += 1
            self._condition.notify_all()
            try:
                while True:
                    self._drop_stale()
                    if self._ready:
                        break
                    if self._error is not None:
                        raise self._error
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._closed:
                        return []
                    self._condition.wait(remaining)
                taken: list[tuple[ServiceBusReceiver, bool]] = []
                while self._ready and len(taken) < most:
                    _, receiver, given_back = self._ready.popleft()
                    taken.append((receiver, given_back))
                return taken
            finally:
                self._waiting -= 1
                self._wanted_until = time.monotonic() + self._ready_for
                self._condition.notify_all()

    def give_back(self, receiver: ServiceBusReceiver) -> None:
        """A session still accepted, for the next caller."""
        with self._condition:
            if self._closed:
                self._closer.close(receiver)
                return
            self._ready.appendleft((time.monotonic(), receiver, True))
            self._condition.notify_all()

    def close(self) -> None:
        """Stop accepting; accepted sessions are given back. A thread parked in an
        accept ends when the accept does (within ``accept_wait``), closing its own
        receiver: the SDK cannot close a receiver while it opens."""
        with self._condition:
            self._closed = True
            ready, self._ready = list(self._ready), deque()
            self._condition.notify_all()
        for _, receiver, _ in ready:
            self._closer.close(receiver)

    # -- the accepting threads (all under the condition's lock unless said) ---------

    def _start(self) -> None:
        if self._sweeper is None or not self._sweeper.is_alive():
            self._sweeper = threading.Thread(
                target=self._sweep, name="servicebus-accept-sweep", daemon=True
            )
            self._sweeper.start()
        for index in range(self._count):
            thread = self._threads[index] if index < len(self._threads) else None
            if thread is not None and thread.is_alive():
                continue
            thread = threading.Thread(
                target=self._run, args=(index,), name=f"servicebus-accept-{index}", daemon=True
            )
            if index < len(self._threads):
                self._threads[index] = thread
            else:
                self._threads.append(thread)
            thread.start()

    def _sweep(self) -> None:
        """Give back, in time, accepted sessions nobody takes (the accepting threads
        may all be parked in accepts)."""
        with self._condition:
            while not self._closed:
                self._drop_stale()
                self._condition.wait(self._ready_for / 4)

    def _asked(self) -> bool:
        return self._waiting > 0 or time.monotonic() < self._wanted_until

    def _should_accept(self, index: int) -> bool:
        """The first thread accepts while callers ask; the others join in while
        sessions are being accepted (a burst), so an idle queue keeps one parked."""
        if not self._asked() or len(self._ready) >= self._count:
            return False
        return index == 0 or time.monotonic() - self._last_accepted < _BURST_WINDOW

    def _drop_stale(self) -> None:
        """Give back sessions nobody took in time, or whose lock is about to lapse."""
        now = time.monotonic()
        soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=_LOCK_MARGIN)
        kept: deque[tuple[float, ServiceBusReceiver, bool]] = deque()
        for item in self._ready:
            accepted_at, receiver, _ = item
            until = receiver.session.locked_until_utc
            if now - accepted_at > self._ready_for or until is None or until <= soon:
                self._closer.close(receiver)
            else:
                kept.append(item)
        self._ready = kept

    def _run(self, index: int) -> None:
        from azure.servicebus.exceptions import OperationTimeoutError

        backoff = 1.0
        while True:
            with self._condition:
                while not self._closed and not self._should_accept(index):
                    self._drop_stale()
                    self._condition.wait(self._ready_for)
                if self._closed:
                    return
                self._accepting += 1
            receiver: ServiceBusReceiver | None = None
            try:
                receiver = self._open(self._accept_wait)
                # No message asked for: the link opens with no credit, so accepting
                # delivers nothing (and locks no message) until a caller receives.
                receiver.receive_messages(max_message_count=None, max_wait_time=self._accept_wait)
            except OperationTimeoutError:
                if receiver is not None:
                    self._closer.close(receiver)  # no session had a message: healthy, idle
                with self._condition:
                    self._accepting -= 1
                    self._error = None
                continue
            except Exception as error:
                if receiver is not None:
                    self._closer.close(receiver)
                mapped = map_servicebus_error(error, "accept a session")
                with self._condition:
                    self._accepting -= 1
                    if self._closed:
                        return
                    self._error = mapped or QueueUnavailable(
                        f"Service Bus accept a session failed: {type(error).__name__}: {error}"
                    )
                    self._condition.notify_all()
                    self._condition.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            with self._condition:
                self._accepting -= 1
                self._error = None
                self._last_accepted = time.monotonic()
                if self._closed or not self._asked():
                    # Nobody asks any more (paused, stopped): give the session back at
                    # once, nothing delivered, for another receiver to take.
                    self._closer.close(receiver)
                    if self._closed:
                        return
                    continue
                self._ready.append((time.monotonic(), receiver, False))
                self._condition.notify_all()


# -- the adapter -------------------------------------------------------------------


class ServiceBusQueue:
    """A Service Bus session queue as an ``EventQueue``.

    Sessions are accepted ahead of the callers by ``concurrent_accepts`` session
    receivers of their own (:class:`_Acceptors`: accepting costs the SDK most of a
    second, which no caller should wait for one session after another); a session
    ``receive_session``/``receive_sessions`` hands out stays locked by its receiver
    until ``release_session``; settle messages before releasing. A session whose
    batch was full is kept accepted for the next caller (it may have more), the
    others are closed in the background. Session receivers come from
    ``receive_client``, which the factories build with ``retry_total=0``: the SDK
    would retry a session wait ``retry_total`` more times, and settling on a broken
    session link cannot succeed by retrying anyway (the lock went with the link).
    The worker's own backoff does the retrying.
    """

    def __init__(
        self,
        client: ServiceBusClient,
        queue_name: str,
        *,
        receive_client: ServiceBusClient | None = None,
        admin: ServiceBusAdministrationClient | None = None,
        max_delivery_count: int = 10,
        dead_letter_wait: float = 2.0,
        concurrent_accepts: int = CONCURRENT_ACCEPTS,
        accept_wait: float = ACCEPT_WAIT,
        ready_for: float = READY_FOR,
    ) -> None:
        self._client = client
        self._receive_client = receive_client or client
        self._closer = _Closer()
        self._acceptors = _Acceptors(
            self._open_session_receiver,
            self._closer,
            count=concurrent_accepts,
            accept_wait=accept_wait,
            ready_for=ready_for,
        )
        #: Sessions handed out whose batch was full, with the lock tokens of that batch
        #: not yet settled: kept for the next caller once all are settled.
        self._full: dict[str, set[str]] = {}
        self._admin = admin
        self.queue_name = queue_name
        self.max_delivery_count = max_delivery_count
        #: How long a dead-letter pass waits for more letters before it ends.
        self.dead_letter_wait = dead_letter_wait
        self._sender: ServiceBusSender | None = None
        self._send_lock = threading.Lock()
        self._receivers: dict[str, ServiceBusReceiver] = {}
        self._receivers_lock = threading.Lock()
        #: The runtime properties ``depth()`` read last, for ``scheduled_count()``.
        self._counted: tuple[float, Any] = (-math.inf, None)

    @classmethod
    def from_namespace(
        cls,
        fully_qualified_namespace: str,
        queue_name: str,
        credential: TokenCredential,
        *,
        retry_total: int = 3,
        client_options: dict[str, Any] | None = None,
        admin_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> ServiceBusQueue:
        """For Azure: ``<name>.servicebus.windows.net`` and a managed identity credential
        (``client_options``/``admin_options`` as for :meth:`from_connection_string`)."""
        from azure.servicebus import ServiceBusClient
        from azure.servicebus.management import ServiceBusAdministrationClient

        amqp = dict(client_options or {})
        client = ServiceBusClient(
            fully_qualified_namespace, credential, retry_total=retry_total, **amqp
        )
        receive_client = ServiceBusClient(
            fully_qualified_namespace, credential, retry_total=0, **amqp
        )
        admin = ServiceBusAdministrationClient(
            fully_qualified_namespace, credential, retry_total=retry_total, **(admin_options or {})
        )
        return cls(client, queue_name, receive_client=receive_client, admin=admin, **options)

    @classmethod
    def from_connection_string(
        cls,
        connection_string: str,
        queue_name: str,
        *,
        retry_total: int = 3,
        client_options: dict[str, Any] | None = None,
        admin_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> ServiceBusQueue:
        """For local tools and emulators (``UseDevelopmentEmulator=true`` for Microsoft's).

        ``client_options`` go to both AMQP clients, ``admin_options`` to the
        administration client: an endpoint and a CA to validate it with
        (``custom_endpoint_address``, ``connection_verify``), as the SDK takes them.
        """
        from azure.servicebus import ServiceBusClient
        from azure.servicebus.management import ServiceBusAdministrationClient

        amqp = dict(client_options or {})
        with translated_errors("connect"):
            client = ServiceBusClient.from_connection_string(
                connection_string, retry_total=retry_total, **amqp
            )
            receive_client = ServiceBusClient.from_connection_string(
                connection_string, retry_total=0, **amqp
            )
            admin = ServiceBusAdministrationClient.from_connection_string(
                connection_string, retry_total=retry_total, **(admin_options or {})
            )
        return cls(client, queue_name, receive_client=receive_client, admin=admin, **options)

    # -- sending ---------------------------------------------------------------

    def send(self, messages: list[OutgoingMessage]) -> None:
        """Send in batches of up to 100 (each batch is atomic in Service Bus)."""
        if not messages:
            return
        outgoing = [to_servicebus_message(m, scheduled_at=_scheduled(m)) for m in messages]
        with self._send_lock, translated_errors("send"):
            sender = self._get_sender()
            for start in range(0, len(outgoing), _MAX_BATCH):
                self._send_batch(sender, outgoing[start : start + _MAX_BATCH])

    @staticmethod
    def _send_batch(sender: ServiceBusSender, messages: list[ServiceBusMessage]) -> None:
        from azure.servicebus.exceptions import MessageSizeExceededError

        batch = sender.create_message_batch()
        for message in messages:
            try:
                batch.add_message(message)
            except MessageSizeExceededError:
                if len(batch) == 0:
                    raise  # one message alone is too large
                sender.send_messages(batch)
                batch = sender.create_message_batch()
                batch.add_message(message)
        sender.send_messages(batch)

    def _get_sender(self) -> ServiceBusSender:
        if self._sender is None:
            self._sender = self._client.get_queue_sender(self.queue_name)
        return self._sender

    def _send_one(self, message: ServiceBusMessage) -> None:
        with self._send_lock:
            self._get_sender().send_messages(message)

    # -- receiving -------------------------------------------------------------

    def receive_session(self, max_messages: int, wait: float) -> list[ReceivedMessage]:
        batches = self.receive_sessions(1, max_messages, wait)
        return batches[0] if batches else []

    def receive_sessions(
        self, max_sessions: int, max_messages: int, wait: float
    ) -> list[list[ReceivedMessage]]:
        """Up to ``max_sessions`` accepted sessions (waiting up to ``wait`` for the first,
        then taking those accepted already), each one's messages received over its
        own link, in parallel."""
        taken = self._acceptors.take(max(max_sessions, 1), wait)
        if not taken:
            return []
        # An accepted session has a message ready; one given back may have none left,
        # and is not waited on longer than the caller would wait.
        waits = [
            min(_RECEIVE_WAIT, max(wait, 0.05)) if back else _RECEIVE_WAIT for _, back in taken
        ]
        receivers = [receiver for receiver, _ in taken]
        if len(receivers) == 1:
            received = [self._receive_on(receivers[0], max_messages, waits[0])]
        else:
            with ThreadPoolExecutor(len(receivers), "servicebus-receive") as pool:
                received = list(
                    pool.map(lambda r, w: self._receive_on(r, max_messages, w), receivers, waits)
                )
        batches: list[list[ReceivedMessage]] = []
        failure: WritebackError | None = None
        for receiver, result in zip(receivers, received, strict=True):
            if isinstance(result, WritebackError) or not result:
                failure = result if isinstance(result, WritebackError) else failure
                self._closer.close(receiver)
                continue
            session_id = receiver.session.session_id
            with self._receivers_lock:
                previous = self._receivers.pop(session_id, None)
                self._receivers[session_id] = receiver
                if len(result) >= max_messages:
                    self._full[session_id] = {str(m.lock_token) for m in result}
                else:
                    self._full.pop(session_id, None)
            if previous is not None and previous is not receiver:
                self._closer.close(previous)
            batches.append([from_servicebus_message(m) for m in result])
        if not batches and failure is not None:
            raise failure
        return batches

    @staticmethod
    def _receive_on(
        receiver: ServiceBusReceiver, max_messages: int, wait: float
    ) -> list[ServiceBusReceivedMessage] | WritebackError:
        """The messages of an accepted session."""
        try:
            with translated_errors("receive"):
                return receiver.receive_messages(max_message_count=max_messages, max_wait_time=wait)
        except WritebackError as error:
            return error

    def _open_session_receiver(self, wait: float) -> ServiceBusReceiver:
        from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusReceiveMode

        return self._receive_client.get_queue_receiver(
            self.queue_name,
            session_id=NEXT_AVAILABLE_SESSION,
            receive_mode=ServiceBusReceiveMode.PEEK_LOCK,
            max_wait_time=wait,
            prefetch_count=0,
        )

    # -- settling --------------------------------------------------------------

    def complete(self, message: ReceivedMessage) -> None:
        raw, receiver = self._settlement(message)
        with translated_errors("complete"):
            receiver.complete_message(raw)
        self._settled(message.session_id, raw)

    def complete_all(self, messages: Sequence[ReceivedMessage]) -> None:
        for message in messages:
            self.complete(message)

    def abandon(self, message: ReceivedMessage, *, delay: float = 0.0) -> None:
        """Redeliver, after ``delay`` seconds if given; dead-letter at the maximum."""
        raw, receiver = self._settlement(message)
        count = message.delivery_count
        if count >= self.max_delivery_count:
            self.dead_letter(
                message,
                MAX_DELIVERY_COUNT_EXCEEDED,
                f"Message could not be consumed after {count} delivery attempts.",
            )
            return
        if delay <= 0:
            with translated_errors("abandon"):
                receiver.abandon_message(raw)
            # Back in the session, ahead of what follows it: the session is not
            # kept for the next caller, whose link would skip it.
            with self._receivers_lock:
                self._full.pop(message.session_id, None)
            return
        copy = _outgoing_copy(raw, message.message_id, f"d{count}", prior_deliveries=count)
        when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=delay)
        with translated_errors("abandon"):
            self._send_one(to_servicebus_message(copy, scheduled_at=when))
            receiver.complete_message(raw)
        self._settled(message.session_id, raw)

    def park(self, message: ReceivedMessage, *, delay: float) -> None:
        """A copy scheduled ``delay`` seconds ahead carrying one delivery fewer, then
        the original completed: the wait is not counted against the event."""
        raw, receiver = self._settlement(message)
        count = message.delivery_count
        tag = f"p{count}-{uuid.uuid4().hex[:8]}"
        copy = _outgoing_copy(raw, message.message_id, tag, prior_deliveries=count - 1)
        when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=max(delay, 1.0))
        with translated_errors("park"):
            self._send_one(to_servicebus_message(copy, scheduled_at=when))
            receiver.complete_message(raw)
        self._settled(message.session_id, raw)

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        raw, receiver = self._settlement(message)
        with translated_errors("dead-letter"):
            receiver.dead_letter_message(
                raw,
                reason=reason[:_MAX_DEAD_LETTER_TEXT],
                error_description=description[:_MAX_DEAD_LETTER_TEXT],
            )
        self._settled(message.session_id, raw)

    def renew_session_lock(self, session_id: str) -> float:
        """Extend the session lock; returns the new expiry (Unix seconds)."""
        with self._receivers_lock:
            receiver = self._receivers.get(session_id)
        if receiver is None:
            raise LockLost(f"session {session_id} is not held by this receiver")
        with translated_errors("renew session lock"):
            return receiver.session.renew_lock().timestamp()

    def release_session(self, session_id: str) -> None:
        """Give the session back; one whose last batch was full and is all settled
        stays accepted for the next caller (its lock renewed), as it may have more
        waiting. A message left unsettled is redelivered, in its order, only once
        the session is closed: so such a session is closed."""
        with self._receivers_lock:
            receiver = self._receivers.pop(session_id, None)
            unsettled = self._full.pop(session_id, None)
            full = unsettled is not None and not unsettled
        if receiver is None:
            return
        if full:
            try:
                with translated_errors("renew session lock"):
                    receiver.session.renew_lock()
            except WritebackError:
                pass
            else:
                self._acceptors.give_back(receiver)
                return
        self._closer.close(receiver)

    def _settled(self, session_id: str, raw: ServiceBusReceivedMessage) -> None:
        with self._receivers_lock:
            unsettled = self._full.get(session_id)
            if unsettled is not None:
                unsettled.discard(str(raw.lock_token))

    def _settlement(self, message: ReceivedMessage) -> tuple[ServiceBusReceivedMessage, Any]:
        from azure.servicebus import ServiceBusReceivedMessage

        if not isinstance(message.lock, ServiceBusReceivedMessage):
            raise LockLost("this message was not received from Service Bus")
        with self._receivers_lock:
            receiver = self._receivers.get(message.session_id)
        if receiver is None:
            raise LockLost(f"session {message.session_id} was released or never held")
        return message.lock, receiver

    # -- dead letters and stats ------------------------------------------------

    def iter_dead_letters(self, *, page_size: int = 250) -> Iterator[DeadLetter]:
        """Every dead letter, oldest first, peeked page by page (nothing is locked)."""
        with translated_errors("read dead letters"), self._dead_letter_receiver() as receiver:
            next_sequence = 0
            while True:
                batch = receiver.peek_messages(
                    max_message_count=page_size, sequence_number=next_sequence
                )
                if not batch:
                    return
                for message in batch:
                    yield dead_letter_from_servicebus_message(message)
                next_sequence = (batch[-1].sequence_number or 0) + 1

    def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters (peeked, nothing locked)."""
        return list(itertools.islice(self.iter_dead_letters(), max(limit, 0)))

    def replay_dead_letters(
        self, choose: Callable[[DeadLetter], bool]
    ) -> Generator[tuple[DeadLetter, bool, WritebackError | None], None, None]:
        """One pass over the dead-letter queue, oldest first, moving what ``choose`` picks.

        Yields ``(letter, chosen, error)`` for every letter looked at; a chosen one
        is moved back (a copy sent to its group's session under a derived id, then
        the letter completed) before the next is looked at, and ``error`` is the
        PermanentError that kept it from moving. A transient error ends the pass
        and propagates; what moved stays moved. Letters passed over stay locked
        until the pass ends (closing the generator ends it), then are abandoned.
        A letter seen twice (its lock lapsed during a long pass) is skipped. A
        letter of an event this pass moved already (dead-lettered again while the
        pass runs: a worker refused the copy) is passed over, not chosen: the pass
        ends with the letters that were there, never moving one event in a circle.
        """
        held: dict[int, ServiceBusReceivedMessage] = {}  # received, not completed
        round_again: list[ServiceBusReceivedMessage] = []
        seen: set[int] = set()
        moved: set[str] = set()  # the events (their own message ids) this pass moved
        with (
            translated_errors("replay dead letters"),
            self._dead_letter_receiver(max_wait_time=self.dead_letter_wait) as receiver,
        ):
            try:
                while True:
                    batch = receiver.receive_messages(
                        max_message_count=100, max_wait_time=self.dead_letter_wait
                    )
                    fresh = []
                    for message in batch:
                        number = message.sequence_number or 0
                        if number in seen:
                            round_again.append(message)  # its lock lapsed during the pass
                            continue
                        seen.add(number)
                        held[number] = message
                        fresh.append(message)
                    if not fresh:
                        return
                    for message in fresh:
                        number = message.sequence_number or 0
                        letter = dead_letter_from_servicebus_message(message)
                        if letter.message_id in moved or not choose(letter):
                            yield letter, False, None
                            continue
                        error = self._move_back(receiver, message, letter)
                        if error is None:
                            del held[number]
                            moved.add(letter.message_id)
                        yield letter, True, error
            finally:
                # Give back what was looked at and not moved (and what was received
                # but not looked at, when the pass was closed early).
                for message in [*held.values(), *round_again]:
                    with contextlib.suppress(Exception):
                        receiver.abandon_message(message)

    def _move_back(
        self, receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage, letter: DeadLetter
    ) -> WritebackError | None:
        """Send the letter's copy, then complete it; a permanent refusal is returned."""
        copy = _outgoing_copy(
            message, letter.message_id, f"r{message.sequence_number}", prior_deliveries=0
        )
        try:
            outgoing = to_servicebus_message(copy)
            with translated_errors("resubmit"):
                self._send_one(outgoing)
        except (MessageRejected, QueueRefused) as refused:
            return refused
        with translated_errors("resubmit"):
            receiver.complete_message(message)
        return None

    def resubmit(self, dead_letter: DeadLetter) -> None:
        """Move one dead letter back (a pass that stops at it; no cap on how far it is)."""
        target = dead_letter.lock
        if not isinstance(target, int):
            raise DeadLetterNotFound("this dead letter did not come from ServiceBusQueue")
        passes = self.replay_dead_letters(lambda letter: letter.lock == target)
        try:
            for _letter, chosen, error in passes:
                if chosen:
                    if error is not None:
                        raise error
                    return
        finally:
            passes.close()
        raise DeadLetterNotFound(
            f"dead letter {dead_letter.message_id} (sequence {target}) is gone"
        )

    @contextmanager
    def _dead_letter_receiver(self, **options: Any) -> Iterator[ServiceBusReceiver]:
        from azure.servicebus import ServiceBusReceiveMode, ServiceBusSubQueue

        receiver = self._client.get_queue_receiver(
            self.queue_name,
            sub_queue=ServiceBusSubQueue.DEAD_LETTER,
            receive_mode=ServiceBusReceiveMode.PEEK_LOCK,
            prefetch_count=0,
            **options,
        )
        with receiver:
            yield receiver

    def _runtime_properties(self) -> Any:
        from azure.core.exceptions import ClientAuthenticationError

        if self._admin is None:
            raise QueueRefused("queue counts need the Service Bus administration client")
        with translated_errors("read queue properties"):
            try:
                return self._admin.get_queue_runtime_properties(self.queue_name)
            except ClientAuthenticationError as error:
                if error.status_code not in (401, 403):
                    raise  # the credential's token endpoint: try later
                raise QueueRefused(
                    f"Service Bus refused to read the properties of queue {self.queue_name} "
                    f"({error.status_code}): that needs Manage rights (with Entra ID the "
                    "'Azure Service Bus Data Owner' role on the queue; see infra/README.md)"
                ) from error

    def depth(self) -> int:
        """Active messages, from the administration API (needs Manage rights)."""
        properties = self._runtime_properties()
        self._counted = (time.monotonic(), properties)
        return properties.active_message_count or 0

    def scheduled_count(self) -> int:
        """Messages scheduled for later (delayed retries), from the administration API.

        Right after ``depth()`` (as "is the queue empty?" asks them), from the same
        read: from two, a scheduled message that came due in between is in neither.
        """
        counted_at, properties = self._counted
        if properties is None or time.monotonic() - counted_at > _SAME_COUNT:
            properties = self._runtime_properties()
        self._counted = (-math.inf, None)
        return properties.scheduled_message_count or 0

    def dead_letter_count_by_reason(self) -> dict[str, int]:
        """Every dead letter counted by reason, peeked page by page (needs Listen only)."""
        return dict(Counter(letter.reason for letter in self.iter_dead_letters()))

    # -- plumbing --------------------------------------------------------------

    def close(self) -> None:
        self._acceptors.close()
        with self._receivers_lock:
            receivers, self._receivers = list(self._receivers.values()), {}
        for receiver in receivers:
            self._closer.close(receiver)
        self._closer.wait(10.0)
        if self._sender is not None:
            self._close_quietly(self._sender)
        # A client holds no connection of its own (each sender and receiver has one);
        # closing it closes the receivers it made, also those of accepts still under
        # way, which the SDK does not survive quietly: those close themselves when
        # their accept ends, so the clients are left to them then.
        if not self._acceptors.accepting:
            self._close_quietly(self._client)
            if self._receive_client is not self._client:
                self._close_quietly(self._receive_client)
        if self._admin is not None:
            self._close_quietly(self._admin)

    def __enter__(self) -> ServiceBusQueue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @staticmethod
    def _close_quietly(handler: Any) -> None:
        """Closing only gives locks back early; they expire anyway, so failures are logged."""
        try:
            handler.close()
        except Exception as error:
            _log.debug("closing %r failed: %r", handler, error)
