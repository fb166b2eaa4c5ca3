"""ServiceBusQueue without a namespace: real SDK messages through the SDK's own AMQP
encoder and decoder, real SDK exceptions, and a real client failing against loopback.

What needs a live namespace (sessions, settlement, the DLQ) is not covered here.
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core import exceptions as core
from azure.identity import CredentialUnavailableError
from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage
from azure.servicebus import exceptions as sb
from azure.servicebus.amqp import (
    AmqpAnnotatedMessage,
    AmqpMessageBodyType,
    AmqpMessageProperties,
)

from writeback.adapters.servicebus import (
    ORIGINAL_MESSAGE_ID,
    PRIOR_DELIVERIES,
    LockLost,
    MessageRejected,
    QueueRefused,
    QueueUnavailable,
    ServiceBusQueue,
    dead_letter_from_servicebus_message,
    derived_message_id,
    from_servicebus_message,
    map_servicebus_error,
    to_servicebus_message,
)
from writeback.errors import PermanentError, TransientError
from writeback.ports import EventQueue, OutgoingMessage, ReceivedMessage


def broker_delivery(
    message: ServiceBusMessage | AmqpAnnotatedMessage,
    *,
    wire_delivery_count: int,
    sequence_number: int,
    enqueued_at: float,
    extra_properties: dict[str | bytes, Any] | None = None,
) -> ServiceBusReceivedMessage:
    """What a receiver gets for ``message``: the SDK's outgoing AMQP encoding plus the
    header and annotations the broker adds, decoded by the SDK's public ``from_bytes``."""
    from azure.servicebus._pyamqp import types
    from azure.servicebus._pyamqp._encode import encode_payload
    from azure.servicebus._pyamqp.message import Header
    from azure.servicebus._transport._pyamqp_transport import PyamqpTransport

    annotated = message if isinstance(message, AmqpAnnotatedMessage) else message.raw_amqp_message
    amqp = PyamqpTransport.to_outgoing_amqp_message(annotated)
    amqp = amqp._replace(
        header=Header(delivery_count=wire_delivery_count),
        message_annotations={
            b"x-opt-enqueued-time": {
                "TYPE": types.AMQPTypes.timestamp,
                "VALUE": int(enqueued_at * 1000),
            },
            b"x-opt-sequence-number": {"TYPE": types.AMQPTypes.long, "VALUE": sequence_number},
        },
        application_properties={
            **(amqp.application_properties or {}),
            **(extra_properties or {}),
        },
    )
    return ServiceBusReceivedMessage.from_bytes(bytes(encode_payload(bytearray(), amqp)))


ENQUEUED = 1_700_000_000.125


# -- conversions -----------------------------------------------------------------------


def test_outgoing_message_becomes_a_session_message() -> None:
    sent = to_servicebus_message(
        OutgoingMessage(b'{"group_id":"g"}', "n-1", "group-1", {"trace": "t-9"})
    )
    assert isinstance(sent, ServiceBusMessage)
    assert (sent.message_id, sent.session_id) == ("n-1", "group-1")
    assert sent.application_properties == {"trace": "t-9"}
    assert sent.body_type == AmqpMessageBodyType.DATA
    assert b"".join(sent.body) == b'{"group_id":"g"}'
    assert sent.scheduled_enqueue_time_utc is None


def test_scheduled_copy_carries_the_time() -> None:
    when = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    sent = to_servicebus_message(OutgoingMessage(b"x", "n", "g"), scheduled_at=when)
    assert sent.scheduled_enqueue_time_utc == when


@pytest.mark.parametrize(
    ("message_id", "session_id"),
    [("", "g"), ("n", ""), ("x" * 129, "g"), ("n", "y" * 129)],
)
def test_ids_service_bus_would_refuse_are_rejected_before_sending(
    message_id: str, session_id: str
) -> None:
    with pytest.raises(MessageRejected):
        to_servicebus_message(OutgoingMessage(b"x", message_id, session_id))


