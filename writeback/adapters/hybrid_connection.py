"""Azure Relay Hybrid Connections, HTTP request/response mode: both client roles.

The on-premises agent cannot accept inbound connections and the cloud side cannot
reach into the customer's network, so both connect outbound to Azure Relay over 443:

* :class:`HybridConnectionListener` (the agent) keeps the "listen" control-channel
  WebSocket open, answers each ``request`` message with a ``response`` message, and
  moves to a rendezvous WebSocket when a request or response is too large for the
  control channel;
* :class:`HybridConnectionSender` (the cloud) sends plain HTTPS requests to
  ``https://{namespace}/{path}/...`` with a SAS token in ``ServiceBusAuthorization``.

Written from the published protocol (azure-relay/relay-hybrid-connections-protocol)
and checked against Microsoft's Node.js client, ``hyco-https`` (tests/interop).
Relay faults become :class:`RelayUnavailable` or :class:`RelayRefused`; statuses the
listener chose are handed back untouched, told apart by the ``Via`` header the relay
adds to every response that came from a listener. The relay's own errors are read
from every place the service puts text: the reason phrase (where Microsoft's tests
find it), a JSON ``{"error": {"code", "message"}}`` body, an XML ``<Detail>``; "no
listener" in any of them is transient, so an agent restart never loses an event.
Keys and tokens are never logged, and tokens travel in headers, never in URLs, so
no URL we log can carry one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from writeback.agent_protocol import audience
from writeback.errors import ConfigError, RelayRefused, RelayUnavailable, WritebackError

log = logging.getLogger(__name__)
# websockets logs handshake headers (our SAS token among them) at DEBUG: its logger for
# our connections stops at INFO, whatever the root level.
_ws_log = logging.getLogger(f"{__name__}.websockets")
_ws_log.setLevel(logging.INFO)

#: Largest body the control channel carries (the protocol says 64 kB); larger ones
#: take a rendezvous WebSocket. Kept under 64 KiB so either reading of "kB" holds.
CONTROL_BODY_LIMIT = 64_000
#: Largest serialised HTTP header metadata on the control channel (protocol: 32 kB).
CONTROL_HEADER_LIMIT = 32_000
#: Largest message we accept on any relay WebSocket (bounds memory per request).
MAX_MESSAGE = 64 * 1024 * 1024
#: RFC 7230 headers the relay strips and a listener must not send.
HOP_HEADERS = frozenset(
    {"connection", "content-length", "host", "te", "trailer", "transfer-encoding", "upgrade"}
    | {"close", "keep-alive", "proxy-connection"}
)
#: Statuses reserved to the relay itself; a listener answering them is sent as 500.
_RELAY_ONLY_STATUSES = frozenset({502, 504})
#: A handshake that gets no answer is given up and retried after this long.
_OPEN_TIMEOUT = 10.0
_BODY_FRAME_TIMEOUT = 30.0
_POLL = 0.5
#: A rendezvous address is valid for 30 s (the protocol's figure): a handler still
#: running after this long gets its response rendezvous opened while it is valid.
RENDEZVOUS_EARLY = 10.0
#: A kept rendezvous that carries no request for this long is closed.
RENDEZVOUS_IDLE = 60.0
#: The relay's texts for "nobody is listening" (404 "There are no listeners
#: connected for the endpoint", "None of the connected listeners meet...", the
#: NoListenerConnected code...).
_NO_LISTENER = re.compile(
    r"\bno\s+(?:active\s+)?listeners?\b|\bnone of the connected listeners\b"
    r"|\blisteners?\s+(?:is|are)\s+not\s+connected\b|nolistener",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class RelayEndpoint:
    """Where a hybrid connection lives and how to trust the relay's certificate."""

    namespace: str  # "contoso.servicebus.windows.net", or "127.0.0.1:PORT" for the stand-in
    path: str  # the hybrid connection name
    ca_file: str | None = None  # an extra CA to trust, on top of the system store
    secure: bool = True  # wss/https; plain ws/http is only allowed to loopback hosts

    def __post_init__(self) -> None:
        host = _host_of(self.namespace)
        if not self.path.strip("/") or any(c in self.path for c in "?#"):
            raise ConfigError(f"relay hybrid connection name {self.path!r} is not valid")
        if not self.secure and not _is_loopback(host):
            raise ConfigError(
                f"relay namespace {self.namespace!r}: plain ws/http is only allowed to a "
                "loopback host; use TLS (secure=True)"
            )

    @property
    def name(self) -> str:
        """The hybrid connection name without surrounding slashes."""
        return self.path.strip("/")

    @property
    def resource_uri(self) -> str:
        """The URI SAS tokens for this hybrid connection are signed for."""
        return f"http://{self.namespace}/{self.name}"

    def websocket_url(self, action: str, client_id: str) -> str:
        """The relay's WebSocket address for ``action`` (listen, connect)."""
        scheme = "wss" if self.secure else "ws"
        return (
            f"{scheme}://{self.namespace}/$hc/{quote(self.name)}"
            f"?sb-hc-action={action}&sb-hc-id={quote(client_id)}"
        )

    def http_url(self, target: str) -> str:
        """The sender's HTTPS address for ``target`` below the hybrid connection."""
        if "://" in target or target.startswith("//"):
            raise ConfigError("a relay request target is a path below the hybrid connection")
        suffix = target if not target or target[0] in "/?" else "/" + target
        return f"{'https' if self.secure else 'http'}://{self.namespace}/{quote(self.name)}{suffix}"

    def trusts_address(self, url: str) -> bool:
        """Whether a rendezvous address the relay sent is one we may connect to.

        Same scheme security as the endpoint, and the namespace's host or a sibling
        under its parent domain (the service hands out addresses of its own nodes).
        """
        parts = urlsplit(url)
        if parts.scheme != ("wss" if self.secure else "ws") or not parts.hostname:
            return False
        host, ours = parts.hostname.lower(), _host_of(self.namespace).lower()
        if host == ours:
            return True
        labels = ours.split(".")
        if _is_ip(ours) or len(labels) < 3:
            return False
        return host.endswith("." + ".".join(labels[1:]))

    def ssl_context(self) -> ssl.SSLContext | None:
        """Certificate-validating TLS context (system trust plus ``ca_file``), or None."""
        if not self.secure:
            return None
        context = ssl.create_default_context()
        if self.ca_file:
            try:
                context.load_verify_locations(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"relay CA file {self.ca_file!r} cannot be read: {exc}") from None
        return context


