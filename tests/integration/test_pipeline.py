"""The single-machine pipeline end to end: Graph stand-in → real HTTP webhook →
LocalQueue → worker threads → real Samba DC, all inside one ``Server``; and the same
with the queue on Service Bus (``[servicebus]``: the emulator, through the real SDK).

Directory state is read back over an independent admin connection; that an
event made no write is shown by the object's ``uSNChanged``, which the DC bumps
on every write to it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ldap3 import BASE, MODIFY_REPLACE

from tests.support.relay import PATH, RelayRig, relay_rig
from tests.support.servicebus import new_queue, sb
from tests.support.world import World, make_world
from writeback.adapters.local_queue import LocalQueue
from writeback.cli import EXIT_OK, main
from writeback.domain.model import Operation
from writeback.errors import WritebackError
from writeback.hosting.serve import ServeConfig, Server
from writeback.ports import Directory, EventQueue, OutgoingMessage
from writeback.service.replay import ReplayFilter, replay
from writeback_sandbox.samba import SambaDC
from writeback_sandbox.servicebus_emulator import ServiceBusEmulator

__all__ = ["sb"]  # fixture

SECRET = "pipeline-client-state-for-tests"
KEY = "function-key-for-tests-0123456789"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with make_world(samba_dc, make_ou(samba_dc)) as w:
        yield w


FAST = ServeConfig(
    settle=0.3,
    workers=2,
    reconcile_at_start=False,
    reconcile_interval=3600,
    subscription_interval=3600,
    retry_delay=0.2,
    attempts=1,
    max_wait=0.1,
    redelivery_scale=0.05,
    max_redelivery_delay=0.5,
    receive_wait=0.1,
)


class Pipeline:
    """A started Server over a LocalQueue in ``tmp``, or with ``servicebus`` over a queue
    of the Service Bus emulator through the product's ServiceBusQueue (the real SDK
    over AMQP: what ``WRITEBACK_QUEUE=servicebus`` builds); closes everything it made.

    With a ``relay`` rig the workers reach AD as ``WRITEBACK_DIRECTORY=relay`` does:
    through the Relay stand-in to an agent that holds the LDAP connection.
    """

    def __init__(
        self,
        world: World,
        tmp: Path,
        relay: RelayRig | None = None,
        servicebus: ServiceBusEmulator | None = None,
    ) -> None:
        self.world = world
        self.tmp = tmp
        self.relay = relay
        self.servicebus = servicebus
        self.servers: list[Server] = []
        self.queue_name = ""
        if servicebus is not None:
            # As the Bicep makes it, the lock shorter (a worker that dies gives it back
            # sooner), the broker's own count above the app's.
            self.queue_name = new_queue(servicebus, lock_duration=30.0, max_delivery_count=120)

    def queue_settings(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The settings the command-line tools read to find this pipeline's queue."""
        monkeypatch.setenv("WRITEBACK_STATE_PATH", str(self.state_path))
        for name in ("WRITEBACK_QUEUE", "WRITEBACK_SERVICEBUS_NAMESPACE"):
            monkeypatch.delenv(name, raising=False)
        sb = self.servicebus
        if sb is None:
            monkeypatch.setenv("WRITEBACK_QUEUE_PATH", str(self.queue_path))
            monkeypatch.delenv("WRITEBACK_SERVICEBUS_CONNECTION", raising=False)
            return
        monkeypatch.setenv("WRITEBACK_SERVICEBUS_CONNECTION", sb.connection_string)
        monkeypatch.setenv("WRITEBACK_SERVICEBUS_QUEUE", self.queue_name)
        monkeypatch.setenv("WRITEBACK_SERVICEBUS_ENDPOINT", f"sb://{sb.host}:{sb.amqp_port}")
        monkeypatch.setenv("WRITEBACK_SERVICEBUS_CA_FILE", sb.ca_file)

    @property
    def queue_path(self) -> Path:
        return self.tmp / "queue.sqlite3"

    @property
    def state_path(self) -> Path:
        return self.tmp / "state.json"

    def start(
        self,
        *,
        member_limit: int | None = None,
        wrap: Callable[[Directory], Directory] | None = None,
        **config: Any,
    ) -> Server:
        world = self.world
        queue: EventQueue
        if self.servicebus is not None:
            queue = self.servicebus.queue_adapter(self.queue_name, max_delivery_count=50)
        else:
            queue = LocalQueue(self.queue_path, lock_duration=30, max_delivery_count=50)
        options = world.options
        if member_limit is not None:
            options = replace(options, member_limit=member_limit)

        relay = self.relay
        if relay is not None and not relay.agents:
            relay.start_agent(lambda: world.dc.directory(world.ou), world.ou)

        def directory() -> Directory:
            made = world.dc.directory(world.ou) if relay is None else relay.directory(world.ou)
            return wrap(made) if wrap is not None else made

        server = Server(
            queue=queue,
            cloud=world.cloud,
            directory_factory=directory,
            options=options,
            client_states=[SECRET],
            config=replace(FAST, state_path=str(self.state_path), **config),
            owned=[queue],
        )
        self.servers.append(server)
        server.start()
        assert server.wait_ready(30)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()


