"""The two sides writeback talks to, as the service layer sees them.

Adapters (Graph over msgraph-sdk, AD over ldap3, later the relay) implement
these; the service layer depends only on these protocols, so it can be driven
by any of them and tested against the real ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from writeback.domain.model import CloudGroup, DirectoryGroup, Operation


@dataclass(frozen=True)
class CloudSnapshot:
    """Every Unified group in the tenant, members resolved, plus the delta links.

    ``soft_deleted`` holds the ids of groups in the recycle bin (restorable for
    30 days), so an orphan can be told apart from a group deleted for good.
    """

    groups: tuple[CloudGroup, ...]
    soft_deleted: frozenset[str]
    groups_delta_link: str | None = None
    users_delta_link: str | None = None


class CloudSource(Protocol):
    def snapshot(self) -> CloudSnapshot:
        """Read all Unified groups with members (full delta round)."""
        ...

    def get_group(self, group_id: str) -> CloudGroup | None:
        """One group with its members, or None when it no longer exists."""
        ...

    def soft_deleted_group_ids(self) -> frozenset[str]: ...


class Directory(Protocol):
    def schema_attributes(self) -> frozenset[str]:
        """Names (lower case) of the optional attributes the group class may hold."""
        ...

    def find_group(self, group_id: str) -> DirectoryGroup | None:
        """The object anchored to ``group_id`` under the target OU, if any."""
        ...

    def iter_groups(self) -> Iterator[DirectoryGroup]:
        """Every anchored object under the target OU, members included."""
        ...

    def apply(self, operation: Operation) -> int:
        """Carry out one planned operation; returns the LDAP requests it took."""
        ...


@dataclass(frozen=True)
class OutgoingMessage:
    """What the webhook enqueues: Service Bus fields, nothing Service Bus-specific."""

    body: bytes
    message_id: str
    session_id: str
    application_properties: dict[str, str] | None = None


@dataclass(frozen=True)
class ReceivedMessage:
    body: bytes
    message_id: str
    session_id: str
    delivery_count: int
    enqueued_at: float
    #: The adapter's handle for settling this message (lock token, row id...).
    lock: object = None


@dataclass(frozen=True)
class DeadLetter:
    body: bytes
    message_id: str
    session_id: str
    reason: str
    description: str
    dead_lettered_at: float
    lock: object = None
    #: Deliveries before it was dead-lettered, and when it was first enqueued.
    delivery_count: int = 0
    enqueued_at: float = 0.0


class EventQueue(Protocol):
    """A session queue (one session per group) with peek-lock and dead letters.

    Service Bus in Azure; an embedded SQLite queue on one machine. Both keep the
    same rules: FIFO per session, one receiver per session at a time, a message
    abandoned ``max_delivery_count`` times is dead-lettered, duplicates of a
    message_id inside the detection window are dropped on send.
    """

    def send(self, messages: list[OutgoingMessage]) -> None: ...

    def receive_session(self, max_messages: int, wait: float) -> list[ReceivedMessage]:
        """Lock the next available session and take up to ``max_messages`` of it."""
        ...

    def complete(self, message: ReceivedMessage) -> None: ...

    def abandon(self, message: ReceivedMessage, *, delay: float = 0.0) -> None:
        """Unlock for redelivery, after ``delay`` seconds."""
        ...

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None: ...

    def release_session(self, session_id: str) -> None: ...

    def dead_letters(self, limit: int = 1000) -> list[DeadLetter]: ...

    def resubmit(self, dead_letter: DeadLetter) -> None:
        """Move one dead letter back to the queue (replay)."""
        ...

    def depth(self) -> int: ...
