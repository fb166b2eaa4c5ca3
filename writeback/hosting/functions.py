"""The Function app's entry points (``function_app.py``) bound to the pipeline.

What an event, a reconcile or a lifecycle item does is the pipeline's business
(:mod:`writeback.service.pipeline`, shared with ``serve``); this module turns
the host's objects into the pipeline's and back, and keeps what a warm worker
process reuses across invocations: the queue client and its settlement, the
pipeline with its Graph client, one LDAP connection per worker thread, the
member-delta links and the event delete budget.

HTTP ``notifications`` and ``lifecycle``
    :func:`~writeback.service.notifications.handle_webhook` with the queue's
    sender; a lifecycle item becomes a control message (Graph waits 3 s at most).
    A setting that is missing answers 503, so Graph retries while it is fixed.

Service Bus trigger ``worker``
    Single dispatch with sessions (``cardinality=one``): up to host.json's
    ``maxConcurrentSessions`` groups at once per instance, one message per
    invocation, session locks renewed by the host; batch mode takes one session
    at a time and measured about 13 times slower for a burst over many groups
    (``bench/functions_trigger.py``). The delivered message becomes a
    :class:`~writeback.ports.ReceivedMessage` (our delivery count: the host's
    plus what a rescheduled copy carries; a hand-off dead letter replayed gets
    its group's session back), and the pipeline handles and settles it through
    :mod:`writeback.adapters.functions_settlement` (the host completes on
    return). Later messages of a burst, accepted before a completed read of
    their group, complete without a read of their own. What the extension does
    around the invocation (an immediate retry after a failed invocation, the
    lock) shapes two rules here:

    * nothing long runs in the trigger: a lifecycle item that needs a reconcile
      only records the request; the reconcile timer runs it;
    * a failure that is not the events' fault must not burn their deliveries.
      A configuration error parks the messages (rescheduled, uncounted). When
      even the queue cannot be used (its settings are broken, or a settle call
      failed), the invocation waits before it fails, longer at each delivery,
      so the broker's redeliveries are spread over tens of minutes instead of
      seconds.

Timers
    ``reconcile`` (``%WRITEBACK_RECONCILE_SCHEDULE%``): how often the reconcile
    timer looks; it runs one when one was requested, or when
    ``WRITEBACK_RECONCILE_INTERVAL`` has passed since the last. The timer is a
    singleton across instances, so reconciles never overlap.
    ``subscription_upkeep`` (``%WRITEBACK_SUBSCRIPTION_SCHEDULE%``): create or
    renew the subscription; a new one requests a reconcile.

Pausing
    The host's own switch, ``AzureWebJobs.worker.Disabled=true``, stops the
    trigger's listener: nothing is received, rescheduled or counted, events wait
    in the queue. ``WRITEBACK_PAUSED=true``, set with it (the Bicep's ``paused``
    parameter sets both; infra/README.md), holds the reconcile, and a message
    delivered anyway is written nowhere and parked ``PAUSE_DELAY`` seconds ahead
    without counting a delivery. The webhook keeps enqueuing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import azure.functions as func

from writeback.config import (
    Host,
    PipelineSettings,
    QueueKind,
    load_pipeline_settings,
    load_settings,
)
from writeback.domain.events import group_session
from writeback.errors import ConfigError, WritebackError
from writeback.hosting.collector import tune_collector
from writeback.logging_setup import configure_logging
from writeback.ports import MessageSender, ReceivedMessage, Settlement

if TYPE_CHECKING:
    from writeback.service.handle_event import EventOutcome
    from writeback.service.pipeline import Pipeline
    from writeback.service.reconcile import SyncResult
    from writeback.service.subscriptions import SubscriptionStatus

log = logging.getLogger("writeback.functions")

#: An invocation that cannot settle waits this long times 2**(delivery - 1) before
#: it fails (at most BACKOFF_MAX: the session lock, 5 minutes, must outlast it).
BACKOFF_BASE: Final = 5.0
BACKOFF_MAX: Final = 120.0


# =========================================================================== messages


def from_trigger(message: func.ServiceBusMessage) -> ReceivedMessage:
    """Our view of a message the host delivered.

    ``delivery_count`` is the host's (1 on first delivery) plus the deliveries a
    rescheduled copy carries; ``message_id`` is the original one; a message in a
    hand-off session gets its group's session back.
    """
    from writeback.adapters.functions_settlement import TriggeredLock
    from writeback.adapters.servicebus import ORIGINAL_MESSAGE_ID, PRIOR_DELIVERIES

    properties = _text_properties(message)
    raw_session = message.session_id or ""
    session = group_session(raw_session, properties)
    try:
        prior = max(0, int(properties.get(PRIOR_DELIVERIES, "0")))
    except ValueError:
        prior = 0
    enqueued = message.enqueued_time_utc
    return ReceivedMessage(
        body=message.get_body(),
        message_id=properties.get(ORIGINAL_MESSAGE_ID) or message.message_id or "",
        session_id=session,
        delivery_count=max(1, message.delivery_count or 1) + prior,
        enqueued_at=enqueued.timestamp() if enqueued is not None else time.time(),
        lock=TriggeredLock(properties, raw_session, message.sequence_number, message.lock_token),
    )


def _text_properties(message: func.ServiceBusMessage) -> dict[str, str]:
    raw: dict[Any, Any] = dict(message.application_properties or {})
    if not raw:
        raw = dict(message.user_properties or {})

    def text(value: object) -> str:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    return {text(k): text(v) for k, v in raw.items()}


# =========================================================================== runtime


class _Runtime:
    """What a warm worker process keeps between invocations, rebuilt when the
    settings change (tests switch them; Azure restarts the process instead)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue_key: PipelineSettings | None = None
        self._sender: MessageSender | None = None
        self._settlement: Settlement | None = None
        self._closers: list[Any] = []
        self._pipeline_key: tuple[object, ...] | None = None
        self._pipeline: Pipeline | None = None

    def queue(self, pipeline: PipelineSettings) -> tuple[MessageSender, Settlement]:
        """The queue's sender (the webhook) and the settlement of delivered messages."""
        from writeback.adapters.functions_settlement import LocalSettlement, ServiceBusSettlement
        from writeback.bootstrap import build_queue, servicebus_client

        with self._lock:
            if self._queue_key != pipeline or self._sender is None or self._settlement is None:
                self._close_queue()
                if pipeline.queue is QueueKind.LOCAL:
                    from writeback.adapters.local_queue import LocalQueue

                    local = build_queue(pipeline)
                    assert isinstance(local, LocalQueue)
                    self._sender, self._settlement = local, LocalSettlement(local)
                    self._closers = [local]
                else:
                    sender = build_queue(pipeline)
                    settlement = ServiceBusSettlement(
                        servicebus_client(pipeline),
                        pipeline.servicebus_queue,
                        max_delivery_count=pipeline.max_delivery_count,
                    )
                    self._sender, self._settlement = sender, settlement
                    self._closers = [settlement, sender]
                self._queue_key = pipeline
            return self._sender, self._settlement

    def pipeline(self, pipeline: PipelineSettings) -> Pipeline:
        """The pipeline with the app's settings (built on first use, then kept warm);
        it schedules its confirmation reads through the queue's sender."""
        from writeback.bootstrap import build_pipeline

        settings = load_settings()
        sender, _ = self.queue(pipeline)
        key = (settings, pipeline)
        with self._lock:
            if self._pipeline is None or self._pipeline_key != key:
                if self._pipeline is not None:
                    self._pipeline.close()
                    self._pipeline = None
                self._pipeline = build_pipeline(settings, pipeline, sender=sender)
                tune_collector()  # the warm pipeline stays for the process
                self._pipeline_key = key
            return self._pipeline

    def _close_queue(self) -> None:
        for closable in self._closers:
            with contextlib.suppress(Exception):
                closable.close()
        self._closers, self._sender, self._settlement, self._queue_key = [], None, None, None

    def close(self) -> None:
        with self._lock:
            self._close_queue()
            if self._pipeline is not None:
                self._pipeline.close()
            self._pipeline, self._pipeline_key = None, None


