"""The Function app's worker under the Service Bus extension's own loop.

:class:`tests.support.functions_host.FunctionsHost` behaves as the WebJobs
Service Bus extension 5.x does for the app's binding (single dispatch with
sessions: ``maxConcurrentSessions`` receivers, one message per invocation,
session-lock renewal, an immediate retry after a failed invocation), with the
queue's lock and every other duration shrunk so that expiry really bites. The app runs on the
local queue with Graph the stand-in and AD a real Samba DC; the worker is the
app's own function, given messages decoded the way the Python worker decodes
them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.functions.timer import TimerRequest

from tests.integration.test_function_app import (
    SECRET,
    app_env,
    entry,
    http,
    notification,
    world,
)
from tests.support.functions_host import FunctionsHost
from tests.support.world import World
from writeback.adapters import functions_settlement
from writeback.adapters.local_queue import LocalQueue
from writeback.errors import QueueUnavailable
from writeback.hosting import functions
from writeback.ports import OutgoingMessage

__all__ = ["app_env", "world"]  # fixtures, used by name

#: Every duration of the extension and the queue (5-minute lock, 2 s idle) times this.
SCALE = 0.01
SUBSCRIPTION = "6c4a1f3e-2b1d-4c5e-9f8a-7b6c5d4e3f2a"


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Confirmation reads one second after an event; an invocation that cannot
    settle backs off for a few milliseconds instead of seconds."""
    monkeypatch.setenv("WRITEBACK_SETTLE_SECONDS", "1")
    monkeypatch.setattr(functions, "BACKOFF_BASE", 0.01)


def lifecycle(subscription: str, event: str) -> bytes:
    item = {"subscriptionId": subscription, "clientState": SECRET, "lifecycleEvent": event}
    return json.dumps({"value": [item]}).encode()


def drain(host: FunctionsHost, timeout: float = 60.0) -> None:
    """Run the trigger until nothing is due, confirmation reads included."""
    deadline = time.monotonic() + timeout
    while True:
        host.run_until_idle(timeout=max(1.0, deadline - time.monotonic()))
        if not host.queue.scheduled_count() or time.monotonic() > deadline:
            return
        time.sleep(0.2)


@pytest.fixture
def app_host(app_env: Path, quick: None) -> Iterator[FunctionsHost]:
    """The app's worker with the app's own binding (single dispatch) and host.json."""
    host = FunctionsHost.for_app(app_env, time_scale=SCALE)
    yield host
    host.close()


def test_a_reconcile_longer_than_the_lock_never_holds_a_session_lock(
    world: World, app_host: FunctionsHost
) -> None:
    """A lifecycle item that needs a reconcile only records the request: the
    invocation ends long before the (scaled) 3 s lock, and the timer runs the
    reconcile, here slowed to twice the lock, outside any session."""
    gids = [world.add_group(n, f"Missed {n}", ["user0"]) for n in range(3)]
    assert http("lifecycle", lifecycle(SUBSCRIPTION, "missed")).status_code == 202
    world.standin.inject_delay(2 * app_host.lock_duration, times=1, path_contains="delta")
    stats = app_host.run_until_idle(timeout=30)
    [control] = app_host.invocations
    assert control.succeeded and control.ended - control.started < app_host.lock_duration / 3
    assert stats.lock_losses == 0 and stats.abandons == 0
    assert all(world.ad_entry(gid) is None for gid in gids)  # not run in the trigger
    started = time.monotonic()
    entry("reconcile")(TimerRequest(past_due=False))
    assert time.monotonic() - started >= 2 * app_host.lock_duration
    assert all(world.ad_entry(gid) is not None for gid in gids)


