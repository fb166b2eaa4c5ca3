"""Handlers behind the Function app's entry points (``function_app.py``).

Every handler reads its settings from app settings (the environment), logs
structured lines (``writeback.logging_setup``), and imports the heavy parts
(msgraph-sdk, ldap3, azure-servicebus, tenacity) only when it runs, so a cold
start pays only for the function that was triggered.

HTTP: ``notifications`` and ``lifecycle``
    Both run :func:`writeback.service.notifications.handle_webhook` (the same
    handler serves both URLs). The queue sender is built once per worker process
    and reused. Each group change becomes one message, ``session_id`` = group
    id, ``message_id`` derived from the notifications so Graph's retries are
    dropped by duplicate detection. A lifecycle item is only *enqueued* (Graph
    waits 3 s at most): one control message in the reserved session
    ``writeback-control``, whose message id buckets the event per minute so
    Graph's retries of it collapse. The worker acts on it (below).

Worker: Service Bus queue trigger, sessions, ``cardinality=many``
    With sessions enabled and cardinality many, the Service Bus extension
    accepts one session and hands the function a batch received from that
    session alone (the extension's batch loop: ``AcceptNextSessionAsync`` then
    ``ReceiveMessagesAsync(maxMessageBatchSize, sessionIdleTimeout)``). So one
    invocation = one group's burst, and :func:`process_session` converges it with
    one LDAP write. The price: the batch loop runs one batch at a time per
    instance (``maxConcurrentSessions`` does not apply), and lock renewal does not
    apply to batches, so the queue's lock duration (set it to the maximum, 5
    minutes) has to cover one group; scale-out adds instances. ``host.json`` keeps
    the single-message settings (sessions, lock renewal) sensible too, so
    switching to cardinality one (more parallel groups, a burst then costs
    repeated reads but still one write, as the worker reads current state) is a
    one-line change. The handler groups the batch by session, so it is correct
    whatever the host hands it.

Settlement: host auto-complete plus our own copies (no settlement preview)
    ``azurefunctions-extensions-bindings-servicebus`` (settle and dead-letter
    from Python over the host's gRPC channel) is 1.0.0b2, pulls in the retired
    ``uamqp`` and ``grpcio-tools``, says "message settling is not yet supported"
    on its SDK type, and cannot be exercised outside a real host. So the
    function runs with ``autoCompleteMessages: true`` (the host completes the
    batch when the function returns, abandons it when it raises) and does the
    rest itself through :class:`ServiceBusSettlement`, an EventQueue-compatible
    adapter handed to the worker logic:

    * ``complete``: nothing; the host completes on return.
    * ``abandon(delay)``: a copy of the message is *scheduled* into the same
      session ``delay`` seconds ahead (``ServiceBusSender.schedule_messages``),
      carrying the deliveries so far and the original message id in application
      properties; the host then completes the original. Our count, not the
      broker's, bounds the retries: at ``WRITEBACK_MAX_DELIVERY_COUNT`` (100 by
      default, with waits doubling up to 5 minutes: hours of outage) the message
      is dead-lettered with ``MaxDeliveryCountExceeded``. A transient fault
      therefore never burns the queue's own ``maxDeliveryCount`` within minutes.
    * ``dead_letter(reason, description)``: only a receiver holding the lock
      can dead-letter, and the host holds this one. So a copy goes to a fresh
      *hand-off session* of the same queue, ``<group id>#dl-<random>``, which we
      lock with our own session receiver *before* sending into it (the host's
      "next available session" receivers cannot take a locked session); we
      receive the copy there and dead-letter it with the reason and
      description. It lands in the queue's own dead-letter sub-queue, where
      ``status`` and ``replay`` look; the group id travels in the application
      property ``writeback-session-id`` and the hand-off session starts with the
      group id. A message replayed from there comes back in the hand-off
      session; :func:`from_trigger` restores the group's session from the
      property, and the worker (which reads both sides afresh) converges it.
    * Anything the worker did not settle because of a bug (an exception that
      is not writeback's) is rescheduled like a transient fault, bounded by the
      same count. If a settlement call itself fails (Service Bus unreachable),
      the function raises and the host abandons the batch: it is delivered
      again at once and the queue's own ``maxDeliveryCount`` (10) is the
      backstop, dead-lettering with ``MaxDeliveryCountExceeded``.

    Invariant: every event ends in AD (completed after its write) or in the
    dead-letter sub-queue with a reason. Copies are sent before the original is
    completed, so a crash in between gives a duplicate, never a loss; the worker
    is idempotent, so a duplicate writes nothing.

    With ``WRITEBACK_QUEUE=local`` (tests, and a dev box without a namespace)
    the same worker settles on the embedded :class:`LocalQueue` instead, by the
    lock token and sequence number the caller hands over (:class:`LocalSettlement`).

Lifecycle events
    ``reauthorizationRequired`` (the only one Graph sends for groups):
    reauthorize, else renew, else recreate (``handle_lifecycle``).
    ``subscriptionRemoved`` and ``missed``: recreate and reconcile. The control
    message is handled by the worker in the ``writeback-control`` session, so
    lifecycle work and the reconciles it asks for run one at a time. A
    reconcile is skipped when one that started after the control message was
    enqueued has finished in this process (a redelivery or a burst of requests
    costs one reconcile). Transient Graph faults reschedule the control message;
    permanent ones dead-letter it.

Timers
    ``reconcile`` (``%WRITEBACK_RECONCILE_SCHEDULE%``): the full sync.
    ``subscription_upkeep`` (``%WRITEBACK_SUBSCRIPTION_SCHEDULE%``): create the
    subscription if missing, renew before expiry (``ensure_subscription`` with
    ``WRITEBACK_NOTIFICATION_URL``, ``WRITEBACK_LIFECYCLE_URL`` and the client
    state); a new subscription is followed by a reconcile in the same run, as
    changes before it may never have been notified.

Pause switch (``WRITEBACK_PAUSED=true``)
    The webhook keeps enqueuing; the worker writes nothing and reschedules each
    group message ``PAUSE_DELAY`` seconds ahead without counting it as an
    attempt (on Service Bus; the local queue counts every delivery);
    lifecycle handling goes on (the subscription must stay alive) but any
    reconcile only plans; the reconcile timer plans and logs what it would do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol

import azure.functions as func

from writeback.config import (
    GraphAuth,
    PipelineSettings,
    QueueKind,
    Settings,
    load_pipeline_settings,
    load_settings,
)
from writeback.domain import events
from writeback.errors import (
    ConfigError,
    PermanentError,
    PoisonEvent,
    TransientError,
    WritebackError,
)
from writeback.logging_setup import configure_logging
from writeback.ports import DeadLetter, EventQueue, OutgoingMessage, ReceivedMessage

if TYPE_CHECKING:
    from azure.servicebus import ServiceBusClient, ServiceBusSender

    from writeback.adapters.local_queue import LocalQueue
    from writeback.service.handle_event import EventOutcome, WorkerContext
    from writeback.service.notifications import LifecycleEvent
    from writeback.service.reconcile import SyncResult
    from writeback.service.subscriptions import SubscriptionStatus

log = logging.getLogger("writeback.functions")

#: The session of control messages (lifecycle events, reconcile requests).
CONTROL_SESSION: Final = "writeback-control"
#: Application property: the group session of a message sent to a hand-off session.
SESSION_PROPERTY: Final = "writeback-session-id"
#: Marks a hand-off session id: ``<group id>#dl-<random>``.
HANDOFF_MARK: Final = events.HANDOFF_MARK
#: Paused: how far ahead a group message is rescheduled.
PAUSE_DELAY: Final = 300.0
#: Shortest wait of a rescheduled copy (Service Bus schedules to the second).
MIN_RESCHEDULE: Final = 1.0
#: How long the hand-off waits for its own copy to arrive in the locked session.
HANDOFF_WAIT: Final = 5.0
_MAX_ID: Final = 128
_MAX_DEAD_LETTER_TEXT: Final = 4096
_MAX_DELIVERY_COUNT_EXCEEDED: Final = "MaxDeliveryCountExceeded"
_OWN_PROPERTIES: Final = frozenset(
    {"writeback-prior-deliveries", "writeback-message-id", SESSION_PROPERTY}
)


# =========================================================================== settings


def pipeline_settings(*, require_client_state: bool = True) -> PipelineSettings:
    """Pipeline settings; the namespace defaults to the trigger connection's.

    The trigger's identity-based connection is ``WRITEBACK_SERVICEBUS__fullyQualifiedNamespace``
    (read by the host); our own SDK client uses ``WRITEBACK_SERVICEBUS_NAMESPACE``
    and falls back to the same value, so the namespace is set once.
    """
    env = dict(os.environ)
    trigger_namespace = env.get("WRITEBACK_SERVICEBUS__fullyQualifiedNamespace")
    if trigger_namespace and not env.get("WRITEBACK_SERVICEBUS_NAMESPACE"):
        env["WRITEBACK_SERVICEBUS_NAMESPACE"] = trigger_namespace
    return load_pipeline_settings(env, require_client_state=require_client_state)


# =========================================================================== messages


@dataclass(frozen=True)
class TriggeredLock:
    """What the host handed over with a message, for settling it."""

    properties: dict[str, str]
    session_id: str
    sequence_number: int | None = None
    lock_token: str | None = None


def from_trigger(message: func.ServiceBusMessage) -> ReceivedMessage:
    """Our view of a message the host delivered (same rules as ``from_servicebus_message``).

    ``delivery_count`` is the host's (1 on first delivery) plus the deliveries a
    rescheduled copy carries; ``message_id`` is the original one; a message in a
    hand-off session gets its group's session back.
    """
    properties = _text_properties(message)
    raw_session = message.session_id or ""
    session = raw_session
    if HANDOFF_MARK in raw_session:
        session = properties.get(SESSION_PROPERTY) or raw_session.split(HANDOFF_MARK, 1)[0]
    try:
        prior = max(0, int(properties.get("writeback-prior-deliveries", "0")))
    except ValueError:
        prior = 0
    enqueued = message.enqueued_time_utc
    return ReceivedMessage(
        body=message.get_body(),
        message_id=properties.get("writeback-message-id") or message.message_id or "",
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


def _lock_of(message: ReceivedMessage) -> TriggeredLock:
    if not isinstance(message.lock, TriggeredLock):
        raise PermanentError("this message was not delivered by the Functions host")
    return message.lock


def _copy(
    message: ReceivedMessage, *, tag: str, session_id: str, prior: int, extra: dict[str, str]
) -> OutgoingMessage:
    from writeback.adapters.servicebus import derived_message_id

    properties = {k: v for k, v in _lock_of(message).properties.items() if k not in _OWN_PROPERTIES}
    properties["writeback-message-id"] = message.message_id
    if prior > 0:
        properties["writeback-prior-deliveries"] = str(prior)
    properties.update(extra)
    return OutgoingMessage(
        body=message.body,
        message_id=derived_message_id(message.message_id, tag),
        session_id=session_id,
        application_properties=properties,
    )


def handoff_session_id(session_id: str) -> str:
    """A fresh session id for one dead-letter hand-off, starting with the group's."""
    suffix = HANDOFF_MARK + uuid.uuid4().hex[:12]
    if len(session_id) + len(suffix) > _MAX_ID:
        session_id = hashlib.sha256(session_id.encode()).hexdigest()
    return session_id + suffix


