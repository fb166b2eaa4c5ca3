"""Subscriptions end to end: the real GraphCloud (msgraph-sdk) against the Graph
stand-in, which runs the validation handshake against and delivers change and
lifecycle notifications to ``handle_webhook`` behind a real loopback HTTP server."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from tests.unit.test_notifications import MemoryQueue
from writeback.adapters.graph import GraphCloud
from writeback.domain.events import Change
from writeback.errors import GraphNotFound, GraphRefused
from writeback.ports import Subscription
from writeback.service.notifications import LifecycleEvent, handle_webhook
from writeback.service.subscriptions import (
    Action,
    ensure_subscription,
    handle_lifecycle,
)
from writeback_sandbox.graph_standin import GraphStandIn, Tenant

SECRET = "s3cret-client-state-for-tests"


class Webhook:
    """``handle_webhook`` behind a threading HTTP server on loopback: the notification
    URL (with a function-key style query) and the lifecycle URL."""

    def __init__(self, *, client_state: str = SECRET) -> None:
        self.client_state = client_state
        self.queue = MemoryQueue()
        self.lifecycle: list[LifecycleEvent] = []
        self.validations: list[str] = []
        self.answers: list[tuple[str, int, float]] = []
        self.broken_validation = False
        #: seconds to wait before answering the next notification POSTs
        self.delays: list[float] = []
        self._lock = threading.Lock()
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                webhook._serve(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.notification_url = f"{base}/api/notifications?code=fn-key"
        self.lifecycle_url = f"{base}/api/lifecycle"

    def _serve(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        query = dict(parse_qsl(urlsplit(request.path).query, keep_blank_values=True))
        with self._lock:
            delay = self.delays.pop(0) if self.delays and "validationToken" not in query else 0
        time.sleep(delay)
        started = time.perf_counter()
        response = handle_webhook(
            method=request.command,
            query=query,
            body=body,
            content_type=request.headers.get("Content-Type"),
            client_state=self.client_state,
            queue=self.queue,
            on_lifecycle=self._record_lifecycle,
        )
        elapsed = time.perf_counter() - started
        status, payload = response.status, response.body
        with self._lock:
            if "validationToken" in query:
                self.validations.append(urlsplit(request.path).path)
                if self.broken_validation:
                    payload = b"not the token"
            self.answers.append((urlsplit(request.path).path, status, elapsed))
        request.send_response(status)
        request.send_header("Content-Type", response.content_type)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)

    def _record_lifecycle(self, event: LifecycleEvent) -> None:
        with self._lock:
            self.lifecycle.append(event)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    server = Webhook()
    yield server
    server.close()


@pytest.fixture
def standin() -> Iterator[GraphStandIn]:
    with GraphStandIn(Tenant(), delivery_retry_delays=(0.05, 0.05, 0.05)) as server:
        yield server


@pytest.fixture
def cloud(standin: GraphStandIn) -> Iterator[GraphCloud]:
    client = GraphCloud(
        base_url=standin.url, timeout=15.0, max_attempts=3, max_wait=0.05, backoff=0.01
    )
    yield client
    client.close()


def now() -> datetime:
    return datetime.now(UTC)


def subscribe(cloud: GraphCloud, webhook: Webhook, *, days: float = 20) -> Subscription:
    return cloud.create_subscription(
        webhook.notification_url,
        webhook.lifecycle_url,
        SECRET,
        now() + timedelta(days=days),
    )


def ensure(cloud: GraphCloud, webhook: Webhook, when: datetime | None = None) -> Any:
    return ensure_subscription(
        cloud,
        notification_url=webhook.notification_url,
        lifecycle_url=webhook.lifecycle_url,
        client_state=SECRET,
        now=when or now(),
    )


def lifecycle(cloud: GraphCloud, webhook: Webhook, event: LifecycleEvent) -> Any:
    return handle_lifecycle(
        cloud,
        event,
        notification_url=webhook.notification_url,
        lifecycle_url=webhook.lifecycle_url,
        client_state=SECRET,
        now=now(),
    )


def group_id(n: int) -> str:
    return str(uuid.UUID(int=n, version=4))


# --------------------------------------------------------------------------- CRUD


def test_create_runs_the_handshake_on_both_urls_and_lists(
    standin: GraphStandIn, cloud: GraphCloud, webhook: Webhook
) -> None:
    created = subscribe(cloud, webhook)
    assert webhook.validations == ["/api/notifications", "/api/lifecycle"]
    assert created.resource == "groups"
    assert created.change_type == "updated,deleted"
    assert created.notification_url == webhook.notification_url
    assert created.lifecycle_url == webhook.lifecycle_url
    assert created.expiration.tzinfo is not None
    assert abs(created.expiration - (now() + timedelta(days=20))) < timedelta(minutes=1)
    assert created.client_state == SECRET
    assert SECRET not in repr(created)
    listed = cloud.list_subscriptions()
    assert [s.id for s in listed] == [created.id]
    assert standin.subscription_ids() == [created.id]


def test_create_is_refused_when_the_handshake_or_the_request_is_wrong(
    cloud: GraphCloud, webhook: Webhook
) -> None:
    webhook.broken_validation = True
    with pytest.raises(GraphRefused, match="validation"):
        subscribe(cloud, webhook)
    webhook.broken_validation = False
    closed = "http://127.0.0.1:9/nothing-listens-here"
    with pytest.raises(GraphRefused, match="validation"):
        cloud.create_subscription(closed, None, SECRET, now() + timedelta(days=1))
    with pytest.raises(GraphRefused, match="41760"):
        subscribe(cloud, webhook, days=29.1)
    with pytest.raises(GraphRefused, match="https"):
        cloud.create_subscription(
            "http://example.com/hook", None, SECRET, now() + timedelta(days=1)
        )
    with pytest.raises(GraphRefused, match="clientState"):
        cloud.create_subscription(
            webhook.notification_url, None, "x" * 129, now() + timedelta(days=1)
        )
    assert cloud.list_subscriptions() == []


def test_renew_reauthorize_and_delete(
    standin: GraphStandIn, cloud: GraphCloud, webhook: Webhook
) -> None:
    created = subscribe(cloud, webhook, days=1)
    renewed = cloud.renew_subscription(created.id, now() + timedelta(days=25))
    assert renewed.id == created.id
    assert renewed.expiration > created.expiration + timedelta(days=23)
    assert cloud.list_subscriptions()[0].expiration == renewed.expiration
    standin.send_lifecycle(created.id, "reauthorizationRequired")
    assert standin.needs_reauthorization(created.id)
    cloud.reauthorize_subscription(created.id)
    assert not standin.needs_reauthorization(created.id)
    cloud.delete_subscription(created.id)
    assert cloud.list_subscriptions() == []
    with pytest.raises(GraphNotFound):
        cloud.delete_subscription(created.id)
    with pytest.raises(GraphNotFound):
        cloud.renew_subscription(created.id, now() + timedelta(days=2))
    with pytest.raises(GraphNotFound):
        cloud.reauthorize_subscription(created.id)


# --------------------------------------------------------------------------- ensure


def test_ensure_subscription_creates_once_then_leaves_it_then_renews(
    standin: GraphStandIn, cloud: GraphCloud, webhook: Webhook
) -> None:
    first = ensure(cloud, webhook)
    assert first.action is Action.CREATED
    assert first.reconcile_needed
    second = ensure(cloud, webhook)
    assert second.action is Action.UNCHANGED
    assert second.subscription.id == first.subscription.id
    assert not second.reconcile_needed
    # Three weeks later it is within two weeks of expiring: renewed, same id.
    standin.clock = lambda: now() + timedelta(days=21)
    later = ensure(cloud, webhook, now() + timedelta(days=21))
    assert later.action is Action.RENEWED
    assert later.subscription.id == first.subscription.id
    assert later.subscription.expiration > first.subscription.expiration
    assert [s.id for s in cloud.list_subscriptions()] == [first.subscription.id]
    assert len(webhook.validations) == 2  # one handshake pair only


def test_ensure_subscription_replaces_stale_and_duplicate_subscriptions(
    cloud: GraphCloud, webhook: Webhook
) -> None:
    without_lifecycle = cloud.create_subscription(
        webhook.notification_url, None, SECRET, now() + timedelta(days=20)
    )
    old_key = cloud.create_subscription(
        webhook.notification_url.replace("fn-key", "old-key"),
        webhook.lifecycle_url,
        SECRET,
        now() + timedelta(days=20),
    )
    status = ensure(cloud, webhook)
    assert status.action is Action.RECREATED
    assert sorted(status.deleted) == sorted([without_lifecycle.id, old_key.id])
    assert [s.id for s in cloud.list_subscriptions()] == [status.subscription.id]
    assert status.subscription.lifecycle_url == webhook.lifecycle_url

    duplicate = subscribe(cloud, webhook, days=5)
    again = ensure(cloud, webhook)
    assert again.action is Action.UNCHANGED
    assert again.subscription.id == status.subscription.id  # the longer-lived one stays
    assert again.deleted == (duplicate.id,)
    assert [s.id for s in cloud.list_subscriptions()] == [status.subscription.id]


def test_ensure_subscription_leaves_other_subscriptions_alone(
    cloud: GraphCloud, webhook: Webhook
) -> None:
    other = Webhook()
    try:
        foreign = cloud.create_subscription(
            other.notification_url.replace("/api/notifications", "/other"),
            None,
            SECRET,
            now() + timedelta(days=3),
        )
        ensure(cloud, webhook)
        assert foreign.id in {s.id for s in cloud.list_subscriptions()}
        assert len(cloud.list_subscriptions()) == 2
    finally:
        other.close()


# --------------------------------------------------------------------------- lifecycle


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_reauthorization_required_reaches_the_webhook_and_is_answered(
    standin: GraphStandIn, cloud: GraphCloud, webhook: Webhook
) -> None:
    subscription = ensure(cloud, webhook).subscription
    standin.send_lifecycle(subscription.id, "reauthorizationRequired")
    assert standin.wait_idle()
    assert webhook.lifecycle == [LifecycleEvent(subscription.id, "reauthorizationRequired")]
    assert standin.deliveries[-1].kind == "lifecycle"
    assert standin.deliveries[-1].status == 202
    outcome = lifecycle(cloud, webhook, webhook.lifecycle[0])
    assert outcome.action is Action.REAUTHORIZED
    assert not outcome.reconcile_needed
    assert not standin.needs_reauthorization(subscription.id)


def test_subscription_removed_is_recreated_and_asks_for_a_reconcile(
    standin: GraphStandIn, cloud: GraphCloud, webhook: Webhook
) -> None:
    subscription = ensure(cloud, webhook).subscription
    standin.send_lifecycle(subscription.id, "subscriptionRemoved")
    assert standin.wait_idle()
    assert cloud.list_subscriptions() == []
    outcome = lifecycle(cloud, webhook, webhook.lifecycle[-1])
    assert outcome.action is Action.CREATED
    assert outcome.reconcile_needed
    assert outcome.subscription is not None
    assert [s.id for s in cloud.list_subscriptions()] == [outcome.subscription.id]
    assert outcome.subscription.id != subscription.id

    # A reauthorization for a subscription that is gone ends in a new one too.
    gone = LifecycleEvent(subscription.id, "reauthorizationRequired")
    again = lifecycle(cloud, webhook, gone)
    assert again.action is Action.UNCHANGED  # the one just created is fine
    assert again.subscription is not None
    assert again.subscription.id == outcome.subscription.id

    missed = lifecycle(cloud, webhook, LifecycleEvent(outcome.subscription.id, "missed"))
    assert missed.action is Action.NONE
    assert missed.reconcile_needed


# --------------------------------------------------------------------------- delivery


def test_a_tenant_change_ends_up_as_one_group_changed_in_the_queue(
    standin: GraphStandIn, cloud: GraphCloud, webhook: Webhook
) -> None:
    ensure(cloud, webhook)
    tenant = standin.tenant
    tenant.add_user("u1", sid="S-1-5-21-1-2-3-1001", synced=True)
    gid = group_id(1)
    tenant.add_group(gid, display_name="Sales", members=["u1"])
    assert standin.wait_idle()
    events = webhook.queue.events()
    assert [(e.group_id, e.change) for e in events] == [(gid, Change.UPDATED)]
    delivered = standin.deliveries[-1]
    assert (delivered.kind, delivered.status, delivered.items) == ("notification", 202, 1)
    sent = json.loads(delivered.body)["value"][0]
    assert sent["resource"] == f"Groups/{gid}"
    assert sent["resourceData"]["@odata.type"] == "#Microsoft.Graph.Group"
    assert sent["resourceData"]["organizationId"] == standin.tenant_id

    tenant.soft_delete_group(gid)
    tenant.hard_delete_group(gid)
    assert standin.wait_idle()
    changes = [e.change for e in webhook.queue.events()]
    assert changes == [Change.UPDATED, Change.UPDATED, Change.DELETED]


def test_a_redelivered_notification_is_a_duplicate(
    standin: GraphStandIn, cloud: GraphCloud, webhook: Webhook
) -> None:
    ensure(cloud, webhook)
    standin.tenant.add_group(group_id(2), display_name="Ops")
    assert standin.wait_idle()
    first = [m.message_id for m in webhook.queue.messages()]
    standin.redeliver_last()
    assert standin.wait_idle()
    assert [d.status for d in standin.deliveries] == [202, 202]
    assert [m.message_id for m in webhook.queue.messages()] == first
    assert webhook.queue.dropped_duplicates == 1


def test_a_failing_queue_makes_graph_retry_until_it_is_persisted(
    standin: GraphStandIn, cloud: GraphCloud, webhook: Webhook
) -> None:
    ensure(cloud, webhook)
    webhook.queue.fail_sends = 2
    standin.tenant.add_group(group_id(3), display_name="Retry")
    assert standin.wait_idle()
    assert [(d.status, d.attempt) for d in standin.deliveries] == [(503, 0), (503, 1), (202, 2)]
    assert [e.group_id for e in webhook.queue.events()] == [group_id(3)]


def test_graph_gives_up_after_its_last_retry(
    standin: GraphStandIn, cloud: GraphCloud, webhook: Webhook
) -> None:
    ensure(cloud, webhook)
    webhook.queue.fail_sends = 100
    standin.tenant.add_group(group_id(8), display_name="Lost")
    assert standin.wait_idle()
    assert [(d.status, d.attempt) for d in standin.deliveries] == [(503, n) for n in range(4)]
    assert webhook.queue.depth() == 0


def test_a_slow_answer_is_retried_and_the_retry_is_a_duplicate(
    standin: GraphStandIn, cloud: GraphCloud, webhook: Webhook
) -> None:
    ensure(cloud, webhook)
    standin.delivery_timeout = 0.2
    webhook.delays = [0.6]
    standin.tenant.add_group(group_id(9), display_name="Slow")
    assert standin.wait_idle()
    wait_for(lambda: len(webhook.answers) >= 4)  # 2 handshakes, the slow POST, the retry
    assert [d.status for d in standin.deliveries] == [0, 202]
    assert [e.group_id for e in webhook.queue.events()] == [group_id(9)]
    assert webhook.queue.dropped_duplicates == 1


def test_paused_notifications_go_out_batched_and_coalesced(
    standin: GraphStandIn, cloud: GraphCloud, webhook: Webhook
) -> None:
    ensure(cloud, webhook)
    standin.delivery_batch_size = 10
    tenant = standin.tenant
    for user in ("u1", "u2"):
        tenant.add_user(user, sid=None, synced=False)
    standin.pause_delivery()
    a, b, c = group_id(4), group_id(5), group_id(6)
    tenant.add_group(a, display_name="A")
    tenant.add_group(b, display_name="B")
    tenant.add_members(a, ["u1"])
    tenant.update_group(a, description="changed")
    tenant.add_group(c, display_name="C", members=["u2"])
    tenant.delete_user("u2")  # c loses a member: another item for c
    time.sleep(0.1)
    assert standin.deliveries == []
    standin.resume_delivery()
    assert standin.wait_idle()
    assert [(d.status, d.items) for d in standin.deliveries] == [(202, 6)]
    assert sorted(e.group_id for e in webhook.queue.events()) == sorted([a, b, c])
    assert webhook.queue.sends == 1


def test_expired_subscriptions_get_nothing(
    standin: GraphStandIn, cloud: GraphCloud, webhook: Webhook
) -> None:
    subscribe(cloud, webhook, days=1)
    standin.clock = lambda: now() + timedelta(days=2)
    standin.tenant.add_group(group_id(7), display_name="Late")
    assert standin.wait_idle()
    assert standin.deliveries == []
    assert cloud.list_subscriptions() == []


def test_webhook_latency_over_http_for_100_item_posts(
    standin: GraphStandIn, cloud: GraphCloud, webhook: Webhook
) -> None:
    ensure(cloud, webhook)
    standin.delivery_batch_size = 100
    standin.pause_delivery()
    for n in range(100):
        standin.tenant.add_group(group_id(100 + n), display_name=f"G{n}")
    standin.resume_delivery()
    assert standin.wait_idle()
    assert [(d.status, d.items) for d in standin.deliveries] == [(202, 100)]
    assert webhook.queue.depth() == 100
    handled = [elapsed for path, status, elapsed in webhook.answers if status == 202]
    print(f"100-item POST through HTTP: handler {handled[-1] * 1000:.2f} ms")
    assert handled[-1] < 0.5


def test_subscription_removed_deletes_only_a_subscription_of_ours(
    standin: GraphStandIn, cloud: GraphCloud, webhook: Webhook
) -> None:
    """Issue 12, item 8: on main ``subscriptionRemoved`` deleted whatever id the
    event named. Another application's subscription (another notification URL)
    named in one is left alone; ours is replaced first and deleted after."""
    other = Webhook()
    try:
        foreign = cloud.create_subscription(
            other.notification_url, None, SECRET, now() + timedelta(days=3)
        )
        mine = ensure(cloud, webhook).subscription
        outcome = lifecycle(cloud, webhook, LifecycleEvent(foreign.id, "subscriptionRemoved"))
        listed = {s.id for s in cloud.list_subscriptions()}
        assert foreign.id in listed
        assert outcome.action is Action.UNCHANGED and outcome.subscription is not None
        assert outcome.subscription.id == mine.id and outcome.reconcile_needed

        # Ours, still listed (the event came before Graph dropped it): a new one first.
        replaced = lifecycle(cloud, webhook, LifecycleEvent(mine.id, "subscriptionRemoved"))
        assert replaced.action is Action.RECREATED and replaced.subscription is not None
        listed = {s.id for s in cloud.list_subscriptions()}
        assert listed == {foreign.id, replaced.subscription.id}
        assert mine.id not in listed
    finally:
        other.close()
