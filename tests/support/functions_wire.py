"""The Service Bus trigger's data, built as the platform builds it for a Python function.

Four hops carry a received message to the function; each is reproduced here from
its source, so a test hands the app's worker function the very objects it gets
on Azure (decoded by ``azure.functions``' own converter), not hand-assembled
``func.ServiceBusMessage`` objects:

1. **The extension's binding data** (WebJobs Service Bus extension 5.x,
   ``ServiceBusTriggerBindingStrategy.GetBindingData``, Azure/azure-sdk-for-net
   ``sdk/servicebus/Microsoft.Azure.WebJobs.Extensions.ServiceBus/src/Triggers``):
   for a batch (``cardinality=many``) one .NET array per property:
   ``DeliveryCountArray`` (int[]), ``DeadLetterSourceArray``, ``LockTokenArray``,
   ``MessageIdArray``, ``ContentTypeArray``, ``ReplyToArray``, ``ToArray``,
   ``SubjectArray`` and ``LabelArray`` (the same subjects), ``CorrelationIdArray``,
   ``SessionIdArray``, ``ReplyToSessionIdArray``, ``PartitionKeyArray`` and
   ``TransactionPartitionKeyArray`` (string[]; the latter filled with the
   partition keys, as the source does), ``SequenceNumberArray`` (long[]),
   ``ExpiresAtUtcArray`` and ``EnqueuedTimeUtcArray`` (DateTime[] taken from
   ``DateTimeOffset.DateTime``, so of unspecified kind), ``ExpiresAtArray`` and
   ``EnqueuedTimeArray`` (DateTimeOffset[]), ``ApplicationPropertiesArray`` and
   ``UserPropertiesArray`` (the same IDictionary<string, object>[]). For one
   message (``cardinality=one``) the same names without ``Array``, as scalars.
2. **The host's conversion to gRPC** (Azure/azure-functions-host
   ``GrpcMessageConversionExtensions.ToRpc`` and
   ``ScriptInvocationContextExtensions.ToRpcInvocationRequest``): null values
   are left out of the trigger metadata; ``byte[]`` → ``bytes``; ``string`` →
   ``string``; ``double`` → ``double``; ``byte[][]`` → ``collection_bytes``;
   ``string[]`` → ``collection_string``; ``long[]`` → ``collection_sint64``;
   anything else, ``int`` and ``long`` scalars, ``int[]``, dates and dictionaries
   included, → ``json`` (Json.NET: dates as ``2026-11-24T06:00:01.123`` with up to
   seven fraction digits, no offset for an unspecified DateTime, ``+00:00`` for
   a DateTimeOffset). The collection cases need the worker's
   ``TypedDataCollection`` capability, which the Python worker declares. Null
   or empty entries of a ``string[]`` are *dropped* unless the worker declares
   ``IncludeEmptyEntriesInMessagePayload``, which the Python worker does not
   (azure-functions-runtime 1.3.0 ``worker_init_request``): such an array is
   compacted, and its entries no longer line up with the messages.
3. **The worker's conversion to Datum** (``Datum.from_typed_data`` in
   azure-functions-runtime / azure_functions_worker): the value of the set
   ``oneof`` case and its name as the type (``collection_*`` values are the
   protobuf collection messages, whose repeated field is named after the
   element type: ``.bytes``, ``.string``, ``.sint64``, ``.double``).
4. **The converter**: ``azure.functions.servicebus.ServiceBusMessageInConverter.decode``.

The trigger's own value is the message body: our binding has no ``dataType``,
and it is taken to reach the worker as ``byte[]`` (one message) or ``byte[][]``
(a batch), as the azure-functions library's own Service Bus tests model it
(``CollectionBytes`` data with ``CollectionString``/``CollectionSint64``
metadata); that step was not traced through the host's script binding code.
Where this differs from Azure: Service Bus timestamps have millisecond precision,
so enqueued times are rounded to the millisecond here as the broker's are;
``ExpiresAt`` is the enqueued time plus the queue's default time to live (14
days in infra/modules/servicebus.bicep), since our queue has none of its own;
the non-null action objects of the binding data (``MessageActions``,
``SessionActions``, ``ReceiveActions``, ``Client``, and their back-compat aliases)
which the host serialises as JSON and the converter ignores, are left out; large
payloads may travel over shared memory when an app enables it, not modelled.

Two consequences a test can rely on, because Azure does the same: the decoded
``enqueued_time_utc`` is a *naive* datetime (the DateTime sent has no offset,
and the converter's local-time format matches it); and lock tokens, sequence
numbers and delivery counts are the queue's own (``LocalLock``), so the app's
local settlement finds the message again.

Messages the real SDK received from a broker (the Service Bus emulator) go the
same way (:func:`received_broker_message`): their lock tokens, sequence numbers,
delivery counts, times and application properties are the broker's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

import azure.functions as func
from azure.functions import meta
from azure.functions.servicebus import ServiceBusMessageInConverter

from writeback.adapters.local_queue import LocalLock
from writeback.ports import ReceivedMessage

if TYPE_CHECKING:
    from azure.servicebus import ServiceBusReceivedMessage

#: The queue's DefaultMessageTimeToLive (infra/modules/servicebus.bicep: P14D).
QUEUE_TIME_TO_LIVE: Final = timedelta(days=14)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

Cardinality = Literal["one", "many"]


class NetValue(NamedTuple):
    """A binding data value with the .NET type the extension gives it."""

    type: str
    value: object


@dataclass(frozen=True)
class BrokerMessage:
    """The properties of a received message (Azure.Messaging.ServiceBus
    ``ServiceBusReceivedMessage``) that the extension puts in the binding data."""

    body: bytes
    message_id: str
    session_id: str | None
    delivery_count: int
    sequence_number: int
    lock_token: str
    enqueued_time: datetime
    expires_at: datetime
    application_properties: Mapping[str, object] = field(default_factory=dict)
    content_type: str | None = None
    correlation_id: str | None = None
    subject: str | None = None
    reply_to: str | None = None
    to: str | None = None
    reply_to_session_id: str | None = None
    partition_key: str | None = None
    transaction_partition_key: str | None = None
    dead_letter_source: str | None = None


def broker_message(
    message: ReceivedMessage, *, time_to_live: timedelta = QUEUE_TIME_TO_LIVE
) -> BrokerMessage:
    """What Service Bus hands the extension: for a message the SDK received (``lock``
    is its ``ServiceBusReceivedMessage``) the broker's own properties, for one of our
    local queue what Service Bus would give it."""
    from azure.servicebus import ServiceBusReceivedMessage

    lock = message.lock
    if isinstance(lock, ServiceBusReceivedMessage):
        return received_broker_message(lock)
    if not isinstance(lock, LocalLock):
        raise TypeError("functions_wire takes messages received from a LocalQueue or the SDK")
    enqueued = _EPOCH + timedelta(milliseconds=round(message.enqueued_at * 1000))
    return BrokerMessage(
        body=message.body,
        message_id=message.message_id,
        session_id=message.session_id,
        delivery_count=message.delivery_count,
        sequence_number=lock.seq,
        lock_token=lock.token,
        enqueued_time=enqueued,
        expires_at=enqueued + time_to_live,
        application_properties=dict(lock.properties),
    )


def received_broker_message(message: ServiceBusReceivedMessage) -> BrokerMessage:
    """A message the Python SDK received from a broker (the emulator), as the .NET
    SDK the extension runs on presents it: ``DeliveryCount`` is the AMQP header's
    delivery-count plus one (the Python SDK gives the header's), application
    property names and text values are strings, times are the broker's."""
    if message.sequence_number is None or message.lock_token is None:
        raise TypeError("a received message in peek-lock mode has a sequence number and a lock")
    if message.enqueued_time_utc is None:
        raise TypeError("a received message has an enqueued time")

    def text(value: object) -> object:
        return value.decode("utf-8") if isinstance(value, bytes) else value

    body = message.body
    enqueued = message.enqueued_time_utc
    return BrokerMessage(
        body=body if isinstance(body, bytes) else b"".join(body),
        message_id=message.message_id or "",
        session_id=message.session_id,
        delivery_count=(message.delivery_count or 0) + 1,
        sequence_number=message.sequence_number,
        lock_token=str(message.lock_token),
        enqueued_time=enqueued,
        expires_at=message.expires_at_utc or enqueued + QUEUE_TIME_TO_LIVE,
        application_properties={
            str(text(k)): text(v) for k, v in (message.application_properties or {}).items()
        },
        content_type=message.content_type,
        correlation_id=message.correlation_id,
        subject=message.subject,
        reply_to=message.reply_to,
        to=message.to,
        reply_to_session_id=message.reply_to_session_id,
        partition_key=message.partition_key,
        dead_letter_source=message.dead_letter_source,
    )


# --------------------------------------------------------------------------- 1. the extension


def _naive(moment: datetime) -> datetime:
    """``DateTimeOffset.DateTime``: the same clock reading, of unspecified kind."""
    return moment.replace(tzinfo=None)


def batch_binding_data(messages: Sequence[BrokerMessage]) -> dict[str, NetValue]:
    """``GetBindingData`` for a batch: one array per property (names as in the source)."""

    def strings(attribute: str) -> NetValue:
        return NetValue("String[]", [getattr(m, attribute) for m in messages])

    properties = NetValue("IDictionary[]", [dict(m.application_properties) for m in messages])
    subjects = strings("subject")
    partition_keys = strings("partition_key")
    return {
        "DeliveryCountArray": NetValue("Int32[]", [m.delivery_count for m in messages]),
        "DeadLetterSourceArray": strings("dead_letter_source"),
        "LockTokenArray": strings("lock_token"),
        "ExpiresAtUtcArray": NetValue("DateTime[]", [_naive(m.expires_at) for m in messages]),
        "ExpiresAtArray": NetValue("DateTimeOffset[]", [m.expires_at for m in messages]),
        "EnqueuedTimeUtcArray": NetValue("DateTime[]", [_naive(m.enqueued_time) for m in messages]),
        "EnqueuedTimeArray": NetValue("DateTimeOffset[]", [m.enqueued_time for m in messages]),
        "MessageIdArray": strings("message_id"),
        "ContentTypeArray": strings("content_type"),
        "ReplyToArray": strings("reply_to"),
        "SequenceNumberArray": NetValue("Int64[]", [m.sequence_number for m in messages]),
        "ToArray": strings("to"),
        "SubjectArray": subjects,
        "LabelArray": subjects,
        "CorrelationIdArray": strings("correlation_id"),
        "ApplicationPropertiesArray": properties,
        "UserPropertiesArray": properties,
        "SessionIdArray": strings("session_id"),
        "ReplyToSessionIdArray": strings("reply_to_session_id"),
        "PartitionKeyArray": partition_keys,
        "TransactionPartitionKeyArray": partition_keys,
    }


def single_binding_data(message: BrokerMessage) -> dict[str, NetValue]:
    """``GetBindingData`` for one message (single dispatch)."""
    properties = NetValue("IDictionary", dict(message.application_properties))
    return {
        "DeliveryCount": NetValue("Int32", message.delivery_count),
        "DeadLetterSource": NetValue("String", message.dead_letter_source),
        "LockToken": NetValue("String", message.lock_token),
        "ExpiresAtUtc": NetValue("DateTime", _naive(message.expires_at)),
        "ExpiresAt": NetValue("DateTimeOffset", message.expires_at),
        "EnqueuedTimeUtc": NetValue("DateTime", _naive(message.enqueued_time)),
        "EnqueuedTime": NetValue("DateTimeOffset", message.enqueued_time),
        "MessageId": NetValue("String", message.message_id),
        "ContentType": NetValue("String", message.content_type),
        "ReplyTo": NetValue("String", message.reply_to),
        "SequenceNumber": NetValue("Int64", message.sequence_number),
        "To": NetValue("String", message.to),
        "Subject": NetValue("String", message.subject),
        "Label": NetValue("String", message.subject),
        "CorrelationId": NetValue("String", message.correlation_id),
        "ApplicationProperties": properties,
        "UserProperties": properties,
        "SessionId": NetValue("String", message.session_id),
        "ReplyToSessionId": NetValue("String", message.reply_to_session_id),
        "PartitionKey": NetValue("String", message.partition_key),
        "TransactionPartitionKey": NetValue("String", message.transaction_partition_key),
    }


# --------------------------------------------------------------------------- 2. the host


@dataclass(frozen=True)
class TypedData:
    """One gRPC ``TypedData``: which case of its ``data`` oneof is set, and the value."""

    case: str
    value: Any


def _dotnet_datetime(moment: datetime) -> str:
    """Json.NET's ISO format: ``yyyy-MM-ddTHH:mm:ss.FFFFFFF`` then the offset, if any."""
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{moment.microsecond * 10:07d}".rstrip("0")
    if fraction:
        text += "." + fraction
    offset = moment.utcoffset()
    if offset is None:
        return text  # DateTimeKind.Unspecified: no suffix
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return f"{text}{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _jsonable(value: object) -> object:
    if isinstance(value, datetime):
        return _dotnet_datetime(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        raise TypeError("bytes inside a JSON value are not modelled")
    return value


def _json_net(value: object) -> str:
    """``JsonConvert.SerializeObject(value, Formatting.None)`` for the values used here
    (non-ASCII is written as is, as Json.NET's default escaping does)."""
    return json.dumps(_jsonable(value), ensure_ascii=False, separators=(",", ":"))


_SCALAR_CASES: Final = {"Byte[]": "bytes", "String": "string", "Double": "double"}
_COLLECTION_CASES: Final = {
    "Byte[][]": "collection_bytes",
    "String[]": "collection_string",
    "Int64[]": "collection_sint64",
    "Double[]": "collection_double",
}


def to_rpc(value: NetValue) -> TypedData | None:
    """The host's ``ToRpc`` for a value of the binding data; None when it is left out."""
    kind, data = value
    if data is None:
        return None  # ShouldSkipBindingData: null binding data is not sent
    if kind in _SCALAR_CASES:
        return TypedData(_SCALAR_CASES[kind], data)
    if kind in _COLLECTION_CASES:
        assert isinstance(data, list)
        if kind == "String[]":
            # Without IncludeEmptyEntriesInMessagePayload, null and "" entries are dropped.
            data = [text for text in data if text]
        else:
            data = [item for item in data if item is not None]
        return TypedData(_COLLECTION_CASES[kind], data)
    return TypedData("json", _json_net(data))


def invocation(
    messages: Sequence[BrokerMessage], cardinality: Cardinality
) -> tuple[TypedData, dict[str, TypedData]]:
    """The trigger's input data and the trigger metadata of the InvocationRequest."""
    if not messages:
        raise ValueError("the extension never invokes a function with no message")
    if cardinality == "many":
        data = to_rpc(NetValue("Byte[][]", [m.body for m in messages]))
        binding_data = batch_binding_data(messages)
    else:
        if len(messages) != 1:
            raise ValueError("single dispatch hands the function exactly one message")
        data = to_rpc(NetValue("Byte[]", messages[0].body))
        binding_data = single_binding_data(messages[0])
    assert data is not None
    metadata = {name: rpc for name, value in binding_data.items() if (rpc := to_rpc(value))}
    return data, metadata


# --------------------------------------------------------------------------- 3. the worker

_REPEATED_FIELD: Final = {
    "collection_bytes": "bytes",
    "collection_string": "string",
    "collection_sint64": "sint64",
    "collection_double": "double",
}


def to_datum(typed: TypedData) -> meta.Datum:
    """``Datum.from_typed_data``: the set case's value (a collection message for
    ``collection_*``) with the case's name as the datum's type."""
    if typed.case in _REPEATED_FIELD:
        message = SimpleNamespace(**{_REPEATED_FIELD[typed.case]: list(typed.value)})
        return meta.Datum(message, typed.case)
    return meta.Datum(typed.value, typed.case)


def trigger_arguments(
    messages: Sequence[BrokerMessage], cardinality: Cardinality
) -> tuple[meta.Datum, dict[str, meta.Datum]]:
    """What the worker passes the converter: the trigger's datum and its metadata."""
    data, metadata = invocation(messages, cardinality)
    return to_datum(data), {name: to_datum(typed) for name, typed in metadata.items()}


# --------------------------------------------------------------------------- 4. the converter


def decode(
    messages: Sequence[BrokerMessage], cardinality: Cardinality
) -> list[func.ServiceBusMessage]:
    """The function's argument, as ``azure.functions`` decodes it (a list either way)."""
    datum, metadata = trigger_arguments(messages, cardinality)
    decoded = ServiceBusMessageInConverter.decode(datum, trigger_metadata=metadata)
    return list(decoded) if isinstance(decoded, list) else [decoded]


def decode_batch(
    messages: Sequence[ReceivedMessage], *, time_to_live: timedelta = QUEUE_TIME_TO_LIVE
) -> list[func.ServiceBusMessage]:
    """A batch of our queue's messages as a ``cardinality=many`` function receives it."""
    return decode([broker_message(m, time_to_live=time_to_live) for m in messages], "many")


def decode_single(
    message: ReceivedMessage, *, time_to_live: timedelta = QUEUE_TIME_TO_LIVE
) -> func.ServiceBusMessage:
    """One of our queue's messages as a ``cardinality=one`` function receives it."""
    [decoded] = decode([broker_message(message, time_to_live=time_to_live)], "one")
    return decoded