# =========================================================================== settlement


class Settlement(Protocol):
    """How messages the host delivered are settled (the queue-specific half)."""

    def complete(self, message: ReceivedMessage) -> None: ...

    def abandon(self, message: ReceivedMessage, *, delay: float = 0.0) -> None: ...

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None: ...

    def park(self, message: ReceivedMessage, *, delay: float) -> None:
        """Put back for later without counting a delivery (the pause switch)."""
        ...


class ServiceBusSettlement:
    """Settlement of host-delivered Service Bus messages (see the module docstring)."""

    def __init__(
        self,
        client: ServiceBusClient,
        queue_name: str,
        *,
        max_delivery_count: int,
        handoff_wait: float = HANDOFF_WAIT,
    ) -> None:
        self._client = client
        self.queue_name = queue_name
        self.max_delivery_count = max_delivery_count
        self.handoff_wait = handoff_wait
        self._sender: ServiceBusSender | None = None
        self._lock = threading.Lock()

    def complete(self, message: ReceivedMessage) -> None:
        """Nothing to do: the host completes the batch when the function returns."""
        _lock_of(message)

    def abandon(self, message: ReceivedMessage, *, delay: float = 0.0) -> None:
        count = message.delivery_count
        if count >= self.max_delivery_count:
            self.dead_letter(
                message,
                _MAX_DELIVERY_COUNT_EXCEEDED,
                f"Message could not be consumed after {count} delivery attempts.",
            )
            return
        copy = _copy(message, tag=f"d{count}", session_id=message.session_id, prior=count, extra={})
        self._schedule(copy, max(delay, MIN_RESCHEDULE))

    def park(self, message: ReceivedMessage, *, delay: float) -> None:
        count = message.delivery_count
        tag = f"p{count}-{uuid.uuid4().hex[:8]}"
        copy = _copy(message, tag=tag, session_id=message.session_id, prior=count - 1, extra={})
        self._schedule(copy, max(delay, MIN_RESCHEDULE))

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        """Hand a copy to a session we hold, and dead-letter it there with the reason."""
        from azure.servicebus import ServiceBusReceiveMode

        from writeback.adapters.servicebus import to_servicebus_message

        session = handoff_session_id(message.session_id)
        copy = _copy(
            message,
            tag="x" + session.rsplit(HANDOFF_MARK, 1)[1],
            session_id=session,
            prior=message.delivery_count - 1,
            extra={SESSION_PROPERTY: message.session_id},
        )
        outgoing = to_servicebus_message(copy)
        with _servicebus_errors()("dead-letter"):
            receiver = self._client.get_queue_receiver(
                self.queue_name,
                session_id=session,
                receive_mode=ServiceBusReceiveMode.PEEK_LOCK,
                max_wait_time=self.handoff_wait,
                prefetch_count=0,
            )
            with receiver:  # attaching the link locks the (still empty) session
                self._send(outgoing)
                received = receiver.receive_messages(
                    max_message_count=1, max_wait_time=self.handoff_wait
                )
                if not received:
                    from writeback.errors import QueueUnavailable

                    raise QueueUnavailable(
                        f"dead-letter hand-off of {message.message_id} did not arrive in {session}"
                    )
                receiver.dead_letter_message(
                    received[0],
                    reason=reason[:_MAX_DEAD_LETTER_TEXT],
                    error_description=description[:_MAX_DEAD_LETTER_TEXT],
                )

    def _schedule(self, copy: OutgoingMessage, delay: float) -> None:
        from writeback.adapters.servicebus import to_servicebus_message

        when = datetime.now(UTC) + timedelta(seconds=delay)
        outgoing = to_servicebus_message(copy)
        with _servicebus_errors()("reschedule"), self._lock:
            self._get_sender().schedule_messages(outgoing, when)

    def _send(self, outgoing: Any) -> None:
        with self._lock:
            self._get_sender().send_messages(outgoing)

    def _get_sender(self) -> ServiceBusSender:
        if self._sender is None:
            self._sender = self._client.get_queue_sender(self.queue_name)
        return self._sender

    def close(self) -> None:
        if self._sender is not None:
            with contextlib.suppress(Exception):
                self._sender.close()
            self._sender = None


