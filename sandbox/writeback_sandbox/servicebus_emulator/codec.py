"""AMQP messages in and out of the broker, with proton's codec.

A transfer from the SDK holds one message, or a *batch*: an envelope whose
``data`` sections each hold one whole encoded message (Service Bus's batch
format, message-format 0x80013700). proton's Python binding does not expose a
transfer's message-format, so a batch is recognised by its content: every data
section decodes as AMQP message sections. A single message whose body happens
to be an encoded AMQP message would be taken for a batch; the SDK never sends
such a body, and writeback's bodies are JSON.

On the way out the broker adds what Service Bus adds: the header's
``delivery-count`` (failed deliveries so far), the ``x-opt-sequence-number``,
``x-opt-enqueued-time``, ``x-opt-locked-until`` (peek-lock outside sessions) and
``x-opt-message-state`` annotations, and on a dead letter the application
properties ``DeadLetterReason`` and ``DeadLetterErrorDescription``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from proton import Data, Described, Message, symbol, timestamp

from writeback_sandbox.servicebus_emulator.model import MessageState, Stored

_DATA: Final = 0x75
_SECTION_CODES: Final = frozenset(range(0x70, 0x79))
SEQUENCE_NUMBER: Final = symbol("x-opt-sequence-number")
ENQUEUED_TIME: Final = symbol("x-opt-enqueued-time")
LOCKED_UNTIL: Final = symbol("x-opt-locked-until")
MESSAGE_STATE: Final = symbol("x-opt-message-state")
SCHEDULED_TIME: Final = symbol("x-opt-scheduled-enqueue-time")
LOCK_TOKEN: Final = symbol("x-opt-lock-token")


@dataclass(frozen=True)
class Incoming:
    """One message as sent, with what the broker needs from it."""

    message: Message
    size: int
    message_id: str | None
    session_id: str | None
    ttl: float | None
    scheduled_for: float | None


def _sections(encoded: bytes) -> list[Any]:
    sections = []
    data = Data()
    offset = 0
    while offset < len(encoded):
        data.clear()
        used = data.decode(encoded[offset:])
        if used <= 0:
            raise ValueError("undecodable AMQP section")
        offset += used
        data.rewind()
        data.next()
        value = data.get_object()
        # Binary values are views into the codec's buffer: copy before it is reused.
        if isinstance(value, Described) and isinstance(value.value, memoryview):
            value = Described(value.descriptor, bytes(value.value))
        sections.append(value)
    return sections


def _is_message(encoded: bytes) -> bool:
    if (
        len(encoded) < 3
        or encoded[0] != 0
        or encoded[1] != 0x53
        or encoded[2] not in _SECTION_CODES
    ):
        return False
    try:
        sections = _sections(encoded)
    except Exception:
        return False
    return all(_code(section) in _SECTION_CODES for section in sections)


def _code(section: Any) -> int | None:
    """The descriptor code of a message section, None for anything else."""
    if not isinstance(section, Described):
        return None
    descriptor: Any = section.descriptor
    return int(descriptor) if isinstance(descriptor, int) else None


def decode_transfer(encoded: bytes) -> list[Incoming]:
    """The messages one transfer carries (several for a batch)."""
    sections = _sections(encoded)
    bodies = [bytes(section.value) for section in sections if _code(section) == _DATA]
    if bodies and all(_is_message(body) for body in bodies):
        return [_incoming(body) for body in bodies]
    return [_incoming(encoded)]


def _incoming(encoded: bytes) -> Incoming:
    message = Message()
    message.decode(encoded)
    annotations: dict[Any, Any] = dict(message.annotations or {})
    scheduled = annotations.get(SCHEDULED_TIME)
    return Incoming(
        message=message,
        size=len(encoded),
        message_id=None if message.id is None else str(message.id),
        session_id=message.group_id or None,
        ttl=message.ttl or None,
        scheduled_for=float(scheduled) / 1000 if scheduled else None,
    )


def decode_one(encoded: bytes) -> Incoming:
    """A message handed over whole (``$management`` schedule requests)."""
    return _incoming(encoded)


def encode_delivery(stored: Stored, *, locked_until: float | None) -> bytes:
    """The message as a receiver gets it (or a peek shows it)."""
    message: Message = stored.payload
    annotations: dict[Any, Any] = dict(message.annotations or {})
    annotations[SEQUENCE_NUMBER] = stored.seq
    annotations[ENQUEUED_TIME] = timestamp(int(stored.enqueued_at * 1000))
    if locked_until is not None:
        annotations[LOCKED_UNTIL] = timestamp(int(locked_until * 1000))
    else:
        annotations.pop(LOCKED_UNTIL, None)
    if stored.state is not MessageState.ACTIVE:
        annotations[MESSAGE_STATE] = int(stored.state)
    else:
        annotations.pop(MESSAGE_STATE, None)
    if stored.scheduled_for is not None:
        annotations[SCHEDULED_TIME] = timestamp(int(stored.scheduled_for * 1000))
    properties: dict[Any, Any] = dict(message.properties or {})
    if stored.dead_letter_reason is not None:
        properties["DeadLetterReason"] = stored.dead_letter_reason
        properties["DeadLetterErrorDescription"] = stored.dead_letter_description or ""
    saved: tuple[Any, Any, int] = (message.annotations, message.properties, message.delivery_count)
    try:
        message.annotations = annotations
        message.properties = properties or None  # type: ignore[assignment]
        message.delivery_count = stored.deliveries
        return bytes(message.encode())
    finally:
        message.annotations, message.properties, message.delivery_count = saved


def ticks(seconds: float) -> int:
    """A UTC moment as .NET ticks, how ``com.microsoft:locked-until-utc`` is given."""
    return 621355968000000000 + int(seconds * 10_000_000)


__all__ = [
    "Incoming",
    "decode_one",
    "decode_transfer",
    "encode_delivery",
    "ticks",
]
