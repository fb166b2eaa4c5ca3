"""Incremental reconcile end to end: Graph stand-in (real delta links, 410 on
expired tokens) -> real adapters -> real Samba AD DC.

Directory state is read back over the harness's admin connection; what Graph
was asked is read from the stand-in's request log.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support.world import World, make_world
from writeback.adapters.local_queue import LocalQueue
from writeback.config import SoftDeletePolicy
from writeback.domain.model import SkipReason
from writeback.hosting.serve import ServeConfig, Server
from writeback.service.incremental import (
    IncrementalResult,
    full_sync_due,
    reconcile_incremental,
)
from writeback.service.reconcile import SyncPolicy
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba

GROUPS = 20


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with make_world(samba_dc, make_ou(samba_dc)) as w:
        for n in range(GROUPS):
            w.add_group(n, f"Team {n}", [f"user{n % 6}", f"user{(n + 1) % 6}"])
        yield w


def run(
    world: World, link: str | None, policy: SyncPolicy | None = None, **kwargs: object
) -> IncrementalResult:
    outcome = reconcile_incremental(
        world.cloud,
        world.directory,
        world.options,
        policy or SyncPolicy(),
        delta_link=link,
        **kwargs,  # type: ignore[arg-type]
    )
    assert outcome.result.failures == [], outcome.result.failures
    return outcome


def full_reads(world: World) -> int:
    """Requests only a full read makes (the users delta, the recycle bin list)."""
    return world.standin.count("/users/delta")


def written(outcome: IncrementalResult) -> set[str]:
    return {op.group_id for op in outcome.result.plan.operations}


def first_full(world: World) -> str:
    outcome = run(world, None)
    assert outcome.mode == "full"
    assert outcome.full_reason == "no stored delta link"
    assert outcome.result.applied == {"add": GROUPS}
    assert outcome.next_delta_link
    world.standin.reset_log()
    return outcome.next_delta_link


def test_first_run_full_then_only_the_changed_groups(world: World) -> None:
    link = first_full(world)
    changed_name, changed_members = world.gid(3), world.gid(12)
    world.tenant.update_group(changed_name, display_name="Team three, renamed")
    world.tenant.add_members(changed_members, [world.uid("user5")])

    outcome = run(world, link)

    assert outcome.mode == "incremental"
    assert outcome.changed == 2
    assert written(outcome) == {changed_name, changed_members}
    assert sum(outcome.result.applied.values()) == 2
    assert outcome.next_delta_link and outcome.next_delta_link != link
    # Only the delta round and the two groups were read: no full read, no other group.
    assert full_reads(world) == 0
    assert world.standin.count("/groups/delta") == 1
    group_reads = {
        gid
        for _, target, _ in world.standin.requests
        for gid in (world.gid(n) for n in range(GROUPS))
        if f"/groups/{gid}" in target
    }
    assert group_reads == {changed_name, changed_members}
    entry = world.ad_entry(changed_name)
    assert entry is not None and entry["displayname"] == ["Team three, renamed"]
    members = world.ad_entry(changed_members)
    assert members is not None and world.sid_of("user5") in members["member_sids"]

    world.standin.reset_log()
    quiet = run(world, outcome.next_delta_link)
    assert quiet.mode == "incremental" and quiet.changed == 0
    assert quiet.result.plan.operations == []
    assert full_reads(world) == 0


def test_hard_delete_removes_and_soft_delete_keeps(world: World) -> None:
    link = first_full(world)
    soft, hard = world.gid(1), world.gid(2)
    world.tenant.soft_delete_group(soft)
    world.tenant.hard_delete_group(hard)

    outcome = run(world, link)

    assert outcome.mode == "incremental"
    assert outcome.result.applied == {"delete": 1}
    assert world.ad_entry(hard) is None
    assert world.ad_entry(soft) is not None  # its SID is kept until it is purged
    assert [(s.group_id, s.reason) for s in outcome.result.plan.skips] == [
        (soft, SkipReason.SOFT_DELETED)
    ]
    assert full_reads(world) == 0

    # Restored from the recycle bin: nothing to write, the object was kept.
    world.tenant.restore_group(soft)
    restored = run(world, outcome.next_delta_link)
    assert restored.mode == "incremental" and restored.result.plan.operations == []
    assert world.ad_entry(soft) is not None

    # Purged for good: now it goes.
    world.tenant.soft_delete_group(soft)
    world.tenant.hard_delete_group(soft)
    purged = run(world, restored.next_delta_link)
    assert purged.result.applied == {"delete": 1}
    assert world.ad_entry(soft) is None


def test_soft_delete_deletes_under_the_delete_policy(world: World) -> None:
    link = first_full(world)
    soft = world.gid(4)
    world.tenant.soft_delete_group(soft)
    outcome = run(world, link, SyncPolicy(soft_delete=SoftDeletePolicy.DELETE))
    assert outcome.result.applied == {"delete": 1}
    assert world.ad_entry(soft) is None


def test_expired_link_falls_back_to_a_full_read(world: World) -> None:
    link = first_full(world)
    world.tenant.update_group(world.gid(7), description="changed while the link expired")
    world.tenant.expire_delta_tokens()

    outcome = run(world, link)

    assert outcome.mode == "full"
    assert outcome.fell_back_reason is not None and "expired" in outcome.fell_back_reason
    assert full_reads(world) >= 1
    assert written(outcome) == {world.gid(7)}
    entry = world.ad_entry(world.gid(7))
    assert entry is not None and entry["description"] == ["changed while the link expired"]
    assert outcome.next_delta_link and outcome.next_delta_link != link

    # The new link works: the next run is incremental again.
    world.standin.reset_log()
    again = run(world, outcome.next_delta_link)
    assert again.mode == "incremental" and again.fell_back_reason is None
    assert full_reads(world) == 0


def test_delete_threshold_holds_across_the_run(world: World) -> None:
    link = first_full(world)
    doomed = [world.gid(n) for n in (5, 6, 8)]
    for gid in doomed:
        world.tenant.hard_delete_group(gid)
    world.tenant.update_group(world.gid(9), display_name="Still written")

    blocked = run(world, link, SyncPolicy(delete_threshold=2))

    assert blocked.mode == "incremental"
    assert blocked.result.plan.deletes_blocked is not None
    assert "3 deletes exceed the threshold of 2" in blocked.result.plan.deletes_blocked
    assert blocked.result.applied == {"modify": 1}
    assert all(world.ad_entry(gid) is not None for gid in doomed)
    assert {s.group_id for s in blocked.result.plan.skips} == set(doomed)
    # The link is kept, so the held-back deletes are reported again next run...
    assert blocked.next_delta_link == link

    # ... and go ahead once they are allowed.
    allowed = run(
        world, blocked.next_delta_link, SyncPolicy(delete_threshold=2, allow_deletes=True)
    )
    assert allowed.mode == "incremental"
    assert allowed.result.applied == {"delete": 3}
    assert all(world.ad_entry(gid) is None for gid in doomed)
    assert allowed.next_delta_link != link


def test_periodic_full_sync_catches_what_the_groups_delta_misses(world: World) -> None:
    link = first_full(world)
    # A member loses its on-prem SID: the group did not change, so its delta is silent.
    world.tenant.update_user(world.uid("user0"), sid=None, synced=False)
    quiet = run(world, link, full_every=3, runs_since_full=1)
    assert quiet.mode == "incremental" and quiet.result.plan.operations == []
    entry = world.ad_entry(world.gid(0))
    assert entry is not None and world.sid_of("user0") in entry["member_sids"]

    full = run(world, quiet.next_delta_link, full_every=3, runs_since_full=3)
    assert full.mode == "full" and full.fell_back_reason is None
    assert full.full_reason is not None and "full_every" in full.full_reason
    entry = world.ad_entry(world.gid(0))
    assert entry is not None and world.sid_of("user0") not in entry["member_sids"]
    assert full.next_delta_link


def test_full_sync_due() -> None:
    now = datetime(2026, 1, 2, tzinfo=UTC)
    assert full_sync_due(delta_link=None) == "no stored delta link"
    assert full_sync_due(delta_link="x") is None
    assert full_sync_due(delta_link="x", full_every=4, runs_since_full=3) is None
    assert full_sync_due(delta_link="x", full_every=4, runs_since_full=4) is not None
    day = timedelta(days=1)
    assert full_sync_due(delta_link="x", full_max_age=day, last_full_at=None) is not None
    recent = now - timedelta(hours=2)
    assert full_sync_due(delta_link="x", full_max_age=day, last_full_at=recent, now=now) is None
    old = now - timedelta(days=2)
    assert full_sync_due(delta_link="x", full_max_age=day, last_full_at=old, now=now) is not None


@pytest.fixture
def queues() -> Iterator[list[LocalQueue]]:
    made: list[LocalQueue] = []
    yield made
    for queue in made:
        queue.close()


def make_server(world: World, tmp_path: Path, queues: list[LocalQueue], **config: object) -> Server:
    queue = LocalQueue(str(tmp_path / f"queue{len(queues)}.db"))
    queues.append(queue)
    return Server(
        queue=queue,
        cloud=world.cloud,
        directory_factory=lambda: world.directory,
        options=world.options,
        client_states=["secret"],
        config=ServeConfig(
            **{  # type: ignore[arg-type]
                "subscribe": False,
                "settle": 0.3,
                "reconcile_at_start": False,
                "state_path": str(tmp_path / "state.json"),
                "incremental": True,
                **config,
            }
        ),
        owned=[],
    )


def mode_of(server: Server) -> str | None:
    return server.last_incremental.mode if server.last_incremental is not None else None


def test_server_keeps_the_delta_link_in_its_state_file(
    world: World, tmp_path: Path, queues: list[LocalQueue]
) -> None:
    server = make_server(world, tmp_path, queues, full_every=2)
    assert server.reconcile()
    assert server.last_incremental is not None and server.last_incremental.mode == "full"
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["delta"]["groups_link"] and state["delta"]["runs_since_full"] == 0
    assert state["last_reconcile"]["applied"] == {"add": GROUPS}

    # A restarted server picks the link up from the state file: incremental.
    world.tenant.update_group(world.gid(2), display_name="Renamed while down")
    world.standin.reset_log()
    again = make_server(world, tmp_path, queues, full_every=2)
    assert again.reconcile()
    assert again.last_incremental is not None and again.last_incremental.mode == "incremental"
    assert again.last_reconcile is not None
    assert again.last_reconcile.applied == {"modify": 1}
    assert full_reads(world) == 0
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["delta"]["runs_since_full"] == 1 and state["delta"]["last_mode"] == "incremental"

    assert again.reconcile()  # second incremental run
    assert mode_of(again) == "incremental"
    assert again.reconcile()  # full_every=2 reached: full
    assert mode_of(again) == "full"
    assert json.loads((tmp_path / "state.json").read_text())["delta"]["runs_since_full"] == 0


def test_server_without_incremental_stays_full(
    world: World, tmp_path: Path, queues: list[LocalQueue]
) -> None:
    server = make_server(world, tmp_path, queues, incremental=False)
    assert server.reconcile()
    world.standin.reset_log()
    assert server.reconcile()
    assert server.last_incremental is None
    assert full_reads(world) >= 1
    assert "delta" not in json.loads((tmp_path / "state.json").read_text())
