"""The queue envelope: one small, versioned message per group change.

A notification is only a trigger (group notifications carry no resource data),
so the envelope names the group and when we heard of it, nothing more; the
worker reads the current state from Graph and AD and converges.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from writeback.domain.model import is_canonical_id
from writeback.errors import PoisonEvent

ENVELOPE_VERSION = 1
_MAX_ID = 128  # Service Bus limit for message and session ids
#: Bodies up to this size have their parse kept (ours are about 200 bytes).
_CACHED_BODY = 1024
#: Marks a dead-letter hand-off session of the Functions worker: ``<group id>#dl-<random>``.
HANDOFF_MARK = "#dl-"
#: Application property of a copy sent to a hand-off session: the group's own session.
HANDOFF_SESSION_PROPERTY = "writeback-session-id"
#: The session of control messages (lifecycle events, reconcile requests): one at a time.
CONTROL_SESSION = "writeback-control"


class Change(StrEnum):
    UPDATED = "updated"
    DELETED = "deleted"
    CREATED = "created"
    RECONCILE = "reconcile"
    #: Not a notification: the worker's own read of the group after the settle
    #: interval, because Graph may have answered an earlier read from a lagging replica.
    CONFIRM = "confirm"


@dataclass(frozen=True)
class GroupChanged:
    group_id: str
    change: Change
    #: When the webhook accepted the notification (Unix seconds), for latency.
    received_at: float
    #: Identifies one Graph delivery, so Graph's retries become duplicates.
    notification_id: str
    version: int = ENVELOPE_VERSION
    #: On a confirmation: when the group was first seen gone (Unix seconds).
    gone_since: float | None = None

    def to_json(self) -> bytes:
        body: dict[str, object] = {
            "group_id": self.group_id,
            "change": self.change.value,
            "received_at": self.received_at,
            "notification_id": self.notification_id,
            "version": self.version,
        }
        if self.gone_since is not None:
            body["gone_since"] = self.gone_since
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, body: bytes) -> GroupChanged:
        """Parse a queue body; anything malformed is a poison event with the reason,
        and so is a group id in any form but a lower-case GUID. A step reads each
        message's body up to three times (coverage, handling, latency), so recent
        parses of envelope-sized bodies are kept: the envelope is immutable, and
        so is its body."""
        if isinstance(body, bytes) and len(body) <= _CACHED_BODY:
            return _parsed(body)
        return cls._from_json(body)

    @classmethod
    def _from_json(cls, body: bytes) -> GroupChanged:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PoisonEvent(f"body is not JSON: {error}") from None
        if not isinstance(data, dict):
            raise PoisonEvent("body is not a JSON object")
        if data.get("version") != ENVELOPE_VERSION:
            raise PoisonEvent(f"unsupported envelope version {data.get('version')!r}")
        group_id, notification_id = data.get("group_id"), data.get("notification_id")
        if not _valid_id(group_id) or not _valid_id(notification_id):
            raise PoisonEvent("group_id or notification_id missing or invalid")
        if not is_canonical_id(str(group_id)):
            # One id form everywhere: AD matches the anchor without case, the recycle
            # bin and the planner with it, so "ABC..." would be one group to AD and a
            # deleted one to the planner.
            raise PoisonEvent(
                f"group_id {str(group_id)[:60]!r} is not an object id (a lower-case GUID)"
            )
        try:
            change = Change(str(data.get("change")))
            received_at = float(data["received_at"])
            gone = data.get("gone_since")
            gone_since = None if gone is None else float(gone)
        except (KeyError, TypeError, ValueError):
            raise PoisonEvent("change, received_at or gone_since missing or invalid") from None
        if not all(map(math.isfinite, (received_at, gone_since or 0.0))):
            raise PoisonEvent("received_at or gone_since is not a finite time")
        return cls(str(group_id), change, received_at, str(notification_id), gone_since=gone_since)


@functools.lru_cache(maxsize=4096)
def _parsed(body: bytes) -> GroupChanged:
    return GroupChanged._from_json(body)


def _valid_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_ID and value.isprintable()


def group_of_session(session_id: str) -> str:
    """The group a session belongs to, hand-off sessions included."""
    return session_id.split(HANDOFF_MARK, 1)[0]


def group_session(session_id: str, properties: Mapping[str, str]) -> str:
    """The group's session of a message: its own, or for a copy in a hand-off session
    the one it names in ``HANDOFF_SESSION_PROPERTY`` (else the group id the hand-off
    session starts with)."""
    if HANDOFF_MARK not in session_id:
        return session_id
    named = properties.get(HANDOFF_SESSION_PROPERTY, "")
    if named and 0 < len(named) <= _MAX_ID and HANDOFF_MARK not in named:
        return named
    return group_of_session(session_id)


@dataclass(frozen=True)
class ControlRequest:
    """A control message: a lifecycle event to act on, or a reconcile to request."""

    kind: str  # "lifecycle" | "reconcile"
    event: str | None = None
    subscription_id: str | None = None
    reason: str = ""
    #: When the webhook accepted it (Unix seconds).
    received_at: float = 0.0

    def to_json(self) -> bytes:
        body: dict[str, object] = {"kind": self.kind, "received_at": self.received_at}
        if self.kind == "lifecycle":
            body.update(event=self.event, subscription_id=self.subscription_id)
        else:
            body["reason"] = self.reason
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, body: bytes) -> ControlRequest:
        """Parse a control body; anything malformed is a poison event with the reason."""
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise PoisonEvent("control message is not JSON") from None
        if not isinstance(data, dict):
            raise PoisonEvent("control message is not a JSON object")
        kind = data.get("kind")
        received = data.get("received_at")
        received_at = float(received) if isinstance(received, int | float) else 0.0
        if kind == "reconcile":
            return cls(
                "reconcile", reason=str(data.get("reason", ""))[:200], received_at=received_at
            )
        if kind == "lifecycle":
            event, subscription_id = data.get("event"), data.get("subscription_id")
            if not _valid_id(event) or not _valid_id(subscription_id):
                raise PoisonEvent("lifecycle control message without event or subscription")
            return cls(
                "lifecycle",
                event=str(event),
                subscription_id=str(subscription_id),
                received_at=received_at,
            )
        raise PoisonEvent(f"unknown control message kind {kind!r}")