def test_received_message_round_trips_through_amqp() -> None:
    sent = to_servicebus_message(OutgoingMessage(b"payload", "n-1", "group-1", {"k": "v"}))
    raw = broker_delivery(sent, wire_delivery_count=0, sequence_number=7, enqueued_at=ENQUEUED)
    got = from_servicebus_message(raw)
    assert isinstance(got, ReceivedMessage)
    assert (got.body, got.message_id, got.session_id) == (b"payload", "n-1", "group-1")
    assert got.delivery_count == 1  # first delivery, as LocalQueue and .NET count it
    assert got.enqueued_at == pytest.approx(ENQUEUED, abs=0.001)
    assert got.lock is raw


def test_redelivery_counts_and_a_delayed_copy_keeps_its_history() -> None:
    sent = to_servicebus_message(OutgoingMessage(b"p", "n-1", "g"))
    again = broker_delivery(sent, wire_delivery_count=2, sequence_number=8, enqueued_at=ENQUEUED)
    assert from_servicebus_message(again).delivery_count == 3

    copy = to_servicebus_message(
        OutgoingMessage(
            b"p",
            derived_message_id("n-1", "d3"),
            "g",
            {ORIGINAL_MESSAGE_ID: "n-1", PRIOR_DELIVERIES: "3"},
        )
    )
    raw = broker_delivery(copy, wire_delivery_count=0, sequence_number=9, enqueued_at=ENQUEUED)
    got = from_servicebus_message(raw)
    assert (got.message_id, got.delivery_count) == ("n-1", 4)


def test_non_data_body_from_another_tool_is_kept_as_text() -> None:
    value = AmqpAnnotatedMessage(
        value_body={"a": 1}, properties=AmqpMessageProperties(message_id="n", group_id="g")
    )
    raw = broker_delivery(value, wire_delivery_count=0, sequence_number=1, enqueued_at=ENQUEUED)
    assert raw.body_type == AmqpMessageBodyType.VALUE
    got = from_servicebus_message(raw)
    assert (got.message_id, got.session_id) == ("n", "g")
    assert isinstance(got.body, bytes)
    assert b"a" in got.body  # unreadable as an envelope: the worker dead-letters it


def test_dead_letter_is_read_from_the_broker_properties() -> None:
    sent = to_servicebus_message(OutgoingMessage(b"bad", "n-1", "g", {"trace": "t"}))
    raw = broker_delivery(
        sent,
        wire_delivery_count=9,
        sequence_number=31,
        enqueued_at=ENQUEUED,
        extra_properties={
            "DeadLetterReason": "MaxDeliveryCountExceeded",
            "DeadLetterErrorDescription": "Message could not be consumed after 10 attempts.",
        },
    )
    dead = dead_letter_from_servicebus_message(raw)
    assert (dead.body, dead.message_id, dead.session_id) == (b"bad", "n-1", "g")
    assert dead.reason == "MaxDeliveryCountExceeded"
    assert dead.description.startswith("Message could not be consumed")
    assert dead.delivery_count == 10
    assert dead.lock == 31
    assert dead.dead_lettered_at == pytest.approx(ENQUEUED, abs=0.001)


def test_derived_ids_stay_within_the_service_bus_limit() -> None:
    assert derived_message_id("n-1", "r31") == "n-1#r31"
    long_id = "x" * 128
    derived = derived_message_id(long_id, "r31")
    assert len(derived) <= 128
    assert derived.endswith("#r31")
    assert derived == derived_message_id(long_id, "r31")
    assert derived != derived_message_id("y" * 128, "r31")


