"""tests/support/functions_wire.py: our queue's messages, through the extension's binding
data, the host's gRPC conversion and the worker's Datum, decoded by azure.functions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import azure.functions as func
import pytest

from tests.support import functions_wire as wire
from writeback.adapters.local_queue import LocalLock, LocalQueue
from writeback.ports import OutgoingMessage, ReceivedMessage

BODIES = [
    b'{"kind":"group","id":"g-1"}',
    "Gruppe für Vertrieb: 販売 ✓".encode(),
    bytes(range(256)),  # not UTF-8 at all
    b"",
]
PROPERTIES: list[dict[str, str] | None] = [
    {"writeback-message-id": "orig-1", "writeback-prior-deliveries": "2"},
    {"note": "ünïcödé ✓", "quote": 'a "b" \\ c'},
    None,
    {"empty": ""},
]


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[LocalQueue]:
    with LocalQueue(tmp_path / "queue.db") as q:
        yield q


def received(queue: LocalQueue) -> list[ReceivedMessage]:
    queue.send(
        [
            OutgoingMessage(body, f"m-{i}", "group-Ä", properties)
            for i, (body, properties) in enumerate(zip(BODIES, PROPERTIES, strict=True))
        ]
    )
    first = queue.receive_session(10, 0)
    queue.abandon(first[1])
    [again] = queue.receive_from_session("group-Ä", 10, 0)  # delivery count 2
    return [first[0], again, *first[2:]]


def expected_enqueued(message: ReceivedMessage) -> datetime:
    """The broker's millisecond timestamp, as the naive DateTime the host sends."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
        milliseconds=round(message.enqueued_at * 1000)
    )
    return moment.replace(tzinfo=None)


def assert_same(decoded: func.ServiceBusMessage, original: ReceivedMessage) -> None:
    lock = original.lock
    assert isinstance(lock, LocalLock)
    assert decoded.get_body() == original.body
    assert decoded.message_id == original.message_id
    assert decoded.session_id == original.session_id
    assert decoded.delivery_count == original.delivery_count
    assert decoded.sequence_number == lock.seq
    assert decoded.lock_token == lock.token
    assert decoded.enqueued_time_utc == expected_enqueued(original)
    assert decoded.enqueued_time_utc is not None and decoded.enqueued_time_utc.tzinfo is None
    assert decoded.expires_at_utc == expected_enqueued(original) + wire.QUEUE_TIME_TO_LIVE
    assert decoded.application_properties == lock.properties
    assert decoded.user_properties == lock.properties
    assert decoded.content_type is None and decoded.correlation_id is None
    assert decoded.locked_until is None  # the 5.x binding data has no LockedUntil


def test_a_batch_round_trips_through_the_converter(queue: LocalQueue) -> None:
    batch = received(queue)
    assert [m.delivery_count for m in batch] == [1, 2, 1, 1]
    decoded = wire.decode_batch(batch)
    assert len(decoded) == len(batch)
    for message, original in zip(decoded, batch, strict=True):
        assert isinstance(message, func.ServiceBusMessage)
        assert_same(message, original)


def test_one_message_round_trips_through_the_converter(queue: LocalQueue) -> None:
    for original in received(queue):
        assert_same(wire.decode_single(original), original)


