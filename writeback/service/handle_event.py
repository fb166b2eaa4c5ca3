"""The worker: a session's messages for one group in, one LDAP operation out.

A message only says *which* group changed. The handler reads the group from
Graph and its object from AD now, plans, and applies the single operation that
converges them, so duplicates, stale or reordered events and replays write
nothing, and a burst of events for one group (taken together from its
session) costs one write.

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
from dataclasses import dataclass, field

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base

from writeback.config import SoftDeletePolicy
from writeback.domain.events import GroupChanged
from writeback.domain.mapping import MappingOptions, desired_group, over_member_limit
from writeback.domain.model import CloudGroup, Operation, Skip
from writeback.domain.planner import plan_group
from writeback.errors import PermanentError, PoisonEvent, TransientError
from writeback.ports import CloudSource, Directory, EventQueue, ReceivedMessage

log = logging.getLogger("writeback.worker")

#: Longest wait between redeliveries of a group whose write keeps failing.
MAX_REDELIVERY_DELAY = 300.0


class OverMemberLimit(PermanentError):
    """The group has more members than the configured limit; it is not written."""


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


@dataclass
class EventOutcome:
    group_id: str
    messages: int
    settlement: str  # "completed" | "dead-lettered" | "abandoned"
    operation: Operation | None = None
    ldap_requests: int = 0
    skips: list[Skip] = field(default_factory=list)
    error: str | None = None
    #: Seconds from the oldest notification in the batch to the write's end.
    latency: float | None = None


def process_session(
    queue: EventQueue,
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
    queue: EventQueue, messages: list[ReceivedMessage]
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
    group = ctx.cloud.get_group(group_id)
    current = ctx.directory.find_group(group_id)
    if group is None:
        if current is None or _kept_as_soft_deleted(group_id, ctx):
            return None, 0, []
        operation = plan_group(None, current, ctx.options.target_ou)
        return operation, _apply(operation, ctx), []
    if not group.is_unified:
        return None, 0, []
    desired = desired_group(_within_limit(group, ctx), ctx.options)
    operation = plan_group(desired, current, ctx.options.target_ou)
    return operation, _apply(operation, ctx), list(desired.skips)


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


def run_once(
    queue: EventQueue, ctx: WorkerContext, *, max_messages: int = 100, wait: float = 1.0
) -> EventOutcome | None:
    """Take the next session with work, handle it, release it. None when idle."""
    messages = queue.receive_session(max_messages, wait)
    if not messages:
        return None
    try:
        return process_session(queue, messages, ctx)
    finally:
        queue.release_session(messages[0].session_id)
