"""A whole pipeline on in-memory ports: a tenant, a domain, a queue, one clock.

:func:`memory_world` builds the product's :class:`~writeback.service.pipeline.Pipeline`
over :class:`MemoryCloud`, a :class:`MemoryDirectory` on a fresh target OU, a
:class:`MemoryQueue` and the product's ``MemoryDeltaLinks`` and ``MemoryState``,
all on one :class:`ManualClock`. Users are made on both sides (an AD user with
its SID, the cloud user synced from it), so events converge as they would
against Samba and the stand-in, in microseconds.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from tests.support.memory.clock import ManualClock
from tests.support.memory.cloud import MemoryCloud
from tests.support.memory.directory import Entry, MemoryDirectory, MemoryForest
from tests.support.memory.queue import MemoryQueue
from writeback.adapters.delta_store import MemoryDeltaLinks
from writeback.adapters.state import MemoryState
from writeback.domain.events import CONTROL_SESSION, Change, ControlRequest, GroupChanged
from writeback.domain.mapping import MappingOptions
from writeback.domain.model import anchor_for
from writeback.ports import OutgoingMessage
from writeback.service.handle_event import EventOutcome
from writeback.service.notifications import LifecycleEvent, lifecycle_message
from writeback.service.pipeline import LATENCY_WINDOW, Pipeline, PipelineConfig

#: Settings for tests: in-process retries without sleeping, short redelivery waits.
TEST_CONFIG = {
    "attempts": 3,
    "max_wait": 0.0,
    "redelivery_scale": 1.0,
    "max_redelivery_delay": 60.0,
}


def object_id(name: str) -> str:
    """A stable Entra-style object id for a name."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"memory-world:{name}"))


@dataclass
class MemoryWorld:
    clock: ManualClock
    cloud: MemoryCloud
    forest: MemoryForest
    target: str
    directory: MemoryDirectory
    queue: MemoryQueue
    links: MemoryDeltaLinks
    state: MemoryState
    config: PipelineConfig
    pipeline: Pipeline
    #: User name -> the SID of its AD account.
    sids: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ the tenant

    def user(self, name: str, *, synced: bool = True) -> str:
        """A user (an AD account synced to the cloud, or cloud-only); returns its id."""
        user_id = object_id(f"user:{name}")
        sid = None
        if synced:
            sid = self.forest.add_user(name)
            self.sids[name] = sid
        self.cloud.add_user(user_id, sid=sid, synced=synced, display_name=name)
        return user_id

    def users(self, *names: str) -> list[str]:
        return [self.user(name) for name in names]

    def group(self, name: str, members: Iterable[str] = (), **fields: Any) -> str:
        """A Unified group with these members (user ids); returns its id."""
        group_id = object_id(f"group:{name}")
        self.cloud.add_group(group_id, display_name=name, members=members, **fields)
        return group_id

    # ------------------------------------------------------------------ the queue

    def event(
        self,
        group_id: str,
        *,
        received_at: float | None = None,
        notification_id: str | None = None,
        session_id: str | None = None,
        change: Change = Change.UPDATED,
    ) -> OutgoingMessage:
        """The message the webhook would enqueue for one change of ``group_id``."""
        message_id = notification_id or "gc-" + uuid.uuid4().hex
        body = GroupChanged(
            group_id, change, self.clock() if received_at is None else received_at, message_id
        ).to_json()
        return OutgoingMessage(body, message_id, session_id or group_id)

    def notify(self, *group_ids: str, **event: Any) -> None:
        """One event per group id, sent in one batch."""
        self.queue.send([self.event(group_id, **event) for group_id in group_ids])

    def lifecycle(self, subscription_id: str, event: str) -> OutgoingMessage:
        return lifecycle_message(LifecycleEvent(subscription_id, event), self.clock())

    def reconcile_request(self, reason: str) -> OutgoingMessage:
        body = ControlRequest("reconcile", reason=reason, received_at=self.clock()).to_json()
        return OutgoingMessage(body, "rc-" + uuid.uuid4().hex, CONTROL_SESSION)

    def drain(self, *, max_messages: int = 100, rounds: int = 1000) -> list[EventOutcome]:
        """Handle sessions until none has a message due now; the outcomes in order."""
        outcomes: list[EventOutcome] = []
        for _ in range(rounds):
            handled = self.pipeline.handle_next(self.queue, max_messages=max_messages, wait=0)
            if handled is None:
                return outcomes
            outcomes.extend(handled)
        raise AssertionError(f"the queue did not go quiet in {rounds} rounds")

    def later(self, seconds: float) -> list[EventOutcome]:
        """Let ``seconds`` pass, then handle what became due."""
        self.clock.advance(seconds)
        return self.drain()

    # ------------------------------------------------------------------ the directory

    def ad(self, group_id: str) -> Entry | None:
        """The object anchored to ``group_id`` under the target OU, read independently."""
        anchor = (anchor_for(group_id),)
        found = [e for e in self.forest.entries(self.target) if e.get("adminDescription") == anchor]
        assert len(found) <= 1, found
        return found[0] if found else None

    def ad_members(self, group_id: str) -> set[str]:
        """User names of the AD members of ``group_id``'s object."""
        entry = self.ad(group_id)
        assert entry is not None, f"no object for {group_id}"
        names = {sid: name for name, sid in self.sids.items()}
        return {names.get(sid, sid) for sid in entry.member_sids}

    def restart(self, *, latency_window: int = LATENCY_WINDOW, **config: Any) -> Pipeline:
        """A new pipeline (a new process) over the same ports and state."""
        self.config = replace(self.config, **config)
        self.pipeline = Pipeline(
            cloud=self.cloud,
            directory=self.directory,
            config=self.config,
            state=self.state,
            links=self.links,
            sender=self.queue,
            clock=self.clock.now,
            latency_window=latency_window,
        )
        return self.pipeline


def memory_world(
    *,
    member_limit: int | None = None,
    max_delivery_count: int = 10,
    lock_duration: float = 300.0,
    **config: Any,
) -> MemoryWorld:
    """A pipeline over fresh in-memory ports; ``config`` overrides :class:`PipelineConfig`."""
    clock = ManualClock()
    cloud = MemoryCloud(clock=clock.now)
    forest = MemoryForest()
    target = forest.add_ou("Writeback", forest.add_ou("Groups"))
    directory = forest.directory(target)
    queue = MemoryQueue(
        clock=clock, lock_duration=lock_duration, max_delivery_count=max_delivery_count
    )
    options = MappingOptions(target_ou=target)
    if member_limit is not None:
        options = replace(options, member_limit=member_limit)
    settings: dict[str, Any] = {**TEST_CONFIG, **config}
    pipeline_config = PipelineConfig(options=options, **settings)
    links, state = MemoryDeltaLinks(), MemoryState()
    pipeline = Pipeline(
        cloud=cloud,
        directory=directory,
        config=pipeline_config,
        state=state,
        links=links,
        sender=queue,
        clock=clock.now,
    )
    return MemoryWorld(
        clock, cloud, forest, target, directory, queue, links, state, pipeline_config, pipeline
    )