def _servicebus_errors() -> Callable[[str], contextlib.AbstractContextManager[None]]:
    """The Service Bus adapter's error translation, imported only when Service Bus is used."""
    from writeback.adapters.servicebus import translated_errors

    return translated_errors


class LocalSettlement:
    """Settlement on the embedded queue, by the lock token and sequence number the
    caller (a test host, or any process holding the session) handed over."""

    def __init__(self, queue: LocalQueue) -> None:
        self._queue = queue

    def _local(self, message: ReceivedMessage) -> ReceivedMessage:
        from writeback.adapters.local_queue import LocalLock
        from writeback.errors import LockLost

        lock = _lock_of(message)
        if lock.sequence_number is None or not lock.lock_token:
            raise LockLost("the host handed over no lock token for this message")
        return replace(message, lock=LocalLock(lock.sequence_number, lock.lock_token))

    def complete(self, message: ReceivedMessage) -> None:
        self._queue.complete(self._local(message))

    def abandon(self, message: ReceivedMessage, *, delay: float = 0.0) -> None:
        self._queue.abandon(self._local(message), delay=delay)

    def park(self, message: ReceivedMessage, *, delay: float) -> None:
        self._queue.abandon(self._local(message), delay=delay)

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        self._queue.dead_letter(self._local(message), reason, description)


