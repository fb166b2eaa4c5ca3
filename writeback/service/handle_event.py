"""The worker: a session's messages for one group in, one LDAP operation out.

A message only says *which* group changed. The handler reads the group from
Graph and its object from AD now, plans, and applies the single operation that
converges them, so duplicates, stale or reordered events and replays write
nothing, and a burst of events for one group (taken together from its
session) costs one write.

Member deltas: with a per-group delta link stored (``WorkerContext.links``),
an event costs what changed rather than the group's size. The group's
properties are read now (state-based, one request), its members only as the
changes since the link (one request, plus one per 15 new member ids for their
SIDs), and the AD object without its ``member`` values; attributes are planned
state-based and the member values from the deltas, in one modify (the adapter's
conflict read-back keeps it idempotent when a value is already there). The
first event for a group, one whose link expired (410), one whose removed
members cannot be resolved to SIDs any more, and any case the deltas cannot
settle alone (the group gone or no longer Unified, its AD object missing, a
member count that could reach the limit) take the full read, which stores a
fresh link. What is written by hand in AD's ``member`` is not seen by the
delta path; reconcile repairs it.

Settlement follows the error tree: success completes every message; a
permanent fault dead-letters them with the error's type as reason and its
message as description; a transient fault that outlives the in-process retries
abandons them with a growing delay, so they wait in the queue (the delivery
count caps how long) and nothing is lost.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base

from writeback.config import SoftDeletePolicy
from writeback.domain.events import GroupChanged
from writeback.domain.mapping import MappingOptions, desired_group, over_member_limit
from writeback.domain.model import (
    Changes,
    CloudGroup,
    CloudMember,
    DirectoryGroup,
    MemberKind,
    Modify,
    Operation,
    Rename,
    Skip,
)
from writeback.domain.planner import plan_group, sid_ref
from writeback.domain.policy import DeleteBudget
from writeback.errors import ConfigError, PermanentError, PoisonEvent, TransientError
from writeback.ports import (
    CloudSource,
    DeltaLinkStore,
    Directory,
    ReceivedMessage,
    Settlement,
    StoredLink,
)

log = logging.getLogger("writeback.worker")

#: Longest wait between redeliveries of a group whose write keeps failing.
MAX_REDELIVERY_DELAY = 300.0


class OverMemberLimit(PermanentError):
    """The group has more members than the configured limit; it is not written."""


def _memory_links() -> DeltaLinkStore:
    from writeback.adapters.delta_store import MemoryDeltaLinks

    return MemoryDeltaLinks()


#: More ids than this to resolve (a restored group reported whole, a mass change)
#: and the full read is cheaper than resolving them 15 at a time.
MAX_DELTA_LOOKUPS = 150


@dataclass(frozen=True)
class WorkerContext:
    cloud: CloudSource
    directory: Directory
    #: Mapping options with the forest's schema attributes already filled in.
    options: MappingOptions
    soft_delete: SoftDeletePolicy = SoftDeletePolicy.KEEP
    #: False when writeback is disabled: events are consumed, nothing is written
    #: (reconcile deletes our groups behind the delete threshold).
    enabled: bool = True
    attempts: int = 3
    max_wait: float = 30.0
    #: Redelivery waits after a transient fault: ``scale * 2**deliveries`` seconds,
    #: at most ``max_redelivery_delay`` (tests shrink both).
    redelivery_scale: float = 1.0
    max_redelivery_delay: float = MAX_REDELIVERY_DELAY
    #: Per-group delta links (in memory unless given); None turns member deltas
    #: off, so every event reads the group in full from both sides.
    links: DeltaLinkStore | None = field(default_factory=_memory_links)
    #: Deletes allowed over a sliding window (see :func:`event_deletes`); None: no cap.
    deletes: DeleteBudget | None = None


#: A configuration error is not the event's fault: it waits this long, uncounted.
CONFIG_RETRY_DELAY = 300.0

#: The window the worker counts its deletes over.
DELETE_WINDOW = 24 * 3600.0


def event_deletes(threshold: int) -> DeleteBudget:
    """The worker's delete cap: WRITEBACK_DELETE_THRESHOLD deletes per 24 hours."""
    return DeleteBudget(threshold, DELETE_WINDOW, setting="WRITEBACK_DELETE_THRESHOLD")


@dataclass
class EventOutcome:
    group_id: str
    messages: int
    settlement: str  # "completed" | "dead-lettered" | "abandoned" | "parked"
    operation: Operation | None = None
    ldap_requests: int = 0
    skips: list[Skip] = field(default_factory=list)
    error: str | None = None
    #: Seconds from the oldest notification in the batch to the write's end.
    latency: float | None = None


