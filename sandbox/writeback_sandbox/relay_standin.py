"""A local stand-in of the Azure Relay Hybrid Connections rendezvous service.

Written from the published protocol (azure-relay/relay-hybrid-connections-protocol),
Microsoft's .NET tests and its Node.js client (``hyco-https``, run against this
stand-in in tests/interop), so the relay adapter and the agent can be driven end to
end without Azure. One loopback port serves, like the namespace's port 443 (TLS by
default, with its own CA):

* ``wss://.../$hc/{path}?sb-hc-action=listen``: listener control channels, token in
  the ``ServiceBusAuthorization`` header or ``sb-hc-token``; up to 25 per hybrid
  connection; pinged every ``ping_interval`` seconds (a listener that does not pong
  within ``ping_timeout`` is dropped); closed with 1008 when the token expires
  unless ``renewToken`` replaced it;
* ``https://.../{path}/...``: sender HTTP requests, token in ``sb-hc-token``,
  ``ServiceBusAuthorization`` or, only when neither is there, ``Authorization``
  (which is then stripped; otherwise it is passed on as the sender wrote it). The
  request target goes to the listener as sent (trailing slash, encoding, query),
  less ``sb-hc-*`` query parameters; repeated headers are joined with ", ". Each
  request goes to a listener picked at random as a ``request`` message (body as a
  following binary frame), or, above 64 kB, as an address-only ``request``; the
  listener's ``response`` comes back on the control channel, or on the rendezvous
  WebSocket it opens at the request's ``address`` (``sb-hc-action=request``, valid
  30 s), which then carries that sender connection's later requests. Listener
  responses carry ``Via``; the relay's own errors do not;
* ``wss://.../$hc/{path}?sb-hc-action=connect``: sender WebSockets. The listener gets
  an ``accept`` message; it accepts by connecting to its address, or declines by
  connecting with ``sb-hc-statusCode``/``sb-hc-statusDescription`` (answered 410, as
  the protocol says), and the sender's handshake then fails with that status;
* tokens: HMAC-SHA256 over the token's URL-encoded ``sr``, a newline and ``se``,
  checked against the hybrid connection's rules (Listen, Send; Manage implies both);
  the audience's host may carry the default port (``:443``, as ``createRelayToken``
  writes it). Missing, malformed, badly signed, expired or with under
  ``min_token_lifetime`` (60 s) left: 401; right or resource missing: 403.

The relay's own errors carry their text in the HTTP reason phrase (where Microsoft's
.NET tests read it) and a JSON body ``{"error": {"code", "message"}}`` (the shape of
Microsoft's RelayEmulator) whose message is the endpoint-level text: for "no
listener" (404, reason "There are no listeners connected for the endpoint.") the
body only says the endpoint was not found, so a sender that reads the body alone
misses it, as it could with the real service. When a listener drops, the requests
it had in flight run to ``response_timeout`` (504), as the service lets them.

Where it differs from the service: one process and port instead of a namespace's
gateways (rendezvous addresses point at the same port); no anonymous senders, no
listener-selection criteria, no quotas beyond 25 listeners; tracking ids are made
up. Test hooks: :meth:`endpoint`, :meth:`wait_for_listeners`,
:meth:`listener_count`, :meth:`drop_listeners`, :meth:`pause`/:meth:`resume` and the
counters in :meth:`stats`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import random
import secrets
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.sync.connection import Connection

from writeback.adapters.hybrid_connection import (
    CONTROL_BODY_LIMIT,
    CONTROL_HEADER_LIMIT,
    HOP_HEADERS,
    MAX_MESSAGE,
    RelayEndpoint,
)

log = logging.getLogger(__name__)
_ws_log = logging.getLogger(f"{__name__}.websockets")  # its DEBUG lines show tokens
_ws_log.setLevel(logging.INFO)

MAX_LISTENERS = 25
RENDEZVOUS_VALIDITY = 30.0
NO_LISTENER = "There are no listeners connected for the endpoint."
#: What the body of a relay error says, per status (the endpoint-level text).
_BODY_TEXT = {
    400: "Bad request.",
    401: "Unauthorized.",
    403: "Forbidden.",
    404: "The endpoint was not found.",
    410: "Gone.",
    413: "The request is too large.",
    502: "Bad gateway.",
    503: "The service is unavailable.",
    504: "Gateway timeout.",
}


@dataclass(frozen=True)
class SasRule:
    """A shared access policy on a hybrid connection: key name, key and rights."""

    name: str
    key: str
    rights: frozenset[str]  # of "Listen", "Send", "Manage"

    def grants(self, right: str) -> bool:
        return right in self.rights or "Manage" in self.rights


class _Denied(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class _Pending:
    """One sender request waiting for its listener's answer."""

    id: str
    listener: _Control
    deliver: tuple[str, bytes] | None = None  # a large request, sent once rendezvous is up
    answer: tuple[int, str, dict[str, str], bytes] | None = None
    failure: tuple[int, str] | None = None
    rendezvous: Connection | None = None
    sender_socket: socket.socket | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Accept:
    """One sender WebSocket waiting for its listener to accept or decline it."""

    id: str
    decided: threading.Event = field(default_factory=threading.Event)
    declined: tuple[int, str] | None = None
    listener_side: Connection | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Control:
    """One listener's control channel."""

    id: str
    conn: Connection
    expires_at: float
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[str, _Pending] = field(default_factory=dict)