class TriggerBatch:
    """An ``EventQueue`` over the messages of one invocation.

    ``receive_session`` hands out the batch (once), settling goes through the
    :class:`Settlement`, ``release_session`` is the host's business, and sending
    and dead-letter reads go to the queue itself. It remembers which messages
    were settled, so a handler that failed half-way can settle the rest.
    """

    def __init__(
        self, messages: Sequence[ReceivedMessage], settlement: Settlement, queue: EventQueue
    ) -> None:
        self._pending = list(messages)
        self._messages = list(messages)
        self._settlement = settlement
        self._queue = queue
        self._settled: set[int] = set()
        #: Set when a settlement call failed: the host has to abandon the batch.
        self.settlement_failed = False

    def unsettled(self) -> list[ReceivedMessage]:
        return [m for m in self._messages if id(m) not in self._settled]

    def _settle(self, message: ReceivedMessage, action: Any, *args: Any, **kwargs: Any) -> None:
        try:
            action(message, *args, **kwargs)
        except Exception:
            self.settlement_failed = True
            raise
        self._settled.add(id(message))

    # -- EventQueue ------------------------------------------------------------

    def send(self, messages: list[OutgoingMessage]) -> None:
        self._queue.send(messages)

    def receive_session(self, max_messages: int, wait: float) -> list[ReceivedMessage]:
        taken, self._pending = self._pending[:max_messages], self._pending[max_messages:]
        return taken

    def complete(self, message: ReceivedMessage) -> None:
        self._settle(message, self._settlement.complete)

    def abandon(self, message: ReceivedMessage, *, delay: float = 0.0) -> None:
        self._settle(message, self._settlement.abandon, delay=delay)

    def park(self, message: ReceivedMessage, *, delay: float) -> None:
        self._settle(message, self._settlement.park, delay=delay)

    def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        self._settle(message, self._settlement.dead_letter, reason, description)

    def release_session(self, session_id: str) -> None:
        """The host owns the session; it releases it after the invocation."""

    def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        return self._queue.dead_letters(limit)

    def resubmit(self, dead_letter: DeadLetter) -> None:
        self._queue.resubmit(dead_letter)

    def depth(self) -> int:
        return self._queue.depth()


