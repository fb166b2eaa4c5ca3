"""The relay agent's state on disk: request nonces and the deletes it made.

Both must outlive the process. A nonce forgotten at a restart lets a captured
request be applied again inside its window; a delete limit counted per process
lets a restart loop delete past it. One SQLite file (``WRITEBACK_AGENT_STATE_PATH``)
holds both; agents on the same host pointed at the same file share them, so a
request refused by one is refused by all of them. SQLite's locking makes each
claim atomic across processes. Created 0600: nonces are not secret, but nobody
else should be able to reset the delete budget.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from writeback.errors import ConfigError, TransientError

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, until REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS nonces_until ON nonces (until)",
    "CREATE TABLE IF NOT EXISTS deletes (at REAL NOT NULL)",
)
#: Expired nonces are swept at most this often (seconds), not on every request.
_SWEEP_EVERY = 30.0


class AgentStateUnavailable(TransientError):
    """The state file could not be read or written (locked too long, disk full):
    the request is refused for now, never served without its checks."""


class AgentStateStore:
    """Nonce store and delete ledger over one SQLite file (thread- and process-safe)."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(
                self._path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL with NORMAL survives a process crash (what a restart is); an OS
            # crash may lose the last commits, within one request window.
            self._db.execute("PRAGMA synchronous=NORMAL")
            for statement in _SCHEMA:
                self._db.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"agent state file {str(self._path)!r} cannot be used: {exc}"
            ) from None
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    @property
    def path(self) -> Path:
        return self._path

    def claim(self, nonce: str, until: float, now: float) -> bool:
        """Record ``nonce`` until ``until``; False if it is recorded and not expired."""
        with self._lock, self._transaction():
            if now >= self._next_sweep:
                self._db.execute("DELETE FROM nonces WHERE until < ?", (now,))
                self._next_sweep = now + _SWEEP_EVERY
            row = self._db.execute("SELECT until FROM nonces WHERE nonce = ?", (nonce,)).fetchone()
            if row is not None and row[0] >= now:
                return False
            self._db.execute(
                "INSERT OR REPLACE INTO nonces (nonce, until) VALUES (?, ?)", (nonce, until)
            )
            return True

    def record_delete(self, now: float, window: float, limit: int) -> bool:
        """A delete at ``now`` if fewer than ``limit`` were recorded in ``window``."""
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM deletes WHERE at <= ?", (now - window,))
            (count,) = self._db.execute("SELECT count(*) FROM deletes").fetchone()
            if count >= limit:
                return False
            self._db.execute("INSERT INTO deletes (at) VALUES (?)", (now,))
            return True

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise AgentStateUnavailable(f"agent state file {str(self._path)!r}: {exc}") from None