def test_the_batch_has_the_extensions_arrays_in_the_hosts_encodings(queue: LocalQueue) -> None:
    batch = received(queue)
    data, metadata = wire.invocation([wire.broker_message(m) for m in batch], "many")
    assert data == wire.TypedData("collection_bytes", BODIES)
    cases = {name: typed.case for name, typed in metadata.items()}
    assert cases == {
        "DeliveryCountArray": "json",  # int[] is not one of the host's collection cases
        "DeadLetterSourceArray": "collection_string",
        "LockTokenArray": "collection_string",
        "ExpiresAtUtcArray": "json",
        "ExpiresAtArray": "json",
        "EnqueuedTimeUtcArray": "json",
        "EnqueuedTimeArray": "json",
        "MessageIdArray": "collection_string",
        "ContentTypeArray": "collection_string",
        "ReplyToArray": "collection_string",
        "SequenceNumberArray": "collection_sint64",
        "ToArray": "collection_string",
        "SubjectArray": "collection_string",
        "LabelArray": "collection_string",
        "CorrelationIdArray": "collection_string",
        "ApplicationPropertiesArray": "json",
        "UserPropertiesArray": "json",
        "SessionIdArray": "collection_string",
        "ReplyToSessionIdArray": "collection_string",
        "PartitionKeyArray": "collection_string",
        "TransactionPartitionKeyArray": "collection_string",
    }
    assert json.loads(metadata["DeliveryCountArray"].value) == [1, 2, 1, 1]
    assert metadata["MessageIdArray"].value == ["m-0", "m-1", "m-2", "m-3"]
    assert metadata["SessionIdArray"].value == ["group-Ä"] * 4
    assert metadata["ContentTypeArray"].value == []  # all null: an empty collection
    assert json.loads(metadata["UserPropertiesArray"].value) == [p or {} for p in PROPERTIES]
    assert "ünïcödé" in metadata["ApplicationPropertiesArray"].value  # written as is
    enqueued = json.loads(metadata["EnqueuedTimeUtcArray"].value)
    assert all("+" not in text and not text.endswith("Z") for text in enqueued)
    assert all(text.endswith("+00:00") for text in json.loads(metadata["EnqueuedTimeArray"].value))


def test_one_message_has_scalars_and_no_nulls(queue: LocalQueue) -> None:
    original = received(queue)[1]
    data, metadata = wire.invocation([wire.broker_message(original)], "one")
    assert data == wire.TypedData("bytes", original.body)
    assert metadata["DeliveryCount"] == wire.TypedData("json", "2")
    assert metadata["SequenceNumber"].case == "json"
    assert metadata["MessageId"] == wire.TypedData("string", "m-1")
    assert metadata["SessionId"] == wire.TypedData("string", "group-Ä")
    assert json.loads(metadata["ApplicationProperties"].value) == PROPERTIES[1]
    for absent in ("ContentType", "CorrelationId", "ReplyTo", "DeadLetterSource", "PartitionKey"):
        assert absent not in metadata
    assert not any(name.endswith("Array") for name in metadata)


def test_string_arrays_lose_empty_entries_and_then_misalign(queue: LocalQueue) -> None:
    """The Python worker does not declare IncludeEmptyEntriesInMessagePayload."""
    base = wire.broker_message(received(queue)[0])
    messages = [
        base,
        wire.BrokerMessage(**{**vars(base), "message_id": "m-x", "content_type": "text/plain"}),
        base,
    ]
    decoded = wire.decode(messages, "many")
    assert [m.content_type for m in decoded] == ["text/plain", None, None]


def test_json_net_dates() -> None:
    utc = datetime(2026, 11, 24, 6, 0, 1, 123000, tzinfo=UTC)
    assert wire._dotnet_datetime(utc) == "2026-11-24T06:00:01.123+00:00"
    assert wire._dotnet_datetime(utc.replace(tzinfo=None)) == "2026-11-24T06:00:01.123"
    assert wire._dotnet_datetime(utc.replace(microsecond=0)) == "2026-11-24T06:00:01+00:00"
    east = datetime(2026, 1, 2, 3, 4, 5, 600, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    assert wire._dotnet_datetime(east) == "2026-01-02T03:04:05.0006+05:30"


def test_only_messages_of_our_queue_and_never_an_empty_batch() -> None:
    foreign = ReceivedMessage(b"x", "m", "s", 1, 0.0, lock="not a LocalLock")
    with pytest.raises(TypeError):
        wire.decode_batch([foreign])
    with pytest.raises(ValueError, match="no message"):
        wire.decode([], "many")
