"""A clock that moves only when the test moves it.

The ports take time in two shapes: Unix seconds (the queues' ``clock``) and an
aware ``datetime`` (the pipeline's and the cloud's ``clock``). One
:class:`ManualClock` gives both, so a queue's lock expiry, a subscription's
expiry and the reconcile schedule all move together.
"""

from __future__ import annotations

from datetime import UTC, datetime

#: 2023-11-14 22:13:20 UTC: any fixed instant will do, a round one reads well in failures.
START = 1_700_000_000.0


class ManualClock:
    """Unix seconds that advance only through :meth:`advance`."""

    def __init__(self, start: float = START) -> None:
        self._now = start

    def __call__(self) -> float:
        """Now, in Unix seconds (the signature of ``time.time``)."""
        return self._now

    def now(self) -> datetime:
        """Now, as an aware UTC datetime (the signature the pipeline's ``clock`` takes)."""
        return datetime.fromtimestamp(self._now, UTC)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
