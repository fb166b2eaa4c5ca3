"""tests/support/functions_host.py: the Service Bus extension's trigger loop, checked
with a trivial function over a real LocalQueue file, with locks shrunk to a second or
less so that expiry really happens."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest

from tests.support.functions_host import (
    HOST_JSON,
    FunctionsHost,
    TriggerOptions,
    app_function,
    one_at_a_time,
    timespan,
)
from writeback.adapters.local_queue import MAX_DELIVERY_COUNT_EXCEEDED
from writeback.ports import OutgoingMessage

#: Durations of host.json and the queue, times this: a 5-minute lock becomes 1.5 s.
SCALE = 0.005
#: The SDK renews 10 s before expiry, against network round trips of milliseconds;
#: scaled that would be 50 ms, less than thread scheduling on a busy test machine.
RENEW_BUFFER = 0.2


@dataclass
class Call:
    session_id: str
    bodies: list[bytes]
    delivery_counts: list[int]
    started: float
    ended: float = 0.0


@dataclass
class Recorder:
    """A trivial worker function: records what it got; can sleep, raise or send."""

    sleep: float = 0.0
    fail_first: int = 0
    sleep_first: float | None = None
    on_call: Callable[[int], None] | None = None
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, argument: Any) -> None:
        messages = argument if isinstance(argument, list) else [argument]
        assert all(isinstance(m, func.ServiceBusMessage) for m in messages)
        call = Call(
            messages[0].session_id,
            [m.get_body() for m in messages],
            [m.delivery_count for m in messages],
            time.monotonic(),
        )
        with self.lock:
            self.calls.append(call)
            number = len(self.calls)
        if self.on_call is not None:
            self.on_call(number)
        pause = self.sleep_first if self.sleep_first is not None and number == 1 else self.sleep
        time.sleep(pause)
        call.ended = time.monotonic()
        if number <= self.fail_first:
            raise RuntimeError(f"call {number} fails")


def burst(host: FunctionsHost, sessions: int, per_session: int) -> None:
    host.queue.send(
        [
            OutgoingMessage(f"{s}/{i}".encode(), f"m-{s}-{i}", f"S{s}")
            for i in range(per_session)
            for s in range(sessions)
        ]
    )


@pytest.fixture
def make_host(tmp_path: Path) -> Iterator[Callable[..., FunctionsHost]]:
    hosts: list[FunctionsHost] = []

    def make(function: Callable[[Any], object], **options: Any) -> FunctionsHost:
        """The driver with host.json's options; batch mode unless a test says otherwise
        (the app itself runs single dispatch: its binding is cardinality one)."""
        options.setdefault("cardinality", "many")
        host = FunctionsHost.for_app(
            tmp_path / "queue.db", function=function, time_scale=SCALE, **options
        )
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.close()


# --------------------------------------------------------------------------- options


def test_options_come_from_the_apps_binding_and_host_json() -> None:
    _, binding = app_function("worker")
    host_json = json.loads(HOST_JSON.read_text())
    options = TriggerOptions.from_binding(binding, host_json)
    settings = host_json["extensions"]["serviceBus"]
    assert options.cardinality == "one"  # the app runs single dispatch
    assert options.auto_complete is True
    assert "maxMessageBatchSize" not in settings  # a batch-mode setting; the default stays
    assert options.max_message_batch_size == 1000
    assert options.session_idle_timeout == timespan(settings["sessionIdleTimeout"])
    assert options.max_concurrent_sessions == settings["maxConcurrentSessions"]
    assert options.max_auto_lock_renewal == timespan(settings["maxAutoLockRenewalDuration"])
    scaled = TriggerOptions.from_binding(binding, host_json, time_scale=0.01)
    assert scaled.session_idle_timeout == pytest.approx(options.session_idle_timeout * 0.01)
    assert scaled.max_message_batch_size == options.max_message_batch_size
    # Without sessionIdleTimeout the extension waits tryTimeout; without host.json, 60 s.
    assert TriggerOptions.from_binding(binding, {}).session_idle_timeout == 60.0
    assert TriggerOptions.from_binding({**binding, "cardinality": "MANY"}).cardinality == "many"
    with pytest.raises(NotImplementedError):
        TriggerOptions.from_binding({**binding, "isSessionsEnabled": False})
    with pytest.raises(NotImplementedError):
        TriggerOptions.from_binding(binding, {"extensions": {"serviceBus": {"prefetchCount": 5}}})


def test_timespans_as_host_json_writes_them() -> None:
    assert timespan("00:00:02") == 2.0
    assert timespan("00:00:00.80") == pytest.approx(0.8)
    assert timespan("1.02:03:04") == 93784.0
    assert timespan("-00:00:00.0010000") == pytest.approx(-0.001)
    with pytest.raises(ValueError):
        timespan("2s")


def test_the_function_gets_what_the_worker_hands_it(
    make_host: Callable[..., FunctionsHost],
) -> None:
    recorder = Recorder()
    host = make_host(recorder)
    host.queue.send([OutgoingMessage("Grüße".encode(), "m-1", "G", {"trace": "t-1"})])
    invocation = host.step(wait=2)
    assert invocation is not None and invocation.message_ids == ("m-1",)
    [call] = recorder.calls
    assert (call.session_id, call.bodies, call.delivery_counts) == ("G", ["Grüße".encode()], [1])
    assert invocation.settlement == "completed" and host.queue.depth() == 0
    assert host.step(wait=0.05) is None


# --------------------------------------------------------------------------- batch mode


def test_batch_mode_holds_one_session_at_a_time(make_host: Callable[..., FunctionsHost]) -> None:
    recorder = Recorder(sleep=0.02)
    host = make_host(recorder, max_concurrent_sessions=8)  # no effect in this mode
    burst(host, sessions=4, per_session=3)
    stats = host.run_until_idle(timeout=20)
    assert (stats.invocations, stats.sessions_accepted, stats.completions) == (4, 4, 12)
    assert stats.max_sessions_held == 1 and stats.max_concurrent_invocations == 1
    assert stats.renewals == 0 and stats.overlaps == 0
    calls = sorted(recorder.calls, key=lambda c: c.started)
    assert all(a.ended <= b.started for a, b in itertools.pairwise(calls))
    for call in calls:  # the whole session in one batch, in order
        session = call.session_id[1:]
        assert call.bodies == [f"{session}/{i}".encode() for i in range(3)]


def test_batch_mode_keeps_the_session_until_a_receive_is_empty(
    make_host: Callable[..., FunctionsHost],
) -> None:
    """New messages for the held session are taken before an older session waits."""
    holder: list[FunctionsHost] = []

    def more_for_a(number: int) -> None:
        if number == 1:
            holder[0].queue.send([OutgoingMessage(b"a/late", "a-late", "A")])

    recorder = Recorder(on_call=more_for_a)
    host = make_host(recorder)
    holder.append(host)
    host.queue.send([OutgoingMessage(b"a/0", "a-0", "A"), OutgoingMessage(b"b/0", "b-0", "B")])
    stats = host.run_until_idle(timeout=20)
    assert [(c.session_id, c.bodies) for c in recorder.calls] == [
        ("A", [b"a/0"]),
        ("A", [b"a/late"]),
        ("B", [b"b/0"]),
    ]
    assert stats.sessions_accepted == 2


def test_batch_mode_retries_a_failed_invocation_at_once(
    make_host: Callable[..., FunctionsHost],
) -> None:
    recorder = Recorder(fail_first=2)
    host = make_host(recorder)
    burst(host, sessions=1, per_session=2)
    stats = host.run_until_idle(timeout=20)
    assert [c.delivery_counts for c in recorder.calls] == [[1, 1], [2, 2], [3, 3]]
    assert (stats.errors, stats.abandons, stats.completions) == (2, 4, 2)
    assert stats.sessions_accepted == 1  # same hold: no waiting, no other session first
    gaps = [b.started - a.ended for a, b in itertools.pairwise(recorder.calls)]
    assert max(gaps) < host.lock_duration  # immediately, not after a lock expiry
    assert [i.settlement for i in host.invocations] == ["abandoned", "abandoned", "completed"]


def test_the_broker_dead_letters_at_the_max_delivery_count(
    make_host: Callable[..., FunctionsHost],
) -> None:
    recorder = Recorder(fail_first=1000)
    host = make_host(recorder, max_delivery_count=4)
    burst(host, sessions=1, per_session=1)
    stats = host.run_until_idle(timeout=20)
    assert [c.delivery_counts for c in recorder.calls] == [[1], [2], [3], [4]]
    assert stats.errors == 4 and stats.sessions_accepted == 1
    [letter] = host.queue.dead_letters()
    assert (letter.message_id, letter.reason, letter.delivery_count) == (
        "m-0-0",
        MAX_DELIVERY_COUNT_EXCEEDED,
        4,
    )
    assert host.queue.depth() == 0


def test_batch_mode_never_renews_so_a_long_invocation_loses_its_lock(
    make_host: Callable[..., FunctionsHost],
) -> None:
    recorder = Recorder(sleep_first=1.0)
    host = make_host(recorder, lock_duration=0.5)  # maxAutoLockRenewalDuration is 1.5 s here
    burst(host, sessions=1, per_session=2)
    stats = host.run_until_idle(timeout=20)
    assert [c.delivery_counts for c in recorder.calls] == [[1, 1], [2, 2]]
    assert [i.settlement for i in host.invocations] == ["lock-lost", "completed"]
    assert (stats.lock_losses, stats.renewals, stats.completions) == (1, 0, 2)
    assert stats.sessions_accepted == 2 and host.queue.depth() == 0


def test_a_hold_longer_than_the_lock_breaks_exclusivity_across_instances(
    make_host: Callable[..., FunctionsHost],
) -> None:
    """Two scaled-out instances: the second takes the group while the first still runs."""
    recorder = Recorder(sleep_first=1.0)
    host = make_host(recorder, lock_duration=0.4, instances=2)
    burst(host, sessions=1, per_session=1)
    stats = host.run_until_idle(timeout=20)
    assert stats.overlaps == 1 and stats.max_concurrent_invocations == 2
    first, second = sorted(host.invocations, key=lambda i: i.started)
    assert first.instance != second.instance
    assert second.started < first.ended and second.delivery_counts == (2,)
    assert (first.settlement, second.settlement) == ("lock-lost", "completed")


def test_a_message_settled_by_the_function_fails_the_hosts_completion(
    make_host: Callable[..., FunctionsHost],
) -> None:
    """As on Service Bus when a function settles outside its message actions."""
    holder: list[FunctionsHost] = []

    def settles_itself(messages: list[func.ServiceBusMessage]) -> None:
        queue = holder[0].queue
        for received in queue.receive_session(10, 0) or []:
            raise AssertionError(f"the session is held by the host: got {received}")
        from writeback.adapters.local_queue import LocalLock
        from writeback.ports import ReceivedMessage

        for m in messages:
            lock = LocalLock(m.sequence_number or 0, m.lock_token or "")
            queue.complete(ReceivedMessage(m.get_body(), m.message_id, "", 1, 0.0, lock))

    host = make_host(settles_itself)
    holder.append(host)
    burst(host, sessions=1, per_session=2)
    stats = host.run_until_idle(timeout=20)
    assert (stats.settle_failures, stats.completions, stats.lock_losses) == (2, 0, 0)
    assert [i.settlement for i in host.invocations] == ["settle-failed"]
    assert host.queue.depth() == 0


# --------------------------------------------------------------------------- single dispatch


def test_single_mode_runs_sessions_concurrently_but_each_alone(
    make_host: Callable[..., FunctionsHost],
) -> None:
    recorder = Recorder(sleep=0.03)
    host = make_host(recorder, cardinality="one", max_concurrent_sessions=3)
    burst(host, sessions=6, per_session=4)
    stats = host.run_until_idle(timeout=20)
    assert (stats.invocations, stats.completions, stats.errors) == (24, 24, 0)
    assert stats.overlaps == 0
    assert stats.max_sessions_held == 3 and 2 <= stats.max_concurrent_invocations <= 3
    assert all(len(c.bodies) == 1 for c in recorder.calls)
    for session in range(6):
        calls = sorted(
            (c for c in recorder.calls if c.session_id == f"S{session}"), key=lambda c: c.started
        )
        assert [c.bodies[0] for c in calls] == [f"{session}/{i}".encode() for i in range(4)]
        assert all(a.ended <= b.started for a, b in itertools.pairwise(calls))


def test_single_mode_renews_the_session_lock_of_a_long_invocation(
    make_host: Callable[..., FunctionsHost],
) -> None:
    recorder = Recorder(sleep=1.2)
    host = make_host(  # renewal for 1.5 s
        recorder, cardinality="one", lock_duration=0.5, renew_buffer_max=RENEW_BUFFER
    )
    burst(host, sessions=1, per_session=1)
    stats = host.run_until_idle(timeout=20)
    assert [c.delivery_counts for c in recorder.calls] == [[1]]
    assert stats.renewals >= 3 and stats.lock_losses == 0 and stats.completions == 1


def test_single_mode_renewal_ends_max_auto_lock_renewal_after_the_accept(
    make_host: Callable[..., FunctionsHost],
) -> None:
    recorder = Recorder(sleep_first=1.2)
    host = make_host(recorder, cardinality="one", lock_duration=0.4, max_auto_lock_renewal=0.5)
    burst(host, sessions=1, per_session=1)
    stats = host.run_until_idle(timeout=20)
    first, second = sorted(host.invocations, key=lambda i: i.started)
    assert (first.delivery_counts, second.delivery_counts) == ((1,), (2,))
    assert (first.settlement, second.settlement) == ("lock-lost", "completed")
    assert stats.lock_losses == 1 and stats.renewals >= 1
    # Another of the instance's 8 session receivers took the group meanwhile.
    assert second.slot != first.slot and second.started < first.ended
    assert stats.overlaps == 1


def test_single_mode_retries_a_failed_message_at_once_in_the_same_session(
    make_host: Callable[..., FunctionsHost],
) -> None:
    recorder = Recorder(fail_first=1)
    host = make_host(recorder, cardinality="one", max_concurrent_sessions=2)
    burst(host, sessions=1, per_session=2)
    stats = host.run_until_idle(timeout=20)
    assert [(c.bodies, c.delivery_counts) for c in recorder.calls] == [
        ([b"0/0"], [1]),
        ([b"0/0"], [2]),
        ([b"0/1"], [1]),
    ]
    assert (stats.sessions_accepted, stats.abandons, stats.completions) == (1, 1, 2)


def test_single_mode_keeps_an_idle_session_until_the_idle_timeout(
    make_host: Callable[..., FunctionsHost],
) -> None:
    recorder = Recorder()
    host = make_host(recorder, cardinality="one", session_idle_timeout=0.5)
    host.queue.send([OutgoingMessage(b"1", "m-1", "G")])
    assert host.step(wait=1) is not None
    threading.Timer(0.1, lambda: host.queue.send([OutgoingMessage(b"2", "m-2", "G")])).start()
    assert host.step(wait=1) is not None  # the same hold took it
    started = time.monotonic()
    assert host.step(wait=0) is None
    assert time.monotonic() - started >= 0.5  # waited the idle timeout, then closed
    assert host.stats.sessions_accepted == 1


def test_a_batch_function_runs_one_message_at_a_time(
    make_host: Callable[..., FunctionsHost],
) -> None:
    got: list[list[func.ServiceBusMessage]] = []
    host = make_host(one_at_a_time(got.append), cardinality="one")
    burst(host, sessions=2, per_session=2)
    assert host.run_until_idle(timeout=20).completions == 4
    assert sorted(len(batch) for batch in got) == [1, 1, 1, 1]