@dataclass
class _HybridConnection:
    name: str
    rules: dict[str, SasRule]
    listeners: list[_Control] = field(default_factory=list)
    forwarded: int = 0
    per_listener: dict[str, int] = field(default_factory=dict)
    connects: int = 0
    renewals: int = 0
    refusals: list[int] = field(default_factory=list)
    rendezvous: int = 0
    pings: int = 0
    pongs: int = 0
    accepts: int = 0
    declines: list[int] = field(default_factory=list)


class RelayStandIn:
    """The relay service for the hybrid connections given, on 127.0.0.1."""

    def __init__(
        self,
        hybrid_connections: Mapping[str, Sequence[SasRule]],
        *,
        tls: bool = True,
        response_timeout: float = 60.0,
        ping_interval: float = 30.0,
        ping_timeout: float = 10.0,
        min_token_lifetime: float = 60.0,
        rendezvous_validity: float = RENDEZVOUS_VALIDITY,
    ) -> None:
        """``response_timeout``: how long a request waits for its listener (the
        service: 60 s); ``ping_interval``/``ping_timeout``: the pings to listeners;
        ``min_token_lifetime``: tokens with less left are refused;
        ``rendezvous_validity``: how long a rendezvous address works (30 s)."""
        self._hcs = {
            name.lower(): _HybridConnection(name, {rule.name: rule for rule in rules})
            for name, rules in hybrid_connections.items()
        }
        self._tls = tls
        self.response_timeout = response_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.min_token_lifetime = min_token_lifetime
        self.rendezvous_validity = rendezvous_validity
        self._lock = threading.Condition()
        self._addresses: dict[str, tuple[_Pending, float]] = {}
        self._accepts: dict[str, tuple[_Accept, _HybridConnection, float]] = {}
        self._paused = threading.Event()
        self._closing = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.ca_file: str | None = None
        self.ssl_context: ssl.SSLContext | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> RelayStandIn:
        if self._tls:
            self._make_tls()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def _make_tls(self) -> None:
        from writeback_sandbox.samba import _issue_tls

        self._tmp = tempfile.TemporaryDirectory(prefix="relay-standin-")
        ca, cert, key = _issue_tls(Path(self._tmp.name), "127.0.0.1", "localhost")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        self.ca_file, self.ssl_context = str(ca), context

    def close(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
            pendings = [p for p, _ in self._addresses.values()]
        for pending in pendings:
            pending.released.set()
        for sock in sockets:
            _abort(sock)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RelayStandIn:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- test hooks --------------------------------------------------------------

    @property
    def namespace(self) -> str:
        if self._server is None:
            raise RuntimeError("relay stand-in not started")
        return f"127.0.0.1:{self._server.server_address[1]}"

    def endpoint(self, path: str) -> RelayEndpoint:
        """How a client reaches hybrid connection ``path`` here."""
        return RelayEndpoint(self.namespace, path, ca_file=self.ca_file, secure=self._tls)

    def listener_count(self, path: str) -> int:
        with self._lock:
            return len(self._hc(path).listeners)

    def wait_for_listeners(self, path: str, n: int, timeout: float = 10.0) -> bool:
        """Wait until exactly ``n`` listeners are connected on ``path``."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._hc(path).listeners) == n, timeout)

    def drop_listeners(self, path: str) -> int:
        """Cut every control channel on ``path`` at the TCP level, as a relay fault."""
        with self._lock:
            listeners = list(self._hc(path).listeners)
        for control in listeners:
            _abort(control.conn.socket)
        return len(listeners)

    def pause(self) -> None:
        """Refuse every new connection and request, as in an outage."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def stats(self, path: str) -> dict[str, Any]:
        """Counters: requests forwarded (in all and per listener id), control-channel
        connects, token renewals, refused connects (their statuses), rendezvous,
        pings sent to listeners and pongs back, WebSockets accepted and declined
        (the listeners' statuses)."""
        with self._lock:
            hc = self._hc(path)
            return {
                "forwarded": hc.forwarded,
                "per_listener": dict(hc.per_listener),
                "connects": hc.connects,
                "renewals": hc.renewals,
                "refusals": list(hc.refusals),
                "rendezvous": hc.rendezvous,
                "pings": hc.pings,
                "pongs": hc.pongs,
                "accepts": hc.accepts,
                "declines": list(hc.declines),
            }

    # -- internals used by the handler ------------------------------------------

    def _hc(self, path: str) -> _HybridConnection:
        return self._hcs[path.strip("/").lower()]

    def find(self, path: str) -> _HybridConnection | None:
        return self._hcs.get(path.strip("/").lower())

    def route(self, path: str) -> _HybridConnection | None:
        """The hybrid connection a sender path names (its first segments, decoded)."""
        segments = path.lstrip("/").split("/")
        for cut in range(len(segments), 0, -1):
            hc = self.find(unquote("/".join(segments[:cut])))
            if hc is not None:
                return hc
        return None

    def authorize(self, hc: _HybridConnection, token: str | None, right: str) -> float:
        """The token's expiry if it grants ``right`` on ``hc``; else raises _Denied."""
        try:
            return _check_token(hc, self.namespace, token, right, self.min_token_lifetime)
        except _Denied as denied:
            with self._lock:
                hc.refusals.append(denied.status)
            raise

    def add_listener(self, hc: _HybridConnection, control: _Control) -> str | None:
        """Registers a control channel; the reason when it is refused instead."""
        with self._lock:
            if self._paused.is_set():  # the outage began during this listener's handshake
                return "The service is unavailable."
            if len(hc.listeners) >= MAX_LISTENERS:
                return "Too many listeners on this hybrid connection."
            hc.listeners.append(control)
            hc.connects += 1
            self._lock.notify_all()
            return None

    def remove_listener(self, hc: _HybridConnection, control: _Control) -> None:
        """Unregisters a control channel. Its requests in flight are not failed: as
        with the service, they wait for their answer until ``response_timeout``."""
        with self._lock:
            if control in hc.listeners:
                hc.listeners.remove(control)
            self._lock.notify_all()

    def pick_listener(self, hc: _HybridConnection) -> _Control | None:
        with self._lock:
            return random.choice(hc.listeners) if hc.listeners else None

    def count(self, hc: _HybridConnection, listener_id: str) -> None:
        with self._lock:
            hc.forwarded += 1
            hc.per_listener[listener_id] = hc.per_listener.get(listener_id, 0) + 1

    def count_renewal(self, hc: _HybridConnection) -> None:
        with self._lock:
            hc.renewals += 1

    def issue_address(self, hc: _HybridConnection, pending: _Pending) -> str:
        secret = secrets.token_urlsafe(24)
        with self._lock:
            self._addresses[secret] = (pending, time.monotonic() + self.rendezvous_validity)
        scheme = "wss" if self._tls else "ws"
        query = urlencode(
            {"sb-hc-action": "request", "sb-hc-id": pending.id, "sb-hc-rendezvous": secret}
        )
        return f"{scheme}://{self.namespace}/$hc/{quote(hc.name)}?{query}"

    def claim_address(self, secret: str) -> _Pending | None:
        """The request a rendezvous address belongs to; each address works once."""
        with self._lock:
            pending, deadline = self._addresses.pop(secret, (None, 0.0))
            if pending is not None:
                pending.listener.pending.pop(pending.id, None)
                self._count_rendezvous(pending)
        return pending if pending is not None and time.monotonic() < deadline else None

    def _count_rendezvous(self, pending: _Pending) -> None:
        for hc in self._hcs.values():
            if pending.listener in hc.listeners:
                hc.rendezvous += 1

    def issue_accept(self, hc: _HybridConnection, accept: _Accept) -> str:
        secret = secrets.token_urlsafe(24)
        with self._lock:
            self._accepts[secret] = (accept, hc, time.monotonic() + self.rendezvous_validity)
        scheme = "wss" if self._tls else "ws"
        query = urlencode(
            {"sb-hc-action": "accept", "sb-hc-id": accept.id, "sb-hc-rendezvous": secret}
        )
        return f"{scheme}://{self.namespace}/$hc/{quote(hc.name)}?{query}"

    def claim_accept(self, secret: str) -> tuple[_Accept, _HybridConnection] | None:
        with self._lock:
            accept, hc, deadline = self._accepts.pop(secret, (None, None, 0.0))
        if accept is None or hc is None or time.monotonic() >= deadline:
            return None
        return accept, hc

    def count_accept(self, hc: _HybridConnection, declined: int | None) -> None:
        with self._lock:
            if declined is None:
                hc.accepts += 1
            else:
                hc.declines.append(declined)

    def count_ping(self, hc: _HybridConnection, *, pong: bool) -> None:
        with self._lock:
            if pong:
                hc.pongs += 1
            else:
                hc.pings += 1

    def forget_address(self, pending: _Pending) -> None:
        with self._lock:
            for secret, (candidate, _) in list(self._addresses.items()):
                if candidate is pending:
                    del self._addresses[secret]

    def track(self, sock: socket.socket, alive: bool) -> None:
        with self._lock:
            if alive:
                self._sockets.add(sock)
            else:
                self._sockets.discard(sock)


# ------------------------------------------------------------------ tokens


def _check_token(
    hc: _HybridConnection,
    namespace: str,
    token: str | None,
    right: str,
    min_lifetime: float = 60.0,
) -> float:
    if not token:
        raise _Denied(401, "MissingToken: the request has no SAS token.")
    fields = _token_fields(token)
    rule = hc.rules.get(unquote(fields.get("skn", "")))
    try:
        expiry = int(fields["se"])
    except (KeyError, ValueError):
        raise _Denied(401, "MalformedToken: the SAS token has no valid expiry.") from None
    if rule is None or "sr" not in fields or "sig" not in fields:
        raise _Denied(401, "InvalidSignature: unknown key name or malformed SAS token.")
    signed = f"{fields['sr']}\n{fields['se']}".encode()
    expected = base64.b64encode(hmac.new(rule.key.encode(), signed, hashlib.sha256).digest())
    if not hmac.compare_digest(expected, unquote(fields["sig"]).encode()):
        raise _Denied(401, "InvalidSignature: the SAS token signature does not match.")
    if expiry <= time.time():
        raise _Denied(401, "ExpiredToken: the SAS token has expired.")
    if expiry - time.time() < min_lifetime:
        raise _Denied(401, "ExpiredToken: the SAS token expires in less than a minute.")
    if not _covers(unquote(fields["sr"]), namespace, hc.name):
        raise _Denied(403, "InvalidAudience: the SAS token is not valid for this path.")
    if not rule.grants(right):
        raise _Denied(403, f"Unauthorized: the SAS rule does not grant '{right}'.")
    return float(expiry)


def _token_fields(token: str) -> dict[str, str]:
    scheme, _, rest = token.strip().partition(" ")
    if scheme != "SharedAccessSignature":
        return {}
    return dict(part.split("=", 1) for part in rest.split("&") if "=" in part)


def _covers(resource: str, namespace: str, name: str) -> bool:
    """Whether a token's resource URI is this hybrid connection or a parent of it
    (the default port may be written in the host: ``http://ns:443/hc``)."""
    host, _, path = resource.lower().split("://", 1)[-1].partition("/")
    bare = f"{host.removesuffix(':443')}/{path}".rstrip("/")
    target = f"{namespace.lower().removesuffix(':443')}/{name.lower()}"
    return target == bare or target.startswith(bare + "/")


# ------------------------------------------------------------------ HTTP and WebSocket


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], handler: type[_Handler], standin: RelayStandIn
    ) -> None:
        self.standin = standin
        super().__init__(address, handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return not self.standin.paused

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("relay stand-in: connection error", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """One client connection: a sender's HTTP requests or one listener WebSocket."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        self.standin = self.server.standin
        # Frames go out in several writes; without this each waits for a delayed ACK.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = self.standin.ssl_context
        if context is not None:
            self.request.settimeout(10)
            self.request = context.wrap_socket(self.request, server_side=True)
            self.request.settimeout(None)
        self.standin.track(self.request, True)
        self.rendezvous: _Pending | None = None
        super().setup()

    def finish(self) -> None:
        if self.rendezvous is not None:
            self.rendezvous.released.set()
        self.standin.track(self.request, False)
        with contextlib.suppress(OSError):
            super().finish()
        with contextlib.suppress(OSError):
            self.request.close()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("relay stand-in: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        if self.standin.paused or self.standin._closing.is_set():
            self.close_connection = True
            return
        path, _, query = _origin_form(self.path).partition("?")
        if not path.startswith("/$hc/"):
            self._sender_request(path, query)
        elif self.headers.get("Upgrade", "").lower() == "websocket":
            self._websocket(unquote(path[len("/$hc/") :]), dict(parse_qsl(query)))
        else:
            self._relay_error(400, "A WebSocket upgrade is required on this address.")

    # -- relay answers -------------------------------------------------------------

    def _relay_error(self, status: int, detail: str, path: str = "") -> None:
        """An error the relay itself generates, no Via header: the text in the reason
        phrase, a JSON body whose message is the status's endpoint-level text."""
        reason = " ".join(detail.split()).encode("latin-1", "replace").decode("latin-1")
        tracking = (
            f"TrackingId:{uuid.uuid4()}, SystemTracker:{self.standin.namespace}/{path}, "
            f"Timestamp:{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime())}"
        )
        message = _BODY_TEXT.get(status, detail)
        body = json.dumps({"error": {"code": status, "message": f"{message} {tracking}"}})
        self._reply(status, reason, {"Content-Type": "application/json"}, body.encode())

    def _reply(
        self,
        status: int,
        reason: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        via: bool = False,
    ) -> None:
        self.send_response(status, reason or None)
        for name, value in headers.items():
            if name.lower() not in HOP_HEADERS and name.lower() != "via":
                self.send_header(name, value)
        if via:
            previous = headers.get("Via") or headers.get("via")
            hop = f"1.1 {self.standin.namespace}"
            self.send_header("Via", f"{previous}, {hop}" if previous else hop)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # -- WebSocket side (listeners) ------------------------------------------------

    def _websocket(self, path: str, params: dict[str, str]) -> None:
        action = params.get("sb-hc-action")
        if action == "request":
            self._rendezvous(params.get("sb-hc-rendezvous", ""))
            return
        if action == "accept":
            self._accepted(params)
            return
        hc = self.standin.route(path)
        if hc is None:
            self._relay_error(404, "The Hybrid Connection path is invalid.", path)
        elif action == "listen":
            self._listen(hc, params)
        elif action == "connect":
            self._connect(hc, params)
        else:
            self._relay_error(400, f"Action '{action}' is not supported by this stand-in.", path)

    def _connect(self, hc: _HybridConnection, params: dict[str, str]) -> None:
        """A sender's WebSocket: offered to a listener, which accepts or declines it."""
        token = params.get("sb-hc-token") or self.headers.get("ServiceBusAuthorization")
        try:
            self.standin.authorize(hc, token, "Send")
        except _Denied as denied:
            self._relay_error(denied.status, denied.detail, hc.name)
            return
        control = self.standin.pick_listener(hc)
        if control is None:
            self._relay_error(404, NO_LISTENER, hc.name)
            return
        accept = _Accept(params.get("sb-hc-id") or str(uuid.uuid4()))
        headers = {
            name: value
            for name, value in self.headers.items()
            if name.lower() not in ("servicebusauthorization", "authorization")
        }
        message = {
            "accept": {
                "address": self.standin.issue_accept(hc, accept),
                "id": accept.id,
                "connectHeaders": headers,
                "remoteEndpoint": {"address": self.client_address[0], "port": 0},
            }
        }
        try:
            with control.send_lock:
                control.conn.send(json.dumps(message))
        except ConnectionClosed:
            self._relay_error(502, "The listener disconnected.", hc.name)
            return
        if not accept.decided.wait(self.standin.rendezvous_validity):
            self._relay_error(504, "The listener did not accept the connection in time.", hc.name)
            return
        if accept.declined is not None:
            self._relay_error(*accept.declined, hc.name)
            return
        conn = self._upgrade()
        listener_side = accept.listener_side
        if conn is None or listener_side is None:
            accept.done.set()
            return
        _pump(conn, listener_side)
        accept.done.set()

    def _accepted(self, params: dict[str, str]) -> None:
        """The listener's answer to ``accept``: its rendezvous, or its refusal."""
        claimed = self.standin.claim_accept(params.get("sb-hc-rendezvous", ""))
        if claimed is None:
            self._relay_error(403, "The accept URL is not valid or has expired.")
            return
        accept, hc = claimed
        status = params.get("sb-hc-statusCode")
        if status is not None:
            code = int(status) if status.isdigit() and 400 <= int(status) < 600 else 500
            description = params.get("sb-hc-statusDescription") or "Rejected"
            accept.declined = (code, description)
            self.standin.count_accept(hc, code)
            accept.decided.set()
            self._relay_error(410, "The connection was rejected by the listener.", hc.name)
            return
        conn = self._upgrade()
        if conn is None:
            return
        accept.listener_side = conn
        self.standin.count_accept(hc, None)
        accept.decided.set()
        accept.done.wait()

    def _listen(self, hc: _HybridConnection, params: dict[str, str]) -> None:
        token = self.headers.get("ServiceBusAuthorization") or params.get("sb-hc-token")
        try:
            expires_at = self.standin.authorize(hc, token, "Listen")
        except _Denied as denied:
            self._relay_error(denied.status, denied.detail, hc.name)
            return
        conn = self._upgrade()
        if conn is None:
            return
        control = _Control(params.get("sb-hc-id") or str(uuid.uuid4()), conn, expires_at)
        refused = self.standin.add_listener(hc, control)
        if refused is not None:
            conn.close(1008, refused)
            return
        try:
            _ControlLoop(self.standin, hc, control).run()
        finally:
            self.standin.remove_listener(hc, control)
            conn.close()

    def _rendezvous(self, secret: str) -> None:
        pending = self.standin.claim_address(secret)
        if pending is None:
            self._relay_error(403, "The rendezvous URL is not valid or has expired.")
            return
        conn = self._upgrade()
        if conn is None:
            return
        pending.rendezvous = conn
        pending.ready.set()
        while not pending.released.wait(0.1):
            if conn.protocol.state is State.CLOSED:
                # The listener dropped it: the service drops the sender's connection too.
                sender = pending.sender_socket
                if sender is not None:
                    _abort(sender)
                return
        conn.close(1001, "The sender client shut down the connection.")

    def _upgrade(self) -> Connection | None:
        """Complete the WebSocket handshake on this connection and hand it over."""
        protocol = ServerProtocol(max_size=MAX_MESSAGE, logger=_ws_log)
        # The HTTP server has read the handshake already: replay it to the protocol.
        head = "".join(f"{name}: {value}\r\n" for name, value in self.headers.items())
        protocol.receive_data(f"GET {self.path} HTTP/1.1\r\n{head}\r\n".encode())
        request = protocol.events_received()[0]
        assert isinstance(request, Request)
        response = protocol.accept(request)
        protocol.send_response(response)
        self.wfile.write(b"".join(protocol.data_to_send()))
        self.close_connection = True
        if response.status_code != 101:
            return None
        return Connection(self.request, protocol, ping_interval=None, close_timeout=2)

    # -- HTTP side (senders) -------------------------------------------------------

    def _sender_request(self, path: str, query: str) -> None:
        hc = self.standin.route(path)
        if hc is None:
            self._relay_error(404, "The Hybrid Connection path is invalid.", path)
            return
        params = [part for part in query.split("&") if part] if query else []
        query_token = next(
            (unquote(p.partition("=")[2]) for p in params if _param_name(p) == "sb-hc-token"),
            None,
        )
        bus_token = self.headers.get("ServiceBusAuthorization")
        # The service evaluates Authorization only when neither of the others is there.
        token = query_token or bus_token or self.headers.get("Authorization")
        try:
            body = self._read_body()
            self.standin.authorize(hc, token, "Send")
        except _Denied as denied:
            self._relay_error(denied.status, denied.detail, hc.name)
            return
        kept = "&".join(p for p in params if not _param_name(p).startswith("sb-hc-"))
        raw_path = self.path.partition("?")[0]  # as sent: absolute form, encoding, slashes
        request = {
            "requestTarget": raw_path + (f"?{kept}" if kept else ""),
            "method": self.command,
            "requestHeaders": self._forwarded_headers(
                strip_authorization=query_token is None and bus_token is None
            ),
        }
        self._forward(hc, request, body)

    def _forwarded_headers(self, *, strip_authorization: bool) -> dict[str, str]:
        """The sender's headers less hop-by-hop ones and the relay token, repeated
        ones joined with ", " (as the service does)."""
        stripped = {"servicebusauthorization"} | (
            {"authorization"} if strip_authorization else set()
        )
        joined: dict[str, str] = {}
        names: dict[str, str] = {}
        for name in self.headers:
            low = name.lower()
            if low in HOP_HEADERS or low in stripped or low in names:
                continue
            names[low] = name
            joined[name] = ", ".join(self.headers.get_all(name) or [])
        return joined

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_MESSAGE:
            raise _Denied(413, "The request body is too large.")
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _forward(self, hc: _HybridConnection, request: dict[str, Any], body: bytes) -> None:
        if self.rendezvous is not None:
            self._over_rendezvous(hc, self.rendezvous, request, body)
            return
        control = self.standin.pick_listener(hc)
        if control is None:
            self._relay_error(404, NO_LISTENER, hc.name)
            return
        pending = _Pending(str(uuid.uuid4()), control)
        message = dict(request, id=pending.id, body=bool(body))
        message["address"] = self.standin.issue_address(hc, pending)
        control.pending[pending.id] = pending
        self.standin.count(hc, control.id)
        if not self._send_request(control, pending, message, body):
            return
        if not pending.ready.wait(self.standin.response_timeout):
            control.pending.pop(pending.id, None)
            self.standin.forget_address(pending)
            pending.released.set()
            self._relay_error(504, "The listener did not answer in time.", hc.name)
            return
        self._complete(hc, pending)

    def _send_request(
        self, control: _Control, pending: _Pending, message: dict[str, Any], body: bytes
    ) -> bool:
        header = json.dumps({"request": message})
        small = len(body) <= CONTROL_BODY_LIMIT and len(header) <= CONTROL_HEADER_LIMIT
        if not small:
            pending.deliver = (json.dumps({"request": dict(message, address="")}), body)
            header = json.dumps({"request": {"address": message["address"], "id": pending.id}})
        try:
            with control.send_lock:
                control.conn.send(header)
                if small and body:
                    control.conn.send(body)
        except ConnectionClosed:
            control.pending.pop(pending.id, None)
            self._relay_error(502, "The listener disconnected.", "")
            return False
        return True

    def _complete(self, hc: _HybridConnection, pending: _Pending) -> None:
        if pending.failure is not None:
            self._relay_error(*pending.failure, hc.name)
        elif pending.answer is not None:
            status, reason, headers, body = pending.answer
            self._reply(status, reason, headers, body, via=True)
        elif pending.rendezvous is not None:
            self.rendezvous = pending
            pending.sender_socket = self.request
            if pending.deliver is not None:
                self._exchange(hc, pending.rendezvous, *pending.deliver)
            else:
                self._receive_answer(hc, pending.rendezvous)

    def _over_rendezvous(
        self, hc: _HybridConnection, pending: _Pending, request: dict[str, Any], body: bytes
    ) -> None:
        assert pending.rendezvous is not None
        message = dict(request, id=str(uuid.uuid4()), body=bool(body))
        self.standin.count(hc, pending.listener.id)
        self._exchange(hc, pending.rendezvous, json.dumps({"request": message}), body)

    def _exchange(self, hc: _HybridConnection, conn: Connection, header: str, body: bytes) -> None:
        try:
            conn.send(header)
            if body:
                conn.send(body)
        except ConnectionClosed:
            self.close_connection = True  # the listener dropped it: drop the sender too
            return
        self._receive_answer(hc, conn)

    def _receive_answer(self, hc: _HybridConnection, conn: Connection) -> None:
        try:
            meta = json.loads(conn.recv(timeout=self.standin.response_timeout))["response"]
            body = _binary(conn.recv(timeout=30)) if meta.get("body") else b""
        except TimeoutError:
            self._relay_error(504, "The listener did not answer in time.", hc.name)
            self.close_connection = True
            return
        except (ConnectionClosed, ValueError, KeyError, TypeError):
            self.close_connection = True
            return
        self._reply(*_answer(meta, body), via=True)


class _ControlLoop:
    """Reads one listener's control channel: responses and token renewals."""

    def __init__(self, standin: RelayStandIn, hc: _HybridConnection, control: _Control) -> None:
        self.standin, self.hc, self.control = standin, hc, control

    def run(self) -> None:
        conn = self.control.conn
        next_ping = time.monotonic() + self.standin.ping_interval
        waiting: tuple[threading.Event, float] | None = None
        while not self.standin._closing.is_set():
            left = self.control.expires_at - time.time()
            if left <= 0:
                conn.close(1008, "The security token has expired.")
                return
            now = time.monotonic()
            if waiting is not None and waiting[0].is_set():
                self.standin.count_ping(self.hc, pong=True)
                waiting = None
            elif waiting is not None and now >= waiting[1]:
                conn.close(1011, "The listener did not answer a ping.")
                return
            if waiting is None and now >= next_ping:
                try:
                    waiting = (conn.ping(), now + self.standin.ping_timeout)
                except ConnectionClosed:
                    return
                self.standin.count_ping(self.hc, pong=False)
                next_ping = now + self.standin.ping_interval
            try:
                message = conn.recv(timeout=min(0.5, left, self.standin.ping_interval))
            except TimeoutError:
                continue
            except ConnectionClosed:
                return
            if isinstance(message, str) and not self._handle(message):
                return

    def _handle(self, message: str) -> bool:
        try:
            envelope = json.loads(message)
        except ValueError:
            return True
        if "response" in envelope:
            self._response(envelope["response"])
        elif "renewToken" in envelope:
            return self._renew(envelope["renewToken"])
        return True

    def _response(self, meta: dict[str, Any]) -> None:
        body = _binary(self.control.conn.recv(timeout=30)) if meta.get("body") else b""
        pending = self.control.pending.pop(str(meta.get("requestId")), None)
        if pending is None:
            return
        self.standin.forget_address(pending)
        if len(body) > CONTROL_BODY_LIMIT + 1536:
            pending.failure = (502, "The listener sent a body over 64 kB on the control channel.")
        else:
            pending.answer = _answer(meta, body)
        pending.ready.set()

    def _renew(self, renewal: dict[str, Any]) -> bool:
        try:
            self.control.expires_at = self.standin.authorize(
                self.hc, renewal.get("token"), "Listen"
            )
        except _Denied:
            self.control.conn.close(1008, "The renewed token is not valid.")
            return False
        self.standin.count_renewal(self.hc)
        return True


def _answer(meta: Mapping[str, Any], body: bytes) -> tuple[int, str, dict[str, str], bytes]:
    headers = {str(k): str(v) for k, v in (meta.get("responseHeaders") or {}).items()}
    return int(meta["statusCode"]), str(meta.get("statusDescription") or ""), headers, body


def _binary(data: str | bytes) -> bytes:
    return data if isinstance(data, bytes) else data.encode()


def _origin_form(target: str) -> str:
    """The path and query of a request target, also when it came in absolute form."""
    if "://" in target.partition("?")[0]:
        parts = urlsplit(target)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return target


def _param_name(part: str) -> str:
    return unquote(part.partition("=")[0]).lower()


def _pump(sender: Connection, listener: Connection) -> None:
    """Relays messages both ways between two WebSockets until one side closes."""

    def copy(source: Connection, sink: Connection) -> None:
        try:
            while True:
                sink.send(source.recv())
        except ConnectionClosed:
            pass
        finally:
            sink.close()
            source.close()

    other = threading.Thread(target=copy, args=(listener, sender), daemon=True)
    other.start()
    copy(sender, listener)
    other.join(5)


def _abort(sock: socket.socket) -> None:
    """Cut a TCP connection under whatever TLS or WebSocket layer uses it."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
