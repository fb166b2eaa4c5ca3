"""Hostile requests against the real HTTP server of single-machine mode.

``tests/unit/test_notifications.py`` fuzzes bodies through ``handle_webhook``;
this adds what only the HTTP layer sees: methods, paths, the webhook key in the
query or a header, broken and lying ``Content-Length``, chunked bodies, odd
headers, bodies shorter or longer than announced, sizes at the 1 MiB limit.
Requests are written byte by byte to a socket. What must hold: no 5xx unless
persisting failed; nothing enqueued unless the key and every item's
clientState were right; no secret in any log record. The server runs paused
(workers never start), with a real SQLite queue and a Graph stand-in behind it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from writeback.adapters.graph import GraphCloud
from writeback.adapters.local_queue import LocalQueue
from writeback.domain.mapping import MappingOptions
from writeback.hosting.serve import ServeConfig, Server
from writeback.ports import Directory
from writeback.service.notifications import MAX_BODY_BYTES
from writeback_sandbox.graph_standin import GraphStandIn, Tenant

SECRET = "hostile-client-state-5e0d"
KEY = "hostile-webhook-key-0b7e41c9"
GID = "3a5c3221-c465-48c0-95b8-e9305786a271"
SUBSCRIPTION = "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d"


def no_directory() -> Directory:
    raise AssertionError("the server is paused: no worker may open the directory")


class Records(logging.Handler):
    """Every log record of the run, formatted, to look for secrets in."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage() + " " + " ".join(map(str, vars(record).values())))


