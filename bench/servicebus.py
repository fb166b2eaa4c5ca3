"""Service Bus through the real SDK against the emulator, next to the local SQLite queue.

In one run:

1. replay: ``--replay`` dead-letter queues of the given sizes (1,000 and 10,000 by
   default), each made through the SDK (sent, received in its session and
   dead-lettered), then moved back by ``writeback.service.replay`` over the
   product's Service Bus adapter in one pass; time per size, per letter, and the
   ratio of the largest to the smallest against the ratio of their sizes (1.0 when
   the time is linear). The same for the local queue;
   Linear time is a constant (opening the receiver, the last empty wait) plus the
   same cost per letter at any size: "ms per extra letter" stays flat;
2. send: ``--messages`` events sent through each queue's ``send`` (100 per call,
   the Service Bus batch limit), and ``--single`` of them one per call, as the
   webhook sends one notification's events;
3. receive-settle: the worker's loop (``receive_session``, ``complete`` each,
   ``release_session``) until the queue is empty: the messages of step 2 in
   ``--sessions`` sessions, then ``--single`` sessions of one message each (one
   event per group, where opening and closing each session receiver dominates).

The emulator runs in this process, on loopback, over TLS; a real namespace adds
network round trips to every figure on the Service Bus side.

    .venv/bin/python bench/servicebus.py --replay 1000,10000
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from azure.servicebus import ServiceBusMessage

from writeback.adapters.local_queue import LocalQueue
from writeback.ports import EventQueue, OutgoingMessage
from writeback.report import markdown_table
from writeback.service.replay import ReplayFilter, replay
from writeback_sandbox.servicebus_emulator import QueueSettings, ServiceBusEmulator

Rows = list[tuple[str, str]]


def make_dead_letters_on_servicebus(sb: ServiceBusEmulator, queue: str, count: int) -> None:
    sessions = max(1, count // 100)
    with sb.client() as client:
        with client.get_queue_sender(queue) as sender:
            for start in range(0, count, 100):
                sender.send_messages(
                    [
                        ServiceBusMessage(
                            b'{"v":1}', message_id=f"m{i}", session_id=f"g{i % sessions}"
                        )
                        for i in range(start, min(start + 100, count))
                    ]
                )
        for session in range(sessions):
            with client.get_queue_receiver(queue, session_id=f"g{session}", max_wait_time=1) as r:
                while batch := r.receive_messages(max_message_count=250, max_wait_time=0.5):
                    for message in batch:
                        r.dead_letter_message(
                            message, reason="OverMemberLimit", error_description="too big"
                        )
    assert sb.counts(queue)["dead_lettered"] == count


def make_dead_letters_locally(queue: LocalQueue, count: int) -> None:
    sessions = max(1, count // 100)
    for start in range(0, count, 100):
        queue.send(
            [
                OutgoingMessage(b'{"v":1}', f"m{i}", f"g{i % sessions}")
                for i in range(start, min(start + 100, count))
            ]
        )
    while batch := queue.receive_session(250, 0):
        for message in batch:
            queue.dead_letter(message, "OverMemberLimit", "too big")
        queue.release_session(batch[0].session_id)


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def replay_figures(name: str, sizes: Sequence[int], run: Callable[[int], float]) -> Rows:
    """Time per size; linear when the cost of each extra letter stays that of the first ones."""
    times = {size: run(size) for size in sorted(sizes)}
    rows = [
        (
            f"{name}: replay {size:,} dead letters, s (ms per letter)",
            f"{t:.2f} ({t / size * 1e3:.2f})",
        )
        for size, t in times.items()
    ]
    ordered = sorted(times)
    for small, large in itertools.pairwise(ordered):
        extra = (times[large] - times[small]) / (large - small) * 1e3
        rows.append((f"{name}: ms per extra letter from {small:,} to {large:,}", f"{extra:.2f}"))
    return rows


def send_and_drain(
    queue: EventQueue, messages: int, sessions: int, single: int
) -> dict[str, float]:
    batch = [OutgoingMessage(b'{"v":1}', f"b{i}", f"s{i % sessions}") for i in range(messages)]
    ones = [OutgoingMessage(b'{"v":1}', f"o{i}", f"one{i}") for i in range(single)]

    def send_batches() -> None:
        for start in range(0, messages, 100):
            queue.send(batch[start : start + 100])

    def send_ones() -> None:
        for message in ones:
            queue.send([message])

    return {
        "send 100 per call": messages / timed(send_batches),
        "receive-settle, many per session": messages / timed(lambda: drain(queue, messages)),
        "send one per call": single / timed(send_ones),
        "receive-settle, one per session": single / timed(lambda: drain(queue, single)),
    }


def drain(queue: EventQueue, expected: int) -> None:
    """The worker's loop until ``expected`` messages are settled (no idle wait at the end)."""
    settled = 0
    while settled < expected:
        messages = queue.receive_session(100, 5.0)
        for message in messages:
            queue.complete(message)
        settled += len(messages)
        if messages:
            queue.release_session(messages[0].session_id)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replay", default="1000,10000", help="dead-letter queue sizes")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--single", type=int, default=40)
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.replay.split(",")]
    rows: Rows = []
    with ServiceBusEmulator() as sb, tempfile.TemporaryDirectory() as tmp:

        def servicebus_replay(size: int) -> float:
            name = f"replay{size}"
            sb.create_queue(name, QueueSettings(lock_duration=300.0))
            make_dead_letters_on_servicebus(sb, name, size)
            with sb.queue_adapter(name, dead_letter_wait=0.5) as queue:
                started = time.perf_counter()
                report = replay(queue, ReplayFilter(reason="OverMemberLimit"))
                elapsed = time.perf_counter() - started
            assert report.moved == size and sb.counts(name)["dead_lettered"] == 0, report
            return elapsed

        def local_replay(size: int) -> float:
            with LocalQueue(Path(tmp) / f"replay{size}.sqlite3") as queue:
                make_dead_letters_locally(queue, size)
                started = time.perf_counter()
                report = replay(queue, ReplayFilter(reason="OverMemberLimit"))
                elapsed = time.perf_counter() - started
                assert report.moved == size and queue.dead_letters() == []
            return elapsed

        rows += replay_figures("Service Bus (emulator)", sizes, servicebus_replay)
        rows += replay_figures("local queue", sizes, local_replay)
        sb.create_queue("rates", QueueSettings(lock_duration=60.0))
        with sb.queue_adapter("rates") as queue:
            remote = send_and_drain(queue, args.messages, args.sessions, args.single)
        with LocalQueue(Path(tmp) / "rates.sqlite3") as local_queue:
            local = send_and_drain(local_queue, args.messages, args.sessions, args.single)
    for figure, rate in remote.items():
        sizes_note = (
            f"{args.messages:,} in {args.sessions}"
            if "many" in figure or "100" in figure
            else f"{args.single} in {args.single}"
        )
        rows.append(
            (
                f"{figure} ({sizes_note} sessions), messages/s: Service Bus SDK / local queue",
                f"{rate:,.0f} / {local[figure]:,.0f}",
            )
        )
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
