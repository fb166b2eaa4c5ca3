"""The Functions host's Service Bus trigger, reproduced over the embedded queue.

:class:`FunctionsHost` runs a Service Bus-triggered function (the app's own
``worker``, from ``function_app.app.get_functions()`` via :func:`app_functions`,
or any callable) over the real :class:`~writeback.adapters.local_queue.LocalQueue`
file the app uses with ``WRITEBACK_QUEUE=local``, and behaves as the WebJobs
Service Bus extension 5.x does with sessions. The function gets what the worker
would hand it (:mod:`tests.support.functions_wire`). Durations can be shrunk
together (``time_scale``) so lock expiry really bites in a test of seconds.

What the extension does, read from its source (Azure/azure-sdk-for-net,
``sdk/servicebus/Microsoft.Azure.WebJobs.Extensions.ServiceBus/src`` and, for
the processor, ``sdk/servicebus/Azure.Messaging.ServiceBus/src/Processor``):

Batch dispatch, ``cardinality=many`` (``ServiceBusListener.RunBatchReceiveLoopAsync``)
    One loop per listener, so **one session at a time per instance**: when it
    holds no session it calls ``AcceptNextSessionAsync`` (a receiver options
    object with nothing but ``PrefetchCount``: no lock renewal), then
    ``ReceiveMessagesAsync(maxMessageBatchSize, sessionIdleTimeout)``. A
    non-empty receive invokes the function once with the whole batch; when the
    invocation succeeded and ``autoCompleteMessages`` is on, every message not
    settled through the function's own message actions is completed
    (``Task.WhenAll``); when it failed, every such message is abandoned,
    whatever ``autoCompleteMessages`` says. The session is **kept** for the
    next receive; only an empty receive closes it (releasing the lock). An
    exception in the loop, a failed completion included, is logged and the
    session receiver closed. Abandoned messages are therefore received again
    at once by the same loop, delivery count + 1: a failing invocation is
    **retried immediately** until the broker dead-letters the messages at the
    queue's ``maxDeliveryCount``. The session lock is **never renewed**: the
    queue's lock duration (5 minutes at most on Service Bus) must cover the
    whole hold, every batch of it. ``maxConcurrentSessions``,
    ``maxConcurrentCallsPerSession`` and ``maxAutoLockRenewalDuration`` are
    documented as not applying to batch functions (``Config/ServiceBusOptions.cs``)
    and this loop indeed never reads them.
Single dispatch, ``cardinality=one`` (``SessionReceiverManager``, ``ReceiverManager``)
    ``maxConcurrentSessions`` session receivers, each: accept the next session,
    then receive one message at a time (``maxConcurrentCallsPerSession`` 1)
    waiting ``sessionIdleTimeout``; an empty receive closes the session and
    the receiver accepts another. A message whose invocation succeeded is
    completed (``AutoCompleteMessages``); one whose invocation failed is
    abandoned (the extension's ``SessionMessageProcessor`` rethrows the
    function's exception to the processor, which abandons unless the lock was
    lost) and the same receiver gets it again at once, delivery count + 1.
    Lock renewal: a session receiver renews the **session** lock
    (``RenewSessionLock``), not message locks (``ProcessOneMessage`` renews a
    message lock only ``if (!Receiver.IsSessionReceiver ...)``; in a session
    the session lock covers its messages). It renews when the remaining lock
    time minus min(half of it, 10 s) has passed (``CalculateRenewDelay``; at
    once below 400 ms left), and stops ``maxAutoLockRenewalDuration`` after the
    session was **accepted** (``CancelAfter`` on the renewal task started at
    accept), so a session held longer than that loses its lock. A
    ``SessionLockLost`` ends the session's loop; a message lock lost on
    completion (the message was settled already) does not.
Settings (``Config/ServiceBusOptions.cs``)
    ``maxMessageBatchSize`` 1000, ``maxConcurrentSessions`` 8,
    ``maxAutoLockRenewalDuration`` 5 minutes, ``autoCompleteMessages`` true
    (the binding's ``autoCompleteMessages`` wins), ``sessionIdleTimeout``
    defaults to ``clientRetryOptions.tryTimeout`` (60 s), ``prefetchCount`` 0.

Where this differs: no prefetch, no ``minMessageBatchSize`` cache, no dynamic
concurrency, no ``maxConcurrentCallsPerSession`` above 1 (each refused when
host.json asks for it); accepting a session and its first receive are one
step (LocalQueue only hands out sessions that have a due message, and Service
Bus's accept does not return an empty session either); no function timeout;
the queue is a file on this machine, so settlement takes microseconds, not a
network round trip. Settling through the function's own message actions does
not exist for this app, so every message the function settled by other means
(the app's local settlement) makes the host's completion fail, as it would on
Service Bus: it is counted in ``settle_failures`` and, in batch mode, closes
the session.

Each concurrency slot (the batch loop, or one session receiver) opens its own
LocalQueue on the file, as each Service Bus receiver has its own link.

Use::

    host = FunctionsHost.for_app(queue_path, time_scale=0.01)  # the app's worker
    host.queue.send([...])
    stats = host.run_until_idle(timeout=30)
    assert stats.overlaps == 0 and stats.lock_losses == 0
    host.close()

``for_app(..., cardinality="one", function=one_at_a_time(worker))`` runs the same
worker in single dispatch; ``instances=2`` adds a scaled-out instance;
``host.invocations`` lists every call (session, ids, delivery counts, timing,
what the host did after it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, cast

from tests.support import functions_wire as wire
from writeback.adapters.local_queue import LocalQueue
from writeback.errors import LockLost
from writeback.ports import ReceivedMessage

if TYPE_CHECKING:
    from azure.servicebus import ServiceBusClient, ServiceBusReceiver

    from writeback.adapters.servicebus import ServiceBusQueue
    from writeback_sandbox.servicebus_emulator import ServiceBusEmulator

ROOT: Final = Path(__file__).resolve().parents[2]
HOST_JSON: Final = ROOT / "host.json"
QUEUE_LOCK_DURATION: Final = 300.0  # the queue's lockDuration (infra: PT5M, Service Bus's maximum)
QUEUE_MAX_DELIVERY_COUNT: Final = 10  # the queue's maxDeliveryCount (infra)
_ACCEPT_SLICE: Final = 0.05  # how long one accept waits before the loop looks at stop()

Cardinality = Literal["one", "many"]
log = logging.getLogger("tests.functions_host")


# --------------------------------------------------------------------------- options


def timespan(text: str) -> float:
    """A .NET TimeSpan as host.json writes it (``[-][d.]hh:mm:ss[.fffffff]``), in seconds."""
    match = re.fullmatch(r"(-)?(?:(\d+)\.)?(\d+):(\d+):(\d+)(?:\.(\d+))?", text.strip())
    if match is None:
        raise ValueError(f"not a TimeSpan: {text!r}")
    sign, days, hours, minutes, seconds, fraction = match.groups()
    value = float(int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + int(seconds))
    value += float(f"0.{fraction}") if fraction else 0.0
    return -value if sign else value


@dataclass(frozen=True)
class TriggerOptions:
    """The extension's settings that matter here, in seconds (see the module docstring)."""

    cardinality: Cardinality = "many"
    max_message_batch_size: int = 1000
    session_idle_timeout: float = 60.0
    max_concurrent_sessions: int = 8
    max_auto_lock_renewal: float = 300.0
    auto_complete: bool = True
    #: CalculateRenewDelay: renew min(half the time left, this) before expiry ...
    renew_buffer_max: float = 10.0
    #: ... and at once when less than this is left.
    renew_at_once_below: float = 0.4

    @classmethod
    def from_binding(
        cls,
        binding: Mapping[str, Any],
        host_json: Mapping[str, Any] | None = None,
        *,
        time_scale: float = 1.0,
    ) -> TriggerOptions:
        """Options from a trigger binding (as the host reads it) and host.json."""
        if str(binding.get("type")) != "serviceBusTrigger":
            raise ValueError(f"not a Service Bus trigger: {binding.get('type')!r}")
        if binding.get("isSessionsEnabled") is not True:
            raise NotImplementedError("only session-enabled triggers are modelled")
        settings: Mapping[str, Any] = dict(
            (host_json or {}).get("extensions", {}).get("serviceBus", {})
        )
        for name, allowed in (
            ("prefetchCount", 0),
            ("minMessageBatchSize", 1),
            ("maxConcurrentCallsPerSession", 1),
        ):
            if int(settings.get(name, allowed)) != allowed:
                raise NotImplementedError(f"host.json {name} other than {allowed} is not modelled")
        try_timeout = timespan(
            str(settings.get("clientRetryOptions", {}).get("tryTimeout", "00:01:00"))
        )
        idle = settings.get("sessionIdleTimeout")
        auto_complete = binding.get("autoCompleteMessages", settings.get("autoCompleteMessages"))
        cardinality = str(binding.get("cardinality", "one")).lower()
        if cardinality not in ("one", "many"):
            raise ValueError(f"unknown cardinality {cardinality!r}")
        options = cls(
            cardinality="many" if cardinality == "many" else "one",
            max_message_batch_size=int(settings.get("maxMessageBatchSize", 1000)),
            session_idle_timeout=timespan(str(idle)) if idle else try_timeout,
            max_concurrent_sessions=int(settings.get("maxConcurrentSessions", 8)),
            max_auto_lock_renewal=timespan(
                str(settings.get("maxAutoLockRenewalDuration", "00:05:00"))
            ),
            auto_complete=True if auto_complete is None else bool(auto_complete),
        )
        return options.scaled(time_scale)

    def scaled(self, factor: float) -> TriggerOptions:
        """Every duration multiplied by ``factor`` (a test's time scale)."""
        return replace(
            self,
            session_idle_timeout=self.session_idle_timeout * factor,
            max_auto_lock_renewal=self.max_auto_lock_renewal * factor,
            renew_buffer_max=self.renew_buffer_max * factor,
            renew_at_once_below=self.renew_at_once_below * factor,
        )


