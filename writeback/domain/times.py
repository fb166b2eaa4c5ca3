"""Moments as the state records and status lines write them: ISO 8601, in UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(moment: datetime) -> str:
    """Full precision: a request and the run that answers it may fall in one second."""
    return moment.astimezone(UTC).isoformat()


def parse_iso(text: object) -> datetime | None:
    """The moment a record holds, aware (UTC when it says no zone); None if it holds none."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