# -- error mapping ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (sb.ServiceBusConnectionError(message="refused"), QueueUnavailable),
        (sb.ServiceBusCommunicationError(message="dns"), QueueUnavailable),
        (sb.OperationTimeoutError(message="timed out"), QueueUnavailable),
        (sb.ServiceBusServerBusyError(message="busy"), QueueUnavailable),
        (sb.ServiceBusQuotaExceededError(message="queue full"), QueueUnavailable),
        (sb.MessagingEntityDisabledError(message="disabled"), QueueUnavailable),
        (sb.SessionCannotBeLockedError(message="taken"), QueueUnavailable),
        (sb.ServiceBusError("something new"), QueueUnavailable),
        (core.ServiceRequestError("connection refused"), QueueUnavailable),
        (core.ClientAuthenticationError("IMDS answered 500"), QueueUnavailable),
        (OSError("network unreachable"), QueueUnavailable),
        (sb.MessageLockLostError(message="lock lost"), LockLost),
        (sb.SessionLockLostError(message="session lock lost"), LockLost),
        (sb.MessageAlreadySettled(action="complete"), LockLost),
        (sb.ServiceBusAuthorizationError(message="no Send claim"), QueueRefused),
        (sb.ServiceBusAuthenticationError(message="bad SAS"), QueueRefused),
        (sb.MessagingEntityNotFoundError(message="no queue"), QueueRefused),
        (core.ResourceNotFoundError("no queue"), QueueRefused),
        (CredentialUnavailableError("no managed identity"), QueueRefused),
        (sb.MessageSizeExceededError(message="too big"), MessageRejected),
        (ValueError("session_id too long"), MessageRejected),
    ],
)
def test_sdk_errors_map_to_writeback_errors(error: Exception, expected: type) -> None:
    mapped = map_servicebus_error(error, "send")
    assert type(mapped) is expected
    assert "Service Bus send failed" in str(mapped)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (403, QueueRefused),
        (401, QueueRefused),
        (400, QueueRefused),
        (429, QueueUnavailable),
        (503, QueueUnavailable),
        (500, QueueUnavailable),
        (408, QueueUnavailable),
    ],
)
def test_administration_api_statuses(status: int, expected: type) -> None:
    error = core.HttpResponseError(message=f"status {status}")
    error.status_code = status
    assert type(map_servicebus_error(error, "read queue properties")) is expected


def test_kinds_are_transient_or_permanent() -> None:
    assert issubclass(QueueUnavailable, TransientError)
    assert issubclass(LockLost, TransientError)
    assert issubclass(QueueRefused, PermanentError)
    assert issubclass(MessageRejected, PermanentError)
    assert map_servicebus_error(KeyError("a bug"), "send") is None


# -- a real client against loopback ----------------------------------------------------


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def resetting_port() -> Iterator[int]:
    """A listener that accepts and hangs up at once."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(2)
    server.close()


def loopback_queue(port: int) -> ServiceBusQueue:
    return ServiceBusQueue.from_connection_string(
        f"Endpoint=sb://127.0.0.1:{port}/;SharedAccessKeyName=RootManageSharedAccessKey;"
        "SharedAccessKey=bm90LWEta2V5;UseDevelopmentEmulator=true",
        "writeback-events",
        retry_total=0,
    )


@pytest.mark.parametrize("endpoint", ["closed_port", "resetting_port"])
def test_unreachable_namespace_is_queue_unavailable_quickly(
    endpoint: str, request: pytest.FixtureRequest
) -> None:
    port: int = request.getfixturevalue(endpoint)
    with loopback_queue(port) as queue:
        port_view: EventQueue = queue
        started = time.monotonic()
        with pytest.raises(QueueUnavailable) as caught:
            port_view.send([OutgoingMessage(b"x", "n-1", "g")])
        assert isinstance(caught.value.__cause__, sb.ServiceBusConnectionError)
        with pytest.raises(QueueUnavailable):
            port_view.receive_session(10, 1)  # not [] : a dead namespace is not an empty one
        with pytest.raises(QueueUnavailable):
            port_view.depth()
        with pytest.raises(QueueUnavailable):
            port_view.dead_letters()
        assert time.monotonic() - started < 10


def test_invalid_message_is_rejected_before_any_connection(closed_port: int) -> None:
    with loopback_queue(closed_port) as queue, pytest.raises(MessageRejected):
        queue.send([OutgoingMessage(b"x", "n-1", "g"), OutgoingMessage(b"x", "", "g")])


def test_settling_without_a_held_session_is_lock_lost(closed_port: int) -> None:
    sent = to_servicebus_message(OutgoingMessage(b"p", "n-1", "g"))
    raw = broker_delivery(sent, wire_delivery_count=0, sequence_number=1, enqueued_at=ENQUEUED)
    message = from_servicebus_message(raw)
    with loopback_queue(closed_port) as queue:
        with pytest.raises(LockLost):
            queue.complete(message)
        with pytest.raises(LockLost):
            queue.abandon(message, delay=5)
        with pytest.raises(LockLost):
            queue.dead_letter(message, "r", "d")
        with pytest.raises(LockLost):
            queue.renew_session_lock("g")
        queue.release_session("g")  # nothing held: a no-op
