"""Replay filters and moves, on a real LocalQueue (a temp SQLite file) and on
plain DeadLetter values; the CLI verbs ``replay`` and ``status`` over the same file."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from writeback.adapters.local_queue import LocalQueue
from writeback.adapters.state import StateFile
from writeback.cli import EXIT_CONFIG, EXIT_OK, main
from writeback.errors import QueueRefused, QueueUnavailable
from writeback.ports import DeadLetter, OutgoingMessage
from writeback.service.replay import (
    ReplayFilter,
    ReplayItem,
    ReplayReport,
    format_report,
    parse_since,
    replay,
    select,
)
from writeback.service.status import collect_status, format_status

GROUP_A = "0b9c2f4e-0000-4000-8000-00000000000a"
GROUP_B = "0b9c2f4e-0000-4000-8000-00000000000b"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(tmp_path: Path, clock: Clock) -> Iterator[LocalQueue]:
    with LocalQueue(tmp_path / "q.sqlite3", clock=clock) as q:
        yield q


def dead_letter(queue: LocalQueue, clock: Clock, message_id: str, group: str, reason: str) -> None:
    """Send one message and dead-letter it at the clock's current time."""
    queue.send([OutgoingMessage(b"{}", message_id, group)])
    [message] = queue.receive_session(1, 0)
    queue.dead_letter(message, reason, f"{reason} for {message_id}")
    queue.release_session(group)
    clock.now += 60


@pytest.fixture
def letters(queue: LocalQueue, clock: Clock) -> LocalQueue:
    dead_letter(queue, clock, "m1", GROUP_A, "PoisonEvent")  # t0
    dead_letter(queue, clock, "m2", GROUP_B, "OverMemberLimit")  # t0 + 60
    dead_letter(queue, clock, "m3", GROUP_A, "OverMemberLimit")  # t0 + 120
    dead_letter(queue, clock, "m4", GROUP_B, "MaxDeliveryCountExceeded")  # t0 + 180
    return queue


def ids(report_items: list[DeadLetter]) -> list[str]:
    return [letter.message_id for letter in report_items]


def test_no_filter_selects_everything_oldest_first(letters: LocalQueue) -> None:
    assert ids(select(reversed(letters.dead_letters()), ReplayFilter())) == ["m1", "m2", "m3", "m4"]


def test_reason_is_exact_but_case_insensitive(letters: LocalQueue) -> None:
    chosen = select(letters.dead_letters(), ReplayFilter(reason="overmemberlimit"))
    assert ids(chosen) == ["m2", "m3"]
    assert select(letters.dead_letters(), ReplayFilter(reason="OverMember")) == []


def test_group_since_and_max_combine(letters: LocalQueue) -> None:
    t0 = 1_700_000_000.0
    assert ids(select(letters.dead_letters(), ReplayFilter(group=GROUP_A.upper()))) == ["m1", "m3"]
    assert ids(select(letters.dead_letters(), ReplayFilter(since=t0 + 60))) == ["m2", "m3", "m4"]
    both = ReplayFilter(group=GROUP_B, since=t0 + 61)
    assert ids(select(letters.dead_letters(), both)) == ["m4"]
    assert ids(select(letters.dead_letters(), ReplayFilter(limit=2))) == ["m1", "m2"]
    limited = ReplayFilter(reason="OverMemberLimit", limit=1)
    assert ids(select(letters.dead_letters(), limited)) == ["m2"]


def test_dry_run_moves_nothing(letters: LocalQueue) -> None:
    report = replay(letters, ReplayFilter(reason="PoisonEvent"), dry_run=True)
    assert [(i.letter.message_id, i.moved) for i in report.items] == [("m1", False)]
    assert letters.depth() == 0
    assert len(letters.dead_letters()) == 4
    assert format_report(report)[-1] == "would move 1 of 4 dead letters"


def test_replay_moves_the_chosen_back_with_a_fresh_delivery_count(letters: LocalQueue) -> None:
    report = replay(letters, ReplayFilter(reason="OverMemberLimit"))
    assert report.moved == 2 and report.failed == 0
    assert [letter.message_id for letter in letters.dead_letters()] == ["m1", "m4"]
    assert letters.depth() == 2
    [first] = letters.receive_session(10, 0)  # GROUP_B's session comes first (m2)
    assert (first.message_id, first.delivery_count, first.session_id) == ("m2", 1, GROUP_B)
    lines = format_report(report)
    assert lines[0].startswith(f"moved: message m2 group {GROUP_B} reason OverMemberLimit")
    assert "dead-lettered 2023-11-14T22:14:20+00:00" in lines[0]
    assert lines[-1] == "moved 2 of 4 dead letters"


