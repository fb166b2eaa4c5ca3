"""Dead letters back to the queue: ``python -m writeback replay``.

Works through the :class:`~writeback.ports.EventQueue` protocol only
(``dead_letters`` to look, ``resubmit`` to move), so the same code replays from
Service Bus and from the single-machine SQLite queue. A replayed event goes to
the end of its group's session with a fresh delivery count and is never dropped
as a duplicate; the worker then reads both sides again, so replaying an event
whose group has converged since writes nothing.

Filters combine (all must match): ``reason`` (case-insensitive, exact),
``group`` (the session id, which is the group id), ``since`` (dead-lettered at
or after), and ``limit`` (the oldest N of what matched).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from writeback.domain.events import group_of_session
from writeback.errors import PermanentError
from writeback.ports import DeadLetter, EventQueue

log = logging.getLogger("writeback.replay")

#: How many dead letters are looked at, at most, in one run.
DEFAULT_SCAN_LIMIT = 10_000


@dataclass(frozen=True)
class ReplayFilter:
    reason: str | None = None
    group: str | None = None
    #: Unix seconds; only dead letters dead-lettered at or after this moment.
    since: float | None = None
    #: Move at most this many (the oldest first).
    limit: int | None = None

    def matches(self, letter: DeadLetter) -> bool:
        if self.reason is not None and letter.reason.casefold() != self.reason.casefold():
            return False
        if self.group is not None and group_of_session(letter.session_id).casefold() != (
            self.group.casefold()
        ):
            return False
        return self.since is None or letter.dead_lettered_at >= self.since


@dataclass(frozen=True)
class ReplayItem:
    letter: DeadLetter
    #: True when it was moved back (always False in a dry run).
    moved: bool
    error: str | None = None

    @property
    def group_id(self) -> str:
        return group_of_session(self.letter.session_id)


@dataclass
class ReplayReport:
    dry_run: bool
    scanned: int = 0
    items: list[ReplayItem] = field(default_factory=list)

    @property
    def moved(self) -> int:
        return sum(1 for item in self.items if item.moved)

    @property
    def failed(self) -> int:
        return sum(1 for item in self.items if item.error is not None)


def select(letters: Iterable[DeadLetter], where: ReplayFilter) -> list[DeadLetter]:
    """The dead letters the filter picks, oldest first, at most ``where.limit``."""
    chosen = sorted(
        (letter for letter in letters if where.matches(letter)),
        key=lambda letter: letter.dead_lettered_at,
    )
    return chosen if where.limit is None else chosen[: max(where.limit, 0)]


def replay(
    queue: EventQueue,
    where: ReplayFilter,
    *,
    dry_run: bool = False,
    scan_limit: int = DEFAULT_SCAN_LIMIT,
) -> ReplayReport:
    """Move the chosen dead letters back to the queue (or only list them).

    A dead letter that is gone by the time it is moved (someone else replayed
    it) is reported and skipped; a transient queue error stops the run (what
    was moved stays moved) and propagates so the command can say so.
    """
    letters = queue.dead_letters(limit=scan_limit)
    report = ReplayReport(dry_run=dry_run, scanned=len(letters))
    for letter in select(letters, where):
        if dry_run:
            report.items.append(ReplayItem(letter, moved=False))
            continue
        try:
            queue.resubmit(letter)
        except PermanentError as error:
            report.items.append(ReplayItem(letter, moved=False, error=str(error)))
            continue
        report.items.append(ReplayItem(letter, moved=True))
        log.info(
            "replayed dead letter %s of group %s (%s)",
            letter.message_id,
            letter.session_id,
            letter.reason,
            extra={
                "message_id": letter.message_id,
                "group_id": letter.session_id,
                "dead_letter_reason": letter.reason,
            },
        )
    return report


def parse_since(text: str) -> float:
    """An ISO 8601 moment (``2025-05-01``, ``2025-05-01T10:00:00Z``, with an
    offset or without, meaning UTC) as Unix seconds."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r} is not an ISO 8601 date or time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_report(report: ReplayReport) -> list[str]:
    """Lines for the CLI: one per dead letter, then a total."""
    verb = "would move" if report.dry_run else "moved"
    lines = []
    for item in report.items:
        letter = item.letter
        state = verb if item.error is None else f"FAILED ({item.error})"
        lines.append(
            f"{state}: message {letter.message_id} group {letter.session_id} "
            f"reason {letter.reason} dead-lettered {_iso(letter.dead_lettered_at)}"
            + (f" - {letter.description}" if letter.description else "")
        )
    count = len(report.items) if report.dry_run else report.moved
    total = f"{verb} {count} of {report.scanned} dead letters"
    if report.failed:
        total += f"; {report.failed} could not be moved"
    lines.append(total)
    return lines


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
