"""The pipeline: how an event becomes a write, and what the timers do, for both hosts.

``serve`` (one process, the SQLite queue) and the Function app (Service Bus,
timers) run this same object; each host only binds its wire to it: HTTP and
threads for ``serve``, triggers for the Function app.

Events
    :meth:`Pipeline.handle` takes the messages a host received (one session's
    batch, or several sessions') and settles every one of them. Messages of a
    group session converge that group with one operation
    (:func:`~writeback.service.handle_event.process_session`: read both sides,
    plan, apply; duplicates and replays write nothing). A message whose group
    was read *after* the webhook accepted it needs no read of its own: that read
    already saw the change (per process; the settle confirmation covers what a
    lagging replica hid). Messages of the control session
    (:data:`~writeback.domain.events.CONTROL_SESSION`) carry lifecycle events
    and reconcile requests: the lifecycle calls are a few Graph requests, and a
    reconcile is only *requested* (recorded in the state store), never run while
    a host holds a session lock. Settlement follows the error tree: completed;
    dead-lettered with the error's type as reason (permanent); abandoned with a
    growing delay (transient); parked, without counting a delivery (the pause
    switch and configuration errors, which are not the event's fault).

Reconcile
    :meth:`Pipeline.reconcile_if_due` runs one when it was requested, or when
    ``reconcile_interval`` has passed since the last one started (sooner, after
    ``retry_delay``, when the last one failed). Incremental from the stored
    groups delta link when ``incremental`` is on (full syncs on schedule), full
    otherwise; the outcome, the delta state and any pending request live in the
    state store, so ``status`` and the next run (on another instance) see them.
    After a reconcile wrote a group, that group's member-delta link is
    forgotten: its next event reads it in full, so a member delta the worker
    stored past can never hide the undo. One reconcile at a time per process.

Subscription
    :meth:`Pipeline.subscription_upkeep` creates or renews the Graph
    subscription and records it; a new one requests a reconcile (changes before
    it were never notified). Lifecycle events are handled the same way.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from writeback.domain.events import CONTROL_SESSION, Change, ControlRequest, GroupChanged
from writeback.domain.mapping import MappingOptions
from writeback.domain.model import Skip
from writeback.domain.times import iso, parse_iso
from writeback.errors import ConfigError, PermanentError, PoisonEvent, TransientError
from writeback.ports import (
    Cloud,
    DeltaLinkStore,
    Directory,
    EventQueue,
    MessageSender,
    ReceivedMessage,
    Settlement,
    StateStore,
    Subscription,
)
from writeback.service.guarding import GuardReads
from writeback.service.handle_event import (
    CONFIG_RETRY_DELAY,
    DEFAULT_SETTLE,
    MAX_REDELIVERY_DELAY,
    EventOutcome,
    WorkerContext,
    event_deletes,
    process_sessions,
    redelivery_delay,
)
from writeback.service.incremental import DeltaState, IncrementalResult, run_incremental
from writeback.service.notifications import LIFECYCLE_EVENTS, LifecycleEvent
from writeback.service.reconcile import SyncPolicy, SyncResult, apply_plan, plan_sync
from writeback.service.subscriptions import (
    DEFAULT_LIFETIME,
    DEFAULT_RENEW_BEFORE,
    LifecycleOutcome,
    SubscriptionStatus,
    ensure_subscription,
    handle_lifecycle,
)

log = logging.getLogger("writeback.pipeline")

#: Paused: how long a message waits before it is looked at again.
PAUSE_DELAY = 300.0
#: A timer that fires on the interval may fire a little early; within this it counts.
SCHEDULE_TOLERANCE = 60.0


@dataclass(frozen=True)
class PipelineConfig:
    """What both hosts configure the same way (built from the settings by the bootstrap)."""

    options: MappingOptions
    policy: SyncPolicy = field(default_factory=SyncPolicy)
    #: In-process retries of a transient fault, and the redelivery waits after them
    #: (``redelivery_scale * 2**deliveries`` seconds, at most ``max_redelivery_delay``).
    attempts: int = 3
    max_wait: float = 30.0
    redelivery_scale: float = 1.0
    max_redelivery_delay: float = MAX_REDELIVERY_DELAY
    #: Per-group member deltas (an event costs what changed, not the group's size).
    member_deltas: bool = True
    reconcile_interval: float = 1800.0
    #: After a failed reconcile, the next one is due this much later.
    retry_delay: float = 30.0
    #: Incremental reconcile from the stored groups delta link, full syncs on schedule.
    incremental: bool = False
    full_every: int | None = 48
    full_max_age: timedelta | None = timedelta(days=1)
    notification_url: str | None = None
    lifecycle_url: str | None = None
    client_state: str | None = field(default=None, repr=False)
    subscription_lifetime: timedelta = DEFAULT_LIFETIME
    renew_before: timedelta = DEFAULT_RENEW_BEFORE
    #: The pause switch as a setting (WRITEBACK_PAUSED): what arrives is parked,
    #: and reconciles are held. A host that stops receiving itself (``serve``) leaves
    #: it off and holds reconciles with :meth:`Pipeline.pause`.
    paused: bool = False
    pause_delay: float = PAUSE_DELAY
    config_retry_delay: float = CONFIG_RETRY_DELAY
    #: Seconds between a read and its confirmation; also how long a group must stay
    #: gone before its object is deleted (WRITEBACK_SETTLE_SECONDS).
    settle: float = DEFAULT_SETTLE


#: Bounds of the latency histogram, seconds from notification to write: a paced event
#: takes tens of milliseconds, a burst queues for seconds, a retried fault for minutes.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)

#: Latencies kept one by one, for percentiles over recent events. Older ones live on only
#: in the histogram's counts: a warm instance or a serve process runs for months, and
#: keeping them all would grow by a float per event and copy every one at each scrape.
LATENCY_WINDOW = 100_000


@dataclass(frozen=True)
class PipelineStats:
    """Counters since the pipeline was built (a copy; the pipeline keeps counting)."""

    #: Notification messages completed (each is one notified group change).
    events: int = 0
    #: Confirmation reads completed (the worker's own, after the settle interval).
    confirmations: int = 0
    #: Deletes waiting for a confirming read.
    pending_deletes: int = 0
    #: Session batches handled (a burst for one group is one batch, one write).
    batches: int = 0
    operations: dict[str, int] = field(default_factory=dict)
    #: Completed batches that needed no write (converged already, duplicates, replays).
    unchanged: int = 0
    #: Completed messages that needed no read: a read after they arrived covered them.
    covered: int = 0
    #: LDAP requests the event writes took.
    writes: int = 0
    #: Members left out of written groups (cloud-only users, nested groups...).
    skipped_members: int = 0
    dead_lettered: int = 0
    abandoned: int = 0
    parked: int = 0
    #: Unexpected errors (a bug or an unmapped library error): the batch was put back.
    errors: int = 0
    reconciles: int = 0
    reconcile_writes: int = 0
    reconcile_failures: int = 0
    lifecycle_events: int = 0
    #: Seconds from the webhook accepting a notification to its write completing, for
    #: the latest completed notifications (at most ``LATENCY_WINDOW``), oldest first.
    latencies: tuple[float, ...] = ()
    #: Every latency recorded since start: their sum, and how many fell at or under
    #: each of ``LATENCY_BUCKETS`` and not under the one before (last: above all).
    latency_sum: float = 0.0
    latency_buckets: tuple[int, ...] = (0,) * (len(LATENCY_BUCKETS) + 1)
    #: Messages by (settlement, reason): the dead-letter reason, the transient error
    #: a batch was put back for, why it was parked; "" for completed ones.
    settled: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Members (and groups) left out of the event writes, by skip reason.
    skipped_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def latency_count(self) -> int:
        """Latencies recorded since start (the histogram's count)."""
        return sum(self.latency_buckets)


class SettlementFailed(TransientError):
    """Settling a message failed (the queue unreachable): nothing is known settled.

    The host cannot hand the messages back itself; it has to let its queue
    redeliver them (the Functions host raises, so the batch is abandoned)."""


class Pipeline:
    """The event path, the reconcile and the subscription upkeep (module docstring)."""

    def __init__(
        self,
        *,
        cloud: Cloud,
        directory: Directory,
        config: PipelineConfig,
        state: StateStore,
        links: DeltaLinkStore | None = None,
        sender: MessageSender | None = None,
        clock: Callable[[], datetime] | None = None,
        on_reconcile_requested: Callable[[], None] | None = None,
        latency_window: int = LATENCY_WINDOW,
    ) -> None:
        self.cloud = cloud
        self.directory = directory
        self.config = config
        self.state = state
        self.clock = clock or (lambda: datetime.now(UTC))
        self.paused = config.paused
        self._links = links if links is not None or not config.member_deltas else _memory_links()
        self._deletes = event_deletes(config.policy.delete_threshold)
        self._on_reconcile_requested = on_reconcile_requested
        #: Where confirmation reads are scheduled (the hosts' queue); None: no confirmations.
        self._sender = sender
        self._lock = threading.Lock()
        self._reconcile_lock = threading.Lock()
        self._context: WorkerContext | None = None
        #: group id -> when its last read began (Unix seconds), for covered messages.
        self._read_at: dict[str, float] = {}
        self._stats = PipelineStats()
        self._operations: Counter[str] = Counter()
        self._settled: Counter[tuple[str, str]] = Counter()
        self._skipped: Counter[str] = Counter()
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._delta = DeltaState.load(state)
        self.last_reconcile: SyncResult | None = None
        self.last_reconcile_error: str | None = None
        self.last_incremental: IncrementalResult | None = None
        #: The subscription as last created, renewed or found (None before upkeep).
        self.subscription: Subscription | None = None

    # ================================================================= events

    def handle(
        self, settlement: Settlement, messages: Sequence[ReceivedMessage]
    ) -> list[EventOutcome]:
        """Converge every group session among ``messages`` and act on control
        messages; every message is settled through ``settlement``.

        Raises :class:`SettlementFailed` when a settle call failed: what it could
        not settle goes back to the queue only when the host lets it."""
        sessions: dict[str, list[ReceivedMessage]] = {}
        for message in messages:
            sessions.setdefault(message.session_id, []).append(message)
        control = sessions.pop(CONTROL_SESSION, [])
        outcomes = self._handle_groups(settlement, list(sessions.values())) if sessions else []
        if control:
            self._handle_control(settlement, control)
        return outcomes

    def handle_next(
        self,
        queue: EventQueue,
        *,
        max_sessions: int = 1,
        max_messages: int = 100,
        wait: float = 1.0,
    ) -> list[EventOutcome] | None:
        """Take up to ``max_sessions`` sessions with work from ``queue``, handle them
        in one step, release them. None when none had work within ``wait`` seconds."""
        batches = queue.receive_sessions(max_sessions, max_messages, wait)
        if not batches:
            return None
        try:
            return self.handle(queue, [m for batch in batches for m in batch])
        finally:
            for batch in batches:
                queue.release_session(batch[0].session_id)

    def _handle_groups(
        self, settlement: Settlement, batches: list[list[ReceivedMessage]]
    ) -> list[EventOutcome]:
        tracked = _Tracked(settlement)
        started = self.clock().timestamp()
        outcomes: list[EventOutcome] = []
        try:
            if self.config.paused:
                outcomes = [
                    self._park(tracked, batch, self.config.pause_delay, "paused")
                    for batch in batches
                ]
            else:
                work = []
                for batch in batches:
                    if self._covered(batch):
                        outcomes.append(self._complete_covered(tracked, batch))
                    else:
                        work.append(batch)
                if work:
                    outcomes.extend(self._converge(tracked, work, started))
        except SettlementFailed:
            raise
        except Exception as error:
            # A bug or an unmapped library error: wait like a transient fault.
            log.exception(
                "groups %s: unexpected %s; put back",
                ", ".join(batch[0].session_id for batch in batches[:5]),
                type(error).__name__,
                extra={"operation": "none", "outcome": "abandoned"},
            )
            done = {o.group_id for o in outcomes}
            for batch in batches:
                unsettled = tracked.unsettled(batch)
                for message in unsettled:
                    tracked.abandon(message, delay=self._redelivery(message.delivery_count))
                if batch[0].session_id not in done:
                    outcomes.append(
                        EventOutcome(
                            batch[0].session_id,
                            len(batch),
                            "abandoned",
                            error=type(error).__name__,
                        )
                    )
            with self._lock:
                self._stats = replace(self._stats, errors=self._stats.errors + 1)
        by_session = {batch[0].session_id: batch for batch in batches}
        for outcome in outcomes:
            self._record(outcome, by_session[outcome.group_id])
        return outcomes

    def _complete_covered(self, tracked: _Tracked, batch: list[ReceivedMessage]) -> EventOutcome:
        session = batch[0].session_id
        for message in batch:
            tracked.complete(message)
        outcome = EventOutcome(session, len(batch), "completed", notifications=len(batch))
        outcome.latency = 0.0
        with self._lock:
            self._stats = replace(self._stats, covered=self._stats.covered + len(batch))
        _log_covered(session, len(batch))
        return outcome

    def _converge(
        self, tracked: _Tracked, batches: list[list[ReceivedMessage]], started: float
    ) -> list[EventOutcome]:
        try:
            ctx = self.worker_context()
        except ConfigError as error:
            log.error("worker not ready: %s", error)
            return [
                self._park(tracked, batch, self.config.config_retry_delay, "config")
                for batch in batches
            ]
        except TransientError as error:
            log.warning(
                "worker not ready: %s: %s",
                type(error).__name__,
                error,
                extra={
                    "operation": "none",
                    "outcome": "abandoned",
                    "reason": type(error).__name__,
                    "messages": sum(len(batch) for batch in batches),
                },
            )
            outcomes = []
            for batch in batches:
                for message in batch:
                    tracked.abandon(message, delay=self._redelivery(message.delivery_count))
                outcome = EventOutcome(
                    batch[0].session_id, len(batch), "abandoned", error=type(error).__name__
                )
                outcomes.append(outcome)
            return outcomes
        outcomes = process_sessions(tracked, batches, ctx)
        with self._lock:
            for outcome in outcomes:
                if outcome.settlement == "completed":
                    self._read_at[outcome.group_id] = started
            while len(self._read_at) > 100_000:
                self._read_at.pop(next(iter(self._read_at)))
        return outcomes

    def _covered(self, batch: list[ReceivedMessage]) -> bool:
        """Whether a completed read of this group began after every message here
        was accepted by the webhook: then converging again can only repeat it."""
        with self._lock:
            read_at = self._read_at.get(batch[0].session_id)
        if read_at is None:
            return False
        for message in batch:
            try:
                event = GroupChanged.from_json(message.body)
            except PoisonEvent:
                return False  # the full path dead-letters it with the reason
            if event.change is Change.CONFIRM or event.received_at >= read_at:
                return False  # a confirmation reads, whatever was read before it
        return True

    def _park(
        self, tracked: _Tracked, batch: list[ReceivedMessage], delay: float, why: str
    ) -> EventOutcome:
        session = batch[0].session_id
        for message in batch:
            tracked.park(message, delay=delay)
        log.info(
            "group %s: %s, %d messages kept for %.0f s",
            session,
            why,
            len(batch),
            delay,
            extra={
                "group_id": session,
                "operation": "none",
                "outcome": "parked",
                "messages": len(batch),
                "reason": why,
            },
        )
        return EventOutcome(session, len(batch), "parked", error=why)

    def _redelivery(self, delivery_count: int, retry_after: float | None = None) -> float:
        return redelivery_delay(
            delivery_count,
            retry_after,
            scale=self.config.redelivery_scale,
            cap=self.config.max_redelivery_delay,
        )

    def worker_context(self) -> WorkerContext:
        """What the event handler needs, built once (the forest's schema read once)."""
        with self._lock:
            if self._context is not None:
                return self._context
        config = self.config
        options = replace(config.options, schema_attributes=self.directory.schema_attributes())
        context = WorkerContext(
            cloud=self.cloud,
            directory=self.directory,
            options=options,
            soft_delete=config.policy.soft_delete,
            enabled=config.policy.enabled,
            attempts=config.attempts,
            max_wait=config.max_wait,
            redelivery_scale=config.redelivery_scale,
            max_redelivery_delay=config.max_redelivery_delay,
            links=self._links,
            deletes=self._deletes,
            sender=self._sender,
            settle=config.settle,
            clock=lambda: self.clock().timestamp(),
            guard=GuardReads(config.policy.guard),
        )
        with self._lock:
            self._context = self._context or context
            return self._context

    def _record(self, outcome: EventOutcome, batch: list[ReceivedMessage]) -> None:
        now = self.clock().timestamp()
        latencies = []
        done = outcome.settlement == "completed"
        if done:
            for message in batch:
                try:
                    event = GroupChanged.from_json(message.body)
                except PermanentError:
                    continue
                if event.change is not Change.CONFIRM:
                    latencies.append(now - event.received_at)
        with self._lock:
            s = self._stats
            self._stats = replace(
                s,
                events=s.events + (outcome.notifications if done else 0),
                confirmations=s.confirmations
                + ((outcome.messages - outcome.notifications) if done else 0),
                pending_deletes=s.pending_deletes + outcome.pending_delete,
                batches=s.batches + 1,
                unchanged=s.unchanged + (done and outcome.operation is None),
                writes=s.writes + outcome.ldap_requests,
                skipped_members=s.skipped_members + sum(k.count for k in outcome.skips),
                dead_lettered=s.dead_lettered
                + (len(batch) if outcome.settlement == "dead-lettered" else 0),
                abandoned=s.abandoned + (len(batch) if outcome.settlement == "abandoned" else 0),
                parked=s.parked + (len(batch) if outcome.settlement == "parked" else 0),
            )
            if outcome.operation is not None and done:
                self._operations[outcome.operation.kind] += 1
            self._settled[(outcome.settlement, outcome.reason or "")] += len(batch)
            for skip in outcome.skips:
                self._skipped[str(skip.reason)] += skip.count
            self._latencies.extend(latencies)
            for latency in latencies:
                self._latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1
            self._latency_sum += sum(latencies)

    @property
    def stats(self) -> PipelineStats:
        with self._lock:
            return replace(
                self._stats,
                operations=dict(self._operations),
                latencies=tuple(self._latencies),
                latency_sum=self._latency_sum,
                latency_buckets=tuple(self._latency_buckets),
                settled=dict(self._settled),
                skipped_by_reason=dict(self._skipped),
            )

    # ================================================================= control messages

    def _handle_control(self, settlement: Settlement, batch: list[ReceivedMessage]) -> None:
        tracked = _Tracked(settlement)
        requests = _control_requests(tracked, batch)
        if not requests:
            return
        started = time.perf_counter()
        try:
            self._act_on_control([request for _, request in requests])
        except ConfigError as error:
            for message, _ in requests:
                tracked.park(message, delay=self.config.config_retry_delay)
            outcome, detail = "parked", f"ConfigError: {error}"
        except TransientError as error:
            for message, _ in requests:
                delay = self._redelivery(message.delivery_count, error.retry_after)
                tracked.abandon(message, delay=delay)
            outcome, detail = "abandoned", f"{type(error).__name__}: {error}"
        except PermanentError as error:
            for message, _ in requests:
                tracked.dead_letter(message, type(error).__name__, str(error))
            outcome, detail = "dead-lettered", f"{type(error).__name__}: {error}"
        except Exception as error:
            # A bug or an unmapped library error: put back like a group batch, never
            # raised to the host (which would redeliver at once, burning deliveries).
            log.exception("control: unexpected %s; put back", type(error).__name__)
            for message, _ in requests:
                tracked.abandon(message, delay=self._redelivery(message.delivery_count))
            outcome, detail = "abandoned", type(error).__name__
            with self._lock:
                self._stats = replace(self._stats, errors=self._stats.errors + 1)
        else:
            for message, _ in requests:
                tracked.complete(message)
            outcome, detail = "completed", ""
        log.info(
            "control: %s after %d messages%s",
            outcome,
            len(requests),
            f", error={detail}" if detail else "",
            extra={
                "group_id": CONTROL_SESSION,
                "operation": ",".join(sorted({r.kind for _, r in requests})),
                "outcome": outcome,
                "latency_ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )

    def _act_on_control(self, requests: list[ControlRequest]) -> None:
        seen: set[tuple[str, str]] = set()
        for request in requests:
            if request.kind == "reconcile":
                self.request_reconcile(f"requested: {request.reason}")
                continue
            assert request.event is not None and request.subscription_id is not None
            key = (request.event, request.subscription_id)
            if key not in seen:
                seen.add(key)
                self.lifecycle(LifecycleEvent(request.subscription_id, request.event))

    # ================================================================= subscription

    def _subscription_settings(self) -> tuple[str, str]:
        if not self.config.notification_url:
            raise ConfigError("WRITEBACK_NOTIFICATION_URL is not set")
        if not self.config.client_state:
            raise ConfigError("WRITEBACK_CLIENT_STATE is not set")
        return self.config.notification_url, self.config.client_state

    def subscription_upkeep(self) -> SubscriptionStatus:
        """Create the subscription if missing, renew it before it expires; a new one
        requests a reconcile. A failure is recorded, then raised."""
        try:
            notification_url, client_state = self._subscription_settings()
            status = ensure_subscription(
                self.cloud,
                notification_url=notification_url,
                lifecycle_url=self.config.lifecycle_url,
                client_state=client_state,
                now=self.clock(),
                renew_before=self.config.renew_before,
                lifetime=self.config.subscription_lifetime,
            )
        except Exception as error:
            log.error(
                "subscription upkeep failed: %s: %s",
                type(error).__name__,
                error,
                extra={
                    "subscription_action": "failed",
                    "outcome": "failed",
                    "error": type(error).__name__,
                },
            )
            self._record_subscription(None, "failed", error=f"{type(error).__name__}: {error}")
            raise
        self._record_subscription(status.subscription.id, status.action.value, status=status)
        if status.reconcile_needed:
            self.request_reconcile(f"subscription {status.action.value}")
        return status

    def lifecycle(self, event: LifecycleEvent) -> LifecycleOutcome:
        """Act on one lifecycle event (reauthorize, renew or recreate); record the
        subscription; request a reconcile when notifications may have been lost."""
        notification_url, client_state = self._subscription_settings()
        outcome = handle_lifecycle(
            self.cloud,
            event,
            notification_url=notification_url,
            lifecycle_url=self.config.lifecycle_url,
            client_state=client_state,
            now=self.clock(),
            renew_before=self.config.renew_before,
            lifetime=self.config.subscription_lifetime,
        )
        with self._lock:
            self._stats = replace(self._stats, lifecycle_events=self._stats.lifecycle_events + 1)
        if outcome.subscription is not None:
            status = SubscriptionStatus(outcome.action, outcome.subscription)
            self._record_subscription(outcome.subscription.id, outcome.action.value, status=status)
        if outcome.reconcile_needed:
            self.request_reconcile(f"lifecycle {event.event}")
        return outcome

    def _record_subscription(
        self,
        subscription_id: str | None,
        action: str,
        *,
        status: SubscriptionStatus | None = None,
        error: str | None = None,
    ) -> None:
        previous = self.state.read().get("subscription")
        record: dict[str, Any] = dict(previous) if isinstance(previous, dict) else {}
        if status is not None:
            self.subscription = status.subscription
            record["id"] = status.subscription.id
            record["expiration"] = iso(status.subscription.expiration)
        record.update(
            action=action,
            checked_at=iso(datetime.now(UTC)),
            endpoint=_without_query(self.config.notification_url or ""),
            error=error,
        )
        record.setdefault("id", subscription_id)
        record.setdefault("expiration", None)
        self._record_state(subscription=record)

    # ================================================================= reconcile

    def request_reconcile(self, reason: str) -> None:
        """Record that a reconcile is wanted (the next due check runs it).

        ``at`` is when it was last asked for: a reconcile that began before that
        does not answer it, even when the request joined one already pending."""
        with self._lock:
            reasons = self._pending_reasons()
            if reason not in reasons:
                reasons.append(reason)
            self._record_state(reconcile_request={"at": iso(self.clock()), "reasons": reasons})
        log.info("reconcile requested: %s", reason, extra={"reconcile_reason": reason})
        if self._on_reconcile_requested is not None:
            self._on_reconcile_requested()

    def _pending_reasons(self) -> list[str]:
        request = self.state.read().get("reconcile_request")
        return [str(r) for r in request.get("reasons", [])] if isinstance(request, dict) else []

    def requested_reconcile(self) -> str | None:
        """The reasons of a pending reconcile request, or None when there is none."""
        request = self.state.read().get("reconcile_request")
        if not isinstance(request, dict):
            return None
        return ", ".join(str(r) for r in request.get("reasons", [])) or "requested"

    def reconcile_due(self) -> str | None:
        """Why a reconcile should run now, or None (paused, or not yet due)."""
        if self.paused:
            return None
        state = self.state.read()
        last = state.get("last_reconcile")
        last = last if isinstance(last, dict) else {}
        started = parse_iso(last.get("at"))
        request = state.get("reconcile_request")
        if isinstance(request, dict):
            asked = parse_iso(request.get("at"))
            if asked is not None and (started is None or asked >= started):
                return ", ".join(str(r) for r in request.get("reasons", [])) or "requested"
        if started is None:
            return "no reconcile recorded yet"
        return "schedule" if self.next_reconcile_in() <= 0 else None

    def next_reconcile_in(self) -> float:
        """Seconds until the scheduled reconcile is due (0 when due now)."""
        state = self.state.read()
        if isinstance(state.get("reconcile_request"), dict):
            return 0.0
        last = state.get("last_reconcile")
        last = last if isinstance(last, dict) else {}
        started = parse_iso(last.get("at"))
        if started is None:
            return 0.0
        failed = bool(last.get("error"))
        wait = (
            self.config.retry_delay
            if failed
            else max(0.0, self.config.reconcile_interval - SCHEDULE_TOLERANCE)
        )
        return max(0.0, wait - (self.clock() - started).total_seconds())

    def reconcile_if_due(self) -> SyncResult | None:
        """Run the reconcile when :meth:`reconcile_due` says so; None when it did not run."""
        reason = self.reconcile_due()
        if reason is None:
            return None
        return self.reconcile(reason)

    def reconcile(self, reason: str = "asked for") -> SyncResult | None:
        """One reconcile now (incremental or full, see the module docstring), its
        outcome recorded; None when it failed (the error is recorded and logged)."""
        with self._reconcile_lock:
            started = self.clock()
            answered = self._pending_reasons()
            try:
                if self.config.incremental:
                    result = self._reconcile_incremental(started)
                else:
                    plan = plan_sync(
                        self.cloud, self.directory, self.config.options, self._policy()
                    )
                    result = apply_plan(plan, self.directory)
            except Exception as error:
                message = f"{type(error).__name__}: {error}"
                log.error(
                    "reconcile failed: %s",
                    message,
                    extra={
                        "reconcile_reason": reason,
                        "outcome": "failed",
                        "error": type(error).__name__,
                    },
                )
                self.last_reconcile_error = message
                with self._lock:
                    self._stats = replace(
                        self._stats, reconcile_failures=self._stats.reconcile_failures + 1
                    )
                self._finish_request(
                    started, {"at": iso(started), "reason": reason, "error": message}, answered
                )
                return None
        self.last_reconcile, self.last_reconcile_error = result, None
        self._forget_member_links(op.group_id for op in result.plan.operations)
        with self._lock:
            self._stats = replace(
                self._stats,
                reconciles=self._stats.reconciles + 1,
                reconcile_writes=self._stats.reconcile_writes + result.ldap_requests,
            )
        plan = result.plan
        self._finish_request(
            started,
            {
                "at": iso(started),
                "reason": reason,
                "seconds": round(result.seconds, 3),
                "applied": dict(result.applied),
                "ldap_requests": result.ldap_requests,
                "failures": len(result.failures),
                "skips": len(plan.skips),
                "deletes_blocked": plan.deletes_blocked,
                "alerts": alerts_record(plan.alerts),
                "alert_count": len(plan.alerts),
                "error": None,
            },
            answered,
        )
        for alert in plan.alerts:
            log.warning(
                "reconcile: group %s: %s: %s",
                alert.group_id,
                alert.reason.value,
                alert.detail,
                extra={"group_id": alert.group_id, "skip_reason": alert.reason.value},
            )
        log.info(
            "reconcile done (%s): %s, %d LDAP requests, %d failures in %.2f s",
            reason,
            ", ".join(f"{n} {k}" for k, n in sorted(result.applied.items())) or "no writes",
            result.ldap_requests,
            len(result.failures),
            result.seconds,
            extra={
                "reconcile_reason": reason,
                "outcome": "done",
                "planned": len(plan.operations),
                "applied": result.applied,
                "ldap_requests": result.ldap_requests,
                "failures": len(result.failures),
                "deletes_blocked": plan.deletes_blocked,
                "seconds": round(result.seconds, 3),
            },
        )
        return result

    def _policy(self) -> SyncPolicy:
        return self.config.policy

    def _finish_request(
        self, started: datetime, record: dict[str, Any], answered: list[str]
    ) -> None:
        """Record the run; a request made before it started is answered by it. One
        asked for again while it ran stays, without the reasons it answered."""
        with self._lock:
            request = self.state.read().get("reconcile_request")
            sections: dict[str, Any] = {"last_reconcile": record}
            if isinstance(request, dict):
                asked = parse_iso(request.get("at"))
                if asked is None or asked <= started:
                    sections["reconcile_request"] = None
                else:
                    reasons = [str(r) for r in request.get("reasons", [])]
                    left = [r for r in reasons if r not in answered] or reasons
                    sections["reconcile_request"] = {**request, "reasons": left}
            self._record_state(**sections)

    def _reconcile_incremental(self, started: datetime) -> SyncResult:
        outcome, self._delta = run_incremental(
            self.cloud,
            self.directory,
            self.config.options,
            self._policy(),
            self._delta,
            full_every=self.config.full_every,
            full_max_age=self.config.full_max_age,
            started=started,
        )
        self.last_incremental = outcome
        self._record_state(delta=self._delta.record(outcome))
        return outcome.result

    def _forget_member_links(self, written: Iterable[str]) -> None:
        group_ids = list(written)  # twice: the links, then the reads it covered
        if self._links is not None:
            for group_id in group_ids:
                self._links.forget(group_id)
        with self._lock:
            for group_id in group_ids:
                self._read_at.pop(group_id, None)

    # ================================================================= pause, state

    def pause(self) -> None:
        """Hold reconciles (and record it); the host stops handing over events."""
        self.paused = True
        self._record_state(paused=True)

    def resume(self) -> None:
        self.paused = False
        self._record_state(paused=False)

    def _record_state(self, **sections: Any) -> None:
        try:
            self.state.update(**sections)
        except OSError as error:
            log.warning("could not record the state: %s", error)

    def close(self) -> None:
        """Close the adapters the pipeline was given."""
        for resource in (self.directory, self.cloud):
            try:
                resource.close()
            except Exception as error:  # closing must not hide what went before
                log.debug("closing %r failed: %r", resource, error)


class _Tracked:
    """A settlement that remembers what it settled, so a handler that failed half-way
    settles the rest, and that tells a settle failure apart from the handler's own."""

    def __init__(self, settlement: Settlement) -> None:
        self._settlement = settlement
        self._settled: set[int] = set()

    def unsettled(self, batch: Iterable[ReceivedMessage]) -> list[ReceivedMessage]:
        return [m for m in batch if id(m) not in self._settled]

    def _settle(self, message: ReceivedMessage, action: Callable[..., None], *args: Any) -> None:
        try:
            action(message, *args)
        except Exception as error:
            raise SettlementFailed(
                f"settling {message.message_id} failed: {type(error).__name__}: {error}"
            ) from error
        self._settled.add(id(message))

    def complete(self, message: ReceivedMessage) -> None:
        self._settle(message, self._settlement.complete)

    def complete_all(self, messages: Sequence[ReceivedMessage]) -> None:
        if not messages:
            return
        try:
            self._settlement.complete_all(messages)
        except Exception as error:
            raise SettlementFailed(
                f"settling {len(messages)} messages failed: {type(error).__name__}: {error}"
            ) from error
        self._settled.update(id(m) for m in messages)

    def abandon(self, message: ReceivedMessage, *, delay: float = 0.0) -> None:
        self._settle(message, lambda m: self._settlement.abandon(m, delay=delay))

    def park(self, message: ReceivedMessage, *, delay: float) -> None:
        self._settle(message, lambda m: self._settlement.park(m, delay=delay))

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        self._settle(message, self._settlement.dead_letter, reason, description)


#: Alerts kept in the state file for ``status`` (the rest are counted).
MAX_RECORDED_ALERTS = 50


def alerts_record(alerts: Sequence[Skip]) -> list[dict[str, Any]]:
    """The reconcile's alerts (duplicated anchors, frozen groups) as ``status`` shows them."""
    return [
        {"group_id": a.group_id, "reason": a.reason.value, "detail": a.detail[:500]}
        for a in alerts[:MAX_RECORDED_ALERTS]
    ]


def _control_requests(
    tracked: _Tracked, batch: list[ReceivedMessage]
) -> list[tuple[ReceivedMessage, ControlRequest]]:
    """The control requests of a batch; a body the worker cannot act on (malformed,
    or a lifecycle event it does not know) is dead-lettered as poison at once."""
    requests: list[tuple[ReceivedMessage, ControlRequest]] = []
    for message in batch:
        try:
            request = ControlRequest.from_json(message.body)
            if request.kind == "lifecycle" and request.event not in LIFECYCLE_EVENTS:
                raise PoisonEvent(f"unknown lifecycle event {request.event!r}")
            requests.append((message, request))
        except PoisonEvent as error:
            tracked.dead_letter(message, "PoisonEvent", str(error))
    return requests


def _memory_links() -> DeltaLinkStore:
    from writeback.adapters.delta_store import MemoryDeltaLinks

    return MemoryDeltaLinks()


def _log_covered(session: str, messages: int) -> None:
    log.info(
        "group %s: completed after %d messages, covered by a later read",
        session,
        messages,
        extra={
            "group_id": session,
            "operation": "none",
            "outcome": "completed",
            "messages": messages,
            "notifications": messages,
        },
    )


def _without_query(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else ""
