"""Dead letters back to the queue: ``python -m writeback replay``.

Works through :class:`DeadLetterQueue` (``iter_dead_letters`` to look,
``replay_dead_letters`` to move), which both queues implement, so the same code
replays from Service Bus and from the single-machine SQLite queue. Listing and
moving are one pass over the dead letters, oldest first, read in pages with no
cap: time grows linearly with the dead-letter queue. A replayed event goes to
the end of its group's own session (also one the Functions host dead-lettered
from a hand-off session) with a fresh delivery count and a fresh message id, so
duplicate detection cannot drop it; the worker then reads both sides again, so
replaying an event whose group has converged since writes nothing.

Filters combine (all must match): ``reason`` (case-insensitive, exact),
``group`` (the group id), ``since`` (dead-lettered at or after), and ``limit``
(the oldest N of what matched; a real run stops looking once it has moved them,
a dry run looks at everything so its total counts the whole queue).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from writeback.domain.events import group_of_session
from writeback.errors import WritebackError
from writeback.ports import DeadLetter, DeadLetterQueue

log = logging.getLogger("writeback.replay")


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
    #: Dead letters looked at.
    scanned: int = 0
    items: list[ReplayItem] = field(default_factory=list)
    #: True when a real run stopped at ``limit`` without looking at the rest.
    stopped_at_limit: bool = False

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


def replay(queue: DeadLetterQueue, where: ReplayFilter, *, dry_run: bool = False) -> ReplayReport:
    """Move the chosen dead letters back to the queue (or only list them), in one pass.

    A dead letter that cannot be moved (refused, or gone because someone else
    replayed it) is reported and the pass goes on; a transient queue error stops
    the run (what was moved stays moved) and propagates so the command can say so.
    """
    limit = None if where.limit is None else max(where.limit, 0)
    picked = 0

    def choose(letter: DeadLetter) -> bool:
        nonlocal picked
        if limit is not None and picked >= limit:
            return False
        if not where.matches(letter):
            return False
        picked += 1
        return True

    report = ReplayReport(dry_run=dry_run)
    if dry_run:
        for letter in queue.iter_dead_letters():
            report.scanned += 1
            if choose(letter):
                report.items.append(ReplayItem(letter, moved=False))
        return report
    passes = queue.replay_dead_letters(choose)
    try:
        for letter, chosen, error in passes:
            report.scanned += 1
            if chosen:
                _record(report, letter, error)
            if limit is not None and picked >= limit:
                report.stopped_at_limit = True
                break
    finally:
        passes.close()
    return report


def _record(report: ReplayReport, letter: DeadLetter, error: WritebackError | None) -> None:
    if error is not None:
        report.items.append(ReplayItem(letter, moved=False, error=str(error)))
        return
    report.items.append(ReplayItem(letter, moved=True))
    log.info(
        "replayed dead letter %s of group %s (%s)",
        letter.message_id,
        letter.session_id,
        letter.reason,
        extra={
            "message_id": letter.message_id,
            "group_id": group_of_session(letter.session_id),
            "dead_letter_reason": letter.reason,
        },
    )


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
    if report.stopped_at_limit:
        total += " looked at (stopped at --max; the rest were not looked at)"
    if report.failed:
        total += f"; {report.failed} could not be moved"
    lines.append(total)
    return lines


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