# =========================================================================== runtime


class _Runtime:
    """The queue (and its settlement) built once per worker process, lazily."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[object, ...] | None = None
        self._queue: EventQueue | None = None
        self._settlement: Settlement | None = None
        self._closers: list[Any] = []

    def get(self, pipeline: PipelineSettings) -> tuple[EventQueue, Settlement]:
        key = (
            pipeline.queue,
            pipeline.queue_path,
            pipeline.servicebus_namespace,
            pipeline.servicebus_connection,
            pipeline.servicebus_queue,
            pipeline.max_delivery_count,
        )
        with self._lock:
            if self._key != key or self._queue is None or self._settlement is None:
                self._close()
                self._queue, self._settlement = self._build(pipeline)
                self._key = key
            return self._queue, self._settlement

    def _build(self, pipeline: PipelineSettings) -> tuple[EventQueue, Settlement]:
        if pipeline.queue is QueueKind.LOCAL:
            from writeback.adapters.local_queue import LocalQueue
            from writeback.wiring import build_queue

            local = build_queue(pipeline)
            assert isinstance(local, LocalQueue)
            self._closers = [local]
            return local, LocalSettlement(local)
        from writeback.adapters.servicebus import ServiceBusQueue

        client = servicebus_client(pipeline)
        queue = ServiceBusQueue(
            client, pipeline.servicebus_queue, max_delivery_count=pipeline.max_delivery_count
        )
        settlement = ServiceBusSettlement(
            client, pipeline.servicebus_queue, max_delivery_count=pipeline.max_delivery_count
        )
        self._closers = [settlement, queue]
        return queue, settlement

    def _close(self) -> None:
        for closable in self._closers:
            with contextlib.suppress(Exception):
                closable.close()
        self._closers, self._queue, self._settlement, self._key = [], None, None, None

    def close(self) -> None:
        with self._lock:
            self._close()


_runtime = _Runtime()


def reset() -> None:
    """Close what the process built (tests switch settings between runs)."""
    global _DELETES  # noqa: PLW0603
    _runtime.close()
    _schema_cache.clear()
    _reconciles.last_started = 0.0
    _DELETES = None


def servicebus_client(pipeline: PipelineSettings) -> ServiceBusClient:
    """Our own Service Bus client: the connection string if set (emulator), else the
    namespace with the app's identity (the credential ``WRITEBACK_GRAPH_AUTH`` names)."""
    from azure.servicebus import ServiceBusClient

    if pipeline.servicebus_connection:
        with _servicebus_errors()("connect"):
            return ServiceBusClient.from_connection_string(pipeline.servicebus_connection)
    if not pipeline.servicebus_namespace:
        raise ConfigError("WRITEBACK_SERVICEBUS_NAMESPACE is not set")
    from writeback.wiring import sync_credential

    raw = os.environ.get("WRITEBACK_GRAPH_AUTH", "").strip().lower()
    try:
        auth = GraphAuth(raw) if raw else GraphAuth.MANAGED_IDENTITY
    except ValueError:
        raise ConfigError(f"WRITEBACK_GRAPH_AUTH={raw!r} is not a known mode") from None
    return ServiceBusClient(pipeline.servicebus_namespace, sync_credential(auth))


# =========================================================================== HTTP


def webhook(req: func.HttpRequest, *, endpoint: str) -> func.HttpResponse:
    """The notification and lifecycle URLs: Graph's handshake, changes, lifecycle items."""
    from writeback.service.notifications import handle_webhook

    configure_logging()
    try:
        pipeline = pipeline_settings()
        queue, _ = _runtime.get(pipeline)
    except WritebackError as error:
        # 503: Graph retries, so nothing is lost while the setting is fixed.
        log.error(
            "webhook %s not ready: %s",
            endpoint,
            error,
            extra={"endpoint": endpoint, "outcome": "unavailable"},
        )
        return func.HttpResponse(status_code=503)

    def on_lifecycle(event: LifecycleEvent) -> None:
        queue.send([lifecycle_message(event, time.time())])

    response = handle_webhook(
        method=req.method,
        query=dict(req.params),
        body=req.get_body(),
        content_type=req.headers.get("content-type"),
        client_state=pipeline.client_states,
        queue=queue,
        on_lifecycle=on_lifecycle,
    )
    return func.HttpResponse(
        body=response.body, status_code=response.status, mimetype=response.content_type
    )


