"""Nested groups on a real Samba DC: a member that is itself one of our groups is
written as a member, a parent created in the same run as its child names it by
DN after the child's creation, member groups not written back are skipped and
reported, cycles are cut and reported, not looped on. Through serve (direct and
through the relay agent), a child created on-premises after its parent makes the
parent's membership converge, by a confirmation of the parent."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.test_pipeline import Pipeline, settle, wait_for
from tests.support.beyond import beyond_world, object_sid
from tests.support.relay import relay_rig
from tests.support.world import World
from writeback.domain.mapping import GroupType
from writeback.domain.model import Add, SkipReason
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba

RULES = """
    [[rule]]
    name = "SG groups"
    kinds = ["security"]
    display_name = "SG-*"

    [[rule]]
    name = "no drafts"
    kinds = ["security"]
    write = false
    """


def security(world: World, n: int, name: str, users: list[str], groups: list[str]) -> str:
    gid = world.gid(n)
    members = [world.uid(u) for u in users] + groups
    world.tenant.add_group(gid, display_name=name, group_types=(), members=members)
    return gid


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with beyond_world(samba_dc, make_ou(samba_dc), rules=RULES) as w:
        yield w


def test_nested_groups_are_written_in_one_run_children_first(world: World) -> None:
    grandchild = security(world, 3, "SG-Grandchild", ["user2"], [])
    child = security(world, 2, "SG-Child", ["user1"], [grandchild])
    draft = security(world, 4, "Draft team", ["user3"], [])
    parent = security(world, 1, "SG-Parent", ["user0"], [child, draft])
    plan = world.plan()
    adds = [op for op in plan.operations if isinstance(op, Add)]
    order = [op.group_id for op in adds]
    assert order.index(grandchild) < order.index(child) < order.index(parent)
    parent_add = next(op for op in adds if op.group_id == parent)
    assert f"CN=Group_{child},{world.ou}" in parent_add.members  # by DN: no SID yet
    skipped = {(s.group_id, s.reason) for s in plan.skips}
    assert (parent, SkipReason.MEMBER_GROUP_NOT_WRITTEN) in skipped
    world.sync()

    child_entry, grandchild_entry = world.ad_entry(child), world.ad_entry(grandchild)
    assert child_entry is not None and grandchild_entry is not None
    parent_entry = world.ad_entry(parent)
    assert parent_entry is not None
    child_sid = object_sid(child_entry)
    assert parent_entry["member_sids"] == {world.sid_of("user0"), child_sid}
    assert child_entry["member_sids"] == {
        world.sid_of("user1"),
        object_sid(grandchild_entry),
    }
    assert world.ad_entry(draft) is None
    assert world.plan().operations == []  # the DN reference converged to the SID

    world.tenant.remove_members(parent, [child])
    world.sync()
    after = world.ad_entry(parent)
    assert after is not None and after["member_sids"] == {world.sid_of("user0")}


def test_cycles_are_cut_and_reported_not_looped_on(world: World) -> None:
    a, b = world.gid(1), world.gid(2)
    security(world, 1, "SG-A", ["user0"], [])
    security(world, 2, "SG-B", ["user1"], [a])
    world.tenant.add_members(a, [b])  # A holds B holds A
    c = security(world, 3, "SG-C", ["user2"], [a])  # outside the cycle: A is written in C
    plan = world.plan()
    cycles = {s.group_id for s in plan.skips if s.reason is SkipReason.MEMBER_GROUP_CYCLE}
    assert cycles == {a, b}
    world.sync()
    a_entry, b_entry, c_entry = world.ad_entry(a), world.ad_entry(b), world.ad_entry(c)
    assert a_entry is not None and b_entry is not None and c_entry is not None
    assert a_entry["member_sids"] == {world.sid_of("user0")}
    assert b_entry["member_sids"] == {world.sid_of("user1")}
    assert c_entry["member_sids"] == {world.sid_of("user2"), object_sid(a_entry)}
    assert world.plan().operations == []


@contextlib.contextmanager
def serving(world: World, tmp: Path, *, through_relay: bool) -> Iterator[Pipeline]:
    with contextlib.ExitStack() as stack:
        rig = stack.enter_context(relay_rig()) if through_relay else None
        if rig is not None:
            rig.start_agent(
                lambda: world.dc.directory(world.ou),
                world.ou,
                group_types=frozenset({GroupType.SECURITY, GroupType.MAIL_ENABLED_SECURITY}),
            )
        pipeline = Pipeline(world, tmp, rig)
        stack.callback(pipeline.close)
        yield pipeline


@pytest.mark.parametrize("directory", ["ldap", "relay"])
def test_a_child_created_after_its_parent_converges_the_parent_through_serve(
    world: World, tmp_path: Path, directory: str
) -> None:
    with serving(world, tmp_path, through_relay=directory == "relay") as pipeline:
        server = pipeline.start()
        child = security(world, 2, "Draft child", ["user1"], [])  # out of scope for now
        parent = security(world, 1, "SG-Parent", ["user0"], [child])
        settle(world, server)
        parent_entry = world.ad_entry(parent)
        assert parent_entry is not None
        assert parent_entry["member_sids"] == {world.sid_of("user0")}
        assert world.ad_entry(child) is None

        # The child comes into scope: its creation confirms the parent, whose
        # membership of it is written once the child exists.
        world.tenant.update_group(child, display_name="SG-Child")

        def parent_holds_child() -> bool:
            child_entry = world.ad_entry(child)
            entry = world.ad_entry(parent)
            return (
                child_entry is not None
                and entry is not None
                and object_sid(child_entry) in entry["member_sids"]
            )

        wait_for(parent_holds_child, timeout=30)
        settle(world, server)
        child_entry = world.ad_entry(child)
        assert child_entry is not None
        assert child_entry["member_sids"] == {world.sid_of("user1")}