@contextlib.contextmanager
def _pipeline(
    world: World,
    tmp: Path,
    *,
    through_relay: bool,
    servicebus: ServiceBusEmulator | None = None,
) -> Iterator[Pipeline]:
    with contextlib.ExitStack() as stack:
        rig = stack.enter_context(relay_rig()) if through_relay else None
        p = Pipeline(world, tmp, rig, servicebus)
        stack.callback(p.close)
        yield p


@pytest.fixture(params=["ldap", "relay", "servicebus"])
def pipeline(world: World, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pipeline]:
    """The pipeline with each WRITEBACK_DIRECTORY (direct LDAP, through the relay) on
    the local queue, and direct LDAP with the queue on Service Bus (the emulator)."""
    servicebus = request.getfixturevalue("sb") if request.param == "servicebus" else None
    with _pipeline(
        world, tmp_path, through_relay=request.param == "relay", servicebus=servicebus
    ) as p:
        yield p


@pytest.fixture
def relay_pipeline(world: World, tmp_path: Path) -> Iterator[Pipeline]:
    with _pipeline(world, tmp_path, through_relay=True) as p:
        yield p


def settle(world: World, server: Server, timeout: float = 20.0) -> None:
    """Every notification delivered and every event handled."""
    assert world.standin.wait_idle(timeout), "the stand-in still has notifications to deliver"
    assert server.wait_idle(timeout), "the pipeline did not go idle"


def usn(world: World, gid: str) -> int:
    entry = world.ad_entry(gid)
    assert entry is not None
    conn = world.dc.connection()
    try:
        conn.search(entry["dn"], "(objectClass=*)", BASE, attributes=["uSNChanged"])
        return int(conn.entries[0].entry_attributes_as_dict["uSNChanged"][0])
    finally:
        conn.unbind()