def lifecycle_message(event: LifecycleEvent, now: float) -> OutgoingMessage:
    """The control message for one lifecycle item; Graph's retries within a minute
    get the same message id (dropped by duplicate detection)."""
    key = f"{event.event}|{event.subscription_id}|{int(now // 60)}"
    message_id = "lc-" + hashlib.sha256(key.encode()).hexdigest()[:40]
    body = {
        "kind": "lifecycle",
        "event": event.event,
        "subscription_id": event.subscription_id,
        "received_at": now,
    }
    return OutgoingMessage(
        body=json.dumps(body, separators=(",", ":")).encode(),
        message_id=message_id,
        session_id=CONTROL_SESSION,
    )


# =========================================================================== worker


_schema_lock = threading.Lock()
_schema_cache: dict[tuple[str, str], frozenset[str]] = {}


def _schema_attributes(settings: Settings, directory: Any) -> frozenset[str]:
    """The forest's optional group attributes, read once per process."""
    key = (settings.ldap_url, settings.target_ou)
    with _schema_lock:
        cached = _schema_cache.get(key)
    if cached is None:
        cached = frozenset(directory.schema_attributes())
        with _schema_lock:
            _schema_cache[key] = cached
    return cached


def run_worker(messages: Sequence[func.ServiceBusMessage]) -> list[EventOutcome]:
    """Handle one invocation's messages: group sessions, then control messages."""
    configure_logging()
    # The client state is the webhook's business (and the control path checks it).
    pipeline = pipeline_settings(require_client_state=False)
    queue, settlement = _runtime.get(pipeline)
    sessions: dict[str, list[ReceivedMessage]] = {}
    for message in messages:
        received = from_trigger(message)
        sessions.setdefault(received.session_id, []).append(received)
    control = sessions.pop(CONTROL_SESSION, [])
    outcomes: list[EventOutcome] = []
    if sessions:
        if pipeline.paused:
            _park(sessions, settlement, queue)
        else:
            outcomes = _run_groups(sessions, settlement, queue)
    if control:
        _run_control(control, settlement, queue, pipeline)
    return outcomes


def _park(
    sessions: dict[str, list[ReceivedMessage]], settlement: Settlement, queue: EventQueue
) -> None:
    for session, batch in sessions.items():
        tb = TriggerBatch(batch, settlement, queue)
        for message in batch:
            tb.park(message, delay=PAUSE_DELAY)
        log.info(
            "group %s: paused, %d messages kept for %.0f s",
            session,
            len(batch),
            PAUSE_DELAY,
            extra={
                "group_id": session,
                "operation": "none",
                "outcome": "paused",
                "messages": len(batch),
            },
        )


def _run_groups(
    sessions: dict[str, list[ReceivedMessage]], settlement: Settlement, queue: EventQueue
) -> list[EventOutcome]:
    from writeback.service.handle_event import redelivery_delay

    try:
        settings = load_settings()
        cloud, directory, ctx = _worker_context(settings)
    except Exception as error:
        # Not the events' fault (a setting, the DC or Graph unreachable): they wait.
        log.error("worker not ready: %s: %s", type(error).__name__, error)
        for batch in sessions.values():
            tb = TriggerBatch(batch, settlement, queue)
            for message in batch:
                tb.abandon(message, delay=redelivery_delay(message.delivery_count))
        return []
    outcomes: list[EventOutcome] = []
    try:
        for batch in sessions.values():
            outcome = _run_session(batch, settlement, queue, ctx)
            if outcome is not None:
                outcomes.append(outcome)
    finally:
        with contextlib.suppress(Exception):
            directory.close()
        with contextlib.suppress(Exception):
            cloud.close()
    return outcomes


def _worker_context(settings: Settings) -> tuple[Any, Any, WorkerContext]:
    from writeback.service.handle_event import WorkerContext
    from writeback.wiring import build_cloud, build_directory

    cloud = build_cloud(settings)
    try:
        directory = build_directory(settings)
    except BaseException:
        cloud.close()
        raise
    try:
        options = settings.mapping(_schema_attributes(settings, directory))
    except BaseException:
        directory.close()
        cloud.close()
        raise
    ctx = WorkerContext(
        cloud,
        directory,
        options,
        soft_delete=settings.soft_delete,
        enabled=settings.enabled,
        links=_delta_links(),
        deletes=_event_deletes(settings.delete_threshold),
    )
    return cloud, directory, ctx


_LINKS: Any = None
_DELETES: Any = None


def _event_deletes(threshold: int) -> Any:
    """The worker's delete cap, counted per warm instance across invocations."""
    global _DELETES  # noqa: PLW0603 - one count per warm instance
    if _DELETES is None:
        from writeback.service.handle_event import event_deletes

        _DELETES = event_deletes(threshold)
    return _DELETES