def process_session(
    queue: Settlement,
    messages: list[ReceivedMessage],
    ctx: WorkerContext,
    *,
    now: Callable[[], float] = time.time,
) -> EventOutcome:
    """Handle one session's batch (one group) and settle every message in it."""
    events, valid = _parse(queue, messages)
    session = messages[0].session_id
    if not events:
        return EventOutcome(session, len(messages), "dead-lettered", error="poison")
    outcome = EventOutcome(session, len(valid), "completed")
    try:
        outcome.operation, outcome.ldap_requests, outcome.skips = _retrying(ctx)(
            converge, session, ctx
        )
    except ConfigError as error:
        for message in valid:
            queue.park(message, delay=CONFIG_RETRY_DELAY)
        outcome.settlement, outcome.error = "parked", f"ConfigError: {error}"
    except PermanentError as error:
        reason = type(error).__name__
        for message in valid:
            queue.dead_letter(message, reason, str(error))
        outcome.settlement, outcome.error = "dead-lettered", f"{reason}: {error}"
    except TransientError as error:
        delay = redelivery_delay(
            max(m.delivery_count for m in valid),
            error.retry_after,
            scale=ctx.redelivery_scale,
            cap=ctx.max_redelivery_delay,
        )
        for message in valid:
            queue.abandon(message, delay=delay)
        outcome.settlement, outcome.error = "abandoned", f"{type(error).__name__}: {error}"
    else:
        for message in valid:
            queue.complete(message)
        outcome.latency = now() - min(e.received_at for e in events)
    _log(outcome)
    return outcome


def _parse(
    queue: Settlement, messages: list[ReceivedMessage]
) -> tuple[list[GroupChanged], list[ReceivedMessage]]:
    """Valid events of the batch; poison messages go to the dead-letter queue at once."""
    events, valid = [], []
    for message in messages:
        try:
            event = GroupChanged.from_json(message.body)
            if event.group_id != message.session_id:
                raise PoisonEvent(
                    f"group_id {event.group_id} does not match session {message.session_id}"
                )
        except PoisonEvent as error:
            queue.dead_letter(message, "PoisonEvent", str(error))
            log.warning("dead-lettered poison message %s: %s", message.message_id, error)
            continue
        events.append(event)
        valid.append(message)
    return events, valid


def converge(group_id: str, ctx: WorkerContext) -> tuple[Operation | None, int, list[Skip]]:
    """Read both sides now, plan, and apply the one operation (if any)."""
    if not ctx.enabled:
        return None, 0, []
    if ctx.links is not None:
        stored = ctx.links.get(group_id)
        if stored is not None:
            done = _converge_by_deltas(group_id, ctx, ctx.links, stored)
            if done is not None:
                return done
            ctx.links.forget(group_id)
    return _converge_in_full(group_id, ctx)


def _converge_in_full(
    group_id: str, ctx: WorkerContext
) -> tuple[Operation | None, int, list[Skip]]:
    """Read the whole group from both sides; store a delta link taken before the reads."""
    # Taken first: a change racing the reads shows up again in the next delta,
    # where writing it once more is harmless; one taken after could miss it.
    link = ctx.cloud.group_delta_link(group_id) if ctx.links is not None else None
    group = ctx.cloud.get_group(group_id)
    current = ctx.directory.find_group(group_id)
    if group is None:
        if current is None or _kept_as_soft_deleted(group_id, ctx):
            return None, 0, []
        operation = plan_group(None, current, ctx.options.target_ou)
        if operation is not None and ctx.deletes is not None:
            ctx.deletes.take()  # past the cap: PolicyRefused, dead-lettered with the reason
        return operation, _apply(operation, ctx), []
    if not group.is_unified:
        return None, 0, []
    desired = desired_group(_within_limit(group, ctx), ctx.options)
    operation = plan_group(desired, current, ctx.options.target_ou)
    requests = _apply(operation, ctx)
    if link is not None and ctx.links is not None:
        ctx.links.put(group_id, StoredLink(link, _user_count(group)))
    return operation, requests, list(desired.skips)


@dataclass(frozen=True)
class _Deltas:
    """What the deltas since a stored link say, with the SIDs they need."""

    group: CloudGroup
    added: tuple[CloudMember, ...]
    removed_sids: frozenset[str]
    delta_link: str
    member_count: int


def _converge_by_deltas(
    group_id: str,
    ctx: WorkerContext,
    links: DeltaLinkStore,
    stored: StoredLink,
) -> tuple[Operation | None, int, list[Skip]] | None:
    """Converge from the member changes since the stored link; None: read in full."""
    read = _read_deltas(group_id, ctx, stored)
    if read is None:
        return None
    current = _attributes_only(group_id, ctx)
    if current is None:
        return None
    desired = desired_group(replace(read.group, members=read.added), ctx.options)
    planned = plan_group(replace(desired, member_sids=frozenset()), current, ctx.options.target_ou)
    add = tuple(sid_ref(sid) for sid in sorted(desired.member_sids))
    remove = tuple(sid_ref(sid) for sid in sorted(read.removed_sids - desired.member_sids))
    operation: Operation | None
    if isinstance(planned, Rename):
        changes = replace(planned.changes, add_members=add, remove_members=remove)
        operation = replace(planned, changes=changes)
    elif isinstance(planned, Modify) or add or remove:
        base = planned.changes if isinstance(planned, Modify) else Changes()
        changes = replace(base, add_members=add, remove_members=remove)
        operation = Modify(group_id, current.dn, changes) if changes else None
    else:
        operation = planned
    requests = _apply(operation, ctx)
    links.put(group_id, StoredLink(read.delta_link, read.member_count))
    return operation, requests, list(desired.skips)