_indexed: list[Any] = []
_indexing = threading.Lock()


def app_functions() -> list[Any]:
    """``function_app.app.get_functions()``, once per process: the worker indexes the
    app once at start-up, and azure-functions refuses a second indexing of the same
    app object (its function names are then "not unique")."""
    with _indexing:
        if not _indexed:
            import function_app

            _indexed.extend(function_app.app.get_functions())
        return list(_indexed)


def app_function(name: str = "worker") -> tuple[Callable[[Any], object], dict[str, Any]]:
    """The app's user function and its trigger binding (the raw JSON the host reads)."""
    for function in app_functions():
        if function.get_function_name() == name:
            raw = [json.loads(text) for text in function.get_raw_bindings()]
            [trigger] = [b for b in raw if str(b.get("type", "")).endswith("Trigger")]
            user_function: Callable[[Any], object] = function.get_user_function()
            return user_function, trigger
    raise LookupError(f"function_app has no function {name!r}")


def one_at_a_time(function: Callable[[list[Any]], object]) -> Callable[[Any], object]:
    """A batch function (takes a list) as a single-dispatch one (takes one message)."""

    def single(message: Any) -> object:
        return function([message])

    return single


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Invocation:
    """One call of the function and what the host did with its messages after."""

    session_id: str
    message_ids: tuple[str, ...]
    delivery_counts: tuple[int, ...]
    instance: int
    slot: int
    started: float  # time.monotonic()
    ended: float
    succeeded: bool
    error: str | None
    #: completed | abandoned | kept (auto-complete off) | lock-lost | settle-failed
    settlement: str


