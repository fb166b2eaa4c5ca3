"""The Function app's entry points, called as the Functions host calls them.

The user functions come out of ``function_app.app`` (``get_functions()`` then
``get_user_function()``) and get real ``azure.functions`` objects:
``func.HttpRequest``, ``func.ServiceBusMessage`` and ``TimerRequest``. There is
no Service Bus here, so the app runs with ``WRITEBACK_QUEUE=local``: the webhook
enqueues into the real SQLite queue, and :class:`Host` plays the Functions host
for the trigger with the extension's own loop (tests/support/functions_host.py:
the batch of one session, completed when the function returns, abandoned when
it raises), the messages decoded by ``azure.functions`` from the data the
extension and the host send (tests/support/functions_wire.py). Graph is the
stand-in, AD a real Samba DC, and AD is read back over an independent admin
connection.

The Service Bus settlement (rescheduled copies, the dead-letter hand-off) is
driven at the end through the real SDK against the Service Bus emulator, on
messages a session receiver took from it as the extension's do, decoded from the
broker's data; and the app runs end to end on the emulator too, under the
extension's loop over Service Bus (``test_over_service_bus_...``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import azure.functions as func
import pytest
from azure.functions.timer import TimerRequest
from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusReceiver,
)
from azure.servicebus.exceptions import OperationTimeoutError

from tests.support import functions_wire as wire
from tests.support.functions_host import (
    FunctionsHost,
    HostStats,
    Invocation,
    ServiceBusTrigger,
    app_functions,
)
from tests.support.relay import PATH as RELAY_PATH
from tests.support.relay import SEND as RELAY_SEND
from tests.support.relay import relay_rig
from tests.support.servicebus import queue_name, sb
from tests.support.settings import agent_only_settings, settings_read_by_the_code
from tests.support.world import World, make_world
from writeback import logging_setup
from writeback.adapters import functions_settlement
from writeback.adapters.functions_settlement import (
    MIN_RESCHEDULE,
    ServiceBusSettlement,
    TriggeredLock,
)
from writeback.adapters.servicebus import (
    ORIGINAL_MESSAGE_ID,
    PRIOR_DELIVERIES,
    derived_message_id,
)
from writeback.cli import EXIT_OK, main
from writeback.domain.events import (
    CONTROL_SESSION,
    HANDOFF_MARK,
    HANDOFF_SESSION_PROPERTY,
    ControlRequest,
)
from writeback.errors import TransientError
from writeback.hosting import functions
from writeback.logging_setup import JsonFormatter
from writeback.ports import OutgoingMessage, ReceivedMessage
from writeback.service.pipeline import PAUSE_DELAY
from writeback.service.replay import ReplayFilter, replay
from writeback_sandbox.samba import SambaDC
from writeback_sandbox.servicebus_emulator import (
    APP_RULE,
    MessageState,
    QueueSettings,
    ServiceBusEmulator,
    Stored,
)

__all__ = ["queue_name", "sb"]  # fixtures

ROOT = Path(__file__).resolve().parents[2]
SECRET = "function-app-client-state-0123456789"
FUNCTION_KEY = "fn-key-for-tests"

#: ``get_functions()`` indexes the app, as the worker does once at start-up (once per
#: process: a second indexing of the same app object is refused).
FUNCTIONS = app_functions()
USER_FUNCTIONS: dict[str, Callable[..., Any]] = {
    str(f.get_function_name()): f.get_user_function() for f in FUNCTIONS
}


def entry(name: str) -> Callable[..., Any]:
    return USER_FUNCTIONS[name]


# --------------------------------------------------------------------------- harness


class Host:
    """The Functions host's part for the Service Bus trigger, on the app's local queue
    (or on a queue of the Service Bus emulator, received through the real SDK): the
    extension's loop (tests/support/functions_host.py, the app's own binding and
    host.json) calling the app's ``worker`` with the messages decoded as the worker
    decodes them (tests/support/functions_wire.py). ``deliver`` is one invocation."""

    def __init__(
        self, queue: Path | ServiceBusTrigger, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.delivered: list[list[func.ServiceBusMessage]] = []
        self._host = FunctionsHost.for_app(
            queue,
            function=self._worker,
            lock_duration=120,
            max_delivery_count=100,
            clock=clock,
            session_idle_timeout=0.1,  # host.json's 2 s: an idle session closes sooner here
        )
        self.queue = self._host.queue

    def _worker(self, message: func.ServiceBusMessage) -> None:
        self.delivered.append([message])  # single dispatch: one message an invocation
        entry("worker")(message)

    def close(self) -> None:
        self._host.close()

    def deliver(self, *, wait: float = 0.5) -> list[func.ServiceBusMessage] | None:
        """One invocation of ``worker`` with the next batch; None when idle."""
        if self._host.step(wait) is None:
            return None
        return self.delivered[-1]

    def drain(self, *, limit: int = 20, wait: float = 0.2) -> int:
        runs = 0
        while runs < limit and self.deliver(wait=wait) is not None:
            runs += 1
        return runs

    @property
    def invocations(self) -> list[Invocation]:
        return self._host.invocations

    @property
    def stats(self) -> HostStats:
        return self._host.stats


def http(
    route: str,
    body: bytes = b"",
    params: dict[str, str] | None = None,
    method: str = "POST",
) -> func.HttpResponse:
    request = func.HttpRequest(
        method=method,
        url=f"https://writeback.example/api/{route}",
        params={"code": FUNCTION_KEY, **(params or {})},
        headers={"content-type": "application/json"},
        body=body,
    )
    response = entry(route)(request)
    assert isinstance(response, func.HttpResponse)
    return response


def notification(gid: str, *, client_state: str = SECRET, seq: int = 1) -> bytes:
    """A changeNotificationCollection as Graph sends it for a group."""
    item = {
        "subscriptionId": "6c4a1f3e-2b1d-4c5e-9f8a-7b6c5d4e3f2a",
        "clientState": client_state,
        "changeType": "updated",
        "resource": f"Groups/{gid}",
        "tenantId": "7d5b3a4e-1c2f-4e8a-9b6d-0a1b2c3d4e5f",
        "resourceData": {
            "@odata.type": "#Microsoft.Graph.Group",
            "@odata.id": f"Groups/{gid}",
            "id": gid,
            "eventTime": f"2026-11-24T06:00:{seq % 60:02d}.0000000Z",
            "sequenceNumber": seq,
        },
    }
    return json.dumps({"value": [item]}).encode()


class Bridge:
    """The app's two HTTP functions behind a loopback HTTP server, as the Functions
    host exposes them, so the Graph stand-in can run its handshake and deliver."""

    def __init__(self) -> None:
        self.answers: list[tuple[str, int]] = []
        bridge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                bridge._serve(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}/api"

    def _serve(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        parts = urlsplit(request.path)
        route = parts.path.rsplit("/", 1)[-1]
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        if params.get("code") != FUNCTION_KEY:
            status, payload, content_type = 401, b"", "text/plain"
        else:
            answer = entry(route)(
                func.HttpRequest(
                    method=request.command,
                    url=f"{self.base}/{route}",
                    params=params,
                    headers=dict(request.headers.items()),
                    body=body,
                )
            )
            status, payload = answer.status_code, answer.get_body()
            content_type = answer.mimetype or "text/plain"
        self.answers.append((route, status))
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def app_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Pipeline settings only (the webhook needs no DC); the queue file's path."""
    for name in ("FUNCTIONS_WORKER_RUNTIME", "APPLICATIONINSIGHTS_CONNECTION_STRING"):
        monkeypatch.delenv(name, raising=False)
    queue_path = tmp_path / "queue.sqlite3"
    monkeypatch.setenv("WRITEBACK_QUEUE", "local")
    monkeypatch.setenv("WRITEBACK_QUEUE_PATH", str(queue_path))
    monkeypatch.setenv("WRITEBACK_CLIENT_STATE", SECRET)
    monkeypatch.setenv("WRITEBACK_PAUSED", "false")
    # Leave the test process's logging alone (configure_logging has its own test).
    monkeypatch.setattr(logging_setup._State, "configured", True)
    functions.reset()
    yield queue_path
    functions.reset()