def _host_of(namespace: str) -> str:
    try:
        host = urlsplit("//" + namespace).hostname
    except ValueError:
        host = None
    if not host or "/" in namespace:
        raise ConfigError(f"relay namespace {namespace!r} is not a host name (with optional port)")
    return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sas_token(
    resource_uri: str, key_name: str, key: str, *, ttl: float = 3600, now: float | None = None
) -> str:
    """A Service Bus shared access signature for ``resource_uri``, valid ``ttl`` seconds.

    The signed string is the URL-encoded URI, a newline and the expiry in Unix seconds;
    the key is used as its UTF-8 bytes, as the Service Bus and Relay documentation show.
    """
    expiry = int((time.time() if now is None else now) + ttl)
    encoded_uri = quote(resource_uri, safe="")
    digest = hmac.new(key.encode(), f"{encoded_uri}\n{expiry}".encode(), hashlib.sha256).digest()
    signature = quote(base64.b64encode(digest).decode(), safe="")
    return (
        f"SharedAccessSignature sr={encoded_uri}&sig={signature}"
        f"&se={expiry}&skn={quote(key_name, safe='')}"
    )


@dataclass(frozen=True)
class RelayRequest:
    """One HTTP request as the listener's handler sees it.

    ``target`` is the path and query below the hybrid connection ("/" at least);
    ``headers`` has lower-case names, without the relay's authorization headers.
    """

    method: str
    target: str
    headers: Mapping[str, str]
    body: bytes = b""


@dataclass(frozen=True)
class RelayResponse:
    """One HTTP response: what a handler returns and what the sender gets back.

    502 and 504 are reserved to the relay by the protocol: a handler returning one is
    sent as 500. Hop-by-hop headers (Content-Length, Connection...) are dropped.
    """

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


Handler = Callable[[RelayRequest], RelayResponse]


