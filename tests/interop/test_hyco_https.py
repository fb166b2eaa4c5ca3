"""The relay against Microsoft's own Hybrid Connections client, ``hyco-https`` 1.4.5.

Microsoft's Node.js package is tested against the live Azure Relay, so it is the
nearest thing to the real wire that runs here. Both directions:

* (a) its listener, ``createRelayedServer``, through our stand-in, with our
  :class:`HybridConnectionSender`, and the relay adapter's real calls (schema, reads,
  a sync, signed answers) with hyco-https in front of our agent on a real Samba DC;
* (b) our :class:`HybridConnectionListener` through our stand-in, with a sender
  written the way Microsoft's samples write one (Node's https client, tokens from
  ``createRelayToken``, in ``ServiceBusAuthorization`` or ``sb-hc-token``).

Where hyco-https itself is wrong, the test says so and covers that path with our
own code instead: it never reads requests on a response rendezvous it opened (a
follow-up on that sender connection is never answered), and its ``accept`` handler
crashes the process (``Extensions`` is not defined).

``scripts/install-interop.sh`` (run by ``scripts/bootstrap.sh``) installs the package
from tests/interop/package-lock.json; without it the tests are skipped, and under CI
they fail.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.support.relay import LISTEN, PATH, SEND, relay_rig
from tests.support.world import World, make_world
from writeback.adapters.hybrid_connection import (
    HybridConnectionListener,
    HybridConnectionSender,
    RelayRequest,
    RelayResponse,
    sas_token,
)
from writeback.errors import RelayUnavailable
from writeback.hosting.agent import AgentService
from writeback_sandbox.relay_standin import RelayStandIn
from writeback_sandbox.samba import SambaDC

HERE = Path(__file__).resolve().parent
NODE_MODULES = HERE / "node_modules" / "hyco-https"
MIB2 = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, with hyco-https installed next to these tests."""
    found = shutil.which("node")
    if found is None or not NODE_MODULES.is_dir():
        reason = "hyco-https is not installed: run scripts/install-interop.sh"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def pattern(size: int) -> bytes:
    """What listener.js answers to ``?size=N``: byte i is i % 251."""
    return bytes(range(251)) * (size // 251) + bytes(range(size % 251))


# ------------------------------------------------------------------- hyco-https listener


class NodeListener:
    """tests/interop/listener.js in a child process: hyco-https's createRelayedServer."""

    def __init__(
        self, node: str, standin: RelayStandIn, *, mode: str = "echo", upstream: str = ""
    ) -> None:
        assert standin.ca_file is not None
        env = {
            **os.environ,
            "NODE_EXTRA_CA_CERTS": standin.ca_file,
            "RELAY_NAMESPACE": standin.namespace,
            "RELAY_PATH": PATH,
            "RELAY_KEY_NAME": LISTEN.name,
            "RELAY_KEY": LISTEN.key,
            "LISTENER_MODE": mode,
            "LISTENER_UPSTREAM": upstream,
        }
        self.process = subprocess.Popen(
            [node, str(HERE / "listener.js")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.served: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_errors, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("served "):
                self.served.append(line[len("served ") :].strip())
            self.lines.put(line.strip())

    def _read_errors(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line.rstrip())

    def wait_listening(self, count: int = 1, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        seen = 0
        while seen < count:
            left = deadline - time.monotonic()
            assert left > 0, f"hyco-https did not listen: {self.stderr}"
            with contextlib.suppress(queue.Empty):
                if self.lines.get(timeout=min(left, 0.5)) == "listening":
                    seen += 1

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def node_listener(node: str, standin: RelayStandIn, **options: str) -> Iterator[NodeListener]:
    listener = NodeListener(node, standin, **options)
    try:
        listener.wait_listening()
        assert standin.wait_for_listeners(PATH, 1), "the relay did not register hyco-https"
        yield listener
    finally:
        listener.stop()
    # Until the relay has dropped its control channel: a listener connected next must
    # not be mistaken for it (its count of one) while it is still routed to. Only on
    # a normal exit, so that a failing test's own error is the one reported.
    assert standin.wait_for_listeners(PATH, 0), "the relay kept the stopped hyco-https"


@pytest.fixture
def standin() -> Iterator[RelayStandIn]:
    with RelayStandIn({PATH: [SEND, LISTEN]}, response_timeout=5) as relay:
        yield relay


@pytest.fixture
def sender(standin: RelayStandIn) -> Iterator[HybridConnectionSender]:
    with HybridConnectionSender(standin.endpoint(PATH), SEND.name, SEND.key, timeout=15) as s:
        yield s


def test_hyco_listener_small_and_2_mib_bodies_both_ways(
    node: str, standin: RelayStandIn, sender: HybridConnectionSender
) -> None:
    big = pattern(MIB2)
    with node_listener(node, standin):
        small = sender.request("POST", "/v1/apply?x=1", b'{"op":1}', {"X-Tag": "a"})
        upload = sender.request("PUT", "/blob", big)  # over 64 kB: request rendezvous
        after_upload = sender.request("POST", "/after", b"follow-up")  # same rendezvous
    assert small.status == 200 and small.body == b'{"op":1}'
    assert small.headers["x-method"] == "POST"
    assert small.headers["x-url"] == f"/{PATH}/v1/apply?x=1"  # the target as sent
    assert small.headers["x-relay-token"] == "stripped"
    assert "via" in small.headers
    assert upload.status == 200
    assert upload.headers["x-body-sha256"] == hashlib.sha256(big).hexdigest()
    assert upload.body == big
    assert after_upload.body == b"follow-up"


def test_hyco_listener_large_answers_on_fresh_connections(node: str, standin: RelayStandIn) -> None:
    endpoint = standin.endpoint(PATH)
    with node_listener(node, standin):
        for size in (65_000, MIB2):
            with HybridConnectionSender(endpoint, SEND.name, SEND.key, timeout=15) as one:
                answer = one.request("GET", f"/report?size={size}")
            assert answer.status == 200 and answer.body == pattern(size)


def test_hyco_listener_never_reads_a_response_rendezvous_it_opened(
    node: str, standin: RelayStandIn, sender: HybridConnectionSender
) -> None:
    """hyco-https is wrong here: after answering over a rendezvous it opened itself
    (a response over 64 kB), it never listens on that socket, so the relay's next
    request from the same sender connection is never answered (504 after the
    relay's response timeout, 5 s here). Our listener serves that path: see
    tests/integration/test_hybrid_connection.py::test_large_bodies_both_ways_go_through_rendezvous
    and the same sequence below."""
    with node_listener(node, standin):
        assert sender.request("GET", "/report?size=100000").body == pattern(100_000)
        with pytest.raises(RelayUnavailable, match="HTTP 504"):
            sender.request("POST", "/follow-up", b"never answered")

    def ours(request: RelayRequest) -> RelayResponse:
        size = request.target.partition("size=")[2]
        return RelayResponse(200, {}, pattern(int(size)) if size else request.body)

    with HybridConnectionListener(standin.endpoint(PATH), LISTEN.name, LISTEN.key, ours) as mine:
        assert mine.connected.wait(10) and standin.wait_for_listeners(PATH, 1)
        with HybridConnectionSender(standin.endpoint(PATH), SEND.name, SEND.key) as fresh:
            assert fresh.request("GET", "/report?size=100000").body == pattern(100_000)
            assert fresh.request("POST", "/follow-up", b"answered").body == b"answered"


def test_hyco_listener_statuses_reasons_headers_and_the_connection_root(
    node: str, standin: RelayStandIn, sender: HybridConnectionSender
) -> None:
    with node_listener(node, standin):
        refused = sender.request("GET", "/x", headers={"X-Status": "404", "X-Reason": "Nope"})
        root = sender.request("GET", "/")
        tags = sender.request(
            "POST", "/tags", b"", {"X-Tag": "one", "Authorization": "Bearer for-the-agent"}
        )
    # A 404 from the listener (with Via) is the listener's answer, not "no listener".
    assert refused.status == 404 and "via" in refused.headers
    assert root.headers["x-url"] == f"/{PATH}/"  # the trailing slash kept
    assert tags.headers["x-tags"] == "one"
    assert tags.headers["x-authorization"] == "Bearer for-the-agent"  # not the relay token


def test_hyco_listener_reconnects_after_the_relay_drops_it(
    node: str, standin: RelayStandIn, sender: HybridConnectionSender
) -> None:
    with node_listener(node, standin) as listener:
        assert sender.request("GET", "/before").status == 200
        standin.drop_listeners(PATH)
        assert standin.wait_for_listeners(PATH, 0, timeout=10)
        listener.wait_listening()  # hyco-https reconnects by itself
        assert standin.wait_for_listeners(PATH, 1, timeout=20)
        assert sender.request("GET", "/after").status == 200
    assert standin.stats(PATH)["connects"] == 2


def test_hyco_listener_crashes_on_a_relayed_websocket(node: str, standin: RelayStandIn) -> None:
    """hyco-https is wrong here: its ``accept`` handler uses an ``Extensions`` it never
    defines, so a sender's WebSocket kills the listener process. Our listener
    declines it with 501 instead: tests/integration/test_hybrid_connection.py::
    test_the_listener_declines_a_relayed_websocket."""
    endpoint = standin.endpoint(PATH)
    token = sas_token(endpoint.resource_uri, SEND.name, SEND.key)
    with node_listener(node, standin) as listener:
        with contextlib.suppress(Exception):
            connect(
                endpoint.websocket_url("connect", "sender-1"),
                ssl=endpoint.ssl_context(),
                additional_headers={"ServiceBusAuthorization": token},
                open_timeout=5,
            )
        assert listener.process.wait(10) != 0
    assert any("Extensions is not defined" in line for line in listener.stderr), listener.stderr


# ------------------------------------------- the relay adapter through hyco-https to the agent


class _AgentOverHttp(BaseHTTPRequestHandler):
    """Plain HTTP in front of AgentService.handle, for hyco-https's proxy mode."""

    protocol_version = "HTTP/1.1"
    service: AgentService

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, headers, reply = self.service.handle(
            self.command, self.path, dict(self.headers.items()), body
        )
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with make_world(samba_dc, make_ou(samba_dc)) as w:
        yield w


def test_the_relay_adapters_calls_through_hyco_https_to_the_agent(node: str, world: World) -> None:
    """RelayDirectory → our stand-in → hyco-https's listener → the agent on a real DC:
    signed requests arrive intact and the agent's signed answers come back intact
    (a sync, then a change and a no-op sync, all through Microsoft's listener)."""
    with relay_rig() as rig:
        service = AgentService(
            lambda: world.dc.directory(world.ou),
            rig.policy(world.ou),
            rig.caller_key,
            audience=rig.audience,
        )
        handler = type("Handler", (_AgentOverHttp,), {"service": service})
        http_server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=http_server.serve_forever, daemon=True).start()
        upstream = f"http://127.0.0.1:{http_server.server_address[1]}"
        try:
            with node_listener(node, rig.standin, mode="proxy", upstream=upstream) as listener:
                relay = rig.directory(world.ou)
                world.directory.close()
                world.directory = relay  # type: ignore[assignment]
                assert relay.schema_attributes() == world.options.schema_attributes
                sales = world.add_group(1, "Sales", ["user0", "user1"], mail="s@contoso.com")
                world.add_group(2, "Ops", ["user2"])
                assert world.sync().applied == {"add": 2}
                world.tenant.add_members(sales, [world.uid("user3")])
                assert world.sync().applied == {"modify": 1}
                assert world.sync().applied == {}
                relay.close()
            assert any(line.startswith(f"POST /{PATH}/v1/apply") for line in listener.served)
        finally:
            http_server.shutdown()
            service.close()
    entry = world.ad_entry(sales)
    assert entry is not None
    assert entry["member_sids"] == {world.sid_of(u) for u in ("user0", "user1", "user3")}


# ------------------------------------------------- our listener, a Microsoft-style sender


def node_send(
    node: str, standin: RelayStandIn, requests: list[dict[str, Any]], **spec: Any
) -> list[dict[str, Any]]:
    """tests/interop/sender.js: the requests in order, as Microsoft's samples send them."""
    assert standin.ca_file is not None
    for request in requests:
        request["body"] = base64.b64encode(request.get("body", b"")).decode()
    payload = {
        "namespace": standin.namespace,
        "path": PATH,
        "keyName": SEND.name,
        "key": SEND.key,
        "tokenIn": "header",
        "keepAlive": True,
        "requests": requests,
        **spec,
    }
    done = subprocess.run(
        [node, str(HERE / "sender.js")],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NODE_EXTRA_CA_CERTS": standin.ca_file},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results: list[dict[str, Any]] = json.loads(done.stdout)
    for result in results:
        assert "error" not in result, result
        result["body"] = base64.b64decode(result["body"])
    return results


def _echo(request: RelayRequest) -> RelayResponse:
    size = request.target.partition("size=")[2]
    headers = {
        "x-target": request.target,
        "x-method": request.method,
        "x-body-sha256": hashlib.sha256(request.body).hexdigest(),
        "x-token": "seen" if "servicebusauthorization" in request.headers else "stripped",
    }
    return RelayResponse(200, headers, pattern(int(size)) if size else request.body)


@contextlib.contextmanager
def our_listener(standin: RelayStandIn, **options: Any) -> Iterator[HybridConnectionListener]:
    listener = HybridConnectionListener(
        standin.endpoint(PATH), LISTEN.name, LISTEN.key, _echo, backoff_max=1.0, **options
    )
    with listener:
        assert listener.connected.wait(10) and standin.wait_for_listeners(PATH, 1)
        yield listener


def test_microsoft_style_sender_small_2_mib_and_keep_alive_follow_ups(
    node: str, standin: RelayStandIn
) -> None:
    big = pattern(MIB2)
    with our_listener(standin):
        results = node_send(
            node,
            standin,
            [
                {"method": "GET", "target": "/"},
                {"method": "POST", "target": "/v1/apply?x=1", "body": b'{"a":1}'},
                {"method": "PUT", "target": "/blob", "body": big},  # request rendezvous
                {"method": "POST", "target": "/after-upload", "body": b"small"},
                {"method": "GET", "target": f"/report?size={MIB2}"},  # response rendezvous
                {"method": "POST", "target": "/after-download", "body": b"again"},
            ],
        )
    root, small, upload, after_upload, download, after_download = results
    assert root["status"] == 200 and root["headers"]["x-target"] == "/"
    assert small["body"] == b'{"a":1}' and small["headers"]["x-target"] == "/v1/apply?x=1"
    assert small["headers"]["x-token"] == "stripped" and "via" in small["headers"]
    assert upload["headers"]["x-body-sha256"] == hashlib.sha256(big).hexdigest()
    assert upload["body"] == big
    assert after_upload["body"] == b"small"
    assert download["body"] == big
    assert after_download["body"] == b"again"  # on the rendezvous we keep


def test_microsoft_style_sender_with_the_token_in_the_query(
    node: str, standin: RelayStandIn
) -> None:
    with our_listener(standin):
        [answer] = node_send(
            node, standin, [{"method": "GET", "target": "/q?keep=1"}], tokenIn="query"
        )
    assert answer["status"] == 200
    assert answer["headers"]["x-target"] == "/q?keep=1"  # sb-hc-token stripped, rest kept


def test_microsoft_style_sender_across_token_renewals_and_a_reconnect(node: str) -> None:
    with (
        RelayStandIn({PATH: [SEND, LISTEN]}, min_token_lifetime=0) as standin,
        our_listener(standin, token_ttl=3),
    ):
        first = node_send(node, standin, [{"method": "GET", "target": "/one"}])
        time.sleep(4)  # past the first listener token: renewed, channel kept
        second = node_send(node, standin, [{"method": "GET", "target": "/two"}])
        standin.drop_listeners(PATH)
        assert standin.wait_for_listeners(PATH, 0, timeout=10)
        assert standin.wait_for_listeners(PATH, 1, timeout=20)  # our listener reconnects
        third = node_send(node, standin, [{"method": "GET", "target": "/three"}])
        stats = standin.stats(PATH)
    assert [r[0]["status"] for r in (first, second, third)] == [200, 200, 200]
    assert stats["renewals"] >= 1 and stats["connects"] == 2


def test_a_microsoft_style_sender_cannot_drive_the_agent_without_the_caller_key(
    node: str, world: World
) -> None:
    """A Send key alone is not enough: the agent answers 401, signed, and AD is left alone."""
    with relay_rig() as rig:
        rig.start_agent(lambda: world.dc.directory(world.ou), world.ou)
        body = json.dumps({"operation": {"kind": "delete", "group_id": world.gid(1), "dn": "x"}})
        [answer] = node_send(
            node, rig.standin, [{"method": "POST", "target": "/v1/apply", "body": body.encode()}]
        )
    assert answer["status"] == 401
    assert b"not signed" in answer["body"]
    assert "x-writeback-reply-signature" in answer["headers"]
