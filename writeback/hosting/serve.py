"""Single-machine mode: ``python -m writeback serve``, the pipeline bound to HTTP and threads.

What happens to an event, a reconcile or a lifecycle item is the pipeline's
business (:mod:`writeback.service.pipeline`, shared with the Function app). This
module only binds it to one process with the embedded SQLite queue
(:class:`~writeback.adapters.local_queue.LocalQueue`) in place of Service Bus:

* an HTTP server (stdlib, loopback by default) with the Graph webhook at
  ``POST /api/notifications`` and ``POST /api/lifecycle`` (both handled by
  :func:`~writeback.service.notifications.handle_webhook`, which persists and
  answers at once, well within Graph's 3 s; a lifecycle item becomes a control
  message in the same queue). When a webhook key is set, a request must carry
  it as ``?code=`` (as in the notification URL, the way a function key is
  carried) or in ``x-functions-key``; it is compared in constant time and
  anything else gets 401. Off loopback the key is required. Each request has
  ``request_timeout`` seconds in all, from waiting for its first byte to its
  answer being written (a client trickling a byte every few seconds is cut off
  at the deadline, not kept forever by a timeout per read); at most
  ``max_connections`` are served at once, and one more is answered 503 at once
  and closed, so slow clients cannot hold every thread; the kernel queues up to
  ``listen_backlog`` connections before they are accepted;
* worker threads, each taking the next session from the queue and handing it
  to :meth:`~writeback.service.pipeline.Pipeline.handle`. ``pause()`` stops them
  from taking work: events wait in the queue until ``resume()``;
* a timer thread: the subscription upkeep (at start and every
  ``subscription_interval``) and the reconcile (at start, every
  ``reconcile_interval``, and whenever the pipeline records a request). The
  reconcile holds the workers back while it runs, so the two never write the
  same group at once.

The JSON state file (the pipeline's state store) records the last reconcile,
the subscription and the pause switch for ``python -m writeback status``.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import parse_qsl, urlsplit

from writeback.adapters.local_queue import LocalQueue
from writeback.adapters.state import MemoryState, StateFile
from writeback.adapters.thread_local import ThreadLocalDirectory
from writeback.domain.mapping import MappingOptions
from writeback.domain.times import iso
from writeback.errors import ConfigError, WritebackError
from writeback.hosting.collector import tune_collector
from writeback.ports import Cloud, Directory, EventQueue, OutgoingMessage, StateStore
from writeback.service.handle_event import MAX_REDELIVERY_DELAY
from writeback.service.incremental import IncrementalResult
from writeback.service.notifications import MAX_BODY_BYTES, enqueue_lifecycle, handle_webhook
from writeback.service.pipeline import Pipeline, PipelineConfig, PipelineStats
from writeback.service.reconcile import SyncPolicy, SyncResult
from writeback.service.subscriptions import DEFAULT_LIFETIME, DEFAULT_RENEW_BEFORE

if TYPE_CHECKING:
    from writeback.config import PipelineSettings, Settings
    from writeback.hosting.metrics import Exposition

log = logging.getLogger("writeback.serve")

NOTIFICATIONS_PATH = "/api/notifications"
LIFECYCLE_PATH = "/api/lifecycle"
HEALTH_PATH = "/api/health"
#: Liveness for a process supervisor: 200 while every thread of the server runs.
HEALTHZ_PATH = "/healthz"
#: Prometheus exposition (writeback/hosting/metrics.py); behind the webhook key when set.
METRICS_PATH = "/metrics"
#: Longest a request may take in all, from waiting for its first byte to its answer
#: being written; past it the connection is dropped.
REQUEST_TIMEOUT = 10.0
#: Connections served at once (WRITEBACK_MAX_CONNECTIONS); one more gets 503.
MAX_CONNECTIONS = 64
#: Connections the kernel queues before they are accepted (listen(2)'s backlog).
LISTEN_BACKLOG = 128
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n"
)


@dataclass(frozen=True)
class ServeConfig:
    address: str = "127.0.0.1"
    #: 0 picks a free port (tests, the demo); ``serve`` uses WRITEBACK_LISTEN_PORT.
    port: int = 0
    workers: int = 4
    reconcile_interval: float = 1800.0
    subscription_interval: float = 6 * 3600.0
    reconcile_at_start: bool = True
    #: Create/renew the Graph subscription (at start and on the upkeep timer).
    subscribe: bool = True
    #: Where Graph should POST; derived from the listen address when not given.
    notification_url: str | None = None
    lifecycle_url: str | None = None
    webhook_key: str | None = field(default=None, repr=False)
    #: The webhook's limits (see the module docstring).
    request_timeout: float = REQUEST_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    listen_backlog: int = LISTEN_BACKLOG
    state_path: str | None = None
    paused: bool = False
    subscription_lifetime: timedelta = DEFAULT_LIFETIME
    renew_before: timedelta = DEFAULT_RENEW_BEFORE
    #: After a failed upkeep or reconcile, try again this much later.
    retry_delay: float = 30.0
    #: Worker knobs (see PipelineConfig): in-process retries, redelivery waits.
    attempts: int = 3
    max_wait: float = 30.0
    redelivery_scale: float = 1.0
    max_redelivery_delay: float = MAX_REDELIVERY_DELAY
    max_messages: int = 100
    #: Sessions a worker takes in one step (read from Graph and AD together): with
    #: the workers, the groups in flight while Graph answers (two $batch POSTs each).
    max_sessions: int = 40
    receive_wait: float = 0.5
    #: Seconds between an event's read and its confirmation (WRITEBACK_SETTLE_SECONDS).
    settle: float = 60.0
    #: Incremental reconcile (:mod:`writeback.service.incremental`): keep the groups
    #: delta link (in the state file's ``delta`` section, else in memory) so a run
    #: reads only what changed. Off by default: every reconcile is a full sync.
    incremental: bool = False
    #: With ``incremental``: a full sync after this many incremental runs and/or
    #: when the last full sync is older than ``full_max_age`` (the groups delta
    #: does not see users' SID/sync changes nor drift made by hand in AD).
    full_every: int | None = 48
    full_max_age: timedelta | None = timedelta(days=1)

    @classmethod
    def from_settings(cls, pipeline: PipelineSettings) -> ServeConfig:
        return cls(
            address=pipeline.listen_address,
            port=pipeline.listen_port,
            workers=pipeline.workers,
            reconcile_interval=float(pipeline.reconcile_interval),
            incremental=pipeline.reconcile_incremental,
            full_every=pipeline.full_sync_every,
            subscription_interval=float(pipeline.subscription_interval),
            notification_url=pipeline.notification_url,
            lifecycle_url=pipeline.lifecycle_url,
            webhook_key=pipeline.webhook_key,
            max_connections=pipeline.max_connections,
            state_path=pipeline.state_path,
            paused=pipeline.paused,
            settle=float(pipeline.settle_seconds),
        )

    def pipeline_config(
        self, options: MappingOptions, policy: SyncPolicy, client_state: str
    ) -> PipelineConfig:
        """The pipeline's share of these settings (the URLs are set at start)."""
        return PipelineConfig(
            options=options,
            policy=policy,
            attempts=self.attempts,
            max_wait=self.max_wait,
            redelivery_scale=self.redelivery_scale,
            max_redelivery_delay=self.max_redelivery_delay,
            reconcile_interval=self.reconcile_interval,
            retry_delay=self.retry_delay,
            incremental=self.incremental,
            full_every=self.full_every,
            full_max_age=self.full_max_age,
            client_state=client_state,
            subscription_lifetime=self.subscription_lifetime,
            renew_before=self.renew_before,
            settle=self.settle,
        )