@pytest.fixture
def records() -> Iterator[Records]:
    handler, root = Records(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    queue = LocalQueue(tmp_path / "queue.sqlite3")
    with GraphStandIn(Tenant()) as standin:
        cloud = GraphCloud(base_url=standin.url)
        made = Server(
            queue=queue,
            cloud=cloud,
            directory_factory=no_directory,
            options=MappingOptions(target_ou="OU=Writeback,DC=corp,DC=example"),
            client_states=[SECRET],
            config=ServeConfig(
                paused=True,
                subscribe=False,
                reconcile_at_start=False,
                webhook_key=KEY,
                state_path=str(tmp_path / "state.json"),
            ),
            owned=[queue, cloud],
        )
        made.start()
        yield made
        made.stop()


def send(server: Server, raw: bytes) -> int | None:
    """Write one raw request, close our side, and return the status (None: no answer)."""
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as conn:
        with contextlib.suppress(OSError):  # answered and closed before all was sent
            conn.sendall(raw)
            conn.shutdown(socket.SHUT_WR)  # a body shorter than announced ends here
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                answer += chunk
    if not answer.startswith(b"HTTP/"):
        return None
    return int(answer.split(b" ", 2)[1])


def request(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes, *, length: str | None
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def notification(state: str = SECRET, gid: str = GID) -> bytes:
    item = {
        "subscriptionId": SUBSCRIPTION,
        "clientState": state,
        "changeType": "updated",
        "resource": f"Groups/{gid}",
        "resourceData": {"@odata.type": "#Microsoft.Graph.Group", "id": gid, "sequenceNumber": 1},
    }
    return json.dumps({"value": [item]}).encode()


# --------------------------------------------------------------------------- fuzz

SERVED_METHODS = frozenset({"POST", "GET", "PUT", "PATCH", "DELETE"})
VALID_KEYS = [(f"code={KEY}", []), ("", [("x-functions-key", KEY)])]

_text = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40)
_bodies = st.one_of(
    st.just(notification()),
    st.just(notification(state=SECRET.upper())),
    st.just(notification(gid="not-a-guid")),
    st.binary(max_size=400),
    _text.map(str.encode),
    st.builds(lambda n: b"[" * n + b"]" * n, st.integers(0, 5000)),
)
_lengths = st.one_of(
    st.none(),
    st.sampled_from(["-1", "abc", "+5", " 7", "0x10", "99999999999999999999", "1e3", ""]),
    st.integers(-5, 5000).map(str),
)
_paths = st.sampled_from(
    [
        "/api/notifications",
        "/api/lifecycle",
        "/api/notifications/",
        "/API/Notifications",
        "//api/notifications",
        "/api/health",
        "/api/../api/notifications",
        "/",
        "*",
    ]
)
_keys = st.sampled_from(
    [
        ("", []),
        (f"code={KEY}", []),
        (f"code={KEY}&code=wrong", []),
        ("code=wrong", []),
        ("", [("x-functions-key", KEY)]),
        ("", [("x-functions-key", KEY + " ")]),
        ("code=", [("x-functions-key", "")]),
    ]
)
_headers = st.lists(
    st.tuples(
        st.sampled_from(
            ["Content-Type", "Transfer-Encoding", "Expect", "X-Forwarded-For", "Content-Encoding"]
        ),
        st.sampled_from(["application/json", "chunked", "100-continue", "gzip", "\x7f", "é" * 50])
        | _text,
    ),
    max_size=4,
)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(
    method=st.sampled_from(["POST", "POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "BREW"]),
    path=_paths,
    key=_keys,
    token=st.none() | _text,
    headers=_headers,
    body=_bodies,
    length=_lengths,
    honest=st.booleans(),
)
def test_fuzzed_requests_never_5xx_and_never_enqueue_garbage(
    server: Server,
    records: Records,
    *,
    method: str,
    path: str,
    key: tuple[str, list[tuple[str, str]]],
    token: str | None,
    headers: list[tuple[str, str]],
    body: bytes,
    length: str | None,
    honest: bool,
) -> None:
    query, key_headers = key
    if token is not None:
        query += f"&validationToken={quote(token)}"
    target = f"{path}?{query.lstrip('&')}" if query else path
    declared = str(len(body)) if honest else length
    before = server.queue.depth()
    status = send(server, request(method, target, key_headers + headers, body, length=declared))
    # 501 is the HTTP server's word for a method it has no handler for (HEAD, OPTIONS...).
    unknown_method = status == 501 and method not in SERVED_METHODS
    assert status is None or status < 500 or unknown_method, status
    enqueued = server.queue.depth() - before
    if enqueued:
        assert status == 202
        assert body == notification() and honest
        # http.server collapses leading slashes ("//api/..." is "/api/...").
        served = "/" + path.strip("/")
        assert method == "POST" and served == "/api/notifications" and token is None
        assert key in VALID_KEYS
    for line in records.lines:
        assert SECRET not in line
        assert KEY not in line


def test_the_webhook_key_never_reaches_a_debug_log_line(server: Server, records: Records) -> None:
    assert send(server, request("POST", f"/api/notifications?code={KEY}", [], b"", length="0"))
    assert not [line for line in records.lines if KEY in line]


# --------------------------------------------------------------------------- sizes and headers

_FRAME = len(b'{"pad": "", ') + len(notification()) - 1
AT_LIMIT = b'{"pad": "' + b"x" * (MAX_BODY_BYTES - _FRAME) + b'", ' + notification()[1:]


@pytest.mark.parametrize(
    ("length", "headers", "body", "status", "enqueued"),
    [
        ("abc", [], notification(), 400, 0),
        ("-1", [], notification(), 400, 0),
        (str(MAX_BODY_BYTES + 1), [], notification(), 413, 0),
        ("99999999999999999999", [], notification(), 413, 0),
        (None, [("Transfer-Encoding", "chunked")], b"5\r\nhello\r\n0\r\n\r\n", 400, 0),
        (str(len(notification()) + 50), [], notification()[:-5], 400, 0),
        (str(len(AT_LIMIT)), [], AT_LIMIT, 202, 1),
        (None, [("Content-Type", "text/html")], b"", 400, 0),
        (str(len(notification())), [("Content-Type", "text/html")], notification(), 202, 1),
        (str(len(notification("wrong"))), [], notification("wrong"), 403, 0),
    ],
)
def test_lengths_and_headers(
    server: Server,
    *,
    length: str | None,
    headers: list[tuple[str, str]],
    body: bytes,
    status: int,
    enqueued: int,
) -> None:
    raw = request("POST", f"/api/notifications?code={KEY}", headers, body, length=length)
    assert send(server, raw) == status
    assert server.queue.depth() == enqueued


def test_only_a_failed_persist_is_a_5xx(server: Server) -> None:
    queue = server.queue
    assert isinstance(queue, LocalQueue)
    queue.close()  # the queue can no longer be written
    good, garbage = notification(), b"{not json"
    raw = request("POST", f"/api/notifications?code={KEY}", [], good, length=str(len(good)))
    assert send(server, raw) == 503
    raw = request("POST", f"/api/notifications?code={KEY}", [], garbage, length=str(len(garbage)))
    assert send(server, raw) == 400
    assert send(server, request("GET", "/api/health", [], b"", length=None)) == 200
