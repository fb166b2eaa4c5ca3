"""Issue 12, findings 2 and 4, through the relay: the agent's own member and nesting
guards, the guards' reads of the cloud side over the relay, and one id form.

Real code end to end: the Relay stand-in, the agent behind the real listener, the
cloud side's RelayDirectory, a real Samba DC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ldap3 import BASE, MODIFY_ADD, MODIFY_REPLACE

from tests.support.relay import RelayRig, relay_rig
from tests.support.world import World, make_world
from writeback.adapters.relay import RelayDirectory
from writeback.domain.guard import GuardRules, PrincipalKind, frozen_groups
from writeback.domain.model import Changes, Modify, SkipReason, anchor_for
from writeback.domain.naming import dn_for
from writeback.errors import DuplicateAnchor, PolicyRefused
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with make_world(samba_dc, make_ou(samba_dc)) as w:
        yield w


@pytest.fixture
def rig() -> Iterator[RelayRig]:
    with relay_rig() as r:
        yield r


def through_relay(world: World, rig: RelayRig, **agent: Any) -> RelayDirectory:
    rig.start_agent(lambda: world.dc.directory(world.ou), world.ou, **agent)
    world.directory.close()
    world.directory = rig.directory(world.ou)  # type: ignore[assignment]
    return world.directory  # type: ignore[return-value]


def admin(world: World, dn: str, changes: dict[str, Any]) -> None:
    conn = world.dc.connection()
    try:
        assert conn.modify(dn, changes), conn.result
    finally:
        conn.unbind()


def usn(world: World, dn: str) -> int:
    conn = world.dc.connection()
    try:
        assert conn.search(dn, "(objectClass=*)", BASE, attributes=["uSNChanged"])
        return int(conn.entries[0].uSNChanged.value)
    finally:
        conn.unbind()


def test_the_agent_refuses_privileged_members_whatever_the_cloud_side_sends(
    world: World, rig: RelayRig
) -> None:
    relay = through_relay(world, rig)
    gid = world.add_group(1, "Ours", ["user0"])
    world.sync()
    entry = world.ad_entry(gid)
    assert entry is not None
    admin(
        world, f"CN={world.token}user1,{world.users_ou}", {"adminCount": [(MODIFY_REPLACE, ["1"])]}
    )
    domain = world.dc.domain_sid()
    before = usn(world, entry["dn"])
    for sid in (
        f"{domain}-512",  # Domain Admins
        f"{domain}-500",  # Administrator
        "S-1-5-32-544",  # Administrators
        f"{domain}-987654",  # nothing
        world.sid_of("user1"),  # adminCount=1
    ):
        hostile = Modify(gid, entry["dn"], Changes(add_members=(f"<SID={sid}>",)))
        with pytest.raises(PolicyRefused, match="member guard"):
            relay.apply(hostile)
    assert usn(world, entry["dn"]) == before
    # What the planner sends for an ordinary user still passes.
    fine = Modify(gid, entry["dn"], Changes(add_members=(f"<SID={world.sid_of('user2')}>",)))
    assert relay.apply(fine) == 1


def test_the_agent_adds_no_member_to_a_group_nested_in_a_protected_one(
    world: World, rig: RelayRig
) -> None:
    relay = through_relay(world, rig)
    gid = world.add_group(1, "Ours", ["user0"])
    world.sync()
    entry = world.ad_entry(gid)
    assert entry is not None
    protected = world.dc.create_group(world.users_ou, f"tier0{world.token}")
    admin(world, protected, {"adminCount": [(MODIFY_REPLACE, ["1"])]})
    admin(world, protected, {"member": [(MODIFY_ADD, [entry["dn"]])]})
    add = Modify(gid, entry["dn"], Changes(add_members=(f"<SID={world.sid_of('user1')}>",)))
    with pytest.raises(PolicyRefused, match="nested in a protected group"):
        relay.apply(add)
    assert world.member_sids(entry["dn"]) == {world.sid_of("user0")}
    remove = Modify(gid, entry["dn"], Changes(remove_members=(f"<SID={world.sid_of('user0')}>",)))
    assert relay.apply(remove) == 1, "removals still go through"


def test_the_cloud_side_reads_what_its_guards_need_through_the_relay(
    world: World, rig: RelayRig
) -> None:
    relay = through_relay(world, rig)
    gid = world.add_group(1, "Ours", ["user0"])
    world.sync()
    entry = world.ad_entry(gid)
    assert entry is not None
    domain = world.dc.domain_sid()
    found = relay.resolve_sids([world.sid_of("user0"), f"{domain}-500", f"{domain}-987654"])
    assert set(found) == {world.sid_of("user0"), f"{domain}-500"}
    assert found[world.sid_of("user0")].kind is PrincipalKind.USER
    assert found[f"{domain}-500"].admin_count
    protected = world.dc.create_group(world.users_ou, f"tier0{world.token}")
    admin(world, protected, {"adminCount": [(MODIFY_REPLACE, ["1"])]})
    admin(world, protected, {"member": [(MODIFY_ADD, [entry["dn"]])]})
    assert set(frozen_groups(relay.group_ancestry(), GuardRules())) == {gid}

    # The whole plan through the relay: the frozen group and a guarded member reported.
    world.tenant.add_user("0e0e0e0e-0000-4000-8000-000000000500", sid=f"{domain}-500", synced=True)
    world.tenant.add_members(gid, ["0e0e0e0e-0000-4000-8000-000000000500", world.uid("user1")])
    plan = world.plan()
    reasons = {(s.reason, s.member) for s in plan.skips}
    assert (SkipReason.MEMBER_PRIVILEGED, f"{domain}-500") in reasons
    assert [a.reason for a in plan.alerts] == [SkipReason.GROUP_FROZEN]
    assert plan.operations == []


def test_ids_in_another_case_and_duplicated_anchors_through_the_relay(
    world: World, rig: RelayRig
) -> None:
    relay = through_relay(world, rig)
    doubled = world.add_group(1, "Doubled", ["user0"])
    fine = world.add_group(2, "Fine", ["user0"])
    world.sync()
    with pytest.raises(PolicyRefused, match="lower-case"):
        relay.find_group(doubled.upper())
    conn = world.dc.connection()
    assert conn.add(
        dn_for("Decoy", world.ou),
        ["top", "group"],
        {"adminDescription": anchor_for(doubled), "sAMAccountName": f"dc{world.token}"},
    )
    conn.unbind()
    with pytest.raises(DuplicateAnchor) as duplicate:
        relay.find_groups([doubled, fine])
    assert set(duplicate.value.duplicates) == {doubled}
    assert len(duplicate.value.duplicates[doubled]) == 2
    assert set(duplicate.value.found) == {fine}
