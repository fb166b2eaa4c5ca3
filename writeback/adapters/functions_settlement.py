"""Settling the messages the Functions host delivered (the Settlement port).

The Service Bus trigger hands the function messages the host's own receiver
holds. ``azurefunctions-extensions-bindings-servicebus`` (settle and
dead-letter from Python over the host's gRPC channel) is 1.0.0b2, pulls in the
retired ``uamqp`` and ``grpcio-tools``, says "message settling is not yet
supported" on its SDK type, and cannot be exercised outside a real host. So the
function runs with ``autoCompleteMessages: true`` (the host completes the
batch when the function returns, abandons it when it raises) and does the rest
itself with its own Service Bus client (:class:`ServiceBusSettlement`):

* ``complete``: nothing; the host completes on return.
* ``abandon(delay)``: a copy of the message is *scheduled* into the same
  session ``delay`` seconds ahead (``ServiceBusSender.schedule_messages``),
  carrying the deliveries so far and the original message id in application
  properties; the host then completes the original. Our count, not the
  broker's, bounds the retries: at ``WRITEBACK_MAX_DELIVERY_COUNT`` the message
  is dead-lettered with ``MaxDeliveryCountExceeded``. A transient fault
  therefore never burns the queue's own ``maxDeliveryCount`` within minutes.
* ``park(delay)``: the same copy, carrying one delivery fewer (the pause switch
  and configuration errors are not the event's fault).
* ``dead_letter(reason, description)``: only a receiver holding the lock can
  dead-letter, and the host holds this one. So a copy goes to a fresh
  *hand-off session* of the same queue, ``<group id>#dl-<random>``, which we
  lock with our own session receiver *before* sending into it (the host's
  "next available session" receivers cannot take a locked session); we receive
  the copy there and dead-letter it with the reason and description. It lands
  in the queue's own dead-letter sub-queue, where ``status`` and ``replay``
  look; the group id travels in the application property
  ``writeback-session-id`` and the hand-off session starts with the group id.

Copies are sent before the original is completed, so a crash in between gives
a duplicate, never a loss; the worker is idempotent, so a duplicate writes
nothing. A settle call that fails raises; the pipeline turns that into
:class:`~writeback.service.pipeline.SettlementFailed` and the host's
invocation fails, so the host abandons the batch and it is delivered again.

With ``WRITEBACK_QUEUE=local`` (tests, a dev box without a namespace) the same
worker settles on the embedded queue by the lock token and sequence number the
caller hands over (:class:`LocalSettlement`).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from writeback.adapters.servicebus import ORIGINAL_MESSAGE_ID, PRIOR_DELIVERIES
from writeback.domain.events import HANDOFF_MARK, HANDOFF_SESSION_PROPERTY
from writeback.errors import PermanentError, QueueUnavailable
from writeback.ports import OutgoingMessage, ReceivedMessage

if TYPE_CHECKING:
    from azure.servicebus import ServiceBusClient, ServiceBusSender

    from writeback.adapters.local_queue import LocalQueue

#: Shortest wait of a rescheduled copy (Service Bus schedules to the second).
MIN_RESCHEDULE: Final = 1.0
#: How long the hand-off waits for its own copy to arrive in the locked session.
HANDOFF_WAIT: Final = 5.0
MAX_DELIVERY_COUNT_EXCEEDED: Final = "MaxDeliveryCountExceeded"
_MAX_ID: Final = 128
_MAX_DEAD_LETTER_TEXT: Final = 4096
_OWN_PROPERTIES: Final = frozenset(
    {PRIOR_DELIVERIES, ORIGINAL_MESSAGE_ID, HANDOFF_SESSION_PROPERTY}
)


@dataclass(frozen=True)
class TriggeredLock:
    """What the host handed over with a message, for settling it."""

    properties: dict[str, str]
    session_id: str
    sequence_number: int | None = None
    lock_token: str | None = None


def lock_of(message: ReceivedMessage) -> TriggeredLock:
    if not isinstance(message.lock, TriggeredLock):
        raise PermanentError("this message was not delivered by the Functions host")
    return message.lock


def handoff_session_id(session_id: str) -> str:
    """A fresh session id for one dead-letter hand-off, starting with the group's."""
    suffix = HANDOFF_MARK + uuid.uuid4().hex[:12]
    if len(session_id) + len(suffix) > _MAX_ID:
        session_id = hashlib.sha256(session_id.encode()).hexdigest()
    return session_id + suffix


def _copy(
    message: ReceivedMessage, *, tag: str, session_id: str, prior: int, extra: dict[str, str]
) -> OutgoingMessage:
    from writeback.adapters.servicebus import derived_message_id

    properties = {k: v for k, v in lock_of(message).properties.items() if k not in _OWN_PROPERTIES}
    properties[ORIGINAL_MESSAGE_ID] = message.message_id
    if prior > 0:
        properties[PRIOR_DELIVERIES] = str(prior)
    properties.update(extra)
    return OutgoingMessage(
        body=message.body,
        message_id=derived_message_id(message.message_id, tag),
        session_id=session_id,
        application_properties=properties,
    )