@dataclass
class HostStats:
    """Counters over the host's life (a snapshot from :attr:`FunctionsHost.stats`)."""

    invocations: int = 0
    messages: int = 0
    errors: int = 0
    sessions_accepted: int = 0
    completions: int = 0
    abandons: int = 0
    #: A receive or settlement found the session lock gone (expired, or taken over).
    lock_losses: int = 0
    #: A completion or abandon failed although the session lock was still held:
    #: the message was settled already (by the function itself).
    settle_failures: int = 0
    renewals: int = 0
    renewal_failures: int = 0
    max_sessions_held: int = 0
    max_concurrent_invocations: int = 0
    #: Invocations that started while another one for the same session was running.
    overlaps: int = 0
    per_session: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- the host


class FunctionsHost:
    """The extension's trigger loop for one function over one queue file.

    ``run_until_idle()`` starts the listeners (threads), waits until no session
    is held and no message is due, stops them and returns the counters.
    ``start()``/``stop()`` do the same by hand; ``step()`` makes the next
    invocation on the caller's thread instead (deterministic tests), and is not
    to be mixed with ``start()``. ``instances`` listeners share the queue as
    scaled-out Function app instances would.
    """

    def __init__(
        self,
        function: Callable[[Any], object],
        queue_path: str | Path | ServiceBusTrigger,
        *,
        options: TriggerOptions,
        lock_duration: float = QUEUE_LOCK_DURATION,
        max_delivery_count: int = QUEUE_MAX_DELIVERY_COUNT,
        instances: int = 1,
        clock: Callable[[], float] = time.time,
        durable_commits: bool = False,
    ) -> None:
        if instances < 1:
            raise ValueError("instances must be at least 1")
        self.function = function
        self.options = options
        self.lock_duration = lock_duration
        self.max_delivery_count = max_delivery_count
        self.clock = clock
        self._queue_options: dict[str, Any] = {
            "lock_duration": lock_duration,
            "max_delivery_count": max_delivery_count,
            "clock": clock,
            "durable_commits": durable_commits,
        }
        self.servicebus = queue_path if isinstance(queue_path, ServiceBusTrigger) else None
        self.path = Path("") if self.servicebus is not None else Path(cast(str, queue_path))
        #: For the test: sending, depth, dead letters (a connection of its own): the
        #: LocalQueue, or over Service Bus the product's ServiceBusQueue adapter.
        self.queue: Any = (
            self.servicebus.test_queue()
            if self.servicebus is not None
            else LocalQueue(self.path, **self._queue_options)
        )
        self.invocations: list[Invocation] = []
        self._stats = HostStats()
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._invoking = 0
        self._held = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._renewer = _Renewer(self)
        per_instance = options.max_concurrent_sessions if options.cardinality == "one" else 1
        self._slots = [
            _Slot(self, instance, index)
            for instance in range(instances)
            for index in range(per_instance)
        ]

    @classmethod
    def for_app(
        cls,
        queue_path: str | Path | ServiceBusTrigger,
        *,
        function_name: str = "worker",
        host_json: Path = HOST_JSON,
        time_scale: float = 1.0,
        lock_duration: float | None = None,
        function: Callable[[Any], object] | None = None,
        **overrides: Any,
    ) -> FunctionsHost:
        """The app's function with its own binding and host.json, durations times
        ``time_scale`` (the queue's 5-minute lock too, unless ``lock_duration``).
        Option names in ``overrides`` replace those options (after scaling);
        ``function`` replaces the function itself (the options stay the app's)."""
        user_function, binding = app_function(function_name)
        options = TriggerOptions.from_binding(
            binding, json.loads(host_json.read_text()), time_scale=time_scale
        )
        option_names = set(TriggerOptions.__dataclass_fields__)
        options = replace(options, **{k: v for k, v in overrides.items() if k in option_names})
        rest = {k: v for k, v in overrides.items() if k not in option_names}
        return cls(
            function or user_function,
            queue_path,
            options=options,
            lock_duration=QUEUE_LOCK_DURATION * time_scale
            if lock_duration is None
            else lock_duration,
            **rest,
        )

    # -- running ------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        for slot in self._slots:
            thread = threading.Thread(
                target=slot.run, name=f"sb-listener-{slot.instance}-{slot.index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let running invocations finish, close every session, stop the listeners."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        stuck = [t.name for t in self._threads if t.is_alive()]
        self._threads = []
        for slot in self._slots:
            slot.close_session()
        self._renewer.stop()
        if stuck:
            raise TimeoutError(f"listeners still running after {timeout} s: {stuck}")

    def run_until_idle(self, timeout: float = 60.0, poll: float = 0.01) -> HostStats:
        """Run until no session is held, nothing is being invoked and no message is
        due (scheduled ones may remain); then stop and return the counters."""
        self.start()
        deadline = time.monotonic() + timeout
        quiet = 0
        try:
            while quiet < 2:
                quiet = quiet + 1 if self.idle() else 0
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not idle after {timeout} s: {self.stats}")
                time.sleep(poll)
        finally:
            self.stop()
        return self.stats

    def step(self, wait: float = 1.0) -> Invocation | None:
        """The next invocation, made on this thread by the first listener; None when
        none happened within ``wait`` seconds (its session closed if it went idle)."""
        if self._threads:
            raise RuntimeError("step() while the listeners run")
        deadline = time.monotonic() + wait
        slot = self._slots[0]
        while True:
            remaining = deadline - time.monotonic()
            invocation = slot.iterate(max(remaining, 0.0))
            if invocation is not None:
                return invocation
            if remaining <= 0:
                return None

    def idle(self) -> bool:
        with self._lock:
            busy = self._held or self._invoking
        return not busy and self.queue.depth() == 0

    def close(self) -> None:
        self.stop()
        for slot in self._slots:
            slot.queue.close()
        self.queue.close()

    def __enter__(self) -> FunctionsHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stats(self) -> HostStats:
        with self._lock:
            return replace(self._stats, per_session=dict(self._stats.per_session))

    # -- bookkeeping (called by the slots) ---------------------------------------

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, amount in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + amount)

    def _session_opened(self) -> None:
        with self._lock:
            self._held += 1
            self._stats.sessions_accepted += 1
            self._stats.max_sessions_held = max(self._stats.max_sessions_held, self._held)

    def _session_closed(self) -> None:
        with self._lock:
            self._held -= 1

    @contextmanager
    def _invoking_session(self, session_id: str, messages: int) -> Iterator[None]:
        with self._lock:
            stats = self._stats
            if self._in_flight.get(session_id):
                stats.overlaps += 1
            self._in_flight[session_id] = self._in_flight.get(session_id, 0) + 1
            self._invoking += 1
            stats.invocations += 1
            stats.messages += messages
            stats.per_session[session_id] = stats.per_session.get(session_id, 0) + 1
            stats.max_concurrent_invocations = max(stats.max_concurrent_invocations, self._invoking)
        try:
            yield
        finally:
            with self._lock:
                self._invoking -= 1
                self._in_flight[session_id] -= 1
                if not self._in_flight[session_id]:
                    del self._in_flight[session_id]

    def _record(self, invocation: Invocation) -> None:
        with self._lock:
            self.invocations.append(invocation)