class HybridConnectionListener:
    """The on-premises side: serves relayed HTTP requests with ``handler``.

    Handler calls run concurrently (several cloud workers share one agent), at most
    ``max_concurrency`` at a time; a handler exception becomes a 500, never a dead
    listener. The control channel is reopened with exponential backoff and jitter
    whenever the relay drops or refuses it, and its token renewed at half-life.
    """

    def __init__(
        self,
        endpoint: RelayEndpoint,
        key_name: str,
        key: str,
        handler: Handler,
        *,
        max_concurrency: int = 4,
        backoff_max: float = 30.0,
        token_ttl: float = 3600,
        rendezvous_early: float = RENDEZVOUS_EARLY,
        rendezvous_idle: float = RENDEZVOUS_IDLE,
        max_rendezvous: int | None = None,
    ) -> None:
        """``rendezvous_early``: seconds after which a handler still running gets its
        response rendezvous opened (well inside the address's 30 s); ``rendezvous_idle``:
        seconds a kept rendezvous may carry nothing before it is closed;
        ``max_rendezvous``: how many are kept at once (default 4 per handler slot)."""
        if max_concurrency < 1 or backoff_max <= 0 or token_ttl < 2:
            raise ConfigError("relay listener: max_concurrency, backoff_max or token_ttl invalid")
        if not 0 < rendezvous_early < 30 or rendezvous_idle <= 0:
            raise ConfigError("relay listener: rendezvous_early or rendezvous_idle invalid")
        self._endpoint = endpoint
        self._key_name = key_name
        self._key = key
        self._handler = handler
        self._max_concurrency = max_concurrency
        self._backoff_max = backoff_max
        self._token_ttl = token_ttl
        self._tls = endpoint.ssl_context()
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._send_lock = threading.Lock()
        self._rendezvous: set[ClientConnection] = set()
        self._rendezvous_lock = threading.Lock()
        self._rendezvous_early = rendezvous_early
        self._rendezvous_idle = rendezvous_idle
        self._max_rendezvous = max_rendezvous or 4 * max_concurrency
        self._running: dict[int, _Route] = {}
        self._running_lock = threading.Condition()
        #: Kept rendezvous sockets refused because ``max_rendezvous`` were kept.
        self.rendezvous_refused = 0
        self._halted = threading.Event()
        self._own_stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listener_id = str(uuid.uuid4())
        #: Set while the control channel is open.
        self.connected = threading.Event()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Run :meth:`run` in a background thread until :meth:`close`."""
        if self._thread is not None:
            raise RuntimeError("relay listener already started")
        self._own_stop.clear()
        self._thread = threading.Thread(
            target=self.run, args=(self._own_stop,), name="relay-listener", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the background thread started by :meth:`start` and wait for it."""
        self._own_stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> HybridConnectionListener:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def run(self, stop: threading.Event) -> None:
        """Listen until ``stop`` is set, reconnecting whenever the channel is lost."""
        self._halted.clear()
        pool = ThreadPoolExecutor(self._max_concurrency, thread_name_prefix="relay-handler")
        watchdog = threading.Thread(target=self._watch, name="relay-rendezvous-early", daemon=True)
        watchdog.start()
        failures = 0
        try:
            while not stop.is_set():
                try:
                    self._listen_once(stop, pool)
                    failures = 0
                except RelayRefused as exc:
                    log.warning("relay refused the listener: %s", exc)
                    failures += 1
                except RelayUnavailable as exc:
                    log.warning("relay unreachable: %s", exc)
                    failures += 1
                if not stop.is_set():
                    delay = self._backoff(failures)
                    log.info("relay listener reconnecting in %.1f s", delay)
                    stop.wait(delay)
        finally:
            self._halted.set()
            with self._running_lock:
                self._running_lock.notify_all()
            self.connected.clear()
            self._close_rendezvous()
            pool.shutdown(wait=False, cancel_futures=True)

    def _backoff(self, failures: int) -> float:
        ceiling = min(self._backoff_max, 0.5 * 2 ** min(failures, 16))
        return random.uniform(ceiling / 2, ceiling)

    # -- control channel ---------------------------------------------------------

    def _listen_once(self, stop: threading.Event, pool: ThreadPoolExecutor) -> None:
        """Open the control channel and serve it until it closes or ``stop`` is set."""
        where = f"{self._endpoint.namespace}/{self._endpoint.name}"
        url = self._endpoint.websocket_url("listen", self.listener_id)
        channel = self._open(url, authorize=True)
        self.connected.set()
        log.info("relay listener connected to %s", where)
        try:
            self._serve_control(channel, stop, pool)
        finally:
            self.connected.clear()
            channel.close()
            log.info("relay listener disconnected from %s", where)

    def _serve_control(
        self, channel: ClientConnection, stop: threading.Event, pool: ThreadPoolExecutor
    ) -> None:
        renew_at = time.monotonic() + self._token_ttl / 2
        while not stop.is_set():
            if time.monotonic() >= renew_at:
                self._renew(channel)
                renew_at = time.monotonic() + self._token_ttl / 2
            try:
                message = channel.recv(timeout=_POLL)
                if isinstance(message, str):
                    self._dispatch(channel, message, pool)
            except TimeoutError:
                continue
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                log.warning("relay closed the control channel (close code %s)", code)
                return

    def _renew(self, channel: ClientConnection) -> None:
        token = self._token()
        with self._send_lock, contextlib.suppress(ConnectionClosed):
            channel.send(json.dumps({"renewToken": {"token": token}}))
        log.info("relay listener token renewed")

    def _dispatch(self, channel: ClientConnection, message: str, pool: ThreadPoolExecutor) -> None:
        try:
            envelope = json.loads(message)
        except ValueError:
            log.warning("relay sent a control message that is not JSON; ignored")
            return
        if "request" in envelope:
            request = envelope["request"]
            if "method" not in request:  # too large for the control channel
                _submit(pool, self._serve_large_request, str(request["address"]))
                return
            body = _read_body(channel) if request.get("body") else b""
            _submit(pool, self._serve_request, channel, request, body)
        elif "accept" in envelope:
            _submit(pool, self._decline_websocket, str(envelope["accept"]["address"]))

    def _serve_request(
        self, channel: ClientConnection, request: Mapping[str, Any], body: bytes
    ) -> None:
        route = _Route(str(request["address"]), time.monotonic())
        with self._running_lock:
            self._running[id(route)] = route
        try:
            response = self._handle(_relay_request(request, body, self._endpoint.name))
        finally:
            with self._running_lock:
                self._running.pop(id(route), None)
        header, payload = _response_frames(str(request["id"]), response)
        early = route.finish(_OPEN_TIMEOUT + 1)
        if early is not None:  # the handler was slow: its rendezvous is already open
            self._send_on(early, header, payload)
            return
        if len(payload) > CONTROL_BODY_LIMIT or len(header) > CONTROL_HEADER_LIMIT:
            self._respond_via_rendezvous(route.address, header, payload)
            return
        try:
            with self._send_lock:
                channel.send(header)
                if payload:
                    channel.send(payload)
        except ConnectionClosed:
            log.warning("relay control channel closed before a response could be sent")

    def _watch(self) -> None:
        """Opens the response rendezvous of handlers that run long, while it is valid."""
        while not self._halted.is_set():
            now = time.monotonic()
            with self._running_lock:
                late = [
                    r
                    for r in self._running.values()
                    if now - r.started >= self._rendezvous_early and r.claim_early()
                ]
                if not late:
                    self._running_lock.wait(min(1.0, self._rendezvous_early / 4))
            for route in late:
                threading.Thread(
                    target=self._open_early, args=(route,), name="relay-rendezvous", daemon=True
                ).start()

    def _open_early(self, route: _Route) -> None:
        try:
            route.opened(self._open(route.address, authorize=False))
            log.info("relay handler still running: its response rendezvous is open")
        except WritebackError as exc:
            log.warning("relay rendezvous for a slow handler failed: %s", exc)
            route.opened(None)

    def _send_on(self, rendezvous: ClientConnection, header: str, payload: bytes) -> None:
        try:
            rendezvous.send(header)
            if payload:
                rendezvous.send(payload)
        except ConnectionClosed as exc:
            log.warning("relay rendezvous closed before a response could be sent: %s", exc)
            return
        self._keep_rendezvous(rendezvous)

    def _handle(self, request: RelayRequest) -> RelayResponse:
        with self._slots:
            try:
                return self._handler(request)
            except Exception:
                log.exception(
                    "relay request handler failed on %s %s",
                    request.method,
                    request.target.split("?", 1)[0],
                )
                return RelayResponse(500, {"content-type": "text/plain"}, b"handler failed\n")

    # -- rendezvous --------------------------------------------------------------

    def _respond_via_rendezvous(self, address: str, header: str, payload: bytes) -> None:
        try:
            rendezvous = self._open(address, authorize=False)
        except WritebackError as exc:
            log.warning("relay rendezvous for a large response failed: %s", exc)
            return
        self._send_on(rendezvous, header, payload)

    def _serve_large_request(self, address: str) -> None:
        try:
            rendezvous = self._open(address, authorize=False)
        except WritebackError as exc:
            log.warning("relay rendezvous for a large request failed: %s", exc)
            return
        self._keep_rendezvous(rendezvous, first_request=True)

    def _keep_rendezvous(
        self, rendezvous: ClientConnection, *, first_request: bool = False
    ) -> None:
        """Serve the sender's later requests on ``rendezvous`` while the relay keeps it.

        At most ``max_rendezvous`` are kept (one thread each); beyond that a response
        rendezvous is closed once its answer is sent, and the relay drops that
        sender's connection, which the sender simply opens again.
        """
        with self._rendezvous_lock:
            full = len(self._rendezvous) >= self._max_rendezvous
            if self._halted.is_set() or (full and not first_request):
                if full:
                    self.rendezvous_refused += 1
                rendezvous.close()
                return
            self._rendezvous.add(rendezvous)
        threading.Thread(
            target=self._serve_rendezvous, args=(rendezvous,), name="relay-rendezvous", daemon=True
        ).start()

    def _serve_rendezvous(self, rendezvous: ClientConnection) -> None:
        last = time.monotonic()
        try:
            while not self._halted.is_set():
                try:
                    message = rendezvous.recv(timeout=_POLL)
                except TimeoutError:
                    if time.monotonic() - last > self._rendezvous_idle:
                        log.info("relay rendezvous idle for %.0f s: closed", self._rendezvous_idle)
                        return
                    continue
                if isinstance(message, str):
                    self._answer_on(rendezvous, message)
                last = time.monotonic()
        except (ConnectionClosed, TimeoutError, ValueError, KeyError) as exc:
            if not isinstance(exc, ConnectionClosed):
                log.warning("relay rendezvous dropped after a malformed request: %s", exc)
        finally:
            with self._rendezvous_lock:
                self._rendezvous.discard(rendezvous)
            rendezvous.close()

    @property
    def kept_rendezvous(self) -> int:
        """Rendezvous sockets kept open for later requests right now."""
        with self._rendezvous_lock:
            return len(self._rendezvous)

    def _answer_on(self, rendezvous: ClientConnection, message: str) -> None:
        request = json.loads(message).get("request")
        if not isinstance(request, dict):
            return
        body = _read_body(rendezvous) if request.get("body") else b""
        response = self._handle(_relay_request(request, body, self._endpoint.name))
        header, payload = _response_frames(str(request["id"]), response)
        rendezvous.send(header)
        if payload:
            rendezvous.send(payload)

    def _decline_websocket(self, address: str) -> None:
        """Refuse a relayed WebSocket (only HTTP requests are served) as the protocol says."""
        separator = "&" if "?" in address else "?"
        refusal = (
            f"{address}{separator}sb-hc-statusCode=501&sb-hc-statusDescription=Not%20Implemented"
        )
        with contextlib.suppress(WritebackError):
            self._open(refusal, authorize=False).close()

    def _close_rendezvous(self) -> None:
        with self._rendezvous_lock:
            sockets, self._rendezvous = list(self._rendezvous), set()
        for channel in sockets:
            channel.close()

    # -- connections -------------------------------------------------------------

    def _token(self) -> str:
        resource = self._endpoint.resource_uri
        return sas_token(resource, self._key_name, self._key, ttl=self._token_ttl)

    def _open(self, url: str, *, authorize: bool) -> ClientConnection:
        """A WebSocket to the relay; relay faults as our errors, with no URL in them."""
        if not authorize and not self._endpoint.trusts_address(url):
            raise RelayRefused("relay handed out a rendezvous address outside its namespace")
        headers = {"ServiceBusAuthorization": self._token()} if authorize else None
        where = self._endpoint.namespace
        try:
            return connect(
                url,
                ssl=self._tls,
                additional_headers=headers,
                open_timeout=_OPEN_TIMEOUT,
                max_size=MAX_MESSAGE,
                compression=None,
                legacy=True,
                logger=_ws_log,
            )
        except InvalidStatus as exc:
            raise _refusal(exc.response.status_code, where) from None
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            raise RelayUnavailable(f"relay {where}: {_describe(exc)}") from None