class _CopySettlement:
    """What both settlements share: the host completes what it delivered, and every
    other outcome is a copy (scheduled back into the session, or dead-lettered)."""

    max_delivery_count: int

    def complete(self, message: ReceivedMessage) -> None:
        """Nothing to do: the host completes the batch when the function returns."""
        lock_of(message)

    def complete_all(self, messages: Sequence[ReceivedMessage]) -> None:
        for message in messages:
            lock_of(message)

    def abandon(self, message: ReceivedMessage, *, delay: float = 0.0) -> None:
        count = message.delivery_count
        if count >= self.max_delivery_count:
            self.dead_letter(
                message,
                MAX_DELIVERY_COUNT_EXCEEDED,
                f"Message could not be consumed after {count} delivery attempts.",
            )
            return
        copy = _copy(message, tag=f"d{count}", session_id=message.session_id, prior=count, extra={})
        self._schedule(copy, max(delay, MIN_RESCHEDULE))

    def park(self, message: ReceivedMessage, *, delay: float) -> None:
        count = message.delivery_count
        tag = f"p{count}-{uuid.uuid4().hex[:8]}"
        copy = _copy(message, tag=tag, session_id=message.session_id, prior=count - 1, extra={})
        self._schedule(copy, max(delay, MIN_RESCHEDULE))

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        raise NotImplementedError

    def _schedule(self, copy: OutgoingMessage, delay: float) -> None:
        raise NotImplementedError


class ServiceBusSettlement(_CopySettlement):
    """Settlement of host-delivered Service Bus messages (see the module docstring)."""

    def __init__(
        self,
        client: ServiceBusClient,
        queue_name: str,
        *,
        max_delivery_count: int,
        handoff_wait: float = HANDOFF_WAIT,
    ) -> None:
        self._client = client
        self.queue_name = queue_name
        self.max_delivery_count = max_delivery_count
        self.handoff_wait = handoff_wait
        self._sender: ServiceBusSender | None = None
        self._lock = threading.Lock()

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        """Hand a copy to a session we hold, and dead-letter it there with the reason."""
        from azure.servicebus import ServiceBusReceiveMode

        from writeback.adapters.servicebus import to_servicebus_message, translated_errors

        session = handoff_session_id(message.session_id)
        copy = _copy(
            message,
            tag="x" + session.rsplit(HANDOFF_MARK, 1)[1],
            session_id=session,
            prior=message.delivery_count - 1,
            extra={HANDOFF_SESSION_PROPERTY: message.session_id},
        )
        outgoing = to_servicebus_message(copy)
        with translated_errors("dead-letter"):
            receiver = self._client.get_queue_receiver(
                self.queue_name,
                session_id=session,
                receive_mode=ServiceBusReceiveMode.PEEK_LOCK,
                max_wait_time=self.handoff_wait,
                prefetch_count=0,
            )
            with receiver:  # attaching the link locks the (still empty) session
                self._send(outgoing)
                received = receiver.receive_messages(
                    max_message_count=1, max_wait_time=self.handoff_wait
                )
                if not received:
                    raise QueueUnavailable(
                        f"dead-letter hand-off of {message.message_id} did not arrive in {session}"
                    )
                receiver.dead_letter_message(
                    received[0],
                    reason=reason[:_MAX_DEAD_LETTER_TEXT],
                    error_description=description[:_MAX_DEAD_LETTER_TEXT],
                )

    def _schedule(self, copy: OutgoingMessage, delay: float) -> None:
        from writeback.adapters.servicebus import to_servicebus_message, translated_errors

        when = datetime.now(UTC) + timedelta(seconds=delay)
        outgoing = to_servicebus_message(copy)
        with translated_errors("reschedule"), self._lock:
            self._get_sender().schedule_messages(outgoing, when)

    def _send(self, outgoing: Any) -> None:
        with self._lock:
            self._get_sender().send_messages(outgoing)

    def _get_sender(self) -> ServiceBusSender:
        if self._sender is None:
            self._sender = self._client.get_queue_sender(self.queue_name)
        return self._sender

    def close(self) -> None:
        if self._sender is not None:
            with contextlib.suppress(Exception):
                self._sender.close()
            self._sender = None
        with contextlib.suppress(Exception):
            self._client.close()


class LocalSettlement(_CopySettlement):
    """The same settlement on the embedded queue (``WRITEBACK_QUEUE=local``: tests, a
    dev box): copies scheduled into the SQLite file, dead letters written as copies,
    so the host's own completion of what it delivered succeeds as on Service Bus."""

    def __init__(self, queue: LocalQueue) -> None:
        self._queue = queue
        self.max_delivery_count = queue.max_delivery_count

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        lock_of(message)
        self._queue.dead_letter_copy(
            OutgoingMessage(
                body=message.body,
                message_id=message.message_id,
                session_id=message.session_id,
                application_properties=None,
            ),
            reason[:_MAX_DEAD_LETTER_TEXT],
            description[:_MAX_DEAD_LETTER_TEXT],
            delivery_count=message.delivery_count,
            enqueued_at=message.enqueued_at,
        )

    def _schedule(self, copy: OutgoingMessage, delay: float) -> None:
        self._queue.send([replace(copy, not_before=self._queue.now() + delay)])

    def close(self) -> None:
        """The queue is closed by whoever opened it."""