class _Slot:
    """One receive loop: the batch loop of an instance, or one session receiver."""

    def __init__(self, host: FunctionsHost, instance: int, index: int) -> None:
        self.host = host
        self.instance = instance
        self.index = index
        self.queue: Any = (
            host.servicebus.slot_queue()
            if host.servicebus is not None
            else LocalQueue(host.path, **host._queue_options)
        )
        self.session: str | None = None
        self.many = host.options.cardinality == "many"

    def run(self) -> None:
        while not self.host._stop.is_set():
            try:
                self.iterate(_ACCEPT_SLICE)
            except Exception:  # the extension logs loop errors, closes the session, goes on
                log.exception("listener %s-%s", self.instance, self.index)
                with contextlib.suppress(Exception):
                    self.close_session()
        self.close_session()

    def iterate(self, accept_wait: float) -> Invocation | None:
        """One turn: accept a session if none is held, else receive from it; invoke
        on what came, settle, and close the session when the receive was empty."""
        options = self.host.options
        limit = options.max_message_batch_size if self.many else 1
        if self.session is None:
            batch = self.queue.receive_session(limit, accept_wait)
            if not batch:
                return None
            self._opened(batch[0].session_id)
        else:
            try:
                batch = self.queue.receive_from_session(
                    self.session, limit, options.session_idle_timeout
                )
            except LockLost:
                self.host._count(lock_losses=1)
                self.close_session()
                return None
            if not batch:
                self.close_session()
                return None
        invocation = self._invoke(batch)
        if self.host._stop.is_set():
            self.close_session()
        return invocation

    def _opened(self, session_id: str) -> None:
        self.session = session_id
        self.host._session_opened()
        if not self.many and self.host.options.max_auto_lock_renewal > 0:
            self.host._renewer.add(self)

    def close_session(self) -> None:
        if self.session is None:
            return
        session, self.session = self.session, None
        self.host._renewer.remove(self)
        try:
            self.queue.release_session(session)
        finally:
            self.host._session_closed()

    def _invoke(self, batch: Sequence[ReceivedMessage]) -> Invocation:
        host = self.host
        session = batch[0].session_id
        argument: Any = wire.decode_batch(batch) if self.many else wire.decode_single(batch[0])
        error: BaseException | None = None
        started = time.monotonic()
        with host._invoking_session(session, len(batch)):
            try:
                host.function(argument)
            except Exception as raised:
                error = raised
        ended = time.monotonic()
        if error is not None:
            host._count(errors=1)
            log.debug("invocation for session %s failed: %r", session, error)
        settlement = self._settle(batch, succeeded=error is None)
        invocation = Invocation(
            session_id=session,
            message_ids=tuple(m.message_id for m in batch),
            delivery_counts=tuple(m.delivery_count for m in batch),
            instance=self.instance,
            slot=self.index,
            started=started,
            ended=ended,
            succeeded=error is None,
            error=None if error is None else repr(error),
            settlement=settlement,
        )
        host._record(invocation)
        return invocation

    def _settle(self, batch: Sequence[ReceivedMessage], *, succeeded: bool) -> str:
        """Complete on success (auto-complete), abandon on failure; every message is
        tried, as ``Task.WhenAll`` does, and a failure is sorted into lock lost
        (the session lock is gone) or settle failure (that message was settled)."""
        host = self.host
        if succeeded and not host.options.auto_complete:
            return "kept"
        action = self.queue.complete if succeeded else self.queue.abandon
        done = failed = 0
        for message in batch:
            try:
                action(message)
                done += 1
            except LockLost:
                failed += 1
        host._count(**{"completions" if succeeded else "abandons": done})
        if not failed:
            return "completed" if succeeded else "abandoned"
        assert self.session is not None
        if self.queue.session_lock_expiry(self.session) is None:
            host._count(lock_losses=1)
            self.close_session()  # SessionLockLost ends the session, in both modes
            return "lock-lost"
        host._count(settle_failures=failed)
        if self.many:
            self.close_session()  # the batch loop closes the session on any exception
        return "settle-failed"