def test_a_broken_setting_does_not_dead_letter_events(
    world: World, app_host: FunctionsHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the target OU unset, every delivery parks the events (rescheduled, no
    delivery counted) instead of burning the queue's 10 deliveries in a row."""
    gids = [world.add_group(n, f"Parked {n}", ["user0"]) for n in range(4)]
    for gid in gids:
        assert http("notifications", notification(gid)).status_code == 202
    ou = world.ou
    monkeypatch.setenv("WRITEBACK_TARGET_OU", "")
    monkeypatch.setattr(functions_settlement, "MIN_RESCHEDULE", 0.05)
    from writeback.service import handle_event

    monkeypatch.setattr(handle_event, "CONFIG_RETRY_DELAY", 0.3)
    for _ in range(4):  # round after round of parking: each parked copy is due 0.3 s later
        app_host.run_until_idle(timeout=10)
        time.sleep(0.35)
    assert app_host.queue.dead_letters() == []
    assert len(app_host.invocations) >= 3 * len(gids)  # every round took them all again
    assert max(c for i in app_host.invocations for c in i.delivery_counts) == 1
    monkeypatch.setenv("WRITEBACK_TARGET_OU", ou)
    drain(app_host)
    assert all(world.ad_entry(gid) is not None for gid in gids)
    assert app_host.queue.dead_letters() == []


def test_nothing_is_lost_when_an_invocation_fails_midway(
    world: World, app_host: FunctionsHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue fails twice in a row in the middle of an invocation: the write is
    made, its confirmation cannot be scheduled, nor can the copy that would put the
    event back. The invocation fails, the host abandons the batch and delivers it
    again at once, and the worker, reading both sides afresh, finishes it."""
    gid = world.add_group(10, "Midway", ["user0"])
    assert http("notifications", notification(gid)).status_code == 202
    real = LocalQueue.send
    failures = [QueueUnavailable("the queue file is locked"), OSError("disk full")]

    def flaky(self: LocalQueue, messages: list[OutgoingMessage]) -> None:
        if failures and any(m.message_id.startswith("cf-") for m in messages):
            raise failures.pop(0)
        if failures and len(failures) == 1:
            raise failures.pop(0)
        real(self, messages)

    monkeypatch.setattr(LocalQueue, "send", flaky)
    drain(app_host)
    assert not failures
    assert world.ad_entry(gid) is not None
    assert app_host.queue.dead_letters() == []
    outcomes = [i.succeeded for i in app_host.invocations]
    assert outcomes[0] is False and all(outcomes[1:])
    assert app_host.invocations[1].delivery_counts == (2,)  # the host's immediate retry


def test_a_burst_for_one_group_is_one_write(world: World, app_host: FunctionsHost) -> None:
    """Six messages of one session are six invocations, one after another (never two
    at once); the first writes, the rest were accepted before its read and need none."""
    gid = world.add_group(20, "Burst", ["user0", "user1"])
    for seq in range(6):
        assert http("notifications", notification(gid, seq=seq)).status_code == 202
    stats = app_host.run_until_idle(timeout=30)
    assert stats.invocations == 6 and stats.overlaps == 0 and stats.sessions_accepted == 1
    assert all(i.succeeded for i in app_host.invocations)
    assert (pipeline_stats().operations, pipeline_stats().covered) == ({"add": 1}, 5)
    assert world.ad_entry(gid) is not None


def pipeline_stats() -> Any:
    """The counters of the pipeline the app's worker process keeps warm."""
    pipeline = functions._runtime._pipeline
    assert pipeline is not None
    return pipeline.stats


def test_single_dispatch_keeps_one_worker_per_group_with_many_sessions(
    world: World, app_env: Path, quick: None
) -> None:
    """Eight concurrent session receivers over twelve groups with bursts of three:
    no two invocations of one group ever overlap, every group is written once, and
    the burst's later messages are covered by the first read (no second write)."""
    gids = [world.add_group(30 + n, f"Parallel {n}", ["user0", "user2"]) for n in range(12)]
    for seq in range(3):
        for gid in gids:
            assert http("notifications", notification(gid, seq=seq)).status_code == 202
    host = FunctionsHost.for_app(app_env, time_scale=SCALE)  # the app's own: single dispatch
    try:
        stats = host.run_until_idle(timeout=60)
        assert stats.overlaps == 0 and stats.lock_losses == 0
        assert stats.max_sessions_held > 1
        assert stats.invocations >= 36
    finally:
        host.close()
    assert all(world.ad_entry(gid) is not None for gid in gids)
    stats = pipeline_stats()
    assert stats.operations == {"add": len(gids)}  # one write per group
    assert stats.covered >= len(gids)  # later messages of a burst needed no read
