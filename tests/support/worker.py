"""Driving the event handler directly, one session at a time, as a test wants it.

The hosts go through :class:`writeback.service.pipeline.Pipeline`; these tests
look at :func:`~writeback.service.handle_event.process_session` alone, with a
:class:`~writeback.service.handle_event.WorkerContext` they build themselves.
"""

from __future__ import annotations

from writeback.ports import EventQueue
from writeback.service.handle_event import EventOutcome, WorkerContext, process_session


def run_once(
    queue: EventQueue, ctx: WorkerContext, *, max_messages: int = 100, wait: float = 1.0
) -> EventOutcome | None:
    """Take the next session with work, handle it, release it. None when idle."""
    messages = queue.receive_session(max_messages, wait)
    if not messages:
        return None
    try:
        return process_session(queue, messages, ctx)
    finally:
        queue.release_session(messages[0].session_id)