@dataclass
class _Renewal:
    slot: _Slot
    session_id: str
    renew_until: float  # time.monotonic(): accepted + maxAutoLockRenewalDuration
    due: float = 0.0


class _Renewer:
    """Session-lock renewal of the single-dispatch receivers (one thread for all)."""

    def __init__(self, host: FunctionsHost) -> None:
        self.host = host
        self._entries: dict[int, _Renewal] = {}
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def add(self, slot: _Slot) -> None:
        assert slot.session is not None
        options = self.host.options
        entry = _Renewal(slot, slot.session, time.monotonic() + options.max_auto_lock_renewal)
        expiry = slot.queue.session_lock_expiry(slot.session)
        self._schedule(entry, expiry)
        with self._condition:
            self._entries[id(slot)] = entry
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="sb-renewer", daemon=True)
                self._thread.start()
            self._condition.notify_all()

    def remove(self, slot: _Slot) -> None:
        with self._condition:
            self._entries.pop(id(slot), None)
            self._condition.notify_all()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(10)

    def _schedule(self, entry: _Renewal, expiry: float | None) -> None:
        """When to renew next (``CalculateRenewDelay``)."""
        options = self.host.options
        remaining = 0.0 if expiry is None else expiry - self.host.clock()
        if remaining < options.renew_at_once_below:
            entry.due = time.monotonic()
        else:
            entry.due = time.monotonic() + remaining - min(remaining / 2, options.renew_buffer_max)

    def _run(self) -> None:
        while True:
            with self._condition:
                if self._stopping:
                    return
                now = time.monotonic()
                due = [e for e in self._entries.values() if e.due <= now]
                if not due:
                    upcoming = [e.due for e in self._entries.values()]
                    self._condition.wait(min(upcoming) - now if upcoming else None)
                    continue
            for entry in due:
                self._renew(entry)

    def _renew(self, entry: _Renewal) -> None:
        if time.monotonic() >= entry.renew_until:
            self._drop(entry)  # maxAutoLockRenewalDuration after accept: renewal ends
            return
        try:
            expiry = entry.slot.queue.renew_session_lock(entry.session_id)
        except LockLost:
            if self._drop(entry):  # not when the receiver closed the session meanwhile
                self.host._count(renewal_failures=1)
            return
        self.host._count(renewals=1)
        self._schedule(entry, expiry)

    def _drop(self, entry: _Renewal) -> bool:
        """Forget ``entry``; False when it was gone already."""
        with self._condition:
            if self._entries.get(id(entry.slot)) is not entry:
                return False
            del self._entries[id(entry.slot)]
            return True


