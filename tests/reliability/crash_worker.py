"""A worker in a child process that dies (SIGKILL) right after its first LDAP write.

It shares the single-machine SQLite queue file with the server under test and
handles sessions with the product's event handler (through
:func:`tests.support.worker.run_once`), so the message whose
write it made is neither completed nor abandoned: its lock has to expire before
the message is delivered again, as after a real crash. Only that kill ends it
with SIGKILL, so the parent knows a write happened from the exit status.

Reads its settings as one JSON line on stdin (the DC password stays off the
command line), connects, prints ``ready``, and waits for a ``go`` line before it
takes any work, so the parent decides when the crash happens. Exits 0 when it
found no write to make before its deadline.

    python -m tests.reliability.crash_worker < spec.json
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from tests.support.worker import run_once
from writeback.adapters.directory import LdapDirectory
from writeback.adapters.graph import GraphCloud
from writeback.adapters.local_queue import LocalQueue
from writeback.domain.guard import Ancestry, Principal
from writeback.domain.mapping import MappingOptions
from writeback.domain.model import DirectoryGroup, Operation
from writeback.errors import WritebackError
from writeback.ports import apply_each
from writeback.service.handle_event import WorkerContext


class AfterWrite:
    """The Directory port around the real adapter, with a step right after each write
    (before the worker can acknowledge it): what the fault-injection wrappers share."""

    def __init__(self, inner: LdapDirectory) -> None:
        self.inner = inner

    def schema_attributes(self) -> frozenset[str]:
        return self.inner.schema_attributes()

    def find_group(self, group_id: str) -> DirectoryGroup | None:
        return self.inner.find_group(group_id)

    def find_group_attributes(self, group_id: str) -> DirectoryGroup | None:
        return self.inner.find_group_attributes(group_id)

    def find_groups(
        self, group_ids: Sequence[str], *, members: bool = True
    ) -> dict[str, DirectoryGroup]:
        return self.inner.find_groups(group_ids, members=members)

    def iter_groups(self) -> Iterator[DirectoryGroup]:
        return self.inner.iter_groups()

    def resolve_sids(self, sids: Sequence[str]) -> dict[str, Principal]:
        return self.inner.resolve_sids(sids)

    def group_ancestry(self) -> Ancestry:
        return self.inner.group_ancestry()

    def apply(self, operation: Operation) -> int:
        requests = self.inner.apply(operation)
        self.after_write(operation)
        return requests

    def apply_all(self, operations: Sequence[Operation]) -> list[int | WritebackError]:
        return apply_each(self.apply, operations)

    def after_write(self, operation: Operation) -> None:
        """Nothing here; a fault in a subclass."""

    def close(self) -> None:
        self.inner.close()


class KillAfterWrite(AfterWrite):
    """The process dies (SIGKILL) right after its first write."""

    def after_write(self, operation: Operation) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def _context(spec: dict[str, Any], deadline: float) -> WorkerContext | None:
    """Connect to both sides; retried, since the DC may be down when the child starts."""
    while time.monotonic() < deadline:
        try:
            directory = LdapDirectory(**spec["ldap"])
            options = MappingOptions(
                target_ou=spec["ldap"]["target_ou"],
                member_limit=spec["member_limit"],
                schema_attributes=directory.schema_attributes(),
            )
        except WritebackError:
            time.sleep(0.2)
            continue
        return WorkerContext(
            cloud=GraphCloud(base_url=spec["graph_url"], backoff=0.05, max_wait=1.0),
            directory=KillAfterWrite(directory),
            options=options,
            attempts=1,
            max_wait=0.1,
            redelivery_scale=0.05,
            max_redelivery_delay=0.5,
        )
    return None


def main() -> int:
    spec = json.loads(sys.stdin.readline())
    deadline = time.monotonic() + spec["seconds"]
    queue = LocalQueue(
        spec["queue"],
        lock_duration=spec["lock_duration"],
        max_delivery_count=spec["max_delivery_count"],
    )
    context = _context(spec, deadline)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 0
    while context is not None and time.monotonic() < deadline:
        try:
            run_once(queue, context, wait=0.5)
        except WritebackError:
            time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
