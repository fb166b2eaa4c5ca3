"""Every protocol the service layer depends on, and the plain types they carry.

Adapters implement these (Graph over msgraph-sdk, AD over ldap3 or through the
relay agent, Service Bus or the embedded SQLite queue, a JSON state file); the
service layer depends on nothing else, so it runs against the real adapters in
the integration tests and against the in-memory ones under ``tests/`` in
milliseconds. What an adapter can do is part of its protocol: the service layer
never probes for optional methods.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from writeback.domain.guard import Ancestry, Principal
from writeback.domain.model import CloudGroup, CloudMember, DirectoryGroup, Operation
from writeback.errors import WritebackError

# =========================================================================== the cloud


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


@dataclass(frozen=True)
class GroupChanges:
    """What an incremental groups delta round reported.

    ``changed`` groups had properties or members change; they are read again (the
    round carries only what changed, so it cannot tell whether such a group is
    Unified). ``delta_link`` is the link for the next round.
    """

    changed: tuple[str, ...]
    soft_deleted: frozenset[str]
    hard_deleted: frozenset[str]
    delta_link: str | None


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


class CloudSource(Protocol):
    """What the sync, the reconcile and the worker read from Graph."""

    def snapshot(self) -> CloudSnapshot:
        """Read all Unified groups with members (full delta round)."""
        ...

    def group_changes(self, delta_link: str) -> GroupChanges:
        """What changed since a groups delta link; raises ``DeltaExpired`` when
        Graph no longer knows it."""
        ...

    def get_group(self, group_id: str) -> CloudGroup | None:
        """One group with its members, or None when it no longer exists."""
        ...

    def get_groups(self, group_ids: Sequence[str]) -> dict[str, GroupRead]:
        """Many groups with their user members at once, and for each one Graph
        answers 404 whether it is in the recycle bin; every id is in the result."""
        ...

    def soft_deleted_group_ids(self) -> frozenset[str]: ...

    def group_delta_link(self, group_id: str) -> str | None:
        """A delta link for this one group as of now (nothing read)."""
        ...

    def group_delta_links(self, group_ids: Sequence[str]) -> dict[str, str | WritebackError]:
        """:meth:`group_delta_link` for many groups at once; one group's error is its own."""
        ...

    def group_delta(self, group_id: str, delta_link: str) -> GroupDelta | None:
        """What changed for this group since ``delta_link``; None when Graph
        refused the link, so the caller does a full read instead."""
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
class Subscription:
    """A Graph change-notification subscription, as Graph reports it.

    ``client_state`` is only known when Graph echoes it (on creation); it is
    kept out of ``repr`` so it never lands in a log line."""

    id: str
    resource: str
    change_type: str
    notification_url: str
    lifecycle_url: str | None
    expiration: datetime
    client_state: str | None = field(default=None, repr=False)


class SubscriptionClient(Protocol):
    """The change-notification subscription calls."""

    def create_subscription(
        self,
        notification_url: str,
        lifecycle_url: str | None,
        client_state: str,
        expiration: datetime,
        *,
        resource: str = ...,
        change_type: str = ...,
    ) -> Subscription: ...

    def list_subscriptions(self) -> list[Subscription]: ...

    def renew_subscription(self, subscription_id: str, expiration: datetime) -> Subscription: ...

    def reauthorize_subscription(self, subscription_id: str) -> None: ...

    def delete_subscription(self, subscription_id: str) -> None: ...


class Cloud(CloudSource, SubscriptionClient, Protocol):
    """Graph as the pipeline sees it: the reads and the subscription calls."""

    def close(self) -> None: ...


# =========================================================================== the directory


class Directory(Protocol):
    """AD under the target OU: directly over LDAP, or through the relay agent."""

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

    def resolve_sids(self, sids: Sequence[str]) -> dict[str, Principal]:
        """What the domain holds for each SID (keys in canonical spelling), in a few
        searches for all of them; a SID that names no object is absent. For the
        member guard (:mod:`writeback.domain.guard`)."""
        ...

    def group_ancestry(self) -> Ancestry:
        """The groups the anchored groups under the target OU are in, directly and
        through nesting, read upward (a search over the OU for those that are in
        any group, then one per level of nesting). For the nesting guard."""
        ...

    def apply(self, operation: Operation) -> int:
        """Carry out one planned operation; returns the LDAP requests it took."""
        ...

    def apply_all(self, operations: Sequence[Operation]) -> list[int | WritebackError]:
        """:meth:`apply` for each, in order (pipelined where the adapter can); each
        entry is that operation's requests or the error it alone ended with."""
        ...

    def close(self) -> None: ...


def apply_each(
    apply: Callable[[Operation], int], operations: Sequence[Operation]
) -> list[int | WritebackError]:
    """``apply_all`` for an adapter that writes one operation at a time: in order,
    each operation's own error kept as its entry, the others still tried."""
    results: list[int | WritebackError] = []
    for operation in operations:
        try:
            results.append(apply(operation))
        except WritebackError as error:
            results.append(error)
    return results


