"""The event path against a Graph that is eventually consistent, through serve mode.

Graph's replicas lag (the stand-in's ``lag``: reads of groups, members and delta
served from a snapshot that many seconds old, while ``/directory/deletedItems``
answers from a fresher one), answer 404 now and then for a group that exists,
and refuse delta links. The server runs with the reconcile interval at an hour,
so only the event path can act, and a settle interval of a few seconds: every
event's read is confirmed by a full read that much later, and nothing is deleted
on one observation. AD is the real Samba DC, read back independently.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.integration.test_pipeline import FAST, SECRET
from tests.support.world import World, make_world
from writeback.adapters.local_queue import LocalQueue
from writeback.hosting.serve import Server
from writeback.service import handle_event
from writeback_sandbox.samba import SambaDC

#: Seconds between an event's read and its confirmation, here.
SETTLE = 3.0
#: How far behind the replica serving group reads is (under the settle interval).
LAG = 1.5


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with make_world(samba_dc, make_ou(samba_dc)) as w:
        yield w


@pytest.fixture
def server(world: World, tmp_path: Path) -> Iterator[Server]:
    queue = LocalQueue(tmp_path / "queue.sqlite3", lock_duration=30, max_delivery_count=50)
    server = Server(
        queue=queue,
        cloud=world.cloud,
        directory_factory=lambda: world.dc.directory(world.ou),
        options=world.options,
        client_states=[SECRET],
        config=replace(
            FAST,
            settle=SETTLE,
            reconcile_at_start=True,  # the groups of the test exist in AD before it acts
            reconcile_interval=3600,  # then only the event path acts
            state_path=str(tmp_path / "state.json"),
        ),
        owned=[queue],
    )
    server.start()
    assert server.wait_ready(30)
    try:
        yield server
    finally:
        server.stop()


def quiet(world: World, server: Server, timeout: float = 30.0) -> None:
    """Every notification delivered, every event and confirmation handled."""
    assert world.standin.wait_idle(timeout), "the stand-in still has notifications to deliver"
    assert server.wait_idle(timeout), "the pipeline did not go idle"


def identity(world: World, gid: str) -> tuple[str, bytes]:
    entry = world.ad_entry(gid)
    assert entry is not None, f"no object for {gid}"
    return str(entry["objectsid"][0]), bytes(entry["objectguid"][0])


def existing(world: World, server: Server, n: int, name: str, members: list[str]) -> str:
    """A group written to AD by the start-up reconcile of a fresh server."""
    gid = world.add_group(n, name, members)
    assert server.reconcile("test setup")
    assert world.ad_entry(gid) is not None
    return gid


def test_a_group_restored_while_the_replica_still_answers_404_keeps_its_sid_and_guid(
    world: World, server: Server
) -> None:
    gid = existing(world, server, 1, "Restored", ["user0"])
    sid, guid = identity(world, gid)
    world.tenant.soft_delete_group(gid)
    quiet(world, server)
    assert identity(world, gid) == (sid, guid)  # kept while in the recycle bin

    # The restore: group reads lag behind it (404: still deleted there), while the
    # recycle bin answers from a replica that has caught up (no longer in it).
    world.standin.lag = LAG
    world.tenant.restore_group(gid)
    started = time.monotonic()
    quiet(world, server)
    assert time.monotonic() - started >= SETTLE  # a confirmation ran
    assert identity(world, gid) == (sid, guid)
    assert "delete" not in server.stats.operations
    assert server.stats.pending_deletes >= 1  # the first read said "gone"; it was checked


def test_a_one_shot_404_on_a_live_group_deletes_nothing(world: World, server: Server) -> None:
    gid = existing(world, server, 2, "Live", ["user0", "user1"])
    before = identity(world, gid)
    world.standin.inject_not_found(gid, times=1)
    world.tenant.update_group(gid, description="touched")
    quiet(world, server)
    assert identity(world, gid) == before
    entry = world.ad_entry(gid)
    assert entry is not None and entry["description"] == ["touched"]
    assert "delete" not in server.stats.operations
    assert server.queue.dead_letters() == []


def test_changes_read_from_a_lagging_replica_reach_ad_within_the_settle_interval(
    world: World, server: Server
) -> None:
    gid = existing(world, server, 3, "Lagging", ["user0"])
    world.standin.lag = LAG
    started = time.monotonic()
    world.tenant.add_members(gid, [world.uid("user2")])
    world.tenant.update_group(gid, display_name="Lagging renamed")

    def arrived() -> bool:
        entry = world.ad_entry(gid)
        return (
            entry is not None
            and entry["displayname"] == ["Lagging renamed"]
            and world.sid_of("user2") in entry["member_sids"]
        )

    while not arrived():
        assert time.monotonic() - started < SETTLE + 5, "not in AD within the settle interval"
        time.sleep(0.1)
    assert server.stats.confirmations >= 1
    quiet(world, server)
    assert server.queue.dead_letters() == []


def test_a_group_created_while_the_replica_answers_404_reaches_ad(
    world: World, server: Server
) -> None:
    world.standin.lag = LAG
    gid = world.add_group(4, "Brand new", ["user0"])  # notified at once, read 404 for LAG s
    quiet(world, server)
    entry = world.ad_entry(gid)
    assert entry is not None and entry["displayname"] == ["Brand new"]
    assert entry["member_sids"] == {world.sid_of("user0")}
    assert server.queue.dead_letters() == []


def test_a_refused_delta_link_converges_with_no_dead_letter(
    world: World, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every group counts as large here, so its events go by member delta.
    monkeypatch.setattr(handle_event, "DELTA_MIN_MEMBERS", 1)
    gid = existing(world, server, 5, "Delta", ["user0"])
    world.tenant.add_members(gid, [world.uid("user1")])  # the first event stores a link
    quiet(world, server)
    world.standin.refuse_delta_link(400, "Directory_ExpiredPageToken", group_id=gid)
    world.tenant.add_members(gid, [world.uid("user3")])
    quiet(world, server)
    entry = world.ad_entry(gid)
    assert entry is not None
    assert entry["member_sids"] == {world.sid_of(u) for u in ("user0", "user1", "user3")}
    assert server.queue.dead_letters() == []
    assert server.stats.dead_lettered == 0
