"""fewer_collections: a higher gen-0 threshold during full reads, and back after."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from writeback.service.heap import READ_THRESHOLD, fewer_collections


@pytest.fixture(autouse=True)
def default_threshold() -> Iterator[None]:
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*saved)


def test_raised_inside_and_restored_after_even_on_error() -> None:
    with pytest.raises(RuntimeError), fewer_collections():
        assert gc.get_threshold() == (READ_THRESHOLD, 10, 10)
        raise RuntimeError("the read failed")
    assert gc.get_threshold() == (700, 10, 10)


def test_overlapping_reads_restore_only_when_the_last_ends() -> None:
    first_in, second_done = threading.Event(), threading.Event()
    seen: list[tuple[int, int, int]] = []

    def other_read() -> None:
        first_in.wait(5)
        with fewer_collections():
            pass
        seen.append(gc.get_threshold())  # the first read is still on
        second_done.set()

    thread = threading.Thread(target=other_read)
    thread.start()
    with fewer_collections():
        first_in.set()
        assert second_done.wait(5)
    thread.join(5)
    assert seen == [(READ_THRESHOLD, 10, 10)]
    assert gc.get_threshold() == (700, 10, 10)


@pytest.mark.parametrize("threshold", [(0, 10, 10), (50_000, 10, 10)])
def test_switched_off_or_higher_is_left_alone(threshold: tuple[int, int, int]) -> None:
    gc.set_threshold(*threshold)
    with fewer_collections():
        assert gc.get_threshold() == threshold
    assert gc.get_threshold() == threshold
