"""The ``<entity>/$management`` request/response operations the SDK sends.

Each request is an AMQP message whose application property ``operation`` names
the operation and whose body is a map; the answer goes back with
``statusCode``, ``statusDescription`` (and ``errorCondition`` on failure) in its
application properties, correlated by the request's message id. Operations and
field names are those of the Service Bus AMQP request/response documentation.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from proton import UNDESCRIBED, Array, Data, timestamp

from writeback_sandbox.servicebus_emulator import auth, codec
from writeback_sandbox.servicebus_emulator.model import (
    BrokerError,
    Entity,
    MessageState,
    Receiver,
    Stored,
)

_VENDOR: Final = "com.microsoft:"


@dataclass
class Answer:
    status: int
    description: str = "OK"
    value: Any = None
    condition: str | None = None


@dataclass
class Request:
    entity: Entity
    body: dict[str, Any]
    #: The receiver link named in ``associated-link-name``, if it is on this connection.
    receiver: Receiver | None
    grants: list[auth.Grant]
    host: str
    now: float


def _elements(value: Any) -> list[Any]:
    if isinstance(value, Array):
        return list(value.elements)
    if isinstance(value, list | tuple):
        return list(value)
    if value is None:
        return []
    return [value]


def _uuid(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    return uuid.UUID(str(value))


def _timestamps(values: list[float]) -> Array:
    undescribed: Any = UNDESCRIBED
    return Array(undescribed, Data.TIMESTAMP, *[timestamp(int(v * 1000)) for v in values])


def _longs(values: list[int]) -> Array:
    undescribed: Any = UNDESCRIBED
    return Array(undescribed, Data.LONG, *values)


def _need(request: Request, right: str) -> None:
    auth.require(request.grants, request.host, request.entity.path, right, request.now)


def _session_id(request: Request) -> str | None:
    value = request.body.get("session-id")
    return None if value is None else str(value)


def renew_lock(request: Request) -> Answer:
    _need(request, auth.LISTEN)
    tokens = [_uuid(t) for t in _elements(request.body.get("lock-tokens"))]
    expirations = [request.entity.renew_lock(token, request.now) for token in tokens]
    return Answer(200, value={"expirations": _timestamps(expirations)})


def renew_session_lock(request: Request) -> Answer:
    _need(request, auth.LISTEN)
    session_id = _session_id(request)
    if session_id is None or not request.entity.sessions:
        raise BrokerError("com.microsoft:argument-error", "session-id is required.", 400)
    until = request.entity.renew_session(request.receiver, session_id, request.now)
    return Answer(200, value={"expiration": timestamp(int(until * 1000))})


def receive_by_sequence_number(request: Request) -> Answer:
    _need(request, auth.LISTEN)
    entity = request.entity
    session_id = _session_id(request)
    if entity.sessions:
        if session_id is None:
            raise BrokerError("com.microsoft:argument-error", "session-id is required.", 400)
        session = entity.held_session(session_id, request.now)
        until = session.locked_until
    else:
        until = request.now + entity.settings.lock_duration
    delete = int(request.body.get("receiver-settle-mode") or 0) == 0
    found: list[Stored] = [
        entity.deferred(int(seq), session_id)
        for seq in _elements(request.body.get("sequence-numbers"))
    ]
    messages: list[dict[str, Any]] = []
    for stored in found:
        if delete:
            messages.append({"message": codec.encode_delivery(stored, locked_until=None)})
            entity.complete(stored)
            continue
        token = entity.lock(stored, request.receiver, until)
        stored.state = MessageState.DEFERRED
        encoded = codec.encode_delivery(stored, locked_until=None if entity.sessions else until)
        messages.append({"lock-token": token, "message": encoded})
    return Answer(200, value={"messages": messages})


def update_disposition(request: Request) -> Answer:
    _need(request, auth.LISTEN)
    entity, now = request.entity, request.now
    status = str(request.body.get("disposition-status") or "")
    for value in _elements(request.body.get("lock-tokens")):
        stored = entity.locked(_uuid(value), None, now)
        if status == "completed":
            entity.complete(stored)
        elif status == "abandoned":
            entity.abandon(stored, now)
        elif status == "defered":
            entity.defer(stored)
        elif status == "suspended":
            entity.dead_letter(
                stored,
                str(request.body.get("deadletter-reason") or ""),
                str(request.body.get("deadletter-description") or ""),
                now,
            )
        else:
            raise BrokerError("com.microsoft:argument-error", f"disposition {status!r}?", 400)
    return Answer(200, value={})


def schedule_message(request: Request) -> Answer:
    _need(request, auth.SEND)
    entity = request.entity
    if entity.is_dead_letter_queue:
        raise BrokerError("amqp:not-allowed", "Cannot schedule into a dead-letter queue.", 400)
    numbers = []
    for item in _elements(request.body.get("messages")):
        incoming = codec.decode_one(bytes(item["message"]))
        when = incoming.scheduled_for if incoming.scheduled_for is not None else request.now
        seq = entity.enqueue(
            incoming.message,
            message_id=incoming.message_id,
            session_id=incoming.session_id,
            size=incoming.size,
            ttl=incoming.ttl,
            scheduled_for=max(when, request.now + 0.001),
            now=request.now,
        )
        # A duplicate is dropped, as on send; the SDK still wants a number back.
        numbers.append(seq if seq is not None else 0)
    return Answer(200, value={"sequence-numbers": _longs(numbers)})


def cancel_scheduled_message(request: Request) -> Answer:
    _need(request, auth.SEND)
    for seq in _elements(request.body.get("sequence-numbers")):
        request.entity.cancel_scheduled(int(seq))
    return Answer(200, value={})


def peek_message(request: Request) -> Answer:
    _need(request, auth.LISTEN)
    start = int(request.body.get("from-sequence-number") or 0)
    count = max(int(request.body.get("message-count") or 1), 1)
    found = request.entity.peek(start, count, _session_id(request))
    if not found:
        return Answer(204, "No messages", value={})
    messages = [{"message": codec.encode_delivery(m, locked_until=None)} for m in found]
    return Answer(200, value={"messages": messages})


def get_session_state(request: Request) -> Answer:
    _need(request, auth.LISTEN)
    session_id = _session_id(request)
    if session_id is None:
        raise BrokerError("com.microsoft:argument-error", "session-id is required.", 400)
    session = request.entity.held_session(session_id, request.now)
    return Answer(200, value={"session-state": session.state})


def set_session_state(request: Request) -> Answer:
    _need(request, auth.LISTEN)
    session_id = _session_id(request)
    if session_id is None:
        raise BrokerError("com.microsoft:argument-error", "session-id is required.", 400)
    session = request.entity.held_session(session_id, request.now)
    state = request.body.get("session-state")
    session.state = None if state is None else bytes(state)
    return Answer(200, value={})


OPERATIONS: Final[dict[str, Callable[[Request], Answer]]] = {
    _VENDOR + "renew-lock": renew_lock,
    _VENDOR + "renew-session-lock": renew_session_lock,
    _VENDOR + "receive-by-sequence-number": receive_by_sequence_number,
    _VENDOR + "update-disposition": update_disposition,
    _VENDOR + "schedule-message": schedule_message,
    _VENDOR + "cancel-scheduled-message": cancel_scheduled_message,
    _VENDOR + "peek-message": peek_message,
    _VENDOR + "get-session-state": get_session_state,
    _VENDOR + "set-session-state": set_session_state,
}


def execute(operation: str, request: Request) -> Answer:
    handler = OPERATIONS.get(operation)
    if handler is None:
        return Answer(
            501, f"The operation {operation!r} is not implemented.", {}, "amqp:not-implemented"
        )
    try:
        return handler(request)
    except BrokerError as error:
        return Answer(error.status, error.description, {}, error.condition)
