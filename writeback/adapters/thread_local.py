"""The Directory port with one adapter per thread.

ldap3's connections are not thread-safe, and the hosts run several workers
(``serve``'s threads, the Functions worker's thread pool, the agent's request
threads): each thread gets its own adapter, opened on first use and closed
with this object.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

from writeback.domain.guard import Ancestry, Principal
from writeback.domain.model import DirectoryGroup, Operation
from writeback.errors import WritebackError
from writeback.ports import Directory


class ThreadLocalDirectory:
    """One ``factory()`` adapter per thread, behind the one Directory port."""

    def __init__(self, factory: Callable[[], Directory]) -> None:
        self._factory = factory
        self._local = threading.local()
        self._made: list[Directory] = []
        self._lock = threading.Lock()

    def _mine(self) -> Directory:
        directory: Directory | None = getattr(self._local, "directory", None)
        if directory is None:
            directory = self._factory()
            self._local.directory = directory
            with self._lock:
                self._made.append(directory)
        return directory

    def schema_attributes(self) -> frozenset[str]:
        return self._mine().schema_attributes()

    def find_group(self, group_id: str) -> DirectoryGroup | None:
        return self._mine().find_group(group_id)

    def find_groups(
        self, group_ids: Sequence[str], *, members: bool = True
    ) -> dict[str, DirectoryGroup]:
        return self._mine().find_groups(group_ids, members=members)

    def iter_groups(self) -> Iterator[DirectoryGroup]:
        return self._mine().iter_groups()

    def resolve_sids(self, sids: Sequence[str]) -> dict[str, Principal]:
        return self._mine().resolve_sids(sids)

    def group_ancestry(self) -> Ancestry:
        return self._mine().group_ancestry()

    def apply(self, operation: Operation) -> int:
        return self._mine().apply(operation)

    def apply_all(self, operations: Sequence[Operation]) -> list[int | WritebackError]:
        return self._mine().apply_all(operations)

    def close(self) -> None:
        with self._lock:
            made, self._made = self._made, []
        for directory in made:
            with contextlib.suppress(Exception):
                directory.close()
