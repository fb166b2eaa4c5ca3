"""Where the pipeline keeps its state (the StateStore port): a JSON file, or memory.

:class:`StateFile` is ``WRITEBACK_STATE_PATH``: the last reconcile, its delta
link, a pending reconcile request, the subscription and the pause switch, which
``status`` reads and the next run (on another instance, under ``/home`` on the
Function app's shared storage) goes on from. It is replaced atomically (a
temporary file, then a rename), so a reader never sees half of it, and holds no
secret (URLs are stored without their query, which may carry the webhook key).

:class:`MemoryState` is the same for a host with no state file (the Function app
without ``WRITEBACK_STATE_PATH``, tests and benchmarks): gone with the process,
so a pending reconcile request or the reconcile's delta link last only as long
as the instance.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from writeback.domain.times import iso

log = logging.getLogger("writeback.state")


STATE_VERSION = 1


class StateFile:
    """A JSON object on disk, updated section by section (thread-safe within a process)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def read(self) -> dict[str, Any]:
        """The recorded state; empty when there is no file or it cannot be read."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            log.warning("state file %s unreadable: %s", self.path, error)
            return {}
        return data if isinstance(data, dict) else {}

    def update(self, **sections: Any) -> dict[str, Any]:
        """Replace the given top-level sections and write the file; returns the new state."""
        with self._lock:
            state = self.read()
            state.update(sections)
            state["version"] = STATE_VERSION
            state["updated_at"] = iso(datetime.now(UTC))
            self._write(state)
            return state

    def _write(self, state: dict[str, Any]) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".state-", suffix=".json", dir=directory)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(state, out, indent=2, sort_keys=True)
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


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