# =========================================================================== the queue


@dataclass(frozen=True)
class OutgoingMessage:
    """What the webhook enqueues: Service Bus fields, nothing Service Bus-specific."""

    body: bytes
    message_id: str
    session_id: str
    application_properties: dict[str, str] | None = None
    #: Deliver no earlier than this (Unix seconds): a scheduled message.
    not_before: float | None = None


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


class Settlement(Protocol):
    """How the pipeline settles the messages it was handed.

    Every message ends completed, abandoned (back to the queue after ``delay``,
    one delivery counted), parked (back after ``delay`` without counting one: the
    pause switch and configuration errors, which the event is not to blame for)
    or dead-lettered with a reason a person will read.
    """

    def complete(self, message: ReceivedMessage) -> None: ...

    def complete_all(self, messages: Sequence[ReceivedMessage]) -> None:
        """Complete many at once (one commit for the embedded queue)."""
        ...

    def abandon(self, message: ReceivedMessage, *, delay: float = 0.0) -> None:
        """Unlock for redelivery, after ``delay`` seconds."""
        ...

    def park(self, message: ReceivedMessage, *, delay: float) -> None:
        """Put back for ``delay`` seconds without counting a delivery."""
        ...

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None: ...


class MessageSender(Protocol):
    """What the webhook needs of the queue: one send for a whole POST's messages."""

    def send(self, messages: list[OutgoingMessage]) -> None: ...


#: One step of a replay pass: the letter, whether it was chosen, and the (permanent)
#: error that kept a chosen one from moving.
ReplayStep = tuple[DeadLetter, bool, WritebackError | None]


class DeadLetterQueue(Protocol):
    """What ``replay`` and ``status`` need of a queue's dead letters and figures."""

    def iter_dead_letters(self, *, page_size: int = ...) -> Iterator[DeadLetter]:
        """Every dead letter, oldest first, read page by page without locking any."""
        ...

    def replay_dead_letters(
        self, choose: Callable[[DeadLetter], bool]
    ) -> Generator[ReplayStep, None, None]:
        """One pass, oldest first: each letter is shown to ``choose`` and the chosen
        are moved back as they are met; closing the generator ends the pass."""
        ...

    def dead_letter_count_by_reason(self) -> dict[str, int]: ...

    def depth(self) -> int:
        """Messages waiting (scheduled ones not counted)."""
        ...

    def scheduled_count(self) -> int:
        """Messages scheduled for later (delayed retries, confirmations, parked)."""
        ...


class EventQueue(MessageSender, Settlement, DeadLetterQueue, Protocol):
    """A session queue (one session per group) with peek-lock and dead letters.

    Service Bus in Azure; an embedded SQLite queue on one machine. Both keep the
    same rules: FIFO per session, one receiver per session at a time, a message
    abandoned ``max_delivery_count`` times is dead-lettered, duplicates of a
    message_id inside the detection window are dropped on send.
    """

    def receive_session(self, max_messages: int, wait: float) -> list[ReceivedMessage]:
        """Lock the next available session and take up to ``max_messages`` of it."""
        ...

    def receive_sessions(
        self, max_sessions: int, max_messages: int, wait: float
    ) -> list[list[ReceivedMessage]]:
        """Lock up to ``max_sessions`` sessions with work (waiting at most ``wait`` for
        the first) and take up to ``max_messages`` of each: one batch per session."""
        ...

    def release_session(self, session_id: str) -> None: ...

    def dead_letters(self, limit: int = 1000) -> list[DeadLetter]: ...

    def resubmit(self, dead_letter: DeadLetter) -> None:
        """Move one dead letter back to the queue (replay)."""
        ...

    def close(self) -> None: ...


# =========================================================================== what is kept


@dataclass(frozen=True)
class StoredLink:
    """A group's delta link and the user members it had when the link was stored.

    ``delta_link`` is empty for a group read in full every time (a small one);
    ``stored_at`` (Unix seconds; 0 when unknown) ages the link out before Graph's
    delta token does. ``trusted``: the link is known not to be ahead of what was
    written with it (a delta round's own next link, or one a later full read
    confirmed); a link asked for as of now next to a full read is not, since that
    read may have come from a replica behind it."""

    delta_link: str
    member_count: int
    stored_at: float = 0.0
    trusted: bool = False


class DeltaLinkStore(Protocol):
    """Per-group delta links kept by the worker between events."""

    def get(self, group_id: str) -> StoredLink | None: ...

    def put(self, group_id: str, link: StoredLink) -> None: ...

    def forget(self, group_id: str) -> None: ...


class StateStore(Protocol):
    """A small JSON object kept between runs, section by section (the last reconcile,
    the reconcile delta link, a pending reconcile request, the subscription, the
    pause switch). ``status`` reads it; so does the next run, on another instance."""

    def read(self) -> dict[str, Any]:
        """The recorded state; empty when there is none or it cannot be read."""
        ...

    def update(self, **sections: Any) -> dict[str, Any]:
        """Replace the given top-level sections; returns the new state."""
        ...
