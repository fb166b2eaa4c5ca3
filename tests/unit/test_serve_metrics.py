"""serve's ``/healthz`` and Prometheus ``/metrics``, scraped from a running server.

The server runs the real HTTP listener, workers and timers over a real SQLite
queue and state file, with the in-memory tenant and directory behind it. It
subscribes, reconciles, then takes two notifications through the webhook: one
group converges (a cloud-only member left out), the other is over the member
limit and is dead-lettered. The scrape is parsed with prometheus-client's own
parser, and every figure is held to what happened.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.support.memory.cloud import MemoryCloud
from tests.support.memory.directory import MemoryForest
from writeback.adapters.local_queue import LocalQueue
from writeback.domain.mapping import MappingOptions
from writeback.hosting.serve import ServeConfig, Server

SECRET = "metrics-client-state-77d1"
KEY = "metrics-webhook-key-3c1a9e"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Scene:
    server: Server
    cloud: MemoryCloud
    small: str
    big: str


def post_notification(server: Server, group_id: str) -> int:
    item = {
        "subscriptionId": server.subscription_id,
        "clientState": SECRET,
        "changeType": "updated",
        "resource": f"Groups/{group_id}",
        "resourceData": {"@odata.type": "#Microsoft.Graph.Group", "id": group_id},
    }
    request = urllib.request.Request(  # noqa: S310 - loopback http in tests
        server.notification_url,
        data=json.dumps({"value": [item]}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with _OPENER.open(request, timeout=5) as answer:
        return int(answer.status)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback
    try:
        with _OPENER.open(request, timeout=5) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    forest = MemoryForest()
    target = forest.add_ou("Writeback", forest.add_ou("Groups"))
    cloud = MemoryCloud()
    users = []
    for name in ("ada", "bob", "cyd"):
        users.append(str(uuid.uuid4()))
        cloud.add_user(users[-1], sid=forest.add_user(name), synced=True, display_name=name)
    cloud_only = str(uuid.uuid4())
    cloud.add_user(cloud_only, sid=None, synced=False, display_name="guest")
    small, big = str(uuid.uuid4()), str(uuid.uuid4())
    cloud.add_group(small, display_name="Small", members=[users[0], cloud_only])
    cloud.add_group(big, display_name="Big", members=users)
    queue = LocalQueue(tmp_path / "queue.sqlite3")
    server = Server(
        queue=queue,
        cloud=cloud,
        directory_factory=lambda: forest.directory(target),
        options=MappingOptions(target_ou=target, member_limit=2),
        client_states=[SECRET],
        config=ServeConfig(
            workers=1,
            webhook_key=KEY,
            state_path=str(tmp_path / "state.json"),
            receive_wait=0.05,
            max_wait=0.0,
        ),
        owned=[queue],
    )
    server.start()
    try:
        assert server.wait_ready(30)
        yield Scene(server, cloud, small, big)
    finally:
        server.stop()


def scrape(server: Server) -> dict[str, list[Sample]]:
    status, content_type, text = get(f"{server.url}/metrics?code={KEY}")
    assert (status, content_type) == (200, CONTENT_TYPE_LATEST)
    families: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = list(family.samples)
    return families


def value(families: dict[str, list[Sample]], name: str, **labels: str) -> float:
    family = name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    matches = [s.value for s in families[family] if s.name == name and dict(s.labels) == labels]
    assert len(matches) == 1, (name, labels, families[family])
    return matches[0]


def test_metrics_tell_what_the_server_did(scene: Scene) -> None:
    server = scene.server
    scene.cloud.add_members(scene.small, [])  # touch nothing: the read converges anyway
    assert post_notification(server, scene.small) == 202
    assert post_notification(server, scene.big) == 202
    assert server.wait_idle(30, include_scheduled=False)
    now = datetime.now(UTC).timestamp()
    families = scrape(server)

    assert value(families, "writeback_notifications_enqueued_total") == 2
    assert value(families, "writeback_events_total") == 1  # the small group
    settled = {
        (dict(s.labels)["settlement"], dict(s.labels)["reason"]): s.value
        for s in families["writeback_messages_settled"]
        if s.name.endswith("_total")
    }
    assert settled == {("completed", "none"): 1, ("dead-lettered", "OverMemberLimit"): 1}
    assert value(families, "writeback_dead_letters", reason="OverMemberLimit") == 1
    assert value(families, "writeback_queue_depth") == 0
    assert value(families, "writeback_queue_available") == 1
    assert value(families, "writeback_queue_scheduled") >= 1  # the settle confirmation
    # The start-up reconcile wrote the small group (one add); the big one is over the limit.
    assert value(families, "writeback_reconciles_total", outcome="done") == 1
    assert value(families, "writeback_reconciles_total", outcome="failed") == 0
    assert value(families, "writeback_ldap_writes_total", source="reconcile") == 1
    assert value(families, "writeback_ldap_writes_total", source="event") == 0  # converged
    assert value(families, "writeback_unchanged_batches_total") == 1
    assert value(families, "writeback_skipped_members_total", reason="member-not-on-prem") == 1
    assert value(families, "writeback_last_reconcile_success") == 1
    assert now - 60 < value(families, "writeback_last_reconcile_timestamp_seconds") <= now
    assert value(families, "writeback_last_reconcile_duration_seconds") >= 0
    assert value(families, "writeback_subscription_expiry_timestamp_seconds") > now + 3600
    assert value(families, "writeback_subscription_upkeep_success") == 1
    assert value(families, "writeback_paused") == 0
    assert value(families, "writeback_worker_errors_total") == 0

    latency = families["writeback_event_latency_seconds"]
    buckets = [s for s in latency if s.name.endswith("_bucket")]
    assert [dict(s.labels)["le"] for s in buckets][-1] == "+Inf"
    counts = [s.value for s in buckets]
    assert counts == sorted(counts) and counts[-1] == 1
    assert value(families, "writeback_event_latency_seconds_count") == 1
    assert 0 < value(families, "writeback_event_latency_seconds_sum") < 30


def test_a_scrape_changes_nothing_and_counts_only_what_is_new(scene: Scene) -> None:
    server = scene.server
    first = scrape(server)
    assert value(first, "writeback_event_latency_seconds_count") == 0
    assert post_notification(server, scene.small) == 202
    assert server.wait_idle(30, include_scheduled=False)
    second, third = scrape(server), scrape(server)
    assert value(second, "writeback_event_latency_seconds_count") == 1
    assert value(third, "writeback_event_latency_seconds_count") == 1
    assert value(third, "writeback_events_total") == 1


def test_metrics_need_the_webhook_key_when_one_is_set(scene: Scene) -> None:
    url = f"{scene.server.url}/metrics"
    assert get(url)[0] == 401
    assert get(url + "?code=wrong")[0] == 401
    assert get(url, {"Authorization": "Bearer wrong"})[0] == 401
    assert get(url, {"Authorization": f"Bearer {KEY}"})[0] == 200  # Prometheus's authorization
    assert get(url, {"x-functions-key": KEY})[0] == 200


def test_healthz_says_whether_every_thread_runs(scene: Scene) -> None:
    status, content_type, text = get(f"{scene.server.url}/healthz")
    assert (status, content_type) == (200, "application/json")
    report = json.loads(text)
    assert report == {
        "status": "ok",
        "threads_down": [],
        "stopping": False,
        "ready": True,
        "paused": False,
    }
    scene.server.stop()
    healthy, report = scene.server.health()
    assert not healthy and report["stopping"] is True
    assert report["status"] == "failing"


def test_a_dead_worker_thread_fails_healthz(scene: Scene) -> None:
    server = scene.server
    worker = next(t for t in server._threads if t.name.startswith("writeback-worker"))
    server._threads.append(type(worker)(target=lambda: None, name="writeback-worker-dead"))
    server._threads[-1].start()
    server._threads[-1].join()
    deadline = time.monotonic() + 5
    status, _, text = get(f"{server.url}/healthz")
    while status != 503 and time.monotonic() < deadline:
        status, _, text = get(f"{server.url}/healthz")
    assert status == 503
    assert json.loads(text)["threads_down"] == ["writeback-worker-dead"]