class _Route:
    """How one control-channel request's response will travel: the control channel,
    unless its handler ran so long that its rendezvous was opened early."""

    def __init__(self, address: str, started: float) -> None:
        self.address = address
        self.started = started
        self._lock = threading.Condition()
        self._state = "running"  # running, opening, done
        self._rendezvous: ClientConnection | None = None

    def claim_early(self) -> bool:
        """For the watchdog: True once, if the handler is still running."""
        with self._lock:
            if self._state != "running":
                return False
            self._state = "opening"
            return True

    def opened(self, rendezvous: ClientConnection | None) -> None:
        with self._lock:
            self._rendezvous = rendezvous
            self._state = "open"
            self._lock.notify_all()

    def finish(self, wait: float) -> ClientConnection | None:
        """The early rendezvous to answer on, if there is one (waiting for it to open)."""
        with self._lock:
            if self._state == "running":
                self._state = "done"
                return None
            self._lock.wait_for(lambda: self._state == "open", wait)
            return self._rendezvous


def _submit(pool: ThreadPoolExecutor, work: Callable[..., None], *args: Any) -> None:
    """Run ``work`` in the pool, logging what escapes it (a future would swallow it)."""

    def guarded() -> None:
        try:
            work(*args)
        except Exception:
            log.exception("relay listener: unexpected error while serving a request")

    pool.submit(guarded)


