"""In-memory implementations of the ports, for testing the pipeline without Samba or HTTP.

* :class:`~tests.support.memory.cloud.MemoryCloud`: the Cloud port (a tenant's
  groups, users, deltas and subscriptions);
* :class:`~tests.support.memory.directory.MemoryForest` and
  :class:`~tests.support.memory.directory.MemoryDirectory`: an AD domain and the
  Directory port over it, with the LDAP adapter's scope guard;
* :class:`~tests.support.memory.queue.MemoryQueue`: the EventQueue port (sessions,
  peek-lock, delivery counts, dead letters);
* :class:`~tests.support.memory.clock.ManualClock` and
  :class:`~tests.support.memory.faults.Faults`: time and failures a test controls.

The delta-link and state stores need no stand-in: the product's own
``MemoryDeltaLinks`` and ``MemoryState`` are used. Each module's docstring says
where its implementation is kinder than the real service; the contract tests
under ``tests/contract`` hold both implementations of each port to the same rules.
"""

from tests.support.memory.clock import ManualClock
from tests.support.memory.cloud import MemoryCloud
from tests.support.memory.directory import Entry, MemoryDirectory, MemoryForest
from tests.support.memory.faults import Faults
from tests.support.memory.queue import MemoryQueue, Settled

__all__ = [
    "Entry",
    "Faults",
    "ManualClock",
    "MemoryCloud",
    "MemoryDirectory",
    "MemoryForest",
    "MemoryQueue",
    "Settled",
]