_runtime = _Runtime()


def reset() -> None:
    """Close what the process built (tests switch settings between runs)."""
    _runtime.close()


def _pipeline_settings() -> PipelineSettings:
    # The client state is the webhook's business; the trigger and timers need the rest.
    return load_pipeline_settings(require_client_state=False, host=Host.FUNCTIONS)


# =========================================================================== HTTP


def webhook(req: func.HttpRequest, *, endpoint: str) -> func.HttpResponse:
    """The notification and lifecycle URLs: Graph's handshake, changes, lifecycle items."""
    from writeback.service.notifications import enqueue_lifecycle, handle_webhook

    configure_logging()
    try:
        pipeline = load_pipeline_settings(host=Host.FUNCTIONS)
        sender, _ = _runtime.queue(pipeline)
    except WritebackError as error:
        # 503: Graph retries, so nothing is lost while the setting is fixed.
        log.error(
            "webhook %s not ready: %s",
            endpoint,
            error,
            extra={"endpoint": endpoint, "outcome": "unavailable"},
        )
        return func.HttpResponse(status_code=503)
    response = handle_webhook(
        method=req.method,
        query=dict(req.params),
        body=req.get_body(),
        content_type=req.headers.get("content-type"),
        client_state=pipeline.client_states,
        queue=sender,
        on_lifecycle=enqueue_lifecycle(sender),
    )
    return func.HttpResponse(
        body=response.body, status_code=response.status, mimetype=response.content_type
    )


