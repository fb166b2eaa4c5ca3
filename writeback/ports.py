"""The two sides writeback talks to, as the service layer sees them.

Adapters (Graph over msgraph-sdk, AD over ldap3, later the relay) implement
these; the service layer depends only on these protocols, so it can be driven
by any of them and tested against the real ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from writeback.domain.model import CloudGroup, CloudMember, DirectoryGroup, Operation
from writeback.errors import WritebackError


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


@dataclass(frozen=True)
class GroupGone:
    """Graph answered 404 for a group. ``soft_deleted``: it is in the recycle bin.

    One such answer is an observation, not a fact: Graph is eventually
    consistent, so a replica that lags can answer 404 for a group that exists.
    """

    soft_deleted: bool


#: One group's answer in a batched read: the group, gone, or the error that item
#: ended with after its own retries (so one throttled group does not fail the rest).
GroupRead = CloudGroup | GroupGone | WritebackError


class CloudSource(Protocol):
    def snapshot(self) -> CloudSnapshot:
        """Read all Unified groups with members (full delta round)."""
        ...

    def get_group(self, group_id: str) -> CloudGroup | None:
        """One group with its members, or None when it no longer exists."""
        ...

    def get_groups(self, group_ids: Sequence[str]) -> dict[str, GroupRead]:
        """Many groups with their user members at once, and for each one Graph
        answers 404 whether it is in the recycle bin; every id is in the result."""
        ...

    def soft_deleted_group_ids(self) -> frozenset[str]: ...


@dataclass(frozen=True)
class GroupDelta:
    """One group's changes since a per-group delta link.

    ``group`` holds the group's properties as they are now (``members`` empty),
    or None when it no longer exists as a live group (deleted, soft-deleted).
    ``added`` are the members added since the link (kind known, SIDs not
    resolved); ``removed`` the members removed since it (kind only).
    """

    group: CloudGroup | None
    added: tuple[CloudMember, ...]
    removed: tuple[CloudMember, ...]
    delta_link: str | None


class MemberDeltaSource(Protocol):
    """Per-group member deltas, so an event costs what changed, not the group's size."""

    def group_delta_link(self, group_id: str) -> str | None:
        """A delta link for this one group as of now (nothing read)."""
        ...

    def group_delta(self, group_id: str, delta_link: str) -> GroupDelta | None:
        """What changed for this group since ``delta_link``; None when the link
        has expired (410), so the caller does a full read instead."""
        ...

    def group_deltas(
        self, links: Mapping[str, str]
    ) -> dict[str, GroupDelta | WritebackError | None]:
        """:meth:`group_delta` for many groups at once (group id -> its link); None
        for a link Graph refused, so that group is read in full."""
        ...

    def resolve_users(self, user_ids: Iterable[str]) -> dict[str, CloudMember]:
        """SID and sync state of the existing users among ``user_ids``."""
        ...


@dataclass(frozen=True)
class StoredLink:
    """A group's delta link and the user members it had when the link was stored."""

    delta_link: str
    member_count: int


class DeltaLinkStore(Protocol):
    """Per-group delta links kept by the worker between events."""

    def get(self, group_id: str) -> StoredLink | None: ...

    def put(self, group_id: str, link: StoredLink) -> None: ...

    def forget(self, group_id: str) -> None: ...


class Directory(Protocol):
    def schema_attributes(self) -> frozenset[str]:
        """Names (lower case) of the optional attributes the group class may hold."""
        ...

    def find_group(self, group_id: str) -> DirectoryGroup | None:
        """The object anchored to ``group_id`` under the target OU, if any."""
        ...

    def find_groups(
        self, group_ids: Sequence[str], *, members: bool = True
    ) -> dict[str, DirectoryGroup]:
        """The objects anchored to these ids, in as few requests as the adapter can
        (ids with no object are absent); ``members=False`` leaves ``member`` unread."""
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