def _delta_links() -> Any:
    """The per-group delta links this instance keeps while it is warm (in memory:
    a cold instance reads each group in full once, then events cost what changed)."""
    global _LINKS  # noqa: PLW0603 - one store per warm instance, across invocations
    if _LINKS is None:
        from writeback.adapters.delta_store import MemoryDeltaLinks

        _LINKS = MemoryDeltaLinks()
    return _LINKS


def _run_session(
    batch: list[ReceivedMessage], settlement: Settlement, queue: EventQueue, ctx: WorkerContext
) -> EventOutcome | None:
    from writeback.service.handle_event import process_session, redelivery_delay

    tb = TriggerBatch(batch, settlement, queue)
    try:
        return process_session(tb, batch, ctx)
    except Exception as error:
        if tb.settlement_failed:
            raise  # the host abandons the batch; it comes back at once
        # A bug or an unmapped library error: treat like a transient fault.
        log.exception(
            "group %s: unexpected %s; rescheduled",
            batch[0].session_id,
            type(error).__name__,
            extra={"group_id": batch[0].session_id, "operation": "none", "outcome": "abandoned"},
        )
        for message in tb.unsettled():
            tb.abandon(message, delay=redelivery_delay(message.delivery_count))
        return None


# =========================================================================== control


@dataclass(frozen=True)
class ControlRequest:
    kind: str  # "lifecycle" | "reconcile"
    event: str | None = None
    subscription_id: str | None = None
    reason: str = ""

    @classmethod
    def from_json(cls, body: bytes) -> ControlRequest:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise PoisonEvent("control message is not JSON") from None
        if not isinstance(data, dict):
            raise PoisonEvent("control message is not a JSON object")
        kind = data.get("kind")
        if kind == "reconcile":
            return cls("reconcile", reason=str(data.get("reason", ""))[:200])
        if kind == "lifecycle":
            event, subscription_id = data.get("event"), data.get("subscription_id")
            if not isinstance(event, str) or not isinstance(subscription_id, str):
                raise PoisonEvent("lifecycle control message without event or subscription")
            return cls("lifecycle", event=event, subscription_id=subscription_id)
        raise PoisonEvent(f"unknown control message kind {kind!r}")


class _Reconciles:
    """One reconcile at a time per process, and when the last finished one started."""

    lock = threading.Lock()
    #: Unix seconds; a control message enqueued before this needs no new reconcile.
    last_started = 0.0


_reconciles = _Reconciles()


def _run_control(
    batch: list[ReceivedMessage],
    settlement: Settlement,
    queue: EventQueue,
    pipeline: PipelineSettings,
) -> None:
    from writeback.service.handle_event import redelivery_delay

    tb = TriggerBatch(batch, settlement, queue)
    requests: list[tuple[ReceivedMessage, ControlRequest]] = []
    for message in batch:
        try:
            requests.append((message, ControlRequest.from_json(message.body)))
        except PoisonEvent as error:
            tb.dead_letter(message, "PoisonEvent", str(error))
    if not requests:
        return
    started = time.perf_counter()
    try:
        reasons = _act_on_control([r for _, r in requests], pipeline)
        oldest = min(m.enqueued_at for m, _ in requests)
        if reasons and _reconciles.last_started <= oldest:
            run_reconcile(reason=", ".join(sorted(reasons)), raise_on_failures=False)
    except TransientError as error:
        for message, _ in requests:
            tb.abandon(message, delay=redelivery_delay(message.delivery_count, error.retry_after))
        outcome, detail = "abandoned", f"{type(error).__name__}: {error}"
    except PermanentError as error:
        for message, _ in requests:
            tb.dead_letter(message, type(error).__name__, str(error))
        outcome, detail = "dead-lettered", f"{type(error).__name__}: {error}"
    else:
        for message, _ in requests:
            tb.complete(message)
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


def _act_on_control(requests: list[ControlRequest], pipeline: PipelineSettings) -> set[str]:
    """Run the lifecycle handling; the reasons a reconcile is needed (empty: none)."""
    from writeback.service.notifications import LifecycleEvent
    from writeback.service.subscriptions import handle_lifecycle
    from writeback.wiring import build_cloud

    reasons = {f"requested: {r.reason}" for r in requests if r.kind == "reconcile"}
    lifecycle = [r for r in requests if r.kind == "lifecycle"]
    if not lifecycle:
        return reasons
    notification_url = _required_url(pipeline.notification_url, "WRITEBACK_NOTIFICATION_URL")
    if not pipeline.client_states:
        raise ConfigError("WRITEBACK_CLIENT_STATE is not set")
    cloud = build_cloud(load_settings())
    try:
        seen: set[tuple[str, str]] = set()
        for request in lifecycle:
            assert request.event is not None and request.subscription_id is not None
            if (request.event, request.subscription_id) in seen:
                continue
            seen.add((request.event, request.subscription_id))
            outcome = handle_lifecycle(
                cloud,
                LifecycleEvent(request.subscription_id, request.event),
                notification_url=notification_url,
                lifecycle_url=pipeline.lifecycle_url,
                client_state=pipeline.client_states[0],
                now=datetime.now(UTC),
            )
            if outcome.reconcile_needed:
                reasons.add(f"lifecycle {request.event}")
    finally:
        cloud.close()
    return reasons


