"""Safety drills on a real DC: the cloud suddenly returns no groups, writeback is
switched off. What must hold: no delete beyond the threshold, through the full
reconcile and the timer's (incremental) reconcile alike, and nothing deleted
that is not our anchored object inside the target OU.

The "empty cloud" is a second Graph stand-in with the same users and no groups
(what a bug or an outage answering 200 with nothing looks like), or the tenant
losing every group; directory state is read over the harness's admin connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from ldap3 import BASE

from tests.support.world import World, make_world, user_id
from writeback.adapters.graph import GraphCloud
from writeback.adapters.local_queue import LocalQueue
from writeback.hosting.serve import ServeConfig, Server
from writeback.service.reconcile import SyncPolicy, apply_plan, plan_sync
from writeback_sandbox.graph_standin import GraphStandIn, Tenant
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba

GROUPS = 6


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with make_world(samba_dc, make_ou(samba_dc)) as w:
        for n in range(GROUPS):
            w.add_group(n, f"Team {n}", [f"user{n % 6}"])
        w.sync()
        yield w


@pytest.fixture
def empty_cloud(world: World) -> Iterator[GraphCloud]:
    """Graph answering with the same users and not one group."""
    tenant = Tenant()
    for name, sid in world.sids.items():
        tenant.add_user(user_id(name), sid=sid, synced=True)
    with GraphStandIn(tenant) as standin:
        cloud = GraphCloud(base_url=standin.url)
        yield cloud
        cloud.close()


def ours(world: World) -> list[str]:
    return [world.gid(n) for n in range(GROUPS)]


def present(world: World) -> list[str]:
    return [gid for gid in ours(world) if world.ad_entry(gid) is not None]


class Servers:
    """Servers made for a test (timer path), stopped at the end."""

    def __init__(self, world: World, tmp: Path) -> None:
        self.world, self.tmp = world, tmp
        self.made: list[Server] = []

    def start(self, cloud: GraphCloud, policy: SyncPolicy, **config: object) -> Server:
        queue = LocalQueue(self.tmp / "queue.sqlite3")
        server = Server(
            queue=queue,
            cloud=cloud,
            directory_factory=lambda: self.world.dc.directory(self.world.ou),
            options=self.world.options,
            client_states=["drill-client-state"],
            policy=policy,
            config=ServeConfig(
                **{  # type: ignore[arg-type]
                    "subscribe": False,
                    "settle": 0.3,
                    "reconcile_interval": 3600,
                    "state_path": str(self.tmp / "state.json"),
                    "incremental": True,
                    "full_max_age": timedelta(days=1),
                    **config,
                }
            ),
            owned=[queue],
        )
        self.made.append(server)
        server.start()
        assert server.wait_ready(60)
        return server

    def reconcile_on_timer(self, server: Server) -> None:
        """Ask the timer thread for a run and wait for it."""
        before = server.stats.reconciles
        server.request_reconcile()
        deadline = time.monotonic() + 60
        while server.stats.reconciles == before:
            assert time.monotonic() < deadline, f"no reconcile: {server.last_reconcile_error}"
            time.sleep(0.05)


@pytest.fixture
def servers(world: World, tmp_path: Path) -> Iterator[Servers]:
    made = Servers(world, tmp_path)
    yield made
    for server in made.made:
        server.stop()


# --------------------------------------------------------------------------- empty cloud


def test_an_empty_cloud_deletes_nothing_through_the_full_reconcile(
    world: World, empty_cloud: GraphCloud
) -> None:
    plan = plan_sync(empty_cloud, world.directory, world.options, SyncPolicy())
    assert plan.deletes == []
    assert plan.deletes_blocked is not None and "no groups" in plan.deletes_blocked
    result = apply_plan(plan, world.directory)
    assert result.applied == {}
    assert present(world) == ours(world)


def test_an_empty_cloud_deletes_nothing_through_the_timer_reconcile(
    world: World, empty_cloud: GraphCloud, servers: Servers
) -> None:
    # The timer's first run is full (no delta link stored yet): the empty-cloud guard.
    server = servers.start(empty_cloud, SyncPolicy(), reconcile_at_start=True)
    assert server.last_reconcile is not None
    assert server.last_reconcile.plan.deletes_blocked is not None
    assert server.last_reconcile.applied == {}
    assert present(world) == ours(world)


def test_every_group_gone_from_the_delta_deletes_nothing_past_the_threshold(
    world: World, servers: Servers
) -> None:
    server = servers.start(world.cloud, SyncPolicy(delete_threshold=GROUPS - 1))
    servers.reconcile_on_timer(server)  # full: stores the groups delta link
    for gid in ours(world):
        world.tenant.hard_delete_group(gid)
    servers.reconcile_on_timer(server)
    outcome = server.last_incremental
    assert outcome is not None and outcome.mode == "incremental"
    blocked = outcome.result.plan.deletes_blocked
    assert blocked is not None and f"{GROUPS} deletes exceed the threshold" in blocked
    assert outcome.result.applied == {}
    assert present(world) == ours(world)


def test_every_group_gone_from_the_delta_is_held_back_like_an_empty_cloud(
    world: World, servers: Servers
) -> None:
    server = servers.start(world.cloud, SyncPolicy())
    servers.reconcile_on_timer(server)
    for gid in ours(world):
        world.tenant.hard_delete_group(gid)
    servers.reconcile_on_timer(server)
    assert server.last_reconcile is not None
    blocked = server.last_reconcile.plan.deletes_blocked
    assert blocked is not None and "no groups" in blocked
    assert present(world) == ours(world)


# --------------------------------------------------------------------------- disabled


@dataclass(frozen=True)
class Decoy:
    dn: str
    usn: int


def plant_decoys(world: World) -> list[Decoy]:
    """Objects a disabled writeback must leave alone, and one of ours moved deeper."""
    conn = world.dc.connection()
    outside = world.dc.create_ou("Outside", world.users_ou.split(",", 1)[1])
    child = world.dc.create_ou("Moved", world.ou)
    gid = world.gid(0)
    decoys = {
        f"CN=No anchor,{world.ou}": {"displayName": "same OU, no anchor"},
        f"CN=Other anchor,{world.ou}": {"adminDescription": f"Other_{gid}"},
        f"CN=Anchored outside,{outside}": {"adminDescription": f"Group_{world.gid(1)}"},
    }
    for n, (dn, attributes) in enumerate(decoys.items()):
        assert conn.add(
            dn, ["top", "group"], {"sAMAccountName": f"decoy{n}{world.token}", **attributes}
        )
    entry = world.ad_entry(gid)
    assert entry is not None
    assert conn.modify_dn(entry["dn"], entry["dn"].split(",", 1)[0], new_superior=child)
    conn.unbind()
    return [Decoy(dn, usn_of(world, dn)) for dn in decoys]


def usn_of(world: World, dn: str) -> int:
    conn = world.dc.connection()
    try:
        conn.search(dn, "(objectClass=*)", BASE, attributes=["uSNChanged"])
        return int(conn.entries[0].entry_attributes_as_dict["uSNChanged"][0])
    finally:
        conn.unbind()


def assert_untouched(world: World, decoys: list[Decoy]) -> None:
    for decoy in decoys:
        assert usn_of(world, decoy.dn) == decoy.usn, decoy.dn


def test_disabled_writeback_deletes_only_our_anchored_objects_behind_the_threshold(
    world: World,
) -> None:
    decoys = plant_decoys(world)
    held = world.sync(SyncPolicy(enabled=False, delete_threshold=GROUPS - 1))
    assert held.plan.deletes_blocked is not None and held.applied == {}
    assert present(world) == ours(world)

    done = world.sync(SyncPolicy(enabled=False, delete_threshold=GROUPS))
    assert done.applied == {"delete": GROUPS}  # the one moved into a child OU too
    assert present(world) == []
    assert_untouched(world, decoys)


def test_disabled_writeback_on_the_timer_deletes_only_ours_behind_the_threshold(
    world: World, servers: Servers
) -> None:
    decoys = plant_decoys(world)
    held = servers.start(
        world.cloud, SyncPolicy(enabled=False, delete_threshold=GROUPS - 1), reconcile_at_start=True
    )
    assert held.last_reconcile is not None and held.last_reconcile.plan.deletes_blocked
    assert present(world) == ours(world)
    held.stop()

    done = servers.start(
        world.cloud, SyncPolicy(enabled=False, delete_threshold=GROUPS), reconcile_at_start=True
    )
    assert done.last_reconcile is not None
    assert done.last_reconcile.applied == {"delete": GROUPS}
    assert present(world) == []
    assert_untouched(world, decoys)