def _refusal(status: int, where: str) -> WritebackError:
    """What a relay status at WebSocket connect means for the listener."""
    if status in (401, 403):
        return RelayRefused(f"relay {where} refused the listener's SAS token (HTTP {status})")
    if status == 404:
        return RelayRefused(f"relay {where} has no such hybrid connection (HTTP 404)")
    return RelayUnavailable(f"relay {where} answered HTTP {status}")


def _read_body(channel: ClientConnection) -> bytes:
    """The binary frame(s) that follow a message announcing ``body: true``."""
    body = channel.recv(timeout=_BODY_FRAME_TIMEOUT)
    return body if isinstance(body, bytes) else body.encode()


def _relay_request(request: Mapping[str, Any], body: bytes, name: str) -> RelayRequest:
    """A ``request`` message as the handler sees it, the hybrid connection name cut off."""
    headers = request.get("requestHeaders") or {}
    return RelayRequest(
        method=str(request.get("method") or "GET").upper(),
        target=handler_target(str(request.get("requestTarget") or "/"), name),
        headers={str(k).lower(): str(v) for k, v in headers.items()},
        body=body,
    )


def handler_target(target: str, name: str) -> str:
    """The path and query below the hybrid connection ``name`` in a relayed target.

    The target is kept as the sender wrote it, so a signature over it still holds;
    only what comes before it is cut: an absolute-form scheme and authority, and the
    connection's name however it was encoded (``writeback%2Dagent``, ``A%2Fb``) or
    cased. A target that does not start with the name is given as it is.
    """
    if "://" in target.partition("?")[0]:  # absolute form: https://ns/name/rest?q
        parts = urlsplit(target)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    path, sep, query = target.partition("?")
    segments = path.lstrip("/").split("/")
    wanted = name.strip("/").lower()
    for cut in range(1, len(segments) + 1):
        decoded = unquote("/".join(segments[:cut])).lower()
        if decoded == wanted:
            path = "/" + "/".join(segments[cut:])
            break
        if not wanted.startswith(decoded):
            break
    if not path.startswith("/"):
        path = "/" + path
    return path + sep + query