@dataclass(frozen=True)
class ServerStats(PipelineStats):
    """The pipeline's counters since start (a copy; the server keeps counting) and the
    host's own: what the webhook enqueued (Graph's redeliveries included; the queue
    drops those as duplicates) and the errors no adapter maps, the pipeline's and
    the worker loop's."""

    enqueued: int = 0
    worker_errors: int = 0

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile of the latencies (None before the first event)."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(p / 100.0 * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1]


# --------------------------------------------------------------------------- plumbing


class _Gate:
    """Workers share it; the reconcile takes it alone (and is let in first)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_shared(self, timeout: float) -> bool:
        with self._cond:
            if not self._cond.wait_for(
                lambda: not self._writer and not self._writers_waiting, timeout
            ):
                return False
            self._readers += 1
            return True

    def release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                self._cond.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _CountingSender:
    """The queue as the webhook sees it: sends passed on and counted."""

    def __init__(self, queue: EventQueue, counted: Callable[[int], None]) -> None:
        self._queue = queue
        self._counted = counted

    def send(self, messages: list[OutgoingMessage]) -> None:
        self._queue.send(messages)
        self._counted(len(messages))


class _HttpServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them: one more is
    answered 503 from the accepting thread, without a thread of its own."""

    daemon_threads = True
    block_on_close = False
    owner: Server

    def __init__(
        self,
        address: tuple[str, int],
        *,
        max_connections: int = MAX_CONNECTIONS,
        backlog: int = LISTEN_BACKLOG,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        if max_connections < 1 or backlog < 1 or request_timeout <= 0:
            raise ConfigError("the webhook needs max_connections, a backlog and a timeout > 0")
        self.request_queue_size = backlog  # read by listen() in the base class's __init__
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.connections = 0
        #: Connections answered 503 because every slot was taken.
        self.refused = 0
        self._slots = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._slots:
            busy = self.connections >= self.max_connections
            if busy:
                self.refused += 1
            else:
                self.connections += 1
        if busy:
            _answer_busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._slots:
            self.connections -= 1


class _IPv6HttpServer(_HttpServer):
    address_family = socket.AF_INET6


def _answer_busy(request: socket.socket) -> None:
    """503 and close, without waiting on the client (the accepting thread sends it)."""
    with contextlib.suppress(OSError):
        request.setblocking(False)
        request.send(_BUSY)


class _DeadlineSocketIO(io.RawIOBase):
    """The connection as the handler reads and writes it: every read and write waits
    at most until the request's deadline (``handler.deadline``), whatever the
    per-call timeout would allow, so a request cannot be stretched by trickling."""

    def __init__(self, connection: socket.socket, handler: _Handler) -> None:
        super().__init__()
        self._connection = connection
        self._handler = handler

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def _wait(self) -> None:
        left = self._handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline has passed")
        self._connection.settimeout(min(left, self._handler.timeout or left))

    def readinto(self, buffer: Any) -> int:
        self._wait()
        return self._connection.recv_into(buffer)

    def write(self, data: Any) -> int:
        self._wait()
        self._connection.sendall(data)
        return len(data)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT
    server: _HttpServer
    #: When the request being read must be answered (time.monotonic()).
    deadline = 0.0

    def setup(self) -> None:
        self.deadline = time.monotonic() + self.server.request_timeout
        super().setup()
        self.rfile.close()  # the plain reader's reference to the socket goes with it
        self.wfile.close()
        raw = _DeadlineSocketIO(self.connection, self)
        self.rfile = io.BufferedReader(raw)
        self.wfile = raw  # type: ignore[assignment]  # unbuffered, as the base class's is

    def handle_one_request(self) -> None:
        """Each request on a kept-alive connection gets a deadline of its own; waiting
        for the next one counts, so an idle connection is closed at the deadline."""
        self.deadline = time.monotonic() + self.server.request_timeout
        try:
            super().handle_one_request()
        except TimeoutError:  # a body still arriving at the deadline: no answer, closed
            log.debug("http: request deadline passed, connection closed")
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Method, path and status only: the query carries the webhook key
        (``?code=``) and validation tokens, which no log line may hold."""
        path = urlsplit(self.path).path if hasattr(self, "path") else "-"
        log.debug("http: %s %s %s", getattr(self, "command", "-"), path, code)

    def do_POST(self) -> None:
        self.server.owner._serve_http(self)

    def do_GET(self) -> None:
        self.server.owner._serve_http(self)

    def do_PUT(self) -> None:
        self.server.owner._serve_http(self)

    def do_PATCH(self) -> None:
        self.server.owner._serve_http(self)

    def do_DELETE(self) -> None:
        self.server.owner._serve_http(self)


# --------------------------------------------------------------------------- the server


class Server:
    """The pipeline behind a webhook, worker threads and a timer thread.

    ``start()`` returns once the webhook listens and the threads run; the
    start-up upkeep and reconcile happen on the timer thread (``wait_ready``
    waits for them). ``stop()`` ends everything and closes what the server
    owns (``owned``: adapters built for it, closed last).
    """

    def __init__(
        self,
        *,
        queue: EventQueue,
        cloud: Cloud,
        directory_factory: Callable[[], Directory],
        options: MappingOptions,
        client_states: Sequence[str],
        policy: SyncPolicy | None = None,
        config: ServeConfig | None = None,
        clock: Callable[[], datetime] | None = None,
        owned: Sequence[object] = (),
    ) -> None:
        self.config = config or ServeConfig()
        if self.config.workers < 1:
            raise ConfigError("the server needs at least one worker")
        states = tuple(s for s in client_states if s)
        if not states:
            raise ConfigError("WRITEBACK_CLIENT_STATE is not set")
        self.queue = queue
        self.cloud = cloud
        self.directory = ThreadLocalDirectory(directory_factory)
        self.client_states = states
        self.state: StateFile | None = (
            StateFile(self.config.state_path) if self.config.state_path else None
        )
        store: StateStore = self.state if self.state is not None else MemoryState()
        self.pipeline = Pipeline(
            cloud=cloud,
            directory=self.directory,
            config=self.config.pipeline_config(options, policy or SyncPolicy(), states[0]),
            state=store,
            # the local queue need not wait for the disk for them (LocalQueue.send)
            sender=queue.before_settle() if isinstance(queue, LocalQueue) else queue,
            clock=clock,
            on_reconcile_requested=self._wake_timers,
        )
        # The workers stop taking events while paused; the pipeline holds reconciles.
        self.pipeline.paused = self.config.paused
        self._owned = list(owned)
        self._webhook_queue = _CountingSender(queue, self._count_enqueued)
        self._gate = _Gate()
        self._lock = threading.Lock()
        self._enqueued = 0
        self._worker_errors = 0
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._unpaused = threading.Event()
        if not self.config.paused:
            self._unpaused.set()
        #: workers receiving or handling a batch / holding received messages
        self._active = 0
        self._busy = 0
        self._reconciling = False
        self._http: _HttpServer | None = None
        self._threads: list[threading.Thread] = []
        self._notification_url: str | None = None
        self._lifecycle_url: str | None = None
        self._metrics: Exposition | None = None

    @classmethod
    def from_settings(cls, settings: Settings, pipeline: PipelineSettings) -> Server:
        """Everything from the environment's settings, adapters owned by the server."""
        from writeback.bootstrap import build_cloud, build_queue, directory_factory
        from writeback.service.reconcile import SyncPolicy

        queue = build_queue(pipeline)
        try:
            cloud = build_cloud(settings)
        except BaseException:
            _close_quietly(queue)
            raise
        return cls(
            queue=queue,
            cloud=cloud,
            directory_factory=directory_factory(settings),
            options=settings.mapping(),
            client_states=pipeline.client_states,
            policy=SyncPolicy.from_settings(settings),
            config=ServeConfig.from_settings(pipeline),
            owned=[cloud, queue],
        )

    # ----------------------------------------------------------------- what tests and
    # the CLI read (the pipeline keeps it)

    @property
    def options(self) -> MappingOptions:
        return self.pipeline.config.options

    @property
    def policy(self) -> SyncPolicy:
        return self.pipeline.config.policy

    @property
    def last_reconcile(self) -> SyncResult | None:
        return self.pipeline.last_reconcile

    @property
    def last_reconcile_error(self) -> str | None:
        return self.pipeline.last_reconcile_error

    @property
    def last_incremental(self) -> IncrementalResult | None:
        return self.pipeline.last_incremental

    @property
    def subscription_id(self) -> str | None:
        subscription = self.pipeline.subscription
        return subscription.id if subscription is not None else None

    @property
    def subscription_expiration(self) -> datetime | None:
        subscription = self.pipeline.subscription
        return subscription.expiration if subscription is not None else None

    @property
    def stats(self) -> ServerStats:
        pipeline = self.pipeline.stats
        with self._lock:
            enqueued, worker_errors = self._enqueued, self._worker_errors
        counts = {f.name: getattr(pipeline, f.name) for f in fields(PipelineStats)}
        return ServerStats(
            **counts, enqueued=enqueued, worker_errors=worker_errors + pipeline.errors
        )

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """Base URL the webhook listens on, e.g. ``http://127.0.0.1:7071``."""
        if self._http is None:
            raise RuntimeError("the server is not started")
        host, port = self._http.server_address[:2]
        host = str(host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def notification_url(self) -> str:
        if self._notification_url is None:
            raise RuntimeError("the server is not started")
        return self._notification_url

    @property
    def lifecycle_url(self) -> str:
        if self._lifecycle_url is None:
            raise RuntimeError("the server is not started")
        return self._lifecycle_url

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    def start(self) -> Server:
        if self._http is not None:
            return self
        server_class = _IPv6HttpServer if ":" in self.config.address else _HttpServer
        http = server_class(
            (self.config.address, self.config.port),
            max_connections=self.config.max_connections,
            backlog=self.config.listen_backlog,
            request_timeout=self.config.request_timeout,
        )
        http.owner = self
        self._http = http
        try:
            self._notification_url = self.config.notification_url or self._derived(
                NOTIFICATIONS_PATH
            )
            self._lifecycle_url = self.config.lifecycle_url or self._derived(LIFECYCLE_PATH)
            if not self.config.webhook_key and not _is_loopback(self.config.address):
                raise ConfigError(
                    f"WRITEBACK_WEBHOOK_KEY must be set to listen on {self.config.address}, "
                    "which is not a loopback address"
                )
        except BaseException:
            self._http = None
            http.server_close()
            raise
        self.pipeline.config = replace(
            self.pipeline.config,
            notification_url=self._notification_url,
            lifecycle_url=self._lifecycle_url,
        )
        self._record_state(
            paused=self.paused,
            server={
                "url": self.url,
                "pid": os.getpid(),
                "started_at": iso(datetime.now(UTC)),
                "stopped_at": None,
            },
        )
        tune_collector()  # start-up is done: what it built stays
        self._spawn("writeback-http", lambda: http.serve_forever(poll_interval=0.1))
        for n in range(self.config.workers):
            self._spawn(f"writeback-worker-{n + 1}", self._work)
        self._spawn("writeback-timers", self._timers)
        log.info(
            "serving the webhook at %s%s with %d workers%s",
            self.url,
            NOTIFICATIONS_PATH,
            self.config.workers,
            " (paused)" if self.paused else "",
        )
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking requests and work, let running batches settle, close."""
        if self._stopping.is_set():
            return
        was_paused = self.paused
        self._stopping.set()
        self._wake.set()
        self._unpaused.set()  # paused workers wake up to see the stop
        http = self._http
        if http is not None:
            if self._threads:  # serve_forever runs: shutdown waits for it to stop
                http.shutdown()
            http.server_close()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            log.warning("threads still running at shutdown: %s", ", ".join(stuck))
        self._record_state(
            paused=was_paused,
            server={**self._server_state(), "stopped_at": iso(datetime.now(UTC))},
        )
        self.directory.close()
        for resource in reversed(self._owned):
            _close_quietly(resource)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait for the start-up subscription upkeep and reconcile to be done."""
        return self._ready.wait(timeout)

    def wait_idle(self, timeout: float = 30.0, *, include_scheduled: bool = True) -> bool:
        """Wait until the queue is empty (delayed retries too, unless told not to),
        no worker is busy, and no reconcile is asked for or running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                quiet = not self._busy and not self._reconciling
            if (
                quiet
                and self.pipeline.requested_reconcile() is None
                and self.queue.depth() == 0
                and (not include_scheduled or self.queue.scheduled_count() == 0)
            ):
                with self._lock:
                    if not self._busy:
                        return True
            time.sleep(0.02)
        return False

    # ----------------------------------------------------------------- switches

    def pause(self, *, wait: float = 30.0) -> None:
        """Stop taking events (they wait in the queue) and hold the reconcile;
        returns once no worker is receiving or handling a batch any more."""
        with self._lock:
            self._unpaused.clear()
        self.pipeline.pause()
        log.warning("writes paused: events wait in the queue")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self._lock:
                if not self._active and not self._reconciling:
                    return
            time.sleep(0.01)

    def resume(self) -> None:
        self._unpaused.set()
        self.pipeline.resume()
        self._wake.set()
        log.warning("writes resumed")

    def request_reconcile(self, reason: str = "asked for") -> None:
        self.pipeline.request_reconcile(reason)

    def _wake_timers(self) -> None:
        self._wake.set()

    # ----------------------------------------------------------------- webhook

    def _derived(self, path: str) -> str:
        address = self.config.address
        if address in ("0.0.0.0", "::"):  # noqa: S104 - checking, not binding
            raise ConfigError(
                "WRITEBACK_NOTIFICATION_URL and WRITEBACK_LIFECYCLE_URL must be set "
                "when listening on every address"
            )
        url = self.url + path
        return f"{url}?code={self.config.webhook_key}" if self.config.webhook_key else url

    def _serve_http(self, request: BaseHTTPRequestHandler) -> None:
        try:
            status, content_type, payload = self._answer(request)
        except TimeoutError:
            raise  # the request's deadline: the handler closes the connection unanswered
        except Exception:
            log.exception("webhook request failed")
            status, content_type, payload = 500, "text/plain", b""
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(payload)

    def _answer(self, request: BaseHTTPRequestHandler) -> tuple[int, str, bytes]:
        parts = urlsplit(request.path)
        path = parts.path.rstrip("/")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if request.command == "GET" and path in (HEALTH_PATH, HEALTHZ_PATH, METRICS_PATH):
            return self._answer_probe(request, path, query)
        if path not in (NOTIFICATIONS_PATH, LIFECYCLE_PATH):
            return 404, "text/plain", b""
        if not self._key_ok(query.get("code") or request.headers.get("x-functions-key")):
            return 401, "text/plain", b""
        length_header = request.headers.get("Content-Length")
        try:
            length = int(length_header) if length_header else 0
        except ValueError:
            request.close_connection = True
            return 400, "text/plain", b""
        if length < 0 or length > MAX_BODY_BYTES:
            request.close_connection = True
            return 413 if length > 0 else 400, "text/plain", b""
        body = request.rfile.read(length) if length else b""
        query.pop("code", None)
        response = handle_webhook(
            method=request.command,
            query=query,
            body=body,
            content_type=request.headers.get("Content-Type"),
            client_state=self.client_states,
            queue=self._webhook_queue,
            on_lifecycle=enqueue_lifecycle(self._webhook_queue),
        )
        return response.status, response.content_type, response.body

    def _answer_probe(
        self, request: BaseHTTPRequestHandler, path: str, query: dict[str, str]
    ) -> tuple[int, str, bytes]:
        """``/api/health`` (plain "ok"), ``/healthz`` (liveness, JSON) and ``/metrics``."""
        if path == HEALTH_PATH:
            return 200, "text/plain", b"ok"
        if path == HEALTHZ_PATH:
            healthy, report = self.health()
            return (200 if healthy else 503), "application/json", json.dumps(report).encode()
        given = query.get("code") or request.headers.get("x-functions-key")
        scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
        if not self._key_ok(given or (token if scheme.lower() == "bearer" else None)):
            return 401, "text/plain", b""
        exposition = self._exposition()
        return 200, exposition.content_type, exposition.render()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether the server is alive (every thread running, not stopping), and why not."""
        down = [thread.name for thread in self._threads if not thread.is_alive()]
        healthy = bool(self._threads) and not down and not self._stopping.is_set()
        report = {
            "status": "ok" if healthy else "failing",
            "threads_down": down,
            "stopping": self._stopping.is_set(),
            "ready": self._ready.is_set(),
            "paused": self.paused,
        }
        return healthy, report

    def _exposition(self) -> Exposition:
        with self._lock:
            if self._metrics is None:
                from writeback.hosting.metrics import Exposition

                self._metrics = Exposition(self)
            return self._metrics

    def _key_ok(self, given: str | None) -> bool:
        key = self.config.webhook_key
        if not key:
            return True
        return hmac.compare_digest((given or "").encode(), key.encode())

    def _count_enqueued(self, n: int) -> None:
        with self._lock:
            self._enqueued += n

    # ----------------------------------------------------------------- workers

    def _work(self) -> None:
        while not self._stopping.is_set():
            if not self._unpaused.wait(0.5) or self._stopping.is_set():
                continue
            try:
                self._work_once()
            except Exception as error:
                with self._lock:
                    self._worker_errors += 1
                level = logging.WARNING if isinstance(error, WritebackError) else logging.ERROR
                log.log(level, "worker: %s: %s", type(error).__name__, error)
                self._stopping.wait(1.0)

    def _work_once(self) -> None:
        if not self._gate.acquire_shared(0.5):
            return
        try:
            with self._lock:  # the pause switch is read and the worker counted as one step
                if self.paused or self._stopping.is_set():
                    return
                self._active += 1
            try:
                self._receive_and_handle()
            finally:
                with self._lock:
                    self._active -= 1
        finally:
            self._gate.release_shared()

    def _receive_and_handle(self) -> None:
        config = self.config
        batches = self.queue.receive_sessions(
            config.max_sessions, config.max_messages, config.receive_wait
        )
        if not batches:
            return
        with self._lock:
            self._busy += 1
        try:
            self.pipeline.handle(self.queue, [m for batch in batches for m in batch])
        finally:
            for batch in batches:
                with contextlib.suppress(WritebackError):
                    self.queue.release_session(batch[0].session_id)
            with self._lock:
                self._busy -= 1

    # ----------------------------------------------------------------- timers

    def _timers(self) -> None:
        now = time.monotonic()
        next_upkeep = now if self.config.subscribe else math.inf
        if not self.config.reconcile_at_start:
            next_reconcile = now + self.config.reconcile_interval
        else:
            next_reconcile = now
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                next_upkeep, next_reconcile = self._timer_round(next_upkeep, next_reconcile)
            except Exception:
                log.exception("timer round failed")
                self._stopping.wait(self.config.retry_delay)
                continue
            finally:
                self._ready.set()
            self._wake.wait(self._next_wait(next_upkeep, next_reconcile))

    def _timer_round(self, next_upkeep: float, next_reconcile: float) -> tuple[float, float]:
        """Upkeep if due; the reconcile if due or asked for (held while paused)."""
        if time.monotonic() >= next_upkeep:
            try:
                self.pipeline.subscription_upkeep()
                next_upkeep = time.monotonic() + self.config.subscription_interval
            except WritebackError:
                next_upkeep = time.monotonic() + self.config.retry_delay
        reason = self.pipeline.requested_reconcile() or (
            "schedule" if time.monotonic() >= next_reconcile else None
        )
        if reason is not None and not self.paused and not self._stopping.is_set():
            done = self.reconcile(reason)
            interval = self.config.reconcile_interval if done else self.config.retry_delay
            next_reconcile = time.monotonic() + interval
        return next_upkeep, next_reconcile

    def _next_wait(self, next_upkeep: float, next_reconcile: float) -> float:
        if not self.paused and self.pipeline.requested_reconcile() is not None:
            return 0.0
        due = min(next_upkeep, next_reconcile)
        return min(max(due - time.monotonic(), 0.0), 3600.0)

    def reconcile(self, reason: str = "asked for") -> bool:
        """A reconcile now (workers held back meanwhile); True when it ran to the end."""
        with self._lock:
            self._reconciling = True
        try:
            with self._gate.exclusive():
                return self.pipeline.reconcile(reason) is not None
        finally:
            with self._lock:
                self._reconciling = False

    # ----------------------------------------------------------------- state

    def _server_state(self) -> dict[str, Any]:
        if self.state is None:
            return {}
        server = self.state.read().get("server")
        return server if isinstance(server, dict) else {}

    def _record_state(self, **sections: Any) -> None:
        if self.state is None:
            return
        try:
            self.state.update(**sections)
        except OSError as error:
            log.warning("could not write the state file %s: %s", self.state.path, error)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()


# --------------------------------------------------------------------------- the command


def run_until_signalled(server: Server, out: TextIO) -> int:
    """``serve``: start, print where, run until SIGINT/SIGTERM; SIGUSR1 pauses,
    SIGUSR2 resumes."""
    stop = threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_pause(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.pause, name="writeback-pause", daemon=True).start()

    def on_resume(signum: int, frame: FrameType | None) -> None:
        server.resume()

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, on_stop),
        signal.SIGTERM: signal.signal(signal.SIGTERM, on_stop),
        signal.SIGUSR1: signal.signal(signal.SIGUSR1, on_pause),
        signal.SIGUSR2: signal.signal(signal.SIGUSR2, on_resume),
    }
    try:
        server.start()
        print(f"writeback: webhook at {_without_query(server.notification_url)}", file=out)
        print(f"writeback: lifecycle at {_without_query(server.lifecycle_url)}", file=out)
        print(
            f"writeback: {server.config.workers} workers"
            + (", PAUSED (kill -USR2 to resume)" if server.paused else "")
            + f"; pid {os.getpid()}; Ctrl-C or SIGTERM stops",
            file=out,
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print("writeback: stopping...", file=out, flush=True)
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    stats = server.stats
    print(
        f"writeback: stopped after {stats.events} events, {stats.writes} LDAP writes, "
        f"{stats.reconciles} reconciles",
        file=out,
    )
    return 0


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address.lower() == "localhost"


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _close_quietly(resource: object) -> None:
    close = getattr(resource, "close", None)
    if callable(close):
        try:
            close()
        except Exception as error:
            log.debug("closing %r failed: %r", resource, error)