@pytest.fixture
def host(app_env: Path) -> Iterator[Host]:
    h = Host(app_env)
    yield h
    h.close()


@pytest.fixture
def world(
    samba_dc: SambaDC,
    make_ou: Callable[[SambaDC], str],
    app_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[World]:
    with make_world(samba_dc, make_ou(samba_dc)) as w:
        env = {
            "WRITEBACK_TARGET_OU": w.ou,
            "WRITEBACK_LDAP_URL": samba_dc.ldaps_url,
            "WRITEBACK_LDAP_USER": samba_dc.admin_dn,
            "WRITEBACK_LDAP_PASSWORD": samba_dc.admin_password,
            "WRITEBACK_LDAP_CA_FILE": str(samba_dc.ca_file),
            "WRITEBACK_GRAPH_URL": w.standin.url,
            "WRITEBACK_GRAPH_AUTH": "none",
            "WRITEBACK_MEMBER_LIMIT": "50000",
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        yield w


@pytest.fixture
def bridge(monkeypatch: pytest.MonkeyPatch) -> Iterator[Bridge]:
    b = Bridge()
    monkeypatch.setenv("WRITEBACK_NOTIFICATION_URL", f"{b.base}/notifications?code={FUNCTION_KEY}")
    monkeypatch.setenv("WRITEBACK_LIFECYCLE_URL", f"{b.base}/lifecycle?code={FUNCTION_KEY}")
    yield b
    b.close()


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


# --------------------------------------------------------------------------- the app


def test_the_app_declares_its_five_functions_with_the_documented_bindings() -> None:
    bindings = {str(f.get_function_name()): f.get_bindings_dict()["bindings"][0] for f in FUNCTIONS}
    assert set(bindings) == {
        "notifications",
        "lifecycle",
        "worker",
        "reconcile",
        "subscription_upkeep",
    }
    assert bindings["notifications"]["route"] == "notifications"
    assert str(bindings["notifications"]["authLevel"].value) == "function"
    assert bindings["lifecycle"]["route"] == "lifecycle"
    worker = bindings["worker"]
    assert worker["type"] == "serviceBusTrigger"
    assert worker["queueName"] == "%WRITEBACK_SERVICEBUS_QUEUE%"
    assert worker["connection"] == "WRITEBACK_SERVICEBUS"
    assert worker["isSessionsEnabled"] is True
    assert str(worker["cardinality"].value) == "one"
    assert bindings["reconcile"]["schedule"] == "%WRITEBACK_RECONCILE_SCHEDULE%"
    assert bindings["subscription_upkeep"]["schedule"] == "%WRITEBACK_SUBSCRIPTION_SCHEDULE%"


def test_host_json_sets_sessions_lock_renewal_and_prefetch() -> None:
    host_json = json.loads((ROOT / "host.json").read_text())
    service_bus = host_json["extensions"]["serviceBus"]
    assert "maxMessageBatchSize" not in service_bus  # batch mode only; the app is single
    assert service_bus["prefetchCount"] == 0
    assert service_bus["autoCompleteMessages"] is True
    assert service_bus["maxConcurrentSessions"] >= 1
    assert service_bus["maxAutoLockRenewalDuration"] == host_json["functionTimeout"]
    assert service_bus["sessionIdleTimeout"]
    assert host_json["functionTimeout"]
    assert host_json["logging"]["logLevel"]["Function"] == "Information"


def test_every_setting_the_code_reads_is_in_the_sample_settings() -> None:
    sample = json.loads((ROOT / "local.settings.sample.json").read_text())
    values: dict[str, str] = sample["Values"]
    documented = set(values) | set(sample["_settings_help"])
    read = settings_read_by_the_code()
    assert {"WRITEBACK_PAUSED", "WRITEBACK_CLIENT_STATE", "AZURE_CLIENT_ID"} <= read
    missing = {
        name
        for name in read - agent_only_settings(read)
        if name not in values and not any(key.startswith(name + "__") for key in values)
    }
    assert missing == set(), f"not in local.settings.sample.json: {sorted(missing)}"
    assert {"AzureWebJobsStorage", "FUNCTIONS_WORKER_RUNTIME"} <= set(values)
    assert "WRITEBACK_SERVICEBUS__fullyQualifiedNamespace" in values
    undocumented = {name for name in values if name not in sample["_settings_help"]}
    assert undocumented == set()
    assert documented


def test_the_sample_settings_hold_no_secret() -> None:
    values = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    for name in ("WRITEBACK_LDAP_PASSWORD", "WRITEBACK_CLIENT_STATE", "AZURE_CLIENT_SECRET"):
        value = values[name]
        assert value == "" or "<" in value or value.startswith("@Microsoft.KeyVault("), name


def test_cold_import_of_the_app_stays_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, function_app\n"
        "heavy = [m for m in ('msgraph', 'ldap3', 'azure.servicebus', 'tenacity', "
        "'azure.monitor.opentelemetry', 'writeback.adapters.graph') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- webhook


def test_validation_handshake_answers_the_token_as_text(app_env: Path) -> None:
    token = "Validation: Testing client application reachability for subscription Request-Id: 1"
    for route in ("notifications", "lifecycle"):
        response = http(route, params={"validationToken": token})
        assert response.status_code == 200
        assert response.mimetype == "text/plain"
        assert response.get_body() == token.encode()


def test_wrong_client_state_is_refused_and_nothing_is_enqueued(host: Host) -> None:
    gid = str(uuid.uuid4())
    response = http("notifications", notification(gid, client_state="not-the-secret"))
    assert response.status_code == 403
    assert host.queue.depth() == 0


def test_a_body_that_is_not_a_notification_is_a_400(host: Host) -> None:
    assert http("notifications", b"{not json").status_code == 400
    assert host.queue.depth() == 0


def test_missing_settings_answer_503_so_graph_retries(
    app_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WRITEBACK_CLIENT_STATE")
    assert http("notifications", notification(str(uuid.uuid4()))).status_code == 503


def test_graph_retries_of_a_notification_are_one_message(host: Host) -> None:
    gid = str(uuid.uuid4())
    body = notification(gid, seq=7)
    assert http("notifications", body).status_code == 202
    assert http("notifications", body).status_code == 202
    assert host.queue.depth() == 1


def test_webhook_logs_a_structured_line_without_the_body_or_secret(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    gid = str(uuid.uuid4())
    with caplog.at_level(logging.INFO, logger="writeback"):
        assert http("notifications", notification(gid)).status_code == 202
    [record] = [r for r in caplog.records if r.name == "writeback.webhook"]
    line = json.loads(JsonFormatter().format(record))
    assert line["webhook_status"] == 202
    assert line["webhook_messages"] == 1
    rendered = json.dumps(line)
    assert SECRET not in rendered
    assert gid not in rendered  # counts only, never the body


# --------------------------------------------------------------------------- worker


def test_notification_to_queue_to_worker_puts_the_group_in_ad(
    world: World, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    gid = world.add_group(1, "Function Sales", ["user0", "user1"])
    assert http("notifications", notification(gid)).status_code == 202
    assert host.queue.depth() == 1
    with caplog.at_level(logging.INFO, logger="writeback"):
        messages = host.deliver()
    assert messages is not None
    [message] = messages
    assert (message.session_id, message.delivery_count) == (gid, 1)
    entry_ = world.ad_entry(gid)
    assert entry_ is not None
    assert entry_["displayname"] == ["Function Sales"]
    assert entry_["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}
    assert host.queue.depth() == 0
    # One structured line for the event: group, operation, outcome, latency.
    [record] = [r for r in caplog.records if getattr(r, "group_id", None) == gid]
    line = json.loads(JsonFormatter().format(record))
    assert (line["operation"], line["outcome"]) == ("add", "completed")
    assert line["latency_ms"] >= 0


def test_the_worker_writes_through_the_relay_agent_and_never_holds_the_ad_password(
    world: World, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WRITEBACK_DIRECTORY=relay: the Function app holds a Send key and the caller key;
    the agent on-premises holds the AD credential and its own policy."""
    sub_ou = world.dc.create_ou("AgentOnly", world.ou)
    with relay_rig() as rig:
        rig.start_agent(lambda: world.dc.directory(world.ou), world.ou)
        for name in ("WRITEBACK_LDAP_URL", "WRITEBACK_LDAP_USER", "WRITEBACK_LDAP_PASSWORD"):
            monkeypatch.delenv(name)
        relay_env = {
            "WRITEBACK_DIRECTORY": "relay",
            "WRITEBACK_RELAY_NAMESPACE": rig.standin.namespace,
            "WRITEBACK_RELAY_PATH": RELAY_PATH,
            "WRITEBACK_RELAY_SEND_KEY": RELAY_SEND.key,
            "WRITEBACK_RELAY_CALLER_KEY": rig.caller_key,
            "WRITEBACK_RELAY_CA_FILE": str(rig.standin.ca_file),
        }
        for name, value in relay_env.items():
            monkeypatch.setenv(name, value)
        functions.reset()
        gid = world.add_group(1, "Through the relay", ["user0", "user1"])
        assert http("notifications", notification(gid)).status_code == 202
        assert host.drain() == 1
        entry_ = world.ad_entry(gid)
        assert entry_ is not None
        assert entry_["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}
        # An agent whose own OU is narrower refuses: the event is dead-lettered with why.
        rig.agents.pop().stop()
        rig.start_agent(lambda: world.dc.directory(world.ou), sub_ou)
        world.tenant.update_group(gid, display_name="Refused")
        assert http("notifications", notification(gid, seq=2)).status_code == 202
        assert host.drain() == 1
        [letter] = host.queue.dead_letters()
        assert letter.reason == "PolicyRefused"
        assert "not below the target OU" in letter.description
        entry_ = world.ad_entry(gid)
        assert entry_ is not None and entry_["displayname"] == ["Through the relay"]


def test_a_burst_for_one_group_is_one_write(world: World, host: Host) -> None:
    """Single dispatch: four messages are four invocations of one session, one after
    another; the first reads and writes, the others were accepted before that read
    and need none of their own."""
    gid = world.add_group(2, "Burst", ["user0"])
    for seq in range(1, 5):
        assert http("notifications", notification(gid, seq=seq)).status_code == 202
    assert host.drain() == 4
    assert [len(m) for m in host.delivered] == [1, 1, 1, 1]
    pipeline = functions._runtime._pipeline
    assert pipeline is not None
    assert (pipeline.stats.operations, pipeline.stats.covered) == ({"add": 1}, 3)
    world.tenant.update_group(gid, display_name="Burst renamed")
    assert http("notifications", notification(gid, seq=9)).status_code == 202
    assert http("notifications", notification(gid, seq=9)).status_code == 202  # a retry
    assert host.drain() == 1  # Graph's retry was dropped as a duplicate
    entry_ = world.ad_entry(gid)
    assert entry_ is not None and entry_["displayname"] == ["Burst renamed"]


def test_a_poison_body_ends_in_the_dead_letters_with_its_reason(world: World, host: Host) -> None:
    gid = world.add_group(3, "Fine", ["user0"])
    host.queue.send([OutgoingMessage(b"\x00 not an envelope", "poison-1", gid)])
    assert http("notifications", notification(gid)).status_code == 202
    assert host.drain() >= 1
    [letter] = host.queue.dead_letters()
    assert (letter.message_id, letter.reason) == ("poison-1", "PoisonEvent")
    assert "JSON" in letter.description
    assert world.ad_entry(gid) is not None  # the good event of the batch still applied
    assert host.queue.depth() == 0


def test_a_dc_outage_reschedules_the_event_instead_of_losing_it(
    world: World, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    gid = world.add_group(4, "Outage", ["user0"])
    dc_url = os.environ["WRITEBACK_LDAP_URL"]
    monkeypatch.setenv("WRITEBACK_LDAP_URL", "ldaps://127.0.0.1:9")  # nothing listens
    assert http("notifications", notification(gid)).status_code == 202
    assert host.deliver() is not None
    assert world.ad_entry(gid) is None
    assert host.queue.dead_letters() == []
    # Waiting, with a delay, for the next delivery; not handed out before then.
    assert (host.queue.depth(), host.queue.scheduled_count()) == (0, 1)
    assert host.deliver(wait=0.2) is None
    monkeypatch.setenv("WRITEBACK_LDAP_URL", dc_url)
    later = Host(Path(host.queue.path), clock=lambda: time.time() + 600)
    try:
        messages = later.deliver()
    finally:
        later.close()
    # A scheduled copy, its first delivery, carrying the one before it.
    assert messages is not None and functions.from_trigger(messages[0]).delivery_count == 2
    assert world.ad_entry(gid) is not None


def test_an_unexpected_error_is_rescheduled_like_a_transient_fault(
    world: World, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    from writeback.service import handle_event

    gid = world.add_group(10, "Bug", ["user0"])

    def broken(works: Any, ctx: Any) -> Any:
        raise KeyError("a bug, not a fault of the event")

    monkeypatch.setattr(handle_event, "converge_groups", broken)
    assert http("notifications", notification(gid)).status_code == 202
    assert host.deliver() is not None
    assert host.queue.dead_letters() == []
    assert host.queue.scheduled_count() == 1
    assert world.ad_entry(gid) is None


def test_pause_switch_keeps_events_and_writes_nothing(
    world: World, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    gid = world.add_group(5, "Paused", ["user0"])
    monkeypatch.setenv("WRITEBACK_PAUSED", "true")
    assert http("notifications", notification(gid)).status_code == 202
    assert host.deliver() is not None
    assert world.ad_entry(gid) is None
    assert host.queue.scheduled_count() == 1 and host.queue.dead_letters() == []
    # The reconcile timer holds the reconcile too.
    entry("reconcile")(TimerRequest(past_due=False))
    assert world.ad_entry(gid) is None
    monkeypatch.setenv("WRITEBACK_PAUSED", "false")
    later = Host(Path(host.queue.path), clock=lambda: time.time() + PAUSE_DELAY + 5)
    try:
        assert later.deliver() is not None
    finally:
        later.close()
    assert world.ad_entry(gid) is not None
    assert host.queue.depth() == 0


# --------------------------------------------------------------------------- on Service Bus


class ShiftedClock:
    """The emulator's clock, which a test moves forward (scheduled copies fall due,
    locks lapse) instead of waiting."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class OnServiceBus:
    sb: ServiceBusEmulator
    queue_name: str
    clock: ShiftedClock
    host: Host


@pytest.fixture
def on_servicebus(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[OnServiceBus]:
    """The app with WRITEBACK_QUEUE=servicebus on an emulator of its own (the queue as
    the Bicep makes it: sessions, 5-minute locks, duplicate detection, 120 deliveries),
    reached with the app's rule (Send and Listen) through the settings only; the
    extension's loop receives from it with the SDK."""
    clock = ShiftedClock()
    settings = QueueSettings(lock_duration=300, max_delivery_count=120)
    with ServiceBusEmulator({"group-events": settings}, clock=clock) as emulator:
        env = {
            "WRITEBACK_QUEUE": "servicebus",
            "WRITEBACK_SERVICEBUS_CONNECTION": emulator.connection_string_for(APP_RULE),
            "WRITEBACK_SERVICEBUS_QUEUE": "group-events",
            "WRITEBACK_SERVICEBUS_ENDPOINT": f"sb://{emulator.host}:{emulator.amqp_port}",
            "WRITEBACK_SERVICEBUS_CA_FILE": emulator.ca_file,
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("WRITEBACK_QUEUE_PATH")
        functions.reset()
        host = Host(ServiceBusTrigger(emulator, "group-events"), clock=clock)
        try:
            yield OnServiceBus(emulator, "group-events", clock, host)
        finally:
            host.close()
            functions.reset()


def test_over_service_bus_events_retries_hand_off_dead_letters_and_replay(
    world: World, on_servicebus: OnServiceBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Webhook → the emulator's queue → the app's worker under the extension's loop
    (SDK session receivers) → AD; a DC outage reschedules a copy; a poison body goes
    to the dead-letter sub-queue by the hand-off; ``replay`` brings it back into the
    group's own session, where the worker refuses it again."""
    sb, name, host = on_servicebus.sb, on_servicebus.queue_name, on_servicebus.host
    gid = world.add_group(1, "On the bus", ["user0", "user1"])
    assert http("notifications", notification(gid)).status_code == 202
    assert http("notifications", notification(gid)).status_code == 202  # Graph's retry
    assert sb.counts(name)["active"] == 1  # dropped as a duplicate by the broker

    [message] = host.deliver(wait=5) or []
    assert (message.session_id, message.delivery_count) == (gid, 1)
    entry_ = world.ad_entry(gid)
    assert entry_ is not None
    assert entry_["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}
    # Completed by the host; the confirmation read waits, scheduled in the session.
    assert host.invocations[-1].settlement == "completed"
    assert (sb.counts(name)["active"], sb.counts(name)["scheduled"]) == (0, 1)

    # The DC is down: the event is rescheduled as a copy, not lost, not dead-lettered.
    dc_url = os.environ["WRITEBACK_LDAP_URL"]
    monkeypatch.setenv("WRITEBACK_LDAP_URL", "ldaps://127.0.0.1:9")  # nothing listens
    world.tenant.update_group(gid, display_name="Renamed on the bus")
    assert http("notifications", notification(gid, seq=2)).status_code == 202
    assert host.deliver(wait=5) is not None
    assert host.invocations[-1].settlement == "completed"  # the copy carries the event
    copies = [m for m in sb.messages(name) if PRIOR_DELIVERIES in properties_of(m)]
    assert [(c.session_id, c.state, properties_of(c)[PRIOR_DELIVERIES]) for c in copies] == [
        (gid, MessageState.SCHEDULED, "1")
    ]
    assert sb.counts(name)["dead_lettered"] == 0
    monkeypatch.setenv("WRITEBACK_LDAP_URL", dc_url)
    on_servicebus.clock.offset += 600  # the copy (and the confirmation) fall due
    assert host.drain(wait=3) >= 1
    assert 2 in [count for i in host.invocations for count in i.delivery_counts]
    entry_ = world.ad_entry(gid)
    assert entry_ is not None and entry_["displayname"] == ["Renamed on the bus"]

    # A poison body: dead-lettered from a hand-off session, listed as the group's.
    host.queue.send([OutgoingMessage(b"\x00 not an envelope", "poison-1", gid)])
    assert host.drain(wait=3) >= 1
    [letter] = host.queue.dead_letters()
    assert (letter.message_id, letter.session_id, letter.reason) == ("poison-1", gid, "PoisonEvent")
    [stored] = sb.messages(f"{name}/$DeadLetterQueue")
    assert stored.session_id is not None and stored.session_id.startswith(gid + HANDOFF_MARK)

    # replay, as the command: back into the group's own session, and refused again.
    out = io.StringIO()
    assert main(["replay", "--reason", "PoisonEvent"], out=out) == EXIT_OK
    assert f"moved: message poison-1 group {gid} reason PoisonEvent" in out.getvalue()
    [back] = [m for m in sb.messages(name) if m.state is MessageState.ACTIVE]
    assert back.session_id == gid
    assert sb.counts(name)["dead_lettered"] == 0
    assert host.drain(wait=3) >= 1
    assert [d.message_id for d in host.queue.dead_letters()] == ["poison-1"]
    assert sb.counts(name)["active"] == 0
    stats = host.stats
    assert (stats.overlaps, stats.lock_losses, stats.settle_failures) == (0, 0, 0)


# --------------------------------------------------------------------------- timers


def request_reconcile(host: Host) -> None:
    """A reconcile asked for through the control session, as a lifecycle item does."""
    body = ControlRequest("reconcile", reason="test", received_at=time.time()).to_json()
    host.queue.send([OutgoingMessage(body, f"rc-{uuid.uuid4().hex}", CONTROL_SESSION)])
    assert host.deliver() is not None


def test_reconcile_timer_writes_what_the_cloud_has(world: World, host: Host) -> None:
    first = world.add_group(6, "Timer One", ["user0"])
    second = world.add_group(7, "Timer Two", ["user1"])
    entry("reconcile")(TimerRequest(past_due=True))
    assert world.ad_entry(first) is not None
    assert world.ad_entry(second) is not None


def test_reconcile_timer_keeps_its_delta_link_and_then_reads_only_changes(
    world: World, host: Host, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    state_path = tmp_path / "state.json"
    monkeypatch.setenv("WRITEBACK_STATE_PATH", str(state_path))
    first = world.add_group(9, "Delta One", ["user0"])
    world.add_group(10, "Delta Two", ["user1"])
    entry("reconcile")(TimerRequest(past_due=False))
    state = json.loads(state_path.read_text())
    assert state["delta"]["last_mode"] == "full" and state["delta"]["groups_link"]
    assert state["last_reconcile"]["applied"] == {"add": 2}

    world.tenant.update_group(first, description="changed in the cloud")
    world.standin.reset_log()
    entry("reconcile")(TimerRequest(past_due=False))  # not due: the interval has not passed
    assert json.loads(state_path.read_text())["last_reconcile"]["applied"] == {"add": 2}
    request_reconcile(host)
    entry("reconcile")(TimerRequest(past_due=False))
    state = json.loads(state_path.read_text())
    assert state["delta"]["last_mode"] == "incremental"
    assert state["last_reconcile"]["applied"] == {"modify": 1}
    assert world.standin.count("/users/delta") == 0, "an incremental run reads no full users delta"
    entry_ = world.ad_entry(first)
    assert entry_ is not None and entry_["description"] == ["changed in the cloud"]


def test_upkeep_creates_the_subscription_then_notifications_flow_to_ad(
    world: World, host: Host, bridge: Bridge
) -> None:
    standin = world.standin
    assert standin.subscription_ids() == []
    entry("subscription_upkeep")(TimerRequest(past_due=False))
    [subscription_id] = standin.subscription_ids()
    assert ("notifications", 200) in bridge.answers  # the validation handshake
    assert ("lifecycle", 200) in bridge.answers
    entry("subscription_upkeep")(TimerRequest(past_due=False))
    assert standin.subscription_ids() == [subscription_id]  # kept, not duplicated

    gid = world.add_group(8, "Notified", ["user0", "user2"])
    assert standin.wait_idle(10)
    assert ("notifications", 202) in bridge.answers
    assert host.drain() >= 1
    entry_ = world.ad_entry(gid)
    assert entry_ is not None
    assert entry_["member_sids"] == {world.sid_of("user0"), world.sid_of("user2")}


def test_lifecycle_reauthorization_is_enqueued_then_done_by_the_worker(
    world: World, host: Host, bridge: Bridge
) -> None:
    standin = world.standin
    entry("subscription_upkeep")(TimerRequest(past_due=False))
    [subscription_id] = standin.subscription_ids()
    standin.send_lifecycle(subscription_id, "reauthorizationRequired")
    assert standin.wait_idle(10)
    assert ("lifecycle", 202) in bridge.answers
    assert standin.needs_reauthorization(subscription_id)  # the webhook only enqueued
    assert host.queue.depth() == 1
    messages = host.deliver()
    assert messages is not None and messages[0].session_id == CONTROL_SESSION
    assert not standin.needs_reauthorization(subscription_id)
    assert standin.subscription_ids() == [subscription_id]
    assert host.queue.depth() == 0


def test_subscription_removed_recreates_it_and_reconciles(
    world: World, host: Host, bridge: Bridge
) -> None:
    standin = world.standin
    entry("subscription_upkeep")(TimerRequest(past_due=False))
    [old] = standin.subscription_ids()
    standin.send_lifecycle(old, "subscriptionRemoved")  # Graph drops it, as it says
    assert standin.wait_idle(10)
    assert ("lifecycle", 202) in bridge.answers
    assert standin.subscription_ids() == []
    gid = world.add_group(9, "Changed while removed", ["user1"])  # nobody is notified
    assert standin.wait_idle(10)
    assert host.drain() == 1  # the control message: recreate, and ask for a reconcile
    [new] = standin.subscription_ids()
    assert new != old
    assert world.ad_entry(gid) is None  # the trigger never runs the reconcile itself
    entry("reconcile")(TimerRequest(past_due=False))
    assert world.ad_entry(gid) is not None  # the timer ran the requested reconcile


def test_a_broken_setting_parks_events_without_counting_a_delivery(
    world: World, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    gid = world.add_group(11, "Broken setting", ["user0"])
    assert http("notifications", notification(gid)).status_code == 202
    url = os.environ["WRITEBACK_LDAP_URL"]
    monkeypatch.setenv("WRITEBACK_LDAP_URL", "")
    for _ in range(3):  # every retry comes back with the same count: none is charged
        later = Host(Path(host.queue.path), clock=lambda: time.time() + 400 * len(host.delivered))
        try:
            [message] = later.deliver() or []
            host.delivered.append([message])
        finally:
            later.close()
        assert message.delivery_count == 1
    assert host.queue.dead_letters() == [] and world.ad_entry(gid) is None
    monkeypatch.setenv("WRITEBACK_LDAP_URL", url)
    fixed = Host(Path(host.queue.path), clock=lambda: time.time() + 2000)
    try:
        assert fixed.deliver() is not None
    finally:
        fixed.close()
    assert world.ad_entry(gid) is not None and host.queue.depth() == 0


def test_a_poison_control_message_is_dead_lettered(world: World, host: Host) -> None:
    host.queue.send([OutgoingMessage(b'{"kind":"reboot"}', "ctl-1", CONTROL_SESSION)])
    assert host.deliver() is not None
    [letter] = host.queue.dead_letters()
    assert letter.reason == "PoisonEvent" and "reboot" in letter.description


# --------------------------------------------------------------------------- logging


def test_json_lines_carry_the_event_fields_and_hide_secrets() -> None:
    record = logging.LogRecord(
        "writeback.worker", logging.INFO, __file__, 1, "group %s", ("g",), None
    )
    record.group_id = "g"
    record.outcome = "completed"
    record.client_state = SECRET
    record.ldap_password = "hunter2"
    record.body = b"raw body"
    line = json.loads(JsonFormatter().format(record))
    assert (line["msg"], line["group_id"], line["outcome"]) == ("group g", "g", "completed")
    assert line["client_state"] == "[redacted]" and line["ldap_password"] == "[redacted]"
    assert line["body"] == "[8 bytes]"


def test_configure_logging_writes_json_lines_outside_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FUNCTIONS_WORKER_RUNTIME", raising=False)
    monkeypatch.delenv("APPLICATIONINSIGHTS_CONNECTION_STRING", raising=False)
    stream = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers)
    logging_setup._reset_for_tests()
    try:
        logging_setup.configure_logging(stream=stream)
        logging_setup.configure_logging(stream=stream)  # idempotent
        added = [h for h in root.handlers if h not in before]
        assert len(added) == 1
        logging.getLogger("writeback.test").info("hello", extra={"group_id": "g1"})
        line = json.loads(stream.getvalue().strip().splitlines()[-1])
        assert (line["msg"], line["group_id"]) == ("hello", "g1")
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
        logging_setup._reset_for_tests()


# --------------------------------------------------------------------------- Service Bus settlement
#
# ServiceBusSettlement through the real SDK against the emulator: the message is sent
# and taken by a session receiver as the extension's receivers take it (next
# available session, peek-lock, no prefetch), the function's argument is decoded by
# azure.functions from the broker's own data (lock token, sequence number, delivery
# count, application properties), and the "host" completes the original when the
# function returns, as autoCompleteMessages does.


@dataclass
class Delivered:
    """One message the host holds: what the function got, and the host's receiver."""

    trigger: func.ServiceBusMessage
    message: ReceivedMessage
    raw: ServiceBusReceivedMessage
    receiver: ServiceBusReceiver

    def complete(self) -> None:
        """The host's auto-completion once the function returned."""
        self.receiver.complete_message(self.raw)


@contextlib.contextmanager
def host_delivery(
    sb: ServiceBusEmulator,
    queue: str,
    *,
    body: bytes = b"{}",
    session_id: str = "g-1",
    message_id: str = "m-1",
    properties: dict[str, str] | None = None,
    deliveries: int = 1,
) -> Iterator[Delivered]:
    """Send one message and hold its ``deliveries``-th delivery (the earlier ones
    abandoned on the broker, which counts them)."""
    with sb.client() as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages(
                ServiceBusMessage(
                    body,
                    message_id=message_id,
                    session_id=session_id,
                    application_properties={k: v for k, v in (properties or {}).items()},
                )
            )
        with client.get_queue_receiver(
            queue, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=10, prefetch_count=0
        ) as receiver:
            for delivery in range(1, deliveries + 1):
                [raw] = receiver.receive_messages(max_message_count=1, max_wait_time=10)
                if delivery < deliveries:
                    receiver.abandon_message(raw)
            [trigger] = wire.decode([wire.received_broker_message(raw)], "one")
            yield Delivered(trigger, functions.from_trigger(trigger), raw, receiver)


@contextlib.contextmanager
def app_settlement(
    sb: ServiceBusEmulator, queue: str, max_delivery_count: int = 5, **options: Any
) -> Iterator[ServiceBusSettlement]:
    """The settlement as the app builds it: its own client, with the app's rights."""
    settlement = ServiceBusSettlement(
        sb.client(APP_RULE, retry_total=3), queue, max_delivery_count=max_delivery_count, **options
    )
    try:
        yield settlement
    finally:
        settlement.close()


def receive_in_session(sb: ServiceBusEmulator, queue: str, session: str) -> func.ServiceBusMessage:
    """The next message of ``session`` as the function would get it (then completed)."""
    with (
        sb.client() as client,
        client.get_queue_receiver(
            queue, session_id=session, max_wait_time=10, prefetch_count=0
        ) as receiver,
    ):
        [raw] = receiver.receive_messages(max_message_count=1, max_wait_time=10)
        [trigger] = wire.decode([wire.received_broker_message(raw)], "one")
        receiver.complete_message(raw)
        return trigger


def properties_of(stored: Stored) -> dict[str, str]:
    return {str(k): str(v) for k, v in (stored.payload.properties or {}).items()}


def test_abandon_schedules_a_copy_that_carries_the_count_and_the_original_id(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    with (
        app_settlement(sb, queue_name) as settlement,
        host_delivery(sb, queue_name, deliveries=2, properties={"trace": "t-1"}) as held,
    ):
        assert held.message.delivery_count == 2  # the broker's count, as the host gives it
        before = time.time()
        settlement.abandon(held.message, delay=30)
        held.complete()
    [copy] = sb.messages(queue_name)
    assert (copy.state, copy.session_id) == (MessageState.SCHEDULED, "g-1")
    assert copy.message_id != "m-1"  # not dropped by duplicate detection
    assert copy.scheduled_for is not None
    assert before + 29 <= copy.scheduled_for <= time.time() + 31
    assert properties_of(copy) == {
        "trace": "t-1",
        ORIGINAL_MESSAGE_ID: "m-1",
        PRIOR_DELIVERIES: "2",
    }


def test_a_rescheduled_copy_comes_back_in_the_session_with_the_count_going_on(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    with (
        app_settlement(sb, queue_name) as settlement,
        host_delivery(sb, queue_name, deliveries=2, properties={"trace": "t-1"}) as held,
    ):
        settlement.abandon(held.message, delay=MIN_RESCHEDULE)
        held.complete()
    again = functions.from_trigger(receive_in_session(sb, queue_name, "g-1"))
    assert (again.message_id, again.session_id, again.delivery_count) == ("m-1", "g-1", 3)
    assert isinstance(again.lock, TriggeredLock) and again.lock.properties["trace"] == "t-1"
    assert sb.counts(queue_name) == {
        "active": 0,
        "scheduled": 0,
        "deferred": 0,
        "dead_lettered": 0,
    }


def test_pause_reschedules_without_counting_a_delivery(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    with (
        app_settlement(sb, queue_name) as settlement,
        host_delivery(sb, queue_name, deliveries=3) as held,
    ):
        settlement.park(held.message, delay=MIN_RESCHEDULE)
        held.complete()
    back = functions.from_trigger(receive_in_session(sb, queue_name, "g-1"))
    assert back.delivery_count == 3  # the parked delivery was not the event's fault


def test_at_the_delivery_limit_abandon_dead_letters_with_the_reason(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    """A rescheduled copy that already carries four deliveries: its first is the fifth."""
    with (
        app_settlement(sb, queue_name, max_delivery_count=5) as settlement,
        host_delivery(sb, queue_name, properties={PRIOR_DELIVERIES: "4"}) as held,
    ):
        assert held.message.delivery_count == 5
        settlement.abandon(held.message, delay=10)
        held.complete()
    counts = sb.counts(queue_name)
    assert (counts["active"], counts["scheduled"], counts["dead_lettered"]) == (0, 0, 1)
    [letter] = sb.messages(f"{queue_name}/$DeadLetterQueue")
    assert letter.dead_letter_reason == "MaxDeliveryCountExceeded"
    assert "5 delivery attempts" in (letter.dead_letter_description or "")


def test_dead_letter_hands_a_copy_to_a_session_it_locked_first(
    sb: ServiceBusEmulator, queue_name: str
) -> None:
    """A receiver of the host's waits for the next available session throughout: it
    never gets the hand-off copy, because the settlement locked that session before
    sending into it. Replayed, the letter goes back to the group's own session."""
    gid = str(uuid.uuid4())
    with (
        app_settlement(sb, queue_name) as settlement,
        host_delivery(sb, queue_name, session_id=gid, deliveries=2, message_id="gc-abc") as held,
    ):
        grabbed: list[object] = []
        with sb.client() as client:
            other = client.get_queue_receiver(
                queue_name, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=4, prefetch_count=0
            )
            waiting = threading.Thread(
                target=lambda: grabbed.extend(
                    _receive_or_nothing(other, max_message_count=1, max_wait_time=4)
                )
            )
            waiting.start()
            wait_for(lambda: sb.pending_accepts() == 1)  # its attach waits for a session
            settlement.dead_letter(held.message, "OverMemberLimit", "group has 60001 members")
            held.complete()
            waiting.join(20)
            other.close()
        assert grabbed == []
    [letter] = sb.messages(f"{queue_name}/$DeadLetterQueue")
    assert (letter.dead_letter_reason, letter.dead_letter_description) == (
        "OverMemberLimit",
        "group has 60001 members",
    )
    assert letter.session_id is not None and letter.session_id.startswith(gid + HANDOFF_MARK)
    assert properties_of(letter)[HANDOFF_SESSION_PROPERTY] == gid
    assert sb.counts(queue_name)["active"] == 0
    with sb.queue_adapter(queue_name, dead_letter_wait=0.5) as queue:
        report = replay(queue, ReplayFilter(reason="OverMemberLimit"))
    assert (report.moved, report.failed) == (1, 0)
    back = functions.from_trigger(receive_in_session(sb, queue_name, gid))
    assert (back.session_id, back.message_id, back.delivery_count) == (gid, "gc-abc", 1)
    assert isinstance(back.lock, TriggeredLock) and back.lock.session_id == gid


def _receive_or_nothing(receiver: ServiceBusReceiver, **options: Any) -> list[object]:
    try:
        return list(receiver.receive_messages(**options))
    except OperationTimeoutError:
        return []  # no session was free within the wait


def test_a_hand_off_that_never_arrives_raises_so_the_host_abandons(
    sb: ServiceBusEmulator, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Duplicate detection drops a copy whose id the queue has seen in its window, and
    says nothing: here the hand-off's id was sent before."""
    session = f"g-1{HANDOFF_MARK}00000000abcd"  # its random part fixed
    monkeypatch.setattr(functions_settlement, "handoff_session_id", lambda group: session)
    earlier = derived_message_id("m-1", "x" + session.rsplit(HANDOFF_MARK, 1)[1])
    with (
        app_settlement(sb, queue_name, handoff_wait=1.0) as settlement,
        host_delivery(sb, queue_name) as held,
    ):
        with sb.client() as client, client.get_queue_sender(queue_name) as sender:
            sender.send_messages(ServiceBusMessage(b"{}", message_id=earlier, session_id="x"))
        with pytest.raises(TransientError, match="did not arrive"):
            settlement.dead_letter(held.message, "PoisonEvent", "bad")
        held.receiver.abandon_message(held.raw)  # the invocation failed: the host abandons
    assert sb.counts(queue_name)["dead_lettered"] == 0
    with sb.lock:
        [original] = [m for m in sb.queue(queue_name).iter_messages() if m.session_id == "g-1"]
        assert (original.message_id, original.deliveries) == ("m-1", 1)  # delivered again


def test_complete_leaves_the_message_to_the_host(sb: ServiceBusEmulator, queue_name: str) -> None:
    with (
        app_settlement(sb, queue_name) as settlement,
        host_delivery(sb, queue_name) as held,
    ):
        settlement.complete(held.message)
        assert sb.counts(queue_name) == {
            "active": 1,  # still locked by the host's receiver
            "scheduled": 0,
            "deferred": 0,
            "dead_lettered": 0,
        }
        held.complete()
    assert sb.counts(queue_name)["active"] == 0
