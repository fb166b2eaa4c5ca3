"""Fewer cyclic garbage collections while a full read builds its objects.

A full read holds every group of both sides until the plan is made: millions of
objects, allocated in a few seconds. With CPython's default gen-0 threshold (700
allocations) the collector runs some 640 times per 10,000 groups, and every few
runs it walks the whole heap, finding nothing: these objects are freed by
reference counting, not collected. Measured at 10,000 groups / 200,000
memberships, that was a fifth of the read's CPU (2.1 s with the defaults, 1.7 s
with a gen-0 threshold of 10,000), and this process's CPU is what a full read is
bound by (its Graph and AD parsing share one GIL). Raising the threshold only
defers the rare cycle; the default comes back when the last read ends.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Allocations between gen-0 collections while a full read runs.
READ_THRESHOLD = 10_000


class _Readers:
    """The reads under way, and the threshold to put back after the last."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.saved: tuple[int, int, int] | None = None


_readers = _Readers()


@contextmanager
def fewer_collections() -> Iterator[None]:
    """Raise the gen-0 threshold to :data:`READ_THRESHOLD` for the block.

    Reads may overlap (the incremental reconcile's full sync beside a ``sync``
    verb in tests, say): the first one in raises it, the last one out restores
    what was set before. A threshold of 0 (collection switched off) or one
    already higher is left as it is.
    """
    readers = _readers
    with readers.lock:
        if readers.count == 0:
            readers.saved = gc.get_threshold()
            gen0, gen1, gen2 = readers.saved
            if 0 < gen0 < READ_THRESHOLD:
                gc.set_threshold(READ_THRESHOLD, gen1, gen2)
        readers.count += 1
    try:
        yield
    finally:
        with readers.lock:
            readers.count -= 1
            if readers.count == 0 and readers.saved is not None:
                gc.set_threshold(*readers.saved)
                readers.saved = None
