"""The cyclic garbage collector's settings for a long-running host process.

Measured with ``bench/pipeline.py`` (a burst over 5,000 groups and its confirmation
reads, 2 cores, timed through ``gc.callbacks``): start-up leaves about 120,000
objects the collector tracks, most of them the SDKs' modules, classes and
functions, and with CPython's defaults every full collection walked all of them
again, about 60 ms each time with the GIL held, in which no worker, webhook or
Graph thread ran; there were ten. The young generation's threshold of 700
allocations also collected a step's short-lived objects (a Graph batch, a claim's
rows) some 1,200 times, promoting the ones still in use to the older generations,
which made those full collections come sooner.
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Final

log = logging.getLogger(__name__)

#: Allocations of tracked objects between two young collections (CPython: 700).
#: A step of 40 groups allocates tens of thousands; the young generation's few MB
#: are the price.
YOUNG_THRESHOLD: Final = 20_000

_lock = threading.Lock()
_tuned = threading.Event()


def tune_collector() -> bool:
    """Freeze what the process holds once start-up is done, so full collections
    walk only what the pipeline allocated since, and collect the young generation
    less often. Only the first call in a process acts (True): a frozen object is
    never collected, so freezing again would pin what has become garbage since.
    A collector the process disabled, or a higher threshold it set, is left as is.
    """
    with _lock:
        if _tuned.is_set():
            return False
        _tuned.set()
        if not gc.isenabled():
            return True
        gc.collect()
        gc.freeze()
        young, *older = gc.get_threshold()
        if young < YOUNG_THRESHOLD:
            gc.set_threshold(YOUNG_THRESHOLD, *older)
        log.debug(
            "garbage collector: %d objects frozen, thresholds %s",
            gc.get_freeze_count(),
            gc.get_threshold(),
        )
        return True