# --------------------------------------------------------------------------- over Service Bus


@dataclass(frozen=True)
class ServiceBusTrigger:
    """The loop over a queue of the Service Bus emulator instead of the queue file:
    each concurrency slot is one session receiver of the real SDK, with a client
    (an AMQP connection) of its own, as each of the extension's receivers has.

    ``rule`` is the host's connection (the app's Send and Listen rule, like its role
    assignments); the test's own :attr:`FunctionsHost.queue` is the product's
    :class:`~writeback.adapters.servicebus.ServiceBusQueue` with Manage rights, for
    sending, the depth and the dead letters.
    """

    emulator: ServiceBusEmulator
    queue_name: str
    rule: str = "writeback-app"

    def slot_queue(self) -> ServiceBusSlotQueue:
        return ServiceBusSlotQueue(
            self.emulator.client(self.rule), self.queue_name, clock=self.emulator.broker.clock
        )

    def test_queue(self) -> ServiceBusQueue:
        from writeback_sandbox.servicebus_emulator import ROOT_RULE

        return self.emulator.queue_adapter(self.queue_name, ROOT_RULE)


class ServiceBusSlotQueue:
    """One receiver of the extension over the SDK, with the LocalQueue calls the loop
    makes: accept the next session with a message (``AcceptNextSessionAsync``),
    receive from it, settle on its link, renew and read its session lock.

    Where it differs from the extension's .NET receiver: accepting costs the Python
    SDK a new connection and link (about 0.6 s on loopback, mostly its own 50 ms
    sleeps while the link opens), which comes out of the accept's wait, so an
    accept waits at least ``MIN_ACCEPT``; a closed session receiver is closed on a
    thread of its own (the SDK's close waits up to a second for its keep-alive
    thread), as the extension does not wait for a close either.
    """

    MIN_ACCEPT: Final = 2.0

    def __init__(
        self, client: ServiceBusClient, queue_name: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._client = client
        self._queue_name = queue_name
        self._clock = clock  # the broker's: lock times are its
        self._receiver: ServiceBusReceiver | None = None
        self._session: str | None = None
        self._closing: list[threading.Thread] = []

    def receive_session(self, max_messages: int, wait: float) -> list[ReceivedMessage]:
        from azure.servicebus import NEXT_AVAILABLE_SESSION
        from azure.servicebus.exceptions import OperationTimeoutError

        from writeback.adapters.servicebus import translated_errors

        if self._receiver is not None:
            raise RuntimeError("a session is held already")
        budget = max(wait, self.MIN_ACCEPT)
        receiver = self._client.get_queue_receiver(
            self._queue_name,
            session_id=NEXT_AVAILABLE_SESSION,
            max_wait_time=budget,
            prefetch_count=0,
        )
        try:
            with translated_errors("accept session"):
                try:
                    raw = receiver.receive_messages(
                        max_message_count=max_messages, max_wait_time=budget
                    )
                except OperationTimeoutError:
                    raw = []  # no session with a message within the wait
        except BaseException:
            self._close_later(receiver)
            raise
        if not raw:
            self._close_later(receiver)
            return []
        self._receiver, self._session = receiver, receiver.session.session_id
        return [self._ours(m) for m in raw]

    def receive_from_session(
        self, session_id: str, max_messages: int, wait: float
    ) -> list[ReceivedMessage]:
        from writeback.adapters.servicebus import translated_errors

        receiver = self._held(session_id)
        with translated_errors("receive"):
            raw = receiver.receive_messages(
                max_message_count=max_messages, max_wait_time=max(wait, 0.05)
            )
        return [self._ours(m) for m in raw]

    def complete(self, message: ReceivedMessage) -> None:
        from writeback.adapters.servicebus import translated_errors

        with translated_errors("complete"):
            self._held(message.session_id).complete_message(self._raw(message))

    def abandon(self, message: ReceivedMessage) -> None:
        from writeback.adapters.servicebus import translated_errors

        with translated_errors("abandon"):
            self._held(message.session_id).abandon_message(self._raw(message))

    def session_lock_expiry(self, session_id: str) -> float | None:
        """When the held session's lock lapses (Unix seconds); None when it is gone."""
        if self._receiver is None or self._session != session_id:
            return None
        session = self._receiver.session
        until = session.locked_until_utc
        if until is None or session.auto_renew_error is not None:
            return None
        expiry = until.timestamp()
        return expiry if expiry > self._clock() else None

    def renew_session_lock(self, session_id: str) -> float:
        from writeback.adapters.servicebus import translated_errors

        with translated_errors("renew session lock"):
            return self._held(session_id).session.renew_lock().timestamp()

    def release_session(self, session_id: str) -> None:
        if self._receiver is not None and self._session == session_id:
            receiver, self._receiver, self._session = self._receiver, None, None
            self._close_later(receiver)

    def close(self) -> None:
        if self._receiver is not None:
            self._close_later(self._receiver)
            self._receiver = self._session = None
        for thread in self._closing:
            thread.join(10)
        with contextlib.suppress(Exception):
            self._client.close()

    # -- plumbing -------------------------------------------------------------------

    def _held(self, session_id: str) -> ServiceBusReceiver:
        if self._receiver is None or self._session != session_id:
            raise LockLost(f"session {session_id} is not held by this receiver")
        return self._receiver

    @staticmethod
    def _raw(message: ReceivedMessage) -> Any:
        return message.lock

    @staticmethod
    def _ours(raw: Any) -> ReceivedMessage:
        from writeback.adapters.servicebus import from_servicebus_message

        return from_servicebus_message(raw)

    def _close_later(self, receiver: ServiceBusReceiver) -> None:
        def close() -> None:
            with contextlib.suppress(Exception):
                receiver.close()

        thread = threading.Thread(target=close, name="sb-receiver-close", daemon=True)
        self._closing = [t for t in self._closing if t.is_alive()] + [thread]
        thread.start()
