"""Replay filters and moves, on a real LocalQueue (a temp SQLite file) and on
plain DeadLetter values; the CLI verbs ``replay`` and ``status`` over the same file."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from writeback.adapters.local_queue import LocalQueue
from writeback.cli import EXIT_CONFIG, EXIT_OK, main
from writeback.ports import DeadLetter, OutgoingMessage
from writeback.service.replay import (
    ReplayFilter,
    format_report,
    parse_since,
    replay,
    select,
)
from writeback.service.status import StateFile, collect_status, format_status

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
    stale = letters.dead_letters()
    letters.resubmit(stale[0])  # someone else replays m1 first

    class Stale:
        """The queue as a second replayer saw it a moment earlier."""

        def __getattr__(self, name: str) -> object:
            return getattr(letters, name)

        def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
            return stale

    report = replay(Stale(), ReplayFilter(group=GROUP_A))  # type: ignore[arg-type]
    assert [(i.letter.message_id, i.moved, i.error is not None) for i in report.items] == [
        ("m1", False, True),
        ("m3", True, False),
    ]
    assert "FAILED" in format_report(report)[0]


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
        def depth(self) -> int:
            from writeback.errors import QueueUnavailable

            raise QueueUnavailable("the file is locked")

    status = collect_status(Broken(), state.read())  # type: ignore[arg-type]
    lines = format_status(status)
    assert lines[0] == "queue: unavailable (QueueUnavailable: the file is locked)"
    assert any("FAILED: LdapUnavailable: x" in line for line in lines)


def test_group_filter_matches_the_functions_workers_hand_off_sessions() -> None:
    from writeback.domain.events import group_of_session
    from writeback.ports import DeadLetter
    from writeback.service.replay import ReplayFilter

    gid = "3a5c3221-c465-48c0-95b8-e9305786a271"
    letter = DeadLetter(b"{}", "m1", f"{gid}#dl-0a1b2c", "PoisonEvent", "bad", 0.0)
    assert group_of_session(letter.session_id) == gid
    assert ReplayFilter(group=gid.upper()).matches(letter)
    assert not ReplayFilter(group="00000000-0000-0000-0000-000000000000").matches(letter)
