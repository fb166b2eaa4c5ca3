"""State kept in memory, for a host with no state file (the StateStore port).

The Function app without ``WRITEBACK_STATE_PATH``, tests and benchmarks: the
same sections as the state file, gone with the process, so a pending reconcile
request or the reconcile's delta link last only as long as the instance.
"""

from __future__ import annotations

import copy
import threading
from typing import Any


class MemoryState:
    """A JSON-like object in memory, updated section by section (thread-safe)."""

    def __init__(self) -> None:
        self._state: dict[str, Any] = {}
        self._lock = threading.Lock()

    def read(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._state)

    def update(self, **sections: Any) -> dict[str, Any]:
        with self._lock:
            self._state.update(copy.deepcopy(sections))
            return copy.deepcopy(self._state)