def _read_deltas(group_id: str, ctx: WorkerContext, stored: StoredLink) -> _Deltas | None:
    """The group now and its member changes, SIDs resolved; None when only a full
    read can settle it (link expired, group gone or not Unified, a removed
    member Graph no longer knows, too many ids, a count that may pass the limit)."""
    delta = ctx.cloud.group_delta(group_id, stored.delta_link)
    if delta is None or delta.group is None or delta.delta_link is None:
        return None
    if not delta.group.is_unified:
        return None
    added_users = [m.id for m in delta.added if m.kind is MemberKind.USER]
    removed_users = [m.id for m in delta.removed if m.kind is MemberKind.USER]
    count = stored.member_count + len(added_users)
    lookups = [*added_users, *removed_users]
    if count > ctx.options.member_limit or len(lookups) > MAX_DELTA_LOOKUPS:
        return None
    users = ctx.cloud.resolve_users(lookups) if lookups else {}
    if any(member_id not in users for member_id in removed_users):
        return None  # gone from Graph: the SID to remove is unknown here
    return _Deltas(
        group=delta.group,
        added=tuple(users.get(m.id, m) for m in delta.added),
        removed_sids=frozenset(sid for member_id in removed_users if (sid := users[member_id].sid)),
        delta_link=delta.delta_link,
        member_count=max(0, count - len(removed_users)),
    )


def _attributes_only(group_id: str, ctx: WorkerContext) -> DirectoryGroup | None:
    """The AD object without its members (the member values are planned from deltas)."""
    return ctx.directory.find_groups([group_id], members=False).get(group_id)


def _user_count(group: CloudGroup) -> int:
    return sum(1 for m in group.members if m.kind is MemberKind.USER)


def _kept_as_soft_deleted(group_id: str, ctx: WorkerContext) -> bool:
    """A soft-deleted group keeps its AD object (and SID) until it is purged."""
    if ctx.soft_delete is not SoftDeletePolicy.KEEP:
        return False
    return group_id in ctx.cloud.soft_deleted_group_ids()


def _within_limit(group: CloudGroup, ctx: WorkerContext) -> CloudGroup:
    skip = over_member_limit(group, ctx.options.member_limit)
    if skip is not None:
        raise OverMemberLimit(f"group {group.id}: {skip.detail}")
    return group


def _apply(operation: Operation | None, ctx: WorkerContext) -> int:
    return ctx.directory.apply(operation) if operation is not None else 0


def _retrying(ctx: WorkerContext) -> Retrying:
    """A few quick in-process retries; longer outages wait in the queue instead."""
    return Retrying(
        stop=stop_after_attempt(ctx.attempts),
        wait=_RetryAfterOrBackoff(ctx.max_wait),
        retry=retry_if_exception_type(TransientError),
        reraise=True,
    )


class _RetryAfterOrBackoff(wait_base):
    """Exponential backoff with jitter, but never shorter than a Retry-After."""

    def __init__(self, cap: float) -> None:
        self._cap = cap

    def __call__(self, retry_state: object) -> float:
        attempt = getattr(retry_state, "attempt_number", 1)
        outcome = getattr(retry_state, "outcome", None)
        error = outcome.exception() if outcome is not None else None
        retry_after = getattr(error, "retry_after", None) or 0.0
        backoff = min(self._cap, 0.2 * 2 ** (attempt - 1)) * (0.5 + random.random())
        return float(min(self._cap, max(backoff, retry_after)))


def redelivery_delay(
    delivery_count: int,
    retry_after: float | None = None,
    *,
    scale: float = 1.0,
    cap: float = MAX_REDELIVERY_DELAY,
) -> float:
    """How long a failing group waits in the queue before the next try."""
    backoff = min(cap, scale * 2.0 ** min(delivery_count, 16))
    return max(backoff, retry_after or 0.0)


def _log(outcome: EventOutcome) -> None:
    op = outcome.operation.kind if outcome.operation is not None else "none"
    log.info(
        "group %s: %s after %d messages, op=%s, ldap=%d%s",
        outcome.group_id,
        outcome.settlement,
        outcome.messages,
        op,
        outcome.ldap_requests,
        f", error={outcome.error}" if outcome.error else "",
        extra={
            "group_id": outcome.group_id,
            "operation": op,
            "outcome": outcome.settlement,
            "latency_ms": None if outcome.latency is None else round(outcome.latency * 1000, 1),
        },
    )