def test_a_dead_letter_gone_meanwhile_is_reported_not_fatal(letters: LocalQueue) -> None:
    mine = letters.replay_dead_letters(lambda letter: True)
    assert next(mine)[0].message_id == "m1"  # this pass has read its page and moved m1
    with LocalQueue(letters.path) as other:
        assert replay(other, ReplayFilter(group=GROUP_B)).moved == 2  # m2, m4 meanwhile
    rest = [(letter.message_id, chosen, error is not None) for letter, chosen, error in mine]
    assert rest == [("m2", True, True), ("m3", True, False), ("m4", True, True)]
    letter = DeadLetter(b"", "m2", GROUP_B, "r", "", 0.0)
    failed = ReplayReport(
        dry_run=False, scanned=1, items=[ReplayItem(letter, moved=False, error="gone")]
    )
    assert format_report(failed)[0].startswith("FAILED (gone): message m2")
    assert format_report(failed)[-1] == "moved 0 of 1 dead letters; 1 could not be moved"


def test_paged_with_no_cap_2500_dead_letters_replay_completely_on_the_local_queue(
    queue: LocalQueue, clock: Clock
) -> None:
    for start in range(0, 2500, 100):
        queue.send(
            [OutgoingMessage(b"{}", f"m{i}", f"g{i % 50}") for i in range(start, start + 100)]
        )
    while batch := queue.receive_session(100, 0):
        for message in batch:
            queue.dead_letter(message, "OverMemberLimit", "too big")
        queue.release_session(batch[0].session_id)
    assert sum(1 for _ in queue.iter_dead_letters(page_size=300)) == 2500
    report = replay(queue, ReplayFilter(reason="OverMemberLimit"))
    assert (report.scanned, report.moved, report.failed) == (2500, 2500, 0)
    assert queue.dead_letters() == [] and queue.depth() == 2500


