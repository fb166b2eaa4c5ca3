"""Faults scheduled for the next calls of a named method of an in-memory port.

``faults.fail("apply", LdapUnavailable("down"), times=2)`` makes the next two
``apply`` calls raise before they change anything; ``fail_after`` lets the call
take effect and then raises (the answer was lost on the way back, so the caller
cannot tell it happened); ``run`` calls a function first (an admin's change that
races the call, say), which may itself raise. ``times=None`` keeps the fault
for every call until :meth:`Faults.clear`. Each call consumes at most one
scheduled entry per side, oldest first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Entry:
    error: BaseException | None
    action: Callable[[], None] | None
    remaining: int | None

    def fire(self) -> None:
        if self.remaining is not None:
            self.remaining -= 1
        if self.action is not None:
            self.action()
        if self.error is not None:
            raise self.error


class Faults:
    """What the next calls of each method do besides their job (see the module docstring)."""

    def __init__(self) -> None:
        self._before: dict[str, list[_Entry]] = {}
        self._after: dict[str, list[_Entry]] = {}

    def fail(self, method: str, error: BaseException, *, times: int | None = 1) -> None:
        """The next ``times`` calls of ``method`` raise ``error`` and do nothing else."""
        self._schedule(self._before, method, _Entry(error, None, times))

    def fail_after(self, method: str, error: BaseException, *, times: int | None = 1) -> None:
        """The next ``times`` calls of ``method`` take effect, then raise ``error``."""
        self._schedule(self._after, method, _Entry(error, None, times))

    def run(self, method: str, action: Callable[[], None], *, times: int | None = 1) -> None:
        """Call ``action`` at the start of the next ``times`` calls of ``method``."""
        self._schedule(self._before, method, _Entry(None, action, times))

    def pending(self, method: str) -> int:
        """Scheduled entries not used up yet for ``method`` (a forever one counts once)."""
        return len(self._before.get(method, ())) + len(self._after.get(method, ()))

    def clear(self) -> None:
        self._before.clear()
        self._after.clear()

    def before(self, method: str) -> None:
        """Called by the port at the start of ``method``."""
        self._take(self._before, method)

    def after(self, method: str) -> None:
        """Called by the port once ``method`` has taken effect."""
        self._take(self._after, method)

    @staticmethod
    def _schedule(table: dict[str, list[_Entry]], method: str, entry: _Entry) -> None:
        if entry.remaining is not None and entry.remaining < 1:
            raise ValueError("times must be at least 1 (or None for every call)")
        table.setdefault(method, []).append(entry)

    @staticmethod
    def _take(table: dict[str, list[_Entry]], method: str) -> None:
        entries = table.get(method)
        if not entries:
            return
        entry = entries[0]
        if entry.remaining is not None and entry.remaining <= 1:
            entries.pop(0)
        entry.fire()
