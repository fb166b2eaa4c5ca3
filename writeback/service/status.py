"""What ``python -m writeback status`` shows, and the state file it reads.

The pipeline keeps a small JSON state (:class:`writeback.adapters.state.StateFile`,
(``WRITEBACK_STATE_PATH``): the last reconcile (when, how long, what it wrote,
whether it failed), the subscription (id, expiry, last upkeep action), whether
writes are paused, and where the server listens. The file is replaced
atomically (write a temporary file, then rename), so a reader never sees half
of it. It holds no secret: URLs are stored without their query (which may
carry the webhook key).

The queue figures come through the queue itself, so ``status`` works on
Service Bus as on the local queue, and each is read on its own: the depth (and
the scheduled retries) and the dead letters by reason. On Service Bus they need
different rights (the depth comes from the administration API and needs Manage,
"Azure Service Bus Data Owner"; the dead letters are peeked and need only Listen,
"Azure Service Bus Data Receiver"), so one that cannot be read is reported with
its reason and the other is still shown.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from writeback.domain.times import iso, parse_iso
from writeback.errors import QueueRefused, WritebackError
from writeback.ports import DeadLetterQueue

log = logging.getLogger("writeback.status")


@dataclass(frozen=True)
class Status:
    queue_depth: int | None
    scheduled: int | None
    dead_letters: dict[str, int] | None
    #: Why the depth could not be read (None when it was).
    depth_error: str | None
    #: Why the dead letters could not be read (None when they were).
    dead_letter_error: str | None
    state: Mapping[str, Any]

    @property
    def dead_letter_total(self) -> int:
        return sum((self.dead_letters or {}).values())

    @property
    def queue_error(self) -> str | None:
        """Every figure that could not be read, with why (None when all were)."""
        errors = [
            f"{what}: {error}"
            for what, error in (
                ("depth", self.depth_error),
                ("dead letters", self.dead_letter_error),
            )
            if error is not None
        ]
        return "; ".join(errors) or None


def collect_status(queue: DeadLetterQueue | None, state: Mapping[str, Any]) -> Status:
    """Read the queue's figures, each on its own (an error is reported, not raised)."""
    depth = scheduled = None
    by_reason: dict[str, int] | None = None
    depth_error = dead_letter_error = None
    if queue is not None:
        try:
            depth = queue.depth()
            scheduled = queue.scheduled_count()
        except WritebackError as failure:
            depth_error = _explain(failure, "depth")
        try:
            by_reason = dead_letters_by_reason(queue)
        except WritebackError as failure:
            dead_letter_error = _explain(failure, "dead letters")
    return Status(depth, scheduled, by_reason, depth_error, dead_letter_error, state)


def _explain(failure: WritebackError, what: str) -> str:
    text = f"{type(failure).__name__}: {failure}"
    if isinstance(failure, QueueRefused) and what == "dead letters":
        text += " (reading dead letters needs Listen: 'Azure Service Bus Data Receiver')"
    return text


def dead_letters_by_reason(queue: DeadLetterQueue) -> dict[str, int]:
    return dict(sorted(queue.dead_letter_count_by_reason().items()))


def format_status(status: Status, now: datetime | None = None) -> list[str]:
    now = now or datetime.now(UTC)
    lines = []
    if status.depth_error is not None:
        lines.append(f"queue: depth unknown ({status.depth_error})")
    else:
        waiting = f", {status.scheduled} waiting to be retried" if status.scheduled else ""
        lines.append(f"queue: {status.queue_depth} messages{waiting}")
    if status.dead_letter_error is not None:
        lines.append(f"dead letters: unknown ({status.dead_letter_error})")
    elif status.dead_letters:
        reasons = ", ".join(f"{reason} {n}" for reason, n in status.dead_letters.items())
        lines.append(f"dead letters: {status.dead_letter_total} ({reasons})")
    else:
        lines.append("dead letters: none")
    state = status.state
    lines.append(_subscription_line(state.get("subscription"), now))
    lines.append(_reconcile_line(state.get("last_reconcile"), now))
    lines.extend(alert_lines(state))
    if "paused" in state:
        paused = bool(state["paused"])
        lines.append("writes: PAUSED (events wait in the queue)" if paused else "writes: on")
    server = state.get("server")
    if isinstance(server, dict) and server.get("url"):
        running = "stopped" if server.get("stopped_at") else f"pid {server.get('pid')}"
        lines.append(f"server: {server['url']} ({running}, started {server.get('started_at')})")
    return lines


def _subscription_line(subscription: object, now: datetime) -> str:
    if not isinstance(subscription, dict) or not subscription.get("id"):
        return "subscription: unknown (no state recorded)"
    error = subscription.get("error")
    expires = parse_iso(subscription.get("expiration"))
    if expires is None:
        when = "expiry unknown"
    elif expires <= now:
        when = f"EXPIRED {iso(expires)}"
    else:
        when = f"expires {iso(expires)} (in {_span(expires - now)})"
    line = f"subscription: {subscription['id']} {when}"
    if subscription.get("action"):
        line += f", last upkeep {subscription['action']} at {subscription.get('checked_at')}"
    if error:
        line += f"; last upkeep FAILED: {error}"
    return line


def _reconcile_line(record: object, now: datetime) -> str:
    if not isinstance(record, dict) or not record.get("at"):
        return "last reconcile: never"
    at = parse_iso(record.get("at"))
    ago = f" ({_span(now - at)} ago)" if at is not None else ""
    if record.get("error"):
        return f"last reconcile: {record['at']}{ago} FAILED: {record['error']}"
    applied = record.get("applied") or {}
    writes = ", ".join(f"{n} {kind}" for kind, n in sorted(applied.items())) or "no writes"
    line = (
        f"last reconcile: {record['at']}{ago}: {writes}; "
        f"{record.get('ldap_requests', 0)} LDAP requests, "
        f"{record.get('failures', 0)} failures in {record.get('seconds', 0):.1f} s"
    )
    if record.get("deletes_blocked"):
        line += f"; deletes held back: {record['deletes_blocked']}"
    return line


def alert_lines(state: Mapping[str, Any]) -> list[str]:
    """The last reconcile's alerts: groups with a duplicated anchor (none of their
    objects is written) and frozen groups (nested in a protected group: no member
    is added). Each is for a person to fix in AD."""
    record = state.get("last_reconcile")
    if not isinstance(record, dict):
        return []
    alerts = [a for a in record.get("alerts") or [] if isinstance(a, dict)]
    total = record.get("alert_count", len(alerts))
    if not alerts:
        return []
    lines = [f"ALERTS: {total} (as of the last reconcile)"]
    for alert in alerts:
        lines.append(
            f"  {alert.get('reason')}: group {alert.get('group_id')}: {alert.get('detail')}"
        )
    if isinstance(total, int) and total > len(alerts):
        lines.append(f"  ... and {total - len(alerts)} more (python -m writeback plan)")
    return lines


def _span(delta: timedelta) -> str:
    seconds = max(int(delta.total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min"
    return f"{seconds} s"
