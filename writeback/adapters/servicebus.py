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
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterator
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
#: After the first session of a claim, how long to wait for each further one.
_NEXT_SESSION_WAIT: Final = 0.1
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


# -- the adapter -------------------------------------------------------------------


class ServiceBusQueue:
    """A Service Bus session queue as an ``EventQueue``.

    Each ``receive_session`` opens a session receiver that stays open (holding the
    session lock) until ``release_session``; settle messages before releasing.
    Session receivers come from ``receive_client``, which the factories build with
    ``retry_total=0``: the SDK retries a session wait ``retry_total`` more times, so
    that is what makes ``wait`` the real bound, and settling on a broken session link
    cannot succeed by retrying anyway (the lock went with the link). The worker's
    own backoff does the retrying.
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
    ) -> None:
        self._client = client
        self._receive_client = receive_client or client
        self._admin = admin
        self.queue_name = queue_name
        self.max_delivery_count = max_delivery_count
        #: How long a dead-letter pass waits for more letters before it ends.
        self.dead_letter_wait = dead_letter_wait
        self._sender: ServiceBusSender | None = None
        self._send_lock = threading.Lock()
        self._receivers: dict[str, ServiceBusReceiver] = {}
        self._receivers_lock = threading.Lock()

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
        from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusReceiveMode
        from azure.servicebus.exceptions import OperationTimeoutError

        wait_time = max(wait, 0.1)
        with translated_errors("receive"):
            receiver = self._receive_client.get_queue_receiver(
                self.queue_name,
                session_id=NEXT_AVAILABLE_SESSION,
                receive_mode=ServiceBusReceiveMode.PEEK_LOCK,
                max_wait_time=wait_time,
                prefetch_count=0,
            )
        try:
            with translated_errors("receive"):
                try:
                    raw = receiver.receive_messages(
                        max_message_count=max_messages, max_wait_time=wait_time
                    )
                except OperationTimeoutError:
                    raw = []  # no session had messages within the wait
        except BaseException:
            self._close_quietly(receiver)
            raise
        if not raw:
            self._close_quietly(receiver)
            return []
        session_id = receiver.session.session_id
        with self._receivers_lock:
            previous = self._receivers.pop(session_id, None)
            self._receivers[session_id] = receiver
        if previous is not None:
            self._close_quietly(previous)
        return [from_servicebus_message(m) for m in raw]

    def receive_sessions(
        self, max_sessions: int, max_messages: int, wait: float
    ) -> list[list[ReceivedMessage]]:
        """Up to ``max_sessions`` sessions, one receiver each; after the first (which
        may wait ``wait``), each further accept waits only briefly."""
        first = self.receive_session(max_messages, wait)
        if not first:
            return []
        batches = [first]
        while len(batches) < max_sessions:
            batch = self.receive_session(max_messages, _NEXT_SESSION_WAIT)
            if not batch:
                break
            batches.append(batch)
        return batches

    # -- settling --------------------------------------------------------------

    def complete(self, message: ReceivedMessage) -> None:
        raw, receiver = self._settlement(message)
        with translated_errors("complete"):
            receiver.complete_message(raw)

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
            return
        copy = _outgoing_copy(raw, message.message_id, f"d{count}", prior_deliveries=count)
        when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=delay)
        with translated_errors("abandon"):
            self._send_one(to_servicebus_message(copy, scheduled_at=when))
            receiver.complete_message(raw)

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

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        raw, receiver = self._settlement(message)
        with translated_errors("dead-letter"):
            receiver.dead_letter_message(
                raw,
                reason=reason[:_MAX_DEAD_LETTER_TEXT],
                error_description=description[:_MAX_DEAD_LETTER_TEXT],
            )

    def renew_session_lock(self, session_id: str) -> float:
        """Extend the session lock; returns the new expiry (Unix seconds)."""
        with self._receivers_lock:
            receiver = self._receivers.get(session_id)
        if receiver is None:
            raise LockLost(f"session {session_id} is not held by this receiver")
        with translated_errors("renew session lock"):
            return receiver.session.renew_lock().timestamp()

    def release_session(self, session_id: str) -> None:
        with self._receivers_lock:
            receiver = self._receivers.pop(session_id, None)
        if receiver is not None:
            self._close_quietly(receiver)

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
        A letter seen twice (its lock lapsed during a long pass) is skipped.
        """
        held: dict[int, ServiceBusReceivedMessage] = {}  # received, not completed
        round_again: list[ServiceBusReceivedMessage] = []
        seen: set[int] = set()
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
                        if not choose(letter):
                            yield letter, False, None
                            continue
                        error = self._move_back(receiver, message, letter)
                        if error is None:
                            del held[number]
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
        return self._runtime_properties().active_message_count or 0

    def scheduled_count(self) -> int:
        """Messages scheduled for later (delayed retries), from the administration API."""
        return self._runtime_properties().scheduled_message_count or 0

    def dead_letter_count_by_reason(self) -> dict[str, int]:
        """Every dead letter counted by reason, peeked page by page (needs Listen only)."""
        return dict(Counter(letter.reason for letter in self.iter_dead_letters()))

    # -- plumbing --------------------------------------------------------------

    def close(self) -> None:
        with self._receivers_lock:
            receivers, self._receivers = list(self._receivers.values()), {}
        for receiver in receivers:
            self._close_quietly(receiver)
        if self._sender is not None:
            self._close_quietly(self._sender)
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