def post(url: str, body: bytes = b"", *, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(  # noqa: S310 - loopback http in tests
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with _OPENER.open(request, timeout=5) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code), error.read().decode()


def notification(
    subscription_id: str, gid: str, seq: int, *, change: str = "updated", state: str = SECRET
) -> bytes:
    """A changeNotificationCollection with one item, shaped as Graph sends it."""
    item = {
        "subscriptionId": subscription_id,
        "subscriptionExpirationDateTime": "2099-01-01T00:00:00.0000000Z",
        "clientState": state,
        "changeType": change,
        "resource": f"Groups/{gid}",
        "tenantId": "7d5b3a4e-1c2f-4e8a-9b6d-0a1b2c3d4e5f",
        "resourceData": {
            "@odata.type": "#Microsoft.Graph.Group",
            "@odata.id": f"Groups/{gid}",
            "id": gid,
            "organizationId": "7d5b3a4e-1c2f-4e8a-9b6d-0a1b2c3d4e5f",
            "eventTime": f"2024-01-01T00:00:{seq:02d}.0000000Z",
            "sequenceNumber": seq,
        },
    }
    return json.dumps({"value": [item]}).encode()


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --------------------------------------------------------------------------- webhook


def test_validation_handshake_and_the_webhook_key(pipeline: Pipeline) -> None:
    world = pipeline.world
    server = pipeline.start(webhook_key=KEY)
    # Subscribing through GraphCloud made the stand-in validate both URLs against us.
    assert server.subscription_id is not None
    assert world.standin.subscription_ids() == [server.subscription_id]
    assert server.notification_url == f"{server.url}/api/notifications?code={KEY}"
    status, text = post(f"{server.url}/api/notifications?validationToken=a%20b%2Bc&code={KEY}")
    assert (status, text) == (200, "a b+c")
    status, text = post(f"{server.url}/api/lifecycle?validationToken=x", headers={})
    assert status == 401
    status, text = post(
        f"{server.url}/api/lifecycle?validationToken=x", headers={"x-functions-key": KEY}
    )
    assert (status, text) == (200, "x")
    assert post(f"{server.url}/api/notifications?code=wrong-{KEY}")[0] == 401
    assert post(f"{server.url}/api/elsewhere?code={KEY}")[0] == 404
    with _OPENER.open(f"{server.url}/api/health", timeout=5) as answer:
        assert answer.read() == b"ok"


def test_wrong_client_state_enqueues_nothing(pipeline: Pipeline) -> None:
    world = pipeline.world
    server = pipeline.start(subscribe=False)
    gid = world.add_group(1, "Sales", ["user0"])
    body = notification("c2b6b0a4-1111-4222-8333-944455556666", gid, 1, state="not-the-secret")
    assert post(f"{server.url}/api/notifications", body)[0] == 403
    assert post(f"{server.url}/api/notifications", b"not json")[0] == 400
    assert server.queue.depth() == 0
    assert server.stats.enqueued == 0
    assert world.ad_entry(gid) is None


# --------------------------------------------------------------------------- event path


def test_create_rename_remember_and_delete_reach_ad_one_write_each(pipeline: Pipeline) -> None:
    world = pipeline.world
    server = pipeline.start()

    def step(change: Callable[[], object]) -> dict[str, int]:
        before = server.stats.operations
        world.standin.pause_delivery()  # a step's tenant changes all happen first
        change()
        world.standin.resume_delivery()
        settle(world, server)
        after = server.stats.operations
        return {k: after.get(k, 0) - before.get(k, 0) for k in after if after[k] != before.get(k)}

    gid = world.gid(1)
    assert step(lambda: world.add_group(1, "Sales", ["user0", "user1", "cloudonly"])) == {"add": 1}
    entry = world.ad_entry(gid)
    assert entry is not None
    assert entry["displayname"] == ["Sales"]
    assert entry["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}
    assert server.stats.skipped_members == 1  # the cloud-only user

    assert step(lambda: world.tenant.update_group(gid, display_name="Sales EMEA")) == {"modify": 1}
    entry = world.ad_entry(gid)
    assert entry is not None and entry["displayname"] == ["Sales EMEA"]

    def remember() -> None:
        world.tenant.add_members(gid, [world.uid("user2"), world.uid("user3")])
        world.tenant.remove_members(gid, [world.uid("user0")])

    assert step(remember) == {"modify": 1}
    entry = world.ad_entry(gid)
    assert entry is not None
    assert entry["member_sids"] == {world.sid_of(u) for u in ("user1", "user2", "user3")}

    before = usn(world, gid)
    assert step(lambda: world.tenant.soft_delete_group(gid)) == {}  # kept until purged
    assert usn(world, gid) == before
    assert step(lambda: world.tenant.hard_delete_group(gid)) == {"delete": 1}
    assert world.ad_entry(gid) is None

    stats = server.stats
    assert stats.dead_lettered == stats.abandoned == 0
    assert stats.events >= 5  # at least one notified change per step
    # Every POST was answered 202 within the stand-in's 3 s (Graph's limit): no retries.
    deliveries = world.standin.deliveries
    assert deliveries and {(d.status, d.attempt) for d in deliveries} == {(202, 0)}
    assert len(stats.latencies) == stats.events
    assert all(0 <= latency < 10 for latency in stats.latencies)


def test_duplicate_and_out_of_order_deliveries_make_no_extra_write(pipeline: Pipeline) -> None:
    world = pipeline.world
    server = pipeline.start()
    subscription = server.subscription_id
    assert subscription is not None
    gid = world.add_group(1, "Ops", ["user0"])
    settle(world, server)
    first = usn(world, gid)
    writes = server.stats.writes

    world.standin.redeliver_last()  # Graph retrying a POST it thinks failed
    settle(world, server)
    assert usn(world, gid) == first
    assert server.stats.writes == writes

    # Two changes; their notifications arrive newest first, then Graph's own late.
    world.standin.pause_delivery()
    world.tenant.update_group(gid, description="one")
    world.tenant.update_group(gid, description="two")
    url = f"{server.url}/api/notifications"
    assert post(url, notification(subscription, gid, 2))[0] == 202
    assert server.wait_idle(20)
    second = usn(world, gid)
    assert second != first
    assert server.stats.writes == writes + 1
    assert post(url, notification(subscription, gid, 1))[0] == 202  # the older one, late
    world.standin.resume_delivery()
    settle(world, server)
    assert usn(world, gid) == second
    assert server.stats.writes == writes + 1
    entry = world.ad_entry(gid)
    assert entry is not None and entry["description"] == ["two"]


def test_a_poison_message_is_dead_lettered_and_replay_brings_it_back(pipeline: Pipeline) -> None:
    world = pipeline.world
    server = pipeline.start(subscribe=False)
    gid = world.gid(1)
    server.queue.send([OutgoingMessage(b"\x00garbage", "poison-1", gid)])
    settle(world, server)
    [letter] = server.queue.dead_letters()
    assert (letter.message_id, letter.session_id, letter.reason) == ("poison-1", gid, "PoisonEvent")
    assert "not JSON" in letter.description
    report = replay(server.queue, ReplayFilter(reason="PoisonEvent"))
    assert [item.letter.message_id for item in report.items if item.moved] == ["poison-1"]
    settle(world, server)
    # Still garbage, so back in the dead letters: replay moved it, the worker refused it.
    assert [d.message_id for d in server.queue.dead_letters()] == ["poison-1"]
    assert server.stats.dead_lettered == 2


def test_an_over_limit_group_is_dead_lettered_then_replayed_after_raising_the_limit(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = pipeline.world
    server = pipeline.start(member_limit=2)
    gid = world.add_group(1, "Big", ["user0", "user1", "user2"])
    settle(world, server)
    [letter] = server.queue.dead_letters()
    assert (letter.session_id, letter.reason) == (gid, "OverMemberLimit")
    assert world.ad_entry(gid) is None

    pipeline.queue_settings(monkeypatch)
    out = io.StringIO()
    assert main(["status"], out=out) == EXIT_OK
    assert "dead letters: 1 (OverMemberLimit 1)" in out.getvalue()
    assert f"subscription: {server.subscription_id} expires" in out.getvalue()

    # The admin raises WRITEBACK_MEMBER_LIMIT and restarts, then replays.
    server.stop()
    server = pipeline.start(member_limit=50_000)
    out = io.StringIO()
    assert main(["replay", "--reason", "OverMemberLimit"], out=out) == EXIT_OK
    assert (
        f"moved: message {letter.message_id} group {gid} reason OverMemberLimit" in out.getvalue()
    )
    settle(world, server)
    entry = world.ad_entry(gid)
    assert entry is not None
    assert entry["member_sids"] == {world.sid_of(u) for u in ("user0", "user1", "user2")}
    assert server.queue.dead_letters() == []


def test_ldap_down_events_wait_and_then_apply_none_lost(pipeline: Pipeline) -> None:
    world = pipeline.world
    server = pipeline.start()
    first = world.add_group(1, "Before", ["user0"])
    settle(world, server)
    assert world.ad_entry(first) is not None
    world.dc.stop()
    try:
        gids = [world.add_group(10 + n, f"During {n}", ["user1"]) for n in range(3)]
        world.tenant.add_members(first, [world.uid("user2")])
        assert world.standin.wait_idle(10)  # the webhook took them all while AD was down
        wait_for(lambda: server.stats.abandoned >= 6)  # each tried and put back, twice
        assert server.queue.dead_letters() == []
    finally:
        world.dc.start()
    settle(world, server, timeout=30)
    for gid in gids:
        entry = world.ad_entry(gid)
        assert entry is not None and entry["member_sids"] == {world.sid_of("user1")}
    entry = world.ad_entry(first)
    assert entry is not None
    assert entry["member_sids"] == {world.sid_of("user0"), world.sid_of("user2")}
    assert server.queue.dead_letters() == []
    assert server.stats.dead_lettered == 0


def test_relay_drops_and_an_agent_restart_mid_stream_lose_no_event(
    relay_pipeline: Pipeline,
) -> None:
    relay, world = relay_pipeline.relay, relay_pipeline.world
    assert relay is not None
    server = relay_pipeline.start()
    gids = [world.add_group(n, f"Stream {n}", ["user0"]) for n in range(4)]
    relay.standin.drop_listeners(PATH)  # the relay drops the agent's control channel
    gids += [world.add_group(10 + n, f"After drop {n}", ["user1"]) for n in range(4)]
    settle(world, server, timeout=30)  # the listener reconnected by itself
    [agent] = relay.agents
    agent.stop()  # the agent restarts: nobody listens for a while
    world.tenant.add_members(gids[0], [world.uid("user2")])
    gids += [world.add_group(20 + n, f"While down {n}", ["user2"]) for n in range(3)]
    assert world.standin.wait_idle(10)  # the webhook took them all
    wait_for(lambda: server.stats.abandoned >= 3)  # tried, put back to wait
    relay.agents.clear()
    relay.start_agent(lambda: world.dc.directory(world.ou), world.ou)
    settle(world, server, timeout=30)
    for n, gid in enumerate(gids):
        entry = world.ad_entry(gid)
        assert entry is not None, n
    first = world.ad_entry(gids[0])
    assert first is not None
    assert first["member_sids"] == {world.sid_of("user0"), world.sid_of("user2")}
    assert server.queue.dead_letters() == []
    assert server.stats.dead_lettered == 0
    assert relay.standin.stats(PATH)["connects"] >= 3


def test_an_unexpected_error_puts_the_event_back_and_it_applies_later(
    pipeline: Pipeline,
) -> None:
    failures = [RuntimeError("a bug")]

    class Buggy:
        """The first write blows up with something no adapter is meant to raise."""

        def __init__(self, inner: Directory) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def apply(self, operation: Operation) -> int:
            if failures:
                raise failures.pop()
            return self.inner.apply(operation)

        def apply_all(self, operations: Sequence[Operation]) -> list[int | WritebackError]:
            if failures:
                raise failures.pop()
            return self.inner.apply_all(operations)

    world = pipeline.world
    server = pipeline.start(wrap=Buggy)
    gid = world.add_group(1, "Bugged", ["user0"])
    settle(world, server)
    assert world.ad_entry(gid) is not None
    stats = server.stats
    assert (stats.worker_errors, stats.events, stats.dead_lettered) == (1, 1, 0)
    assert server.queue.dead_letters() == []


def test_pause_switch_holds_events_until_resumed(pipeline: Pipeline) -> None:
    world = pipeline.world
    server = pipeline.start(paused=True)  # WRITEBACK_PAUSED=true at start
    assert json.loads(pipeline.state_path.read_text())["paused"] is True
    gid = world.add_group(1, "Waits", ["user0"])
    assert world.standin.wait_idle(10)
    time.sleep(0.5)
    assert server.queue.depth() == 1
    assert world.ad_entry(gid) is None
    server.resume()
    settle(world, server)
    assert world.ad_entry(gid) is not None

    server.pause()  # at runtime
    world.tenant.update_group(gid, display_name="Waited")
    assert world.standin.wait_idle(10)
    time.sleep(0.5)
    assert server.queue.depth() == 1
    entry = world.ad_entry(gid)
    assert entry is not None and entry["displayname"] == ["Waits"]
    assert json.loads(pipeline.state_path.read_text())["paused"] is True
    server.resume()
    settle(world, server)
    entry = world.ad_entry(gid)
    assert entry is not None and entry["displayname"] == ["Waited"]
    assert json.loads(pipeline.state_path.read_text())["paused"] is False


# --------------------------------------------------------------------------- timers


def test_reconcile_at_start_and_lifecycle_events(pipeline: Pipeline) -> None:
    world = pipeline.world
    gid = world.add_group(1, "Existing", ["user0"], description="from the cloud")
    server = pipeline.start(reconcile_at_start=True)
    assert server.stats.reconciles == 1
    assert world.ad_entry(gid) is not None
    state = json.loads(pipeline.state_path.read_text())
    assert state["last_reconcile"]["applied"] == {"add": 1}
    subscription = server.subscription_id
    assert subscription is not None
    assert state["subscription"]["id"] == subscription

    world.standin.send_lifecycle(subscription, "reauthorizationRequired")
    assert world.standin.needs_reauthorization(subscription)
    wait_for(lambda: not world.standin.needs_reauthorization(subscription))
    assert world.standin.subscription_ids() == [subscription]

    # Drift the group by hand, then Graph says notifications were missed: reconcile.
    entry = world.ad_entry(gid)
    assert entry is not None
    conn = world.dc.connection()
    conn.modify(entry["dn"], {"description": [(MODIFY_REPLACE, ["edited on-prem"])]})
    conn.unbind()
    post(
        server.lifecycle_url,
        json.dumps(
            {
                "value": [
                    {
                        "subscriptionId": subscription,
                        "clientState": SECRET,
                        "lifecycleEvent": "missed",
                        "tenantId": "7d5b3a4e-1c2f-4e8a-9b6d-0a1b2c3d4e5f",
                    }
                ]
            }
        ).encode(),
    )
    wait_for(lambda: server.stats.reconciles == 2)
    entry = world.ad_entry(gid)
    assert entry is not None and entry["description"] == ["from the cloud"]

    world.standin.send_lifecycle(subscription, "subscriptionRemoved")
    wait_for(lambda: server.stats.reconciles == 3)
    [recreated] = world.standin.subscription_ids()
    assert recreated != subscription and server.subscription_id == recreated
    assert json.loads(pipeline.state_path.read_text())["subscription"]["id"] == recreated


def test_the_upkeep_timer_renews_the_subscription(pipeline: Pipeline) -> None:
    server = pipeline.start(
        subscription_interval=0.3,
        subscription_lifetime=timedelta(hours=1),
        renew_before=timedelta(minutes=59, seconds=59),  # due for renewal a second after
    )
    subscription, created = server.subscription_id, server.subscription_expiration
    assert subscription is not None and created is not None
    wait_for(
        lambda: json.loads(pipeline.state_path.read_text())["subscription"]["action"] == "renewed"
    )
    state = json.loads(pipeline.state_path.read_text())["subscription"]
    assert state["id"] == subscription
    assert datetime.fromisoformat(state["expiration"]) > created.replace(microsecond=0)
    assert pipeline.world.standin.subscription_ids() == [subscription]
    assert server.subscription_expiration is not None
    assert server.subscription_expiration - datetime.now(UTC) > timedelta(minutes=59)


# --------------------------------------------------------------------------- the real command


def test_serve_command_runs_the_pipeline_and_stops_on_sigterm(world: World, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "WRITEBACK_TARGET_OU": world.ou,
        "WRITEBACK_LDAP_URL": world.dc.ldaps_url,
        "WRITEBACK_LDAP_USER": world.dc.admin_dn,
        "WRITEBACK_LDAP_PASSWORD": world.dc.admin_password,
        "WRITEBACK_LDAP_CA_FILE": world.dc.ca_file,
        "WRITEBACK_GRAPH_URL": world.standin.url,
        "WRITEBACK_GRAPH_AUTH": "none",
        "WRITEBACK_CLIENT_STATE": SECRET,
        "WRITEBACK_WEBHOOK_KEY": KEY,
        "WRITEBACK_QUEUE_PATH": str(tmp_path / "queue.sqlite3"),
        "WRITEBACK_STATE_PATH": str(tmp_path / "state.json"),
        "WRITEBACK_LISTEN_PORT": "0",
    }
    for name in ("WRITEBACK_QUEUE", "WRITEBACK_SERVICEBUS_NAMESPACE", "WRITEBACK_PAUSED"):
        env.pop(name, None)
    existing = world.add_group(1, "At start", ["user0"])
    process = subprocess.Popen(
        [sys.executable, "-m", "writeback", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("writeback: webhook at http://127.0.0.1:"), first
        assert KEY not in first
        wait_for(lambda: world.ad_entry(existing) is not None, 30)  # the start-up reconcile
        wait_for(lambda: bool(world.standin.subscription_ids()), 30)
        notified = world.add_group(2, "Notified", ["user1"])
        wait_for(lambda: world.ad_entry(notified) is not None, 30)
        process.send_signal(signal.SIGTERM)
        output, errors = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, errors
    assert "writeback: stopped after" in output
    assert world.dc.admin_password not in output + errors
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["server"]["stopped_at"] is not None
    assert state["last_reconcile"]["applied"] == {"add": 1}
    assert KEY not in (tmp_path / "state.json").read_text()