def _required_url(value: str | None, name: str) -> str:
    if not value:
        raise ConfigError(f"{name} is not set")
    return value


# =========================================================================== timers


def run_reconcile(
    *, past_due: bool = False, reason: str = "schedule", raise_on_failures: bool = True
) -> SyncResult:
    """The full sync; with the pause switch on, it plans and logs but writes nothing."""
    from writeback.service.reconcile import SyncPolicy, SyncResult, apply_plan, plan_sync
    from writeback.wiring import build_cloud, build_directory

    configure_logging()
    settings = load_settings()
    pipeline = pipeline_settings(require_client_state=False)
    paused = pipeline.paused
    policy = SyncPolicy.from_settings(settings)
    started_at = time.time()
    with _reconciles.lock:
        cloud = build_cloud(settings)
        try:
            directory = build_directory(settings)
            try:
                if not paused and _state_kept(pipeline):
                    result = _reconcile_with_state(cloud, directory, settings, policy, pipeline)
                else:
                    plan = plan_sync(cloud, directory, settings.mapping(), policy)
                    result = SyncResult(plan) if paused else apply_plan(plan, directory)
            finally:
                directory.close()
        finally:
            cloud.close()
        _reconciles.last_started = max(_reconciles.last_started, started_at)
    plan = result.plan
    log.info(
        "reconcile %s (%s): %d operations planned, %d failures",
        "paused, nothing written" if paused else "done",
        reason,
        len(plan.operations),
        len(result.failures),
        extra={
            "reconcile_reason": reason,
            "past_due": past_due,
            "paused": paused,
            "planned": len(plan.operations),
            "applied": result.applied,
            "ldap_requests": result.ldap_requests,
            "failures": len(result.failures),
            "deletes_blocked": plan.deletes_blocked,
            "seconds": round(result.seconds, 3),
        },
    )
    if result.failures and raise_on_failures:
        raise WritebackError(f"reconcile: {len(result.failures)} operations failed")
    return result


def _state_kept(pipeline: PipelineSettings) -> bool:
    """Incremental reconcile needs somewhere to keep its delta link between runs: a
    state file that outlives the instance (on Linux plans, a path under /home, which
    the platform keeps on shared storage), named by WRITEBACK_STATE_PATH."""
    return pipeline.reconcile_incremental and bool(os.environ.get("WRITEBACK_STATE_PATH"))


def _reconcile_with_state(
    cloud: Any, directory: Any, settings: Settings, policy: Any, pipeline: PipelineSettings
) -> SyncResult:
    """Read only what changed since the kept delta link (full when none, on 410, or
    every WRITEBACK_FULL_SYNC_EVERY runs), and keep the link and the result for status."""
    from writeback.service.incremental import DeltaState, run_incremental
    from writeback.service.status import StateFile, iso

    state = StateFile(pipeline.state_path)
    started = datetime.now(UTC)
    options = replace(settings.mapping(), schema_attributes=directory.schema_attributes())
    outcome, delta = run_incremental(
        cloud,
        directory,
        options,
        policy,
        DeltaState.load(state),
        full_every=pipeline.full_sync_every,
        full_max_age=timedelta(days=1),
        started=started,
    )
    result = outcome.result
    state.update(
        delta=delta.record(outcome),
        last_reconcile={
            "at": iso(started),
            "seconds": round(result.seconds, 3),
            "applied": dict(result.applied),
            "ldap_requests": result.ldap_requests,
            "failures": len(result.failures),
            "deletes_blocked": result.plan.deletes_blocked,
            "error": None,
        },
    )
    return result


def run_subscription_upkeep() -> SubscriptionStatus:
    """Create the subscription if missing, renew it before it expires; a new one
    is followed by a reconcile (changes before it were never notified)."""
    from writeback.service.subscriptions import ensure_subscription
    from writeback.wiring import build_cloud

    configure_logging()
    settings = load_settings()
    pipeline = pipeline_settings()
    notification_url = _required_url(pipeline.notification_url, "WRITEBACK_NOTIFICATION_URL")
    cloud = build_cloud(settings)
    try:
        status = ensure_subscription(
            cloud,
            notification_url=notification_url,
            lifecycle_url=pipeline.lifecycle_url,
            client_state=pipeline.client_states[0],
            now=datetime.now(UTC),
        )
    finally:
        cloud.close()
    if status.reconcile_needed:
        run_reconcile(reason=f"subscription {status.action.value}")
    return status
