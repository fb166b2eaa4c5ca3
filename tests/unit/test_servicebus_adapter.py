"""ServiceBusQueue through the real SDK over AMQP: against the Service Bus emulator
(sandbox/writeback_sandbox/servicebus_emulator, TLS with its own CA) for everything a
namespace does, and against loopback ports that refuse or hang up for a namespace
that is down. The pure parts (message building, derived ids, error mapping) are
tested on their own at the end.
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from azure.core import exceptions as core
from azure.identity import CredentialUnavailableError
from azure.servicebus import ServiceBusMessage, ServiceBusSubQueue
from azure.servicebus import exceptions as sb_errors
from azure.servicebus.amqp import AmqpAnnotatedMessage, AmqpMessageBodyType, AmqpMessageProperties

from tests.support.servicebus import adapter, new_queue, queue_name, sb, sdk_client
from writeback.adapters.servicebus import (
    ORIGINAL_MESSAGE_ID,
    PRIOR_DELIVERIES,
    LockLost,
    MessageRejected,
    QueueRefused,
    QueueUnavailable,
    ServiceBusQueue,
    derived_message_id,
    map_servicebus_error,
    to_servicebus_message,
)
from writeback.errors import PermanentError, TransientError
from writeback.ports import EventQueue, OutgoingMessage, ReceivedMessage
from writeback_sandbox.servicebus_emulator import APP_RULE, ServiceBusEmulator

__all__ = ["queue_name", "sb"]  # fixtures


@pytest.fixture
def queue(sb: ServiceBusEmulator, queue_name: str) -> Iterator[ServiceBusQueue]:
    with adapter(sb, queue_name, max_delivery_count=5) as q:
        yield q


def out(message_id: str, session: str = "g1", body: bytes = b'{"e":1}') -> OutgoingMessage:
    return OutgoingMessage(body, message_id, session, {"trace": "t-9"})


# -- the port over the wire ----------------------------------------------------------


def test_satisfies_the_port_and_round_trips_a_message(queue: ServiceBusQueue) -> None:
    port: EventQueue = queue
    before = time.time()
    port.send([out("n-1"), out("n-2", "g2")])
    [got] = port.receive_session(10, 2)
    assert isinstance(got, ReceivedMessage)
    assert (got.body, got.message_id, got.session_id) == (b'{"e":1}', "n-1", "g1")
    assert got.delivery_count == 1  # first delivery, as LocalQueue and .NET count it
    assert before - 1 <= got.enqueued_at <= time.time() + 1
    port.complete(got)
    port.release_session("g1")
    assert port.depth() == 1


def test_a_session_is_taken_by_one_receiver_in_fifo_order(
    sb: ServiceBusEmulator, queue: ServiceBusQueue
) -> None:
    """Each adapter accepts sessions ahead of its callers and gives back within a
    second what they do not take, so another receiver gets them soon after."""
    queue.send([out(f"a{i}") for i in range(3)] + [out("b0", "g2")])
    first = queue.receive_session(2, 2)
    assert [m.message_id for m in first] == ["a0", "a1"]
    with adapter(sb, queue.queue_name) as other:
        [b0] = other.receive_session(10, 5)  # g1 is held: the other receiver gets g2
        assert b0.session_id == "g2"
        other.complete(b0)
        other.release_session("g2")
        for message in first:
            queue.complete(message)
        queue.release_session("g1")
        [a2] = other.receive_session(10, 5)
        assert a2.message_id == "a2"
        other.complete(a2)
        other.release_session("g1")
    assert queue.receive_session(10, 0.5) == []  # empty: [] within the wait, not an error


def test_several_sessions_at_once_and_a_full_one_kept_for_the_next_caller(
    sb: ServiceBusEmulator, queue: ServiceBusQueue
) -> None:
    """``receive_sessions`` hands out sessions accepted ahead of it, one receiver each;
    a session whose batch was full and settled is kept (its lock renewed) and the next
    caller gets the rest of it in order; the others are given back."""
    queue.send([out(f"a{i}") for i in range(4)] + [out("b0", "g2"), out("c0", "g3")])
    deadline = time.monotonic() + 10
    batches: list[list[ReceivedMessage]] = []
    while len(batches) < 3 and time.monotonic() < deadline:  # sessions accepted one by one
        batches += queue.receive_sessions(3 - len(batches), 2, 5)
    by_session = {batch[0].session_id: [m.message_id for m in batch] for batch in batches}
    assert by_session == {"g1": ["a0", "a1"], "g2": ["b0"], "g3": ["c0"]}
    for batch in batches:
        for message in batch:
            queue.complete(message)
        queue.release_session(batch[0].session_id)
    rest = queue.receive_session(2, 5)
    assert [m.message_id for m in rest] == ["a2", "a3"]
    assert [m.delivery_count for m in rest] == [1, 1]
    for message in rest:
        queue.complete(message)
    queue.release_session("g1")
    assert sb.counts(queue.queue_name)["active"] == 0


def test_a_message_left_unsettled_comes_back_first_in_its_session(
    queue: ServiceBusQueue,
) -> None:
    """A worker that fails half way through a full batch releases the session with a
    message unsettled: the session is closed, not kept, so that message is delivered
    again before the ones behind it (FIFO per group holds)."""
    queue.send([out(f"a{i}") for i in range(3)])
    first = queue.receive_session(2, 5)
    assert [m.message_id for m in first] == ["a0", "a1"]
    queue.complete(first[0])
    queue.release_session("g1")  # a1 left unsettled
    again = queue.receive_session(10, 5)
    assert [(m.message_id, m.delivery_count) for m in again] == [("a1", 2), ("a2", 1)]
    for message in again:
        queue.complete(message)
    queue.release_session("g1")


def test_abandon_counts_the_delivery_and_the_maximum_dead_letters(
    queue: ServiceBusQueue,
) -> None:
    queue.send([out("n-1")])
    counts = []
    for _ in range(5):
        [message] = queue.receive_session(1, 2)
        counts.append(message.delivery_count)
        queue.abandon(message)
        queue.release_session("g1")
    assert counts == [1, 2, 3, 4, 5]
    [letter] = queue.dead_letters()
    assert (letter.message_id, letter.session_id) == ("n-1", "g1")
    assert letter.reason == "MaxDeliveryCountExceeded"
    assert letter.description == "Message could not be consumed after 5 delivery attempts."


def test_a_delayed_abandon_is_a_scheduled_copy_that_keeps_the_count(
    queue: ServiceBusQueue,
) -> None:
    queue.send([out("n-1")])
    [message] = queue.receive_session(1, 2)
    queue.abandon(message, delay=1.5)
    queue.release_session("g1")
    assert queue.scheduled_count() == 1 and queue.depth() == 0
    assert queue.receive_session(1, 0.3) == []
    time.sleep(1.3)
    [again] = queue.receive_session(1, 2)
    assert (again.message_id, again.delivery_count, again.body) == ("n-1", 2, b'{"e":1}')
    queue.complete(again)
    queue.release_session("g1")


def test_dead_letter_keeps_the_reason_description_and_history(queue: ServiceBusQueue) -> None:
    queue.send([out("n-1")])
    [message] = queue.receive_session(1, 2)
    queue.abandon(message)
    queue.release_session("g1")
    [message] = queue.receive_session(1, 2)
    queue.dead_letter(message, "OverMemberLimit", "group has 60001 members" + "x" * 5000)
    queue.release_session("g1")
    [letter] = queue.dead_letters()
    assert (letter.reason, letter.delivery_count, letter.body) == ("OverMemberLimit", 2, b'{"e":1}')
    assert letter.description.startswith("group has 60001") and len(letter.description) == 4096
    assert isinstance(letter.lock, int)
    assert queue.dead_letter_count_by_reason() == {"OverMemberLimit": 1}


def test_a_lapsed_session_lock_is_lock_lost_and_renewal_prevents_it(
    sb: ServiceBusEmulator,
) -> None:
    with adapter(sb, new_queue(sb, lock_duration=1.0)) as queue:
        queue.send([out("n-1"), out("n-2")])
        first, second = queue.receive_session(2, 2)
        for _ in range(3):
            time.sleep(0.5)
            assert queue.renew_session_lock("g1") > time.time()
        queue.complete(first)
        time.sleep(1.3)
        with pytest.raises(LockLost):
            queue.complete(second)
        with pytest.raises(LockLost):
            queue.renew_session_lock("g1")
        queue.release_session("g1")
        [again] = queue.receive_session(1, 2)
        assert (again.message_id, again.delivery_count) == ("n-2", 2)


def test_duplicates_are_dropped_and_a_large_batch_is_split(queue: ServiceBusQueue) -> None:
    queue.send([out("n-1"), out("n-1")])
    queue.send([out("n-1")])
    queue.send([out(f"m{i}", f"s{i % 7}", b"x" * 4000) for i in range(250)])  # > one batch
    assert queue.depth() == 251


def test_an_oversized_message_is_rejected(queue: ServiceBusQueue) -> None:
    with pytest.raises(MessageRejected):
        queue.send([out("big", body=b"x" * (300 * 1024))])
    assert queue.depth() == 0


def test_a_body_another_tool_sent_as_a_value_is_read_as_text(
    sb: ServiceBusEmulator, queue: ServiceBusQueue
) -> None:
    value = AmqpAnnotatedMessage(
        value_body={"a": 1}, properties=AmqpMessageProperties(message_id="v", group_id="g1")
    )
    with sdk_client(sb) as client, client.get_queue_sender(queue.queue_name) as sender:
        sender.send_messages(value)
    [got] = queue.receive_session(1, 2)
    assert (got.message_id, got.session_id) == ("v", "g1")
    assert isinstance(got.body, bytes) and b"a" in got.body  # the worker dead-letters it


def test_without_manage_rights_depth_is_refused_but_dead_letters_are_read(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    with adapter(sb, queue_name, rule=APP_RULE) as app:
        app.send([out("n-1")])
        [message] = app.receive_session(1, 2)
        app.dead_letter(message, "PoisonEvent", "bad")
        app.release_session("g1")
        with pytest.raises(QueueRefused):
            app.depth()
        assert app.dead_letter_count_by_reason() == {"PoisonEvent": 1}


def test_depth_then_scheduled_count_read_one_snapshot(
    queue: ServiceBusQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "Is the queue empty?" asks depth() then scheduled_count(): from two reads, a
    scheduled message that came due in between would be in neither (the pipeline
    tests on Service Bus saw it go idle before a confirmation was handled)."""
    admin = queue._admin
    assert admin is not None
    reads: list[str] = []
    read = admin.get_queue_runtime_properties

    def counted(name: str, **kwargs: object) -> object:
        reads.append(name)
        return read(name, **kwargs)

    monkeypatch.setattr(admin, "get_queue_runtime_properties", counted)
    later = time.time() + 60
    queue.send([out("now"), OutgoingMessage(b"{}", "later", "g2", not_before=later)])
    assert (queue.depth(), queue.scheduled_count()) == (1, 1)
    assert len(reads) == 1
    assert queue.scheduled_count() == 1  # on its own: a read of its own
    assert len(reads) == 2