def test_parse_since_accepts_dates_times_and_offsets() -> None:
    assert parse_since("2024-01-02") == datetime(2024, 1, 2, tzinfo=UTC).timestamp()
    assert (
        parse_since("2024-01-02T03:04:05Z") == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()
    )
    assert parse_since("2024-01-02T05:04:05+02:00") == parse_since("2024-01-02T03:04:05")
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_since("yesterday")


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_env(letters: LocalQueue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("WRITEBACK_SERVICEBUS_NAMESPACE", "WRITEBACK_SERVICEBUS_CONNECTION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("WRITEBACK_QUEUE", raising=False)
    monkeypatch.setenv("WRITEBACK_QUEUE_PATH", letters.path)
    monkeypatch.setenv("WRITEBACK_STATE_PATH", str(tmp_path / "state.json"))
    return tmp_path


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def test_cli_replay_dry_run_then_for_real(cli_env: Path, letters: LocalQueue) -> None:
    code, output = run("replay", "--dry-run", "--reason", "OverMemberLimit", "--max", "1")
    assert code == EXIT_OK
    assert output.splitlines()[0].startswith("would move: message m2 group")
    assert output.splitlines()[-1] == "would move 1 of 4 dead letters"
    code, output = run("replay", "--group", GROUP_A, "--since", "2023-11-14T22:14:00Z")
    assert code == EXIT_OK
    assert "moved: message m3" in output and "m1" not in output
    # moved back (with the CLI's real clock, so this queue's fake clock sees it as scheduled)
    assert [letter.message_id for letter in letters.dead_letters()] == ["m1", "m2", "m4"]


def test_cli_replay_refuses_a_bad_since_or_a_missing_queue(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run("replay", "--since", "last tuesday")[0] == EXIT_CONFIG
    monkeypatch.setenv("WRITEBACK_QUEUE_PATH", str(cli_env / "nowhere.sqlite3"))
    assert run("replay")[0] == EXIT_CONFIG
    assert not (cli_env / "nowhere.sqlite3").exists()


def test_cli_status_shows_depth_dead_letters_subscription_and_reconcile(
    cli_env: Path, letters: LocalQueue
) -> None:
    code, output = run("status")
    assert code == EXIT_OK
    assert "queue: 0 messages" in output
    assert (
        "dead letters: 4 (MaxDeliveryCountExceeded 1, OverMemberLimit 2, PoisonEvent 1)" in output
    )
    assert "subscription: unknown" in output and "last reconcile: never" in output
    StateFile(cli_env / "state.json").update(
        subscription={
            "id": "sub-1",
            "expiration": "2999-01-01T00:00:00+00:00",
            "action": "created",
        },
        last_reconcile={
            "at": "2024-01-01T00:00:00+00:00",
            "seconds": 1.5,
            "applied": {"add": 3},
            "ldap_requests": 3,
            "failures": 0,
        },
        paused=True,
    )
    code, output = run("status")
    assert "subscription: sub-1 expires 2999-01-01T00:00:00+00:00" in output
    assert "last reconcile: 2024-01-01T00:00:00+00:00" in output and "3 add" in output
    assert "writes: PAUSED" in output


def test_status_reports_a_queue_it_cannot_read_without_raising(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = StateFile(path)
    state.update(last_reconcile={"at": "2024-01-01T00:00:00+00:00", "error": "LdapUnavailable: x"})
    assert json.loads(path.read_text())["version"] == 1

    class Broken:
        """Every read fails, as a locked queue file would."""

        def depth(self) -> int:
            raise QueueUnavailable("the file is locked")

        def scheduled_count(self) -> int:
            raise QueueUnavailable("the file is locked")

        def dead_letter_count_by_reason(self) -> dict[str, int]:
            raise QueueUnavailable("the file is locked")

        def iter_dead_letters(self, *, page_size: int = 100) -> Iterator[DeadLetter]:
            raise QueueUnavailable("the file is locked")

        def replay_dead_letters(self, choose: Callable[[DeadLetter], bool]) -> Generator[Any]:
            raise QueueUnavailable("the file is locked")

    status = collect_status(Broken(), state.read())
    lines = format_status(status)
    assert lines[0] == "queue: depth unknown (QueueUnavailable: the file is locked)"
    assert lines[1] == "dead letters: unknown (QueueUnavailable: the file is locked)"
    assert status.queue_error is not None and "depth" in status.queue_error
    assert any("FAILED: LdapUnavailable: x" in line for line in lines)


def test_status_shows_dead_letters_when_only_the_depth_fails(letters: LocalQueue) -> None:
    class NoDepth:
        """The queue as a Data Receiver sees it: dead letters, but no depth (Manage)."""

        def depth(self) -> int:
            raise QueueRefused("needs Manage")

        def scheduled_count(self) -> int:
            raise QueueRefused("needs Manage")

        def dead_letter_count_by_reason(self) -> dict[str, int]:
            return letters.dead_letter_count_by_reason()

        def iter_dead_letters(self, *, page_size: int = 100) -> Iterator[DeadLetter]:
            return letters.iter_dead_letters(page_size=page_size)

        def replay_dead_letters(self, choose: Callable[[DeadLetter], bool]) -> Generator[Any]:
            return letters.replay_dead_letters(choose)

    status = collect_status(NoDepth(), {})
    assert status.dead_letters == {
        "MaxDeliveryCountExceeded": 1,
        "OverMemberLimit": 2,
        "PoisonEvent": 1,
    }
    assert format_status(status)[:2] == [
        "queue: depth unknown (QueueRefused: needs Manage)",
        "dead letters: 4 (MaxDeliveryCountExceeded 1, OverMemberLimit 2, PoisonEvent 1)",
    ]


def test_group_filter_matches_the_functions_workers_hand_off_sessions() -> None:
    from writeback.domain.events import group_of_session
    from writeback.ports import DeadLetter
    from writeback.service.replay import ReplayFilter

    gid = "3a5c3221-c465-48c0-95b8-e9305786a271"
    letter = DeadLetter(b"{}", "m1", f"{gid}#dl-0a1b2c", "PoisonEvent", "bad", 0.0)
    assert group_of_session(letter.session_id) == gid
    assert ReplayFilter(group=gid.upper()).matches(letter)
    assert not ReplayFilter(group="00000000-0000-0000-0000-000000000000").matches(letter)