def _response_frames(request_id: str, response: RelayResponse) -> tuple[str, bytes]:
    """The ``response`` text frame and the body frame for ``response``."""
    status = 500 if response.status in _RELAY_ONLY_STATUSES else response.status
    try:
        description = HTTPStatus(status).phrase
    except ValueError:
        description = ""
    headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS}
    header = {
        "response": {
            "requestId": request_id,
            "statusCode": status,
            "statusDescription": description,
            "responseHeaders": headers,
            "body": bool(response.body),
        }
    }
    return json.dumps(header), bytes(response.body)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class HybridConnectionSender:
    """The cloud side: HTTP requests to the listener through the relay.

    One pooled HTTPS client per sender, reused across calls and threads; the SAS
    token is cached and re-signed at half its lifetime.
    """

    def __init__(
        self,
        endpoint: RelayEndpoint,
        key_name: str,
        key: str,
        *,
        timeout: float = 30.0,
        token_ttl: float = 3600,
    ) -> None:
        self._endpoint = endpoint
        self._key_name = key_name
        self._key = key
        self._token_ttl = token_ttl
        self._token_value = ""
        self._token_renew_at = 0.0
        self._token_lock = threading.Lock()
        context = endpoint.ssl_context()
        # One round trip per call, so no write may wait for a delayed ACK (Nagle).
        transport = httpx.HTTPTransport(
            verify=context if context is not None else True,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        self._client = httpx.Client(transport=transport, timeout=timeout, follow_redirects=False)

    def request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> RelayResponse:
        """Send one request; the listener's answer comes back whatever its status."""
        if method.upper() == "CONNECT":
            raise ConfigError("the relay does not carry CONNECT requests")
        url = self._endpoint.http_url(target)
        sent = {k: v for k, v in (headers or {}).items() if k.lower() not in HOP_HEADERS}
        sent["ServiceBusAuthorization"] = self._token()
        try:
            answer = self._client.request(method, url, content=body, headers=sent)
        except httpx.HTTPError as exc:  # the exception holds the request, token included
            raise RelayUnavailable(f"relay {self._where()}: {_describe(exc)}") from None
        return self._classify(answer)

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()

    def __enter__(self) -> HybridConnectionSender:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def audience(self) -> str:
        """The hybrid connection, as the caller key's signatures name it."""
        return audience(self._endpoint.namespace, self._endpoint.name)

    def _where(self) -> str:
        return f"{self._endpoint.namespace}/{self._endpoint.name}"

    def _token(self) -> str:
        with self._token_lock:
            now = time.time()
            if now >= self._token_renew_at:
                self._token_value = sas_token(
                    self._endpoint.resource_uri,
                    self._key_name,
                    self._key,
                    ttl=self._token_ttl,
                    now=now,
                )
                self._token_renew_at = now + self._token_ttl / 2
            return self._token_value

    def _classify(self, answer: httpx.Response) -> RelayResponse:
        """The listener's response, or our error when the relay answered itself."""
        response = RelayResponse(answer.status_code, dict(answer.headers.items()), answer.content)
        if "via" in answer.headers or answer.status_code < 400:
            return response
        status, detail = answer.status_code, _relay_detail(answer)
        where = self._where()
        if _NO_LISTENER.search(detail) or (status == 404 and "listener" in detail.lower()):
            raise RelayUnavailable(f"no agent is listening on relay {where}: {detail}")
        if status in (401, 403):
            raise RelayRefused(f"relay {where} refused the sender (HTTP {status}): {detail}")
        if status >= 500 or status == 429:
            raise RelayUnavailable(
                f"relay {where} answered HTTP {status}: {detail}",
                retry_after=_retry_after(answer.headers.get("retry-after")),
            )
        raise RelayRefused(f"relay {where} rejected the request (HTTP {status}): {detail}")


def _relay_detail(answer: httpx.Response) -> str:
    """Everything the relay said about its error, trimmed for a message: the reason
    phrase, and the body's JSON ``error`` (code, message), XML ``<Detail>`` or text."""
    parts = [answer.reason_phrase or ""]
    text = answer.content[:4096].decode("utf-8", "replace")
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        parts += [str(error.get("code") or ""), str(error.get("message") or "")]
    elif isinstance(error, str):
        parts.append(error)
    else:
        start, end = text.find("<Detail>"), text.find("</Detail>")
        parts.append(text[start + len("<Detail>") : end] if 0 <= start < end else text)
    seen: list[str] = []
    for part in (" ".join(p.split()) for p in parts):
        if part and part not in seen:
            seen.append(part)
    return "; ".join(seen)[:400]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
