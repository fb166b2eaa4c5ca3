"""Issue 12, finding 7: serve's webhook under slow and many clients, on the real server.

A timeout per ``recv`` let a client trickling one byte a second hold a thread
forever, and with no cap 1,600 such connections made Graph's POST time out.
Now each request has one deadline in all, connections beyond the cap are
answered 503 at once, the listen backlog is real, and listening off loopback
needs the webhook key.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from writeback.adapters.graph import GraphCloud
from writeback.adapters.local_queue import LocalQueue
from writeback.config import Host, load_pipeline_settings
from writeback.domain.mapping import MappingOptions
from writeback.errors import ConfigError
from writeback.hosting.serve import ServeConfig, Server
from writeback.ports import Directory
from writeback_sandbox.graph_standin import GraphStandIn, Tenant

SECRET = "limits-client-state-77aa"
GID = "3a5c3221-c465-48c0-95b8-e9305786a271"


def no_directory() -> Directory:
    raise AssertionError("the server is paused: no worker may open the directory")


@contextlib.contextmanager
def serving(tmp_path: Path, **config: Any) -> Iterator[Server]:
    queue = LocalQueue(tmp_path / "queue.sqlite3")
    with GraphStandIn(Tenant()) as standin:
        cloud = GraphCloud(base_url=standin.url)
        server = Server(
            queue=queue,
            cloud=cloud,
            directory_factory=no_directory,
            options=MappingOptions(target_ou="OU=Writeback,DC=corp,DC=example"),
            client_states=[SECRET],
            config=ServeConfig(paused=True, subscribe=False, reconcile_at_start=False, **config),
            owned=[queue, cloud],
        )
        server.start()
        try:
            yield server
        finally:
            server.stop()


def connect(server: Server) -> socket.socket:
    address = urlsplit(server.url)
    return socket.create_connection((address.hostname, address.port), timeout=10)


def notification() -> bytes:
    item = {
        "subscriptionId": "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d",
        "clientState": SECRET,
        "changeType": "updated",
        "resource": f"Groups/{GID}",
        "resourceData": {"@odata.type": "#Microsoft.Graph.Group", "id": GID},
    }
    body = json.dumps({"value": [item]}).encode()
    head = (
        "POST /api/notifications HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def status_of(conn: socket.socket) -> int | None:
    answer = b""
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := conn.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None


def test_a_trickling_request_is_cut_off_at_its_deadline(tmp_path: Path) -> None:
    with serving(tmp_path, request_timeout=1.0) as server:
        raw = notification()
        with connect(server) as conn:
            started = time.monotonic()
            closed_at = None
            for byte in raw:  # a byte every 0.2 s: no single recv ever waits 1 s
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    closed_at = time.monotonic()
                    break
                time.sleep(0.2)
                if time.monotonic() - started > 6:
                    break
            if closed_at is None:
                conn.settimeout(3)
                assert status_of(conn) is None, "the trickled request was answered"
                closed_at = time.monotonic()
        assert closed_at - started < 4, "the connection outlived its request deadline"
        assert server.queue.depth() == 0
        # An honest request right after is served.
        with connect(server) as conn:
            conn.sendall(raw)
            assert status_of(conn) == 202


def test_connections_beyond_the_cap_are_answered_503_at_once(tmp_path: Path) -> None:
    with serving(tmp_path, max_connections=3, request_timeout=5.0) as server:
        idle = [connect(server) for _ in range(3)]
        try:
            time.sleep(0.2)  # accepted, each holding a slot and sending nothing
            started = time.monotonic()
            with connect(server) as extra:
                extra.sendall(notification())
                assert status_of(extra) == 503
            assert time.monotonic() - started < 1.0
        finally:
            for conn in idle:
                conn.close()
        deadline = time.monotonic() + 5
        while server._http is not None and server._http.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        with connect(server) as conn:  # the slots came back
            conn.sendall(notification())
            assert status_of(conn) == 202


def test_the_listen_backlog_is_the_configured_one(tmp_path: Path) -> None:
    with serving(tmp_path, listen_backlog=77) as server:
        port = urlsplit(server.url).port
        listing = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout.split()
        # ss shows a listening socket's backlog in its Send-Q column.
        assert listing[0] == "LISTEN" and listing[2] == "77", listing


def test_listening_off_loopback_needs_the_webhook_key(tmp_path: Path) -> None:
    env = {"WRITEBACK_CLIENT_STATE": "secret", "WRITEBACK_LISTEN_ADDRESS": "0.0.0.0"}  # noqa: S104
    with pytest.raises(ConfigError, match="WRITEBACK_WEBHOOK_KEY"):
        load_pipeline_settings(env, host=Host.SERVE)
    assert load_pipeline_settings({**env, "WRITEBACK_WEBHOOK_KEY": "k" * 32}, host=Host.SERVE)
    assert load_pipeline_settings({"WRITEBACK_CLIENT_STATE": "secret"}, host=Host.SERVE)
    public = {
        "address": "0.0.0.0",  # noqa: S104 - the case under test
        "notification_url": "https://hooks.example/api/notifications",
        "lifecycle_url": "https://hooks.example/api/lifecycle",
    }
    with pytest.raises(ConfigError, match="WRITEBACK_WEBHOOK_KEY"), serving(tmp_path, **public):
        pass
    with serving(tmp_path, webhook_key="k" * 32, **public) as server:
        assert server.url
