"""The member and nesting guards (issue 12) on what goes beyond V1 (issue 14), on
the real Samba DC: the guards apply after the mapping to the groups the rules
place in OUs below the target OU, in the reconcile and in the event path; a
member group of ours is written by its SID without a lookup; a parent the
rules nest groups into that an admin nests into a protected group gets no
member added, neither a user nor a child group (by DN in the run that creates
the child, by SID afterwards), while its other changes are still written; the
child it holds is in the protected group through it, so it is frozen too."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ldap3 import MODIFY_ADD, MODIFY_DELETE

from tests.support.beyond import beyond_world, object_sid
from tests.support.world import World, user_id
from writeback.domain.guard import GuardRules
from writeback.domain.model import Add, Modify, SkipReason
from writeback.service.guarding import GuardReads
from writeback.service.handle_event import WorkerContext, converge
from writeback.service.reconcile import SyncPolicy
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba

RULES = """
    [[rule]]
    name = "security groups"
    kinds = ["security"]
    ou = "OU=Placed"
    dn_format = "displayname"

    [[rule]]
    name = "Microsoft 365 groups"
    kinds = ["microsoft365"]
    """


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with beyond_world(samba_dc, make_ou(samba_dc), rules=RULES) as w:
        w.dc.create_ou("Placed", w.ou)
        yield w


def security(world: World, n: int, name: str, users: list[str], groups: list[str]) -> str:
    gid = world.gid(n)
    members = [world.uid(u) for u in users] + groups
    world.tenant.add_group(gid, display_name=name, group_types=(), members=members)
    return gid


def admin(world: World, dn: str, changes: dict[str, Any]) -> None:
    conn = world.dc.connection()
    try:
        assert conn.modify(dn, changes), conn.result
    finally:
        conn.unbind()


def test_the_member_guard_holds_for_groups_the_rules_place(world: World) -> None:
    domain_admins = f"{world.dc.domain_sid()}-512"
    world.tenant.add_user(user_id("da"), sid=domain_admins, synced=True, display_name="da")
    denied = world.sid_of("user1")
    policy = SyncPolicy(guard=GuardRules(deny=frozenset({denied})))
    gid = security(world, 1, "SG-Ops", ["user0", "user1", "da"], [])
    plan = world.plan(policy)
    assert plan.rules[gid] == "security groups"
    refused = {(s.member, s.reason) for s in plan.skips if s.member}
    assert refused == {
        (domain_admins, SkipReason.MEMBER_PRIVILEGED),
        (denied, SkipReason.MEMBER_DENIED),
    }
    [add] = plan.operations
    assert isinstance(add, Add) and add.dn.startswith(f"CN=SG-Ops_{gid[-12:]},OU=Placed,")
    world.sync(policy)
    entry = world.ad_entry(gid)
    assert entry is not None and ",OU=Placed," in entry["dn"]
    assert entry["member_sids"] == {world.sid_of("user0")}

    # The event path: the same guards, for the same placed group.
    world.tenant.add_members(gid, [world.uid("user2")])
    context = WorkerContext(
        world.cloud, world.directory, world.options, attempts=1, guard=GuardReads(policy.guard)
    )
    operation, _, skipped = converge(gid, context)
    assert operation is not None
    assert {(s.member, s.reason) for s in skipped if s.member} == refused
    entry = world.ad_entry(gid)
    assert entry is not None
    assert entry["member_sids"] == {world.sid_of("user0"), world.sid_of("user2")}


@pytest.fixture
def frozen_parent(world: World) -> Iterator[tuple[str, str]]:
    """A parent holding a child, both placed by the rules and written, the parent
    then nested by an admin into Backup Operators: (parent id, child's SID). The
    nesting is undone afterwards (the DC is shared by the session)."""
    child = security(world, 2, "SG-Child", ["user1"], [])
    parent = security(world, 1, "SG-Parent", ["user0"], [child])
    world.sync()
    parent_entry, child_entry = world.ad_entry(parent), world.ad_entry(child)
    assert parent_entry is not None and child_entry is not None
    child_sid = object_sid(child_entry)
    assert parent_entry["member_sids"] == {world.sid_of("user0"), child_sid}
    operators = f"CN=Backup Operators,CN=Builtin,{world.dc.base_dn}"
    admin(world, operators, {"member": [(MODIFY_ADD, [parent_entry["dn"]])]})
    try:
        yield parent, child_sid
    finally:
        admin(world, operators, {"member": [(MODIFY_DELETE, [parent_entry["dn"]])]})


def test_a_parent_nested_into_a_protected_group_gets_no_member_group_added(
    world: World, frozen_parent: tuple[str, str]
) -> None:
    parent, child_sid = frozen_parent
    held = {world.sid_of("user0"), child_sid}
    late = security(world, 3, "SG-Late child", ["user2"], [])
    world.tenant.add_members(parent, [late, world.uid("user3")])
    world.tenant.update_group(parent, description="still written")
    child = world.gid(2)
    world.tenant.add_members(child, [world.uid("user4")])
    plan = world.plan()
    frozen = {s.group_id: s for s in plan.skips if s.reason is SkipReason.GROUP_FROZEN}
    assert set(frozen) == {parent, child}  # the child is in Backup Operators through it
    assert frozen[parent].count == 2  # the late child by DN, user3
    assert frozen[child].count == 1  # user4
    assert "Backup Operators" in frozen[parent].detail
    by_group = {op.group_id: op for op in plan.operations}
    assert isinstance(by_group[late], Add)
    parent_op = by_group[parent]
    assert isinstance(parent_op, Modify) and parent_op.changes.add_members == ()
    world.sync()
    parent_entry = world.ad_entry(parent)
    assert parent_entry is not None and parent_entry["member_sids"] == held
    assert parent_entry["description"] == ["still written"]
    late_entry = world.ad_entry(late)
    assert late_entry is not None  # the child itself is written, only not nested

    # The event path: the child now has a SID; the frozen parent still gets neither.
    context = WorkerContext(world.cloud, world.directory, world.options, attempts=1)
    operation, _, skipped = converge(parent, context)
    assert operation is None
    [alert] = [s for s in skipped if s.reason is SkipReason.GROUP_FROZEN]
    assert alert.count == 2  # the late child by its SID, user3
    parent_entry = world.ad_entry(parent)
    assert parent_entry is not None and parent_entry["member_sids"] == held
