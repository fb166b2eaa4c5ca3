"""The Graph webhook: validation handshake, change and lifecycle notifications.

Framework-free: the Function app (or any HTTP server) passes the method, the
decoded query, the raw body and its content type, and sends back the
:class:`WebhookResponse`. The same handler serves the notification URL and the
lifecycle URL.

What it answers (Graph retries anything that is not 2xx, for up to 4 hours):

* ``?validationToken=...`` -> 200 ``text/plain`` with the token, whatever the
  body (Graph's subscription handshake, for both URLs). A token over 1 KiB or
  with control characters -> 400.
* A changeNotificationCollection -> 202 once every group it names is
  persisted in the queue by ONE ``queue.send``; 503 when that send fails, so
  Graph delivers again (never 2xx for something not persisted).
* Not JSON, not ``{"value": [objects...]}`` -> 400; over 1 MiB -> 413; a
  method other than POST -> 405. The content type is not relied on (Graph
  sends ``application/json``): the body has to parse as JSON whatever it says,
  and refusing on a header alone would only risk losing notifications.

clientState policy: every item must carry one of the accepted client states
(compared in constant time). If ANY item does not, the whole POST is refused
with 403 and nothing from it is enqueued or passed on. Graph puts our
clientState on every item of every subscription of ours, so a POST with a
wrong one was not built by Graph for us; accepting its other items would
trust a sender that has already shown it does not know the secret. Accepting
the good items would gain nothing either: whoever can make a good item knows
the secret. To rotate the secret without refusing Graph's deliveries for the
old subscription, pass both the new and the old value as ``client_state``.

Notifications are triggers only: items of the same group in one POST become
one :class:`GroupChanged` (session = group id). Its message id is a hash of
the notifications it stands for (subscription, change type, resource,
sequence number, event time), so a redelivery by Graph of the same POST gets
the same message id and the queue's duplicate detection drops it. An item
without a sequence number or event time cannot be told apart from a later
change of the same group, so its message gets a random id (never dropped).

Nothing here logs a body, a clientState or a validation token: one line per
request with counts, outcome and latency.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from writeback.domain.events import CONTROL_SESSION, Change, ControlRequest, GroupChanged
from writeback.ports import MessageSender, OutgoingMessage

log = logging.getLogger("writeback.webhook")

MAX_BODY_BYTES = 1024 * 1024
MAX_TOKEN_BYTES = 1024
MAX_CLIENT_STATE = 128

#: The lifecycle events Graph sends (only the first is sent for groups).
REAUTHORIZATION_REQUIRED = "reauthorizationRequired"
SUBSCRIPTION_REMOVED = "subscriptionRemoved"
MISSED = "missed"
LIFECYCLE_EVENTS = frozenset({REAUTHORIZATION_REQUIRED, SUBSCRIPTION_REMOVED, MISSED})

_TEXT = "text/plain"
_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_GROUP_RESOURCE = re.compile(r"/?groups/([^/]+)(?:/.*)?", re.IGNORECASE | re.DOTALL)
_GROUP_TYPE = "#microsoft.graph.group"
#: changeType -> envelope change; when several items meet, the strongest wins.
_CHANGES = {"created": Change.CREATED, "updated": Change.UPDATED, "deleted": Change.DELETED}
_STRENGTH = {Change.CREATED: 0, Change.UPDATED: 1, Change.DELETED: 2}


@dataclass(frozen=True)
class WebhookResponse:
    status: int
    body: bytes = b""
    content_type: str = _TEXT


@dataclass(frozen=True)
class LifecycleEvent:
    """A lifecycle notification of one of our subscriptions (clientState checked)."""

    subscription_id: str
    event: str


@dataclass
class _Counts:
    items: int = 0
    groups: int = 0
    messages: int = 0
    ignored: int = 0
    lifecycle: int = 0
    refused: int = 0


@dataclass
class _Group:
    change: Change
    keys: set[str] = field(default_factory=set)
    unique: bool = False


def handle_webhook(
    *,
    method: str,
    query: Mapping[str, str],
    body: bytes,
    content_type: str | None,
    client_state: str | Iterable[str],
    queue: MessageSender,
    now: Callable[[], float] = time.time,
    on_lifecycle: Callable[[LifecycleEvent], None] | None = None,
) -> WebhookResponse:
    """Answer one request to the notification or lifecycle URL.

    ``query`` holds the decoded query parameters (as every framework hands them
    over; the token is not decoded a second time). ``client_state`` is the
    secret the subscriptions were created with, or several during a rotation.
    ``on_lifecycle`` is called once per lifecycle item after the change items
    are persisted; it must only record or enqueue (Graph waits 3 s at most).
    """
    started = time.perf_counter()
    counts = _Counts()
    response = _handle(
        method=method,
        query=query,
        body=body,
        client_state=client_state,
        queue=queue,
        now=now,
        on_lifecycle=on_lifecycle,
        counts=counts,
    )
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    level = logging.INFO if response.status < 400 else logging.WARNING
    log.log(
        level,
        "webhook answered %d: %d items, %d groups, %d messages, %d ignored, "
        "%d lifecycle, %d refused in %.1f ms",
        response.status,
        counts.items,
        counts.groups,
        counts.messages,
        counts.ignored,
        counts.lifecycle,
        counts.refused,
        elapsed_ms,
        extra={
            "webhook_status": response.status,
            "webhook_items": counts.items,
            "webhook_groups": counts.groups,
            "webhook_messages": counts.messages,
            "webhook_ignored": counts.ignored,
            "webhook_lifecycle": counts.lifecycle,
            "webhook_refused": counts.refused,
            "webhook_body_bytes": len(body),
            "webhook_content_type": (content_type or "").split(";", 1)[0].strip()[:100],
            "webhook_ms": round(elapsed_ms, 3),
        },
    )
    return response


def _handle(
    *,
    method: str,
    query: Mapping[str, str],
    body: bytes,
    client_state: str | Iterable[str],
    queue: MessageSender,
    now: Callable[[], float],
    on_lifecycle: Callable[[LifecycleEvent], None] | None,
    counts: _Counts,
) -> WebhookResponse:
    verb = method.upper()
    token = _query_value(query, "validationToken")
    if token is not None:
        return _validation(token) if verb in ("POST", "GET") else _status(405)
    if verb != "POST":
        return _status(405)
    if len(body) > MAX_BODY_BYTES:
        return _status(413)
    items = _parse(body)
    if items is None:
        return _status(400)
    counts.items = len(items)
    secrets = _secrets(client_state)
    # No secret configured: refuse everything rather than trust anything.
    counts.refused = sum(1 for i in items if not _client_state_ok(i.get("clientState"), secrets))
    if counts.refused:
        return _status(403)
    groups, lifecycle = _collect(items, counts)
    return _persist(
        groups,
        lifecycle if on_lifecycle is not None else [],
        queue=queue,
        received_at=now(),
        on_lifecycle=on_lifecycle or _ignore,
        counts=counts,
    )


def _collect(
    items: list[Mapping[str, Any]], counts: _Counts
) -> tuple[dict[str, _Group], list[LifecycleEvent]]:
    """Group items by group id (one message each) and pick out lifecycle items."""
    groups: dict[str, _Group] = {}
    lifecycle: list[LifecycleEvent] = []
    for item in items:
        if "lifecycleEvent" in item:
            event = _lifecycle(item)
            if event is None:
                counts.ignored += 1
            else:
                lifecycle.append(event)
            continue
        found = _group_change(item)
        if found is None:
            counts.ignored += 1
            continue
        group_id, change, key = found
        entry = groups.get(group_id)
        if entry is None:
            entry = groups[group_id] = _Group(change)
        elif _STRENGTH[change] > _STRENGTH[entry.change]:
            entry.change = change
        if key is None:
            entry.unique = True
        else:
            entry.keys.add(key)
    counts.groups = len(groups)
    counts.lifecycle = len(lifecycle)
    return groups, lifecycle


def _persist(
    groups: dict[str, _Group],
    lifecycle: list[LifecycleEvent],
    *,
    queue: MessageSender,
    received_at: float,
    on_lifecycle: Callable[[LifecycleEvent], None],
    counts: _Counts,
) -> WebhookResponse:
    """Change items first, in one send; lifecycle callbacks only once those are in."""
    if groups:
        messages = [_message(gid, entry, received_at) for gid, entry in groups.items()]
        try:
            queue.send(messages)
        except Exception as error:
            log.error(
                "webhook could not enqueue %d messages: %s", len(messages), type(error).__name__
            )
            return _status(503)
        counts.messages = len(messages)
    for event in lifecycle:
        try:
            on_lifecycle(event)
        except Exception as error:
            log.error("webhook could not record a lifecycle event: %s", type(error).__name__)
            return _status(503)
    return _status(202)


# --------------------------------------------------------------------------- pieces


def _ignore(event: LifecycleEvent) -> None:
    """No lifecycle handler: the items are acknowledged (counted in the log line)."""


def _status(status: int) -> WebhookResponse:
    return WebhookResponse(status)


def _query_value(query: Mapping[str, str], name: str) -> str | None:
    value = query.get(name)
    if value is None:
        lowered = name.lower()
        for key, candidate in query.items():
            if key.lower() == lowered:
                return candidate
    return value


def _validation(token: str) -> WebhookResponse:
    encoded = token.encode("utf-8", "replace")
    if not token or len(encoded) > MAX_TOKEN_BYTES or not token.isprintable():
        return _status(400)
    return WebhookResponse(200, encoded, _TEXT)


def _parse(body: bytes) -> list[Mapping[str, Any]] | None:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    value = document.get("value")
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        return None
    return value


def _secrets(client_state: str | Iterable[str]) -> list[bytes]:
    states = [client_state] if isinstance(client_state, str) else list(client_state)
    return [s.encode("utf-8") for s in states if s]


def _client_state_ok(value: object, secrets: list[bytes]) -> bool:
    if not isinstance(value, str) or not value or len(value) > MAX_CLIENT_STATE:
        return False
    given = value.encode("utf-8", "replace")
    # Compare with every secret (no early exit), so timing says nothing about which.
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(given, secret)
    return matched


def _lifecycle(item: Mapping[str, Any]) -> LifecycleEvent | None:
    event = item.get("lifecycleEvent")
    subscription_id = item.get("subscriptionId")
    if event not in LIFECYCLE_EVENTS or not _is_guid(subscription_id):
        return None
    return LifecycleEvent(str(subscription_id).lower(), str(event))


def _group_change(item: Mapping[str, Any]) -> tuple[str, Change, str | None] | None:
    """(group id, change, dedupe key or None) of a group item; None for anything else."""
    resource = item.get("resource")
    data = item.get("resourceData")
    data = data if isinstance(data, dict) else {}
    odata_type = data.get("@odata.type")
    from_resource: str | None = None
    if isinstance(resource, str):
        match = _GROUP_RESOURCE.fullmatch(resource)
        if match is not None:
            from_resource = match.group(1)
    is_group_type = isinstance(odata_type, str) and odata_type.lower() == _GROUP_TYPE
    if from_resource is None and not is_group_type:
        return None
    data_id = data.get("id")
    group_id = data_id if data_id is not None else from_resource
    if not _is_guid(group_id):
        return None
    if from_resource is not None and from_resource.lower() != str(group_id).lower():
        return None  # the two disagree: not a shape Graph sends
    change = _CHANGES.get(str(item.get("changeType", "")).strip().lower())
    if change is None:
        return None
    sequence, event_time = data.get("sequenceNumber"), data.get("eventTime")
    key: str | None = None
    if sequence is not None or event_time is not None:
        key = "|".join(
            _text(part)
            for part in (
                item.get("subscriptionId"),
                item.get("changeType"),
                resource,
                sequence,
                event_time,
                item.get("id"),
            )
        )
    return str(group_id).lower(), change, key


def _message(group_id: str, entry: _Group, received_at: float) -> OutgoingMessage:
    if entry.unique:
        message_id = "gc-" + uuid.uuid4().hex
    else:
        digest = hashlib.sha256()
        digest.update(group_id.encode())
        for key in sorted(entry.keys):
            digest.update(b"\x00")
            digest.update(key.encode("utf-8", "replace"))
        message_id = "gc-" + digest.hexdigest()
    event = GroupChanged(group_id, entry.change, received_at, message_id)
    return OutgoingMessage(body=event.to_json(), message_id=message_id, session_id=group_id)


def _is_guid(value: object) -> bool:
    return isinstance(value, str) and _GUID.fullmatch(value) is not None


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def lifecycle_message(event: LifecycleEvent, now: float) -> OutgoingMessage:
    """The control message for one lifecycle item (the worker acts on it; Graph
    waits 3 s at most). Graph's retries within a minute get the same message id,
    which the queue's duplicate detection drops."""
    key = f"{event.event}|{event.subscription_id}|{int(now // 60)}"
    request = ControlRequest(
        "lifecycle", event=event.event, subscription_id=event.subscription_id, received_at=now
    )
    return OutgoingMessage(
        body=request.to_json(),
        message_id="lc-" + hashlib.sha256(key.encode()).hexdigest()[:40],
        session_id=CONTROL_SESSION,
    )


def enqueue_lifecycle(
    queue: MessageSender, now: Callable[[], float] = time.time
) -> Callable[[LifecycleEvent], None]:
    """The ``on_lifecycle`` both hosts give :func:`handle_webhook`: each lifecycle item
    becomes a control message in the same queue."""

    def on_lifecycle(event: LifecycleEvent) -> None:
        queue.send([lifecycle_message(event, now())])

    return on_lifecycle
