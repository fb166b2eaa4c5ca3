"""Where the worker keeps each group's delta link between events.

Two implementations of :class:`writeback.ports.DeltaLinkStore`:

* :class:`MemoryDeltaLinks`: a bounded in-process map. The default of the
  worker (``serve`` keeps one for its lifetime) and what a Functions instance
  keeps while it is warm; a cold instance, or a group whose link was pushed
  out, simply takes the full read once and stores a new link.
* :class:`SqliteDeltaLinks`: the same in a small SQLite file, for a worker that
  should keep its links across restarts (one table, one row per group).

A lost link never loses a change: without one the worker reads the group in
full, as it did before links existed. Links are only stored after the write
they led to succeeded, so a failed event retries from the same link.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path

from writeback.ports import StoredLink

#: Groups whose links an in-memory store keeps (a link is a few hundred bytes).
DEFAULT_CAPACITY = 100_000


class MemoryDeltaLinks:
    """Per-group delta links in memory, least recently used dropped past ``capacity``."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self._capacity = capacity
        self._links: OrderedDict[str, StoredLink] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, group_id: str) -> StoredLink | None:
        with self._lock:
            link = self._links.get(group_id)
            if link is not None:
                self._links.move_to_end(group_id)
            return link

    def put(self, group_id: str, link: StoredLink) -> None:
        with self._lock:
            self._links[group_id] = link
            self._links.move_to_end(group_id)
            while len(self._links) > self._capacity:
                self._links.popitem(last=False)

    def forget(self, group_id: str) -> None:
        with self._lock:
            self._links.pop(group_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._links)


class SqliteDeltaLinks:
    """Per-group delta links in a SQLite file (safe across threads of one process)."""

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS group_delta_links ("
            " group_id TEXT PRIMARY KEY, delta_link TEXT NOT NULL,"
            " member_count INTEGER NOT NULL, stored_at REAL NOT NULL DEFAULT 0,"
            " trusted INTEGER NOT NULL DEFAULT 0)"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(group_delta_links)")}
        if "stored_at" not in columns:  # a file from before links aged out: 0 = too old
            self._db.execute(
                "ALTER TABLE group_delta_links ADD COLUMN stored_at REAL NOT NULL DEFAULT 0"
            )
        if "trusted" not in columns:
            self._db.execute(
                "ALTER TABLE group_delta_links ADD COLUMN trusted INTEGER NOT NULL DEFAULT 0"
            )

    def get(self, group_id: str) -> StoredLink | None:
        with self._lock:
            row = self._db.execute(
                "SELECT delta_link, member_count, stored_at, trusted FROM group_delta_links"
                " WHERE group_id = ?",
                (group_id,),
            ).fetchone()
        if row is None:
            return None
        return StoredLink(str(row[0]), int(row[1]), float(row[2]), bool(row[3]))

    def put(self, group_id: str, link: StoredLink) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO group_delta_links"
                " (group_id, delta_link, member_count, stored_at, trusted)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT(group_id) DO UPDATE SET"
                " delta_link = excluded.delta_link, member_count = excluded.member_count,"
                " stored_at = excluded.stored_at, trusted = excluded.trusted",
                (group_id, link.delta_link, link.member_count, link.stored_at, int(link.trusted)),
            )

    def forget(self, group_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM group_delta_links WHERE group_id = ?", (group_id,))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteDeltaLinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