# =========================================================================== worker


def run_worker(messages: Sequence[func.ServiceBusMessage]) -> list[EventOutcome]:
    """Handle one invocation's messages (one session's batch in batch mode, one
    message in single dispatch); every message is settled or the call fails."""
    from writeback.service.handle_event import CONFIG_RETRY_DELAY
    from writeback.service.pipeline import SettlementFailed

    configure_logging()
    received = [from_trigger(m) for m in messages]
    deliveries = max((m.delivery_count for m in received), default=1)
    try:
        _, settlement = _runtime.queue(_pipeline_settings())
    except WritebackError as error:
        _back_off(deliveries, f"the queue cannot be used: {type(error).__name__}: {error}")
        raise
    try:
        pipeline = _runtime.pipeline(_pipeline_settings())
    except ConfigError as error:
        log.error("worker not ready: %s; messages parked", error, extra={"outcome": "parked"})
        for message in received:
            settlement.park(message, delay=CONFIG_RETRY_DELAY)
        return []
    try:
        return pipeline.handle(settlement, received)
    except SettlementFailed as error:
        _back_off(deliveries, str(error))
        raise


def _back_off(deliveries: int, why: str) -> None:
    """Wait before failing the invocation: the host redelivers at once, and every
    redelivery counts against the queue's maxDeliveryCount."""
    delay = min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ** max(deliveries - 1, 0))
    log.error(
        "worker cannot settle (%s); failing the invocation after %.0f s",
        why,
        delay,
        extra={"outcome": "failed", "backoff_s": delay},
    )
    time.sleep(delay)


# =========================================================================== timers


def run_reconcile(*, past_due: bool = False) -> SyncResult | None:
    """The reconcile when one is due (requested, or the interval passed); None when
    none was. Raises when it failed or some writes failed (a failed invocation)."""
    configure_logging()
    pipeline = _runtime.pipeline(_pipeline_settings())
    reason = pipeline.reconcile_due()
    if reason is None:
        log.debug("reconcile timer: nothing due (past_due=%s)", past_due)
        return None
    result = pipeline.reconcile(reason)
    if result is None:
        raise WritebackError(f"reconcile failed: {pipeline.last_reconcile_error}")
    if result.failures:
        raise WritebackError(f"reconcile: {len(result.failures)} operations failed")
    return result


def run_subscription_upkeep() -> SubscriptionStatus:
    """Create the subscription if missing, renew it before it expires."""
    configure_logging()
    return _runtime.pipeline(_pipeline_settings()).subscription_upkeep()