def test_settling_a_released_or_foreign_message_is_lock_lost(queue: ServiceBusQueue) -> None:
    queue.send([out("n-1")])
    [message] = queue.receive_session(1, 2)
    queue.release_session("g1")
    for settle in (
        lambda: queue.complete(message),
        lambda: queue.abandon(message, delay=5),
        lambda: queue.dead_letter(message, "r", "d"),
        lambda: queue.renew_session_lock("g1"),
    ):
        with pytest.raises(LockLost):
            settle()
    foreign = ReceivedMessage(b"", "x", "g1", 1, 0.0, lock=object())
    with pytest.raises(LockLost):
        queue.complete(foreign)
    queue.release_session("g1")  # nothing held: a no-op


def test_the_dead_letter_sub_queue_is_read_in_pages_without_a_cap(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    with sdk_client(sb) as client:
        with client.get_queue_sender(queue_name) as sender:
            for start in range(0, 1200, 100):
                sender.send_messages(
                    [
                        ServiceBusMessage(b"{}", message_id=f"m{i}", session_id="g1")
                        for i in range(start, start + 100)
                    ]
                )
        with client.get_queue_receiver(queue_name, session_id="g1", max_wait_time=2) as r:
            while batch := r.receive_messages(max_message_count=200, max_wait_time=1):
                for message in batch:
                    r.dead_letter_message(message, reason="PoisonEvent", error_description="x")
    with adapter(sb, queue_name) as queue:
        ids = [letter.message_id for letter in queue.iter_dead_letters(page_size=250)]
        assert ids == [f"m{i}" for i in range(1200)]
        assert len(queue.dead_letters(limit=1100)) == 1100  # the old fixed cap was 1,000
        assert queue.dead_letter_count_by_reason() == {"PoisonEvent": 1200}
    with (
        sdk_client(sb) as client,
        client.get_queue_receiver(queue_name, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq,
    ):
        assert len(dlq.peek_messages(5)) == 5  # peeking locked nothing


# -- a namespace that is down ----------------------------------------------------------


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
        assert isinstance(caught.value.__cause__, sb_errors.ServiceBusConnectionError)
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


# -- pure parts ------------------------------------------------------------------------


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
    when = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    later = to_servicebus_message(OutgoingMessage(b"x", "n", "g"), scheduled_at=when)
    assert later.scheduled_enqueue_time_utc == when


@pytest.mark.parametrize(
    ("message_id", "session_id"),
    [("", "g"), ("n", ""), ("x" * 129, "g"), ("n", "y" * 129)],
)
def test_ids_service_bus_would_refuse_are_rejected_before_sending(
    message_id: str, session_id: str
) -> None:
    with pytest.raises(MessageRejected):
        to_servicebus_message(OutgoingMessage(b"x", message_id, session_id))


def test_derived_ids_stay_within_the_service_bus_limit() -> None:
    assert derived_message_id("n-1", "r31") == "n-1#r31"
    long_id = "x" * 128
    derived = derived_message_id(long_id, "r31")
    assert len(derived) <= 128
    assert derived.endswith("#r31")
    assert derived == derived_message_id(long_id, "r31")
    assert derived != derived_message_id("y" * 128, "r31")
    assert {ORIGINAL_MESSAGE_ID, PRIOR_DELIVERIES} == {
        "writeback-message-id",
        "writeback-prior-deliveries",
    }


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (sb_errors.ServiceBusConnectionError(message="refused"), QueueUnavailable),
        (sb_errors.ServiceBusCommunicationError(message="dns"), QueueUnavailable),
        (sb_errors.OperationTimeoutError(message="timed out"), QueueUnavailable),
        (sb_errors.ServiceBusServerBusyError(message="busy"), QueueUnavailable),
        (sb_errors.ServiceBusQuotaExceededError(message="queue full"), QueueUnavailable),
        (sb_errors.MessagingEntityDisabledError(message="disabled"), QueueUnavailable),
        (sb_errors.SessionCannotBeLockedError(message="taken"), QueueUnavailable),
        (sb_errors.ServiceBusError("something new"), QueueUnavailable),
        (core.ServiceRequestError("connection refused"), QueueUnavailable),
        (core.ClientAuthenticationError("IMDS answered 500"), QueueUnavailable),
        (OSError("network unreachable"), QueueUnavailable),
        (sb_errors.MessageLockLostError(message="lock lost"), LockLost),
        (sb_errors.SessionLockLostError(message="session lock lost"), LockLost),
        (sb_errors.MessageAlreadySettled(action="complete"), LockLost),
        (sb_errors.ServiceBusAuthorizationError(message="no Send claim"), QueueRefused),
        (sb_errors.ServiceBusAuthenticationError(message="bad SAS"), QueueRefused),
        (sb_errors.MessagingEntityNotFoundError(message="no queue"), QueueRefused),
        (core.ResourceNotFoundError("no queue"), QueueRefused),
        (CredentialUnavailableError("no managed identity"), QueueRefused),
        (sb_errors.MessageSizeExceededError(message="too big"), MessageRejected),
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
