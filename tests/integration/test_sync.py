"""Full sync end to end: Graph stand-in → real adapters → real Samba AD DC.

Every test asserts the directory state read back over an independent admin
connection, not what the code under test says it did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
from ldap3 import MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE

from tests.support.world import World, make_world
from writeback.config import SoftDeletePolicy
from writeback.domain.model import Add, Delete, Modify, Rename, SkipReason
from writeback.domain.naming import DnFormat, dn_for
from writeback.service.reconcile import SyncPolicy
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba

HOSTILE_NAMES = [
    'Sales, "EMEA" + <Ops>; a=b \\ team',
    "#hashtag group",
    "  padded name  ",
    "x" * 80,
    "Отдел продаж 営業部 المبيعات",
]


@pytest.fixture
def world(any_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with make_world(any_dc, make_ou(any_dc)) as w:
        yield w


@pytest.fixture
def display_world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with make_world(samba_dc, make_ou(samba_dc), dn_format=DnFormat.DISPLAY_NAME) as w:
        yield w


def test_create_in_objectid_format_with_members_by_sid(world: World) -> None:
    gid = world.add_group(
        1,
        "Sales",
        ["user0", "user1", "cloudonly"],
        mail="sales@contoso.com",
        mail_nickname="sales",
        proxy_addresses=["SMTP:sales@contoso.com", "smtp:sales@contoso.onmicrosoft.com"],
        description="Sales team",
    )
    result = world.sync()
    assert result.applied == {"add": 1}
    entry = world.ad_entry(gid)
    assert entry is not None
    assert entry["dn"] == f"CN=Group_{gid},{world.ou}"
    assert entry["displayname"] == ["Sales"]
    assert [int(v) for v in entry["grouptype"]] == [8]
    assert entry["samaccountname"] == [("Group_" + gid.replace("-", ""))[:20]]
    assert sorted(entry["proxyaddresses"]) == [
        "SMTP:sales@contoso.com",
        "smtp:sales@contoso.onmicrosoft.com",
    ]
    assert entry["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}
    skips = [s for s in result.plan.skips if s.group_id == gid]
    assert [(s.reason, s.count) for s in skips] == [(SkipReason.MEMBER_NOT_ON_PREM, 1)]
    exchange = "mailnickname" in world.directory.schema_attributes()
    assert (entry.get("mailnickname") == ["sales"]) is exchange


def test_create_in_display_name_format_and_rename(display_world: World) -> None:
    world = display_world
    gid = world.add_group(2, "Marketing", ["user0"])
    world.sync()
    entry = world.ad_entry(gid)
    assert entry is not None
    assert entry["dn"] == f"CN=Marketing_{gid[-12:]},{world.ou}"
    sid_before = entry["objectsid"]
    world.tenant.update_group(gid, display_name="Brand, & Marketing")
    result = world.sync()
    assert result.applied == {"rename": 1}
    renamed = world.ad_entry(gid)
    assert renamed is not None
    assert renamed["dn"] == dn_for(f"Brand, & Marketing_{gid[-12:]}", world.ou)
    assert renamed["displayname"] == ["Brand, & Marketing"]
    assert renamed["objectsid"] == sid_before


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_display_names_round_trip(display_world: World, name: str) -> None:
    world = display_world
    gid = world.add_group(3, name, ["user1"])
    world.sync()
    entry = world.ad_entry(gid)
    assert entry is not None
    assert entry["displayname"] == [name]
    assert entry["cn"][0].endswith("_" + gid[-12:])
    assert len(entry["cn"][0]) <= 64
    assert world.sync().applied == {}, "a second sync must not write"


def test_attribute_update_and_member_changes_are_one_modify(world: World) -> None:
    gid = world.add_group(4, "Finance", ["user0", "user1"], description="old")
    world.sync()
    world.tenant.update_group(gid, description="new text")
    world.tenant.add_members(gid, [world.uid("user2")])
    world.tenant.remove_members(gid, [world.uid("user0")])
    result = world.sync()
    assert result.applied == {"modify": 1}
    assert result.ldap_requests == 1
    entry = world.ad_entry(gid)
    assert entry is not None
    assert entry["description"] == ["new text"]
    assert entry["member_sids"] == {world.sid_of("user1"), world.sid_of("user2")}


def test_orphans_are_deleted_but_soft_deleted_groups_are_kept(world: World) -> None:
    soft = world.add_group(5, "Soft", ["user0"])
    hard = world.add_group(6, "Hard", ["user0"])
    world.add_group(7, "Stays", ["user0"])
    world.sync()
    world.tenant.soft_delete_group(soft)
    world.tenant.hard_delete_group(hard)
    result = world.sync()
    assert result.applied == {"delete": 1}
    assert world.ad_entry(hard) is None
    assert world.ad_entry(soft) is not None
    assert [s.reason for s in result.plan.skips] == [SkipReason.SOFT_DELETED]
    world.tenant.restore_group(soft)
    assert world.sync().applied == {}
    world.tenant.soft_delete_group(soft)
    world.sync(SyncPolicy(soft_delete=SoftDeletePolicy.DELETE))
    assert world.ad_entry(soft) is None


def test_drift_made_by_hand_in_ad_is_put_back(world: World) -> None:
    gid = world.add_group(8, "Legal", ["user0", "user1"], description="cloud text")
    world.sync()
    entry = world.ad_entry(gid)
    assert entry is not None
    contact = f"CN=Outside Contact,{world.users_ou}"
    conn = world.dc.connection()
    conn.add(contact, ["top", "person", "organizationalPerson", "contact"])
    conn.modify(
        entry["dn"],
        {
            "description": [(MODIFY_REPLACE, ["edited on-prem"])],
            "displayName": [(MODIFY_REPLACE, ["Hijacked"])],
            "member": [
                (MODIFY_ADD, [f"<SID={world.sid_of('user3')}>", contact]),
            ],
        },
    )
    conn.modify(entry["dn"], {"member": [(MODIFY_DELETE, [f"<SID={world.sid_of('user0')}>"])]})
    conn.unbind()
    result = world.sync()
    assert result.applied == {"modify": 1}
    repaired = world.ad_entry(gid)
    assert repaired is not None
    assert repaired["description"] == ["cloud text"]
    assert repaired["displayname"] == ["Legal"]
    assert repaired["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}
    assert not any("Outside Contact" in str(m) for m in repaired.get("member", []))


def test_connect_written_group_is_adopted_with_its_sid(world: World) -> None:
    gid = world.gid(9)
    connect_dn = f"CN=Group_{gid},{world.ou}"
    conn = world.dc.connection()
    assert conn.add(
        connect_dn,
        ["top", "group"],
        {
            "adminDescription": f"Group_{gid}",
            "sAMAccountName": "Group_connect_made",
            "groupType": 8,
            "displayName": "Written by Connect",
            "member": [f"<SID={world.sid_of('user0')}>"],
        },
    ), conn.result
    conn.unbind()
    before = world.ad_entry(gid)
    assert before is not None
    world.add_group(9, "Engineering", ["user1"])
    result = world.sync()
    assert result.applied == {"modify": 1}
    after = world.ad_entry(gid)
    assert after is not None
    assert after["objectsid"] == before["objectsid"]
    assert after["objectguid"] == before["objectguid"]
    assert after["samaccountname"] == ["Group_connect_made"]
    assert after["displayname"] == ["Engineering"]
    assert after["member_sids"] == {world.sid_of("user1")}


def test_decoys_are_never_touched(world: World) -> None:
    gid = world.add_group(10, "Decoy target", ["user0"])
    world.add_group(14, "Stays in the cloud", ["user0"])
    outside_ou = world.dc.create_ou("Outside", world.users_ou.split(",", 1)[1])
    same_name = dn_for(f"Group_{gid}", world.users_ou)
    outside_anchor = f"CN=Anchored outside,{outside_ou}"
    look_alike = dn_for("Finance", world.ou)  # an admin's own Group_ text, not an object id
    conn = world.dc.connection()
    assert conn.add(same_name, ["top", "group"], {"displayName": "same name, no anchor"})
    assert conn.add(
        look_alike, ["top", "group"], {"adminDescription": "Group_Finance", "displayName": "kept"}
    )
    assert conn.add(
        outside_anchor,
        ["top", "group"],
        {"adminDescription": f"Group_{world.gid(11)}", "displayName": "untouched"},
    )
    conn.unbind()
    world.sync()
    world.tenant.hard_delete_group(gid)
    world.sync()
    conn = world.dc.connection()
    kept = (
        (same_name, "same name, no anchor"),
        (outside_anchor, "untouched"),
        (look_alike, "kept"),
    )
    for dn, name in kept:
        assert conn.search(dn, "(objectClass=group)", attributes=["displayName"])
        assert conn.entries[0].displayName.value == name
    conn.unbind()
    assert world.ad_entry(gid) is None


def test_group_over_the_member_limit_is_skipped_not_truncated(world: World) -> None:
    world.options = replace(world.options, member_limit=3)
    small = world.add_group(12, "Small", ["user0"])
    big = world.add_group(13, "Big", ["user0", "user1", "user2", "user3"])
    result = world.sync()
    assert world.ad_entry(small) is not None
    assert world.ad_entry(big) is None
    [skip] = [s for s in result.plan.skips if s.group_id == big]
    assert skip.reason is SkipReason.OVER_MEMBER_LIMIT
    assert skip.count == 4


def test_delete_threshold_stops_every_delete(world: World) -> None:
    ids = [world.add_group(20 + i, f"G{i}", ["user0"]) for i in range(3)]
    world.sync()
    for gid in ids[:2]:
        world.tenant.hard_delete_group(gid)
    plan = world.plan(SyncPolicy(delete_threshold=1))
    assert plan.deletes == [] and plan.deletes_blocked
    world.sync(SyncPolicy(delete_threshold=1))
    assert all(world.ad_entry(gid) is not None for gid in ids)
    world.sync(SyncPolicy(delete_threshold=1, allow_deletes=True))
    assert [world.ad_entry(gid) is None for gid in ids] == [True, True, False]


def test_second_sync_makes_zero_writes(world: World) -> None:
    for i in range(5):
        world.add_group(30 + i, f"Team {i}", ["user0", "user1", f"user{i}"])
    first = world.sync()
    assert first.applied == {"add": 5}
    second = world.sync()
    assert second.applied == {}
    assert second.ldap_requests == 0
    assert second.plan.operations == []


def test_plan_operations_have_the_expected_kinds(world: World) -> None:
    keep = world.add_group(40, "Keep", ["user0"])
    gone = world.add_group(41, "Gone", ["user0"])
    world.sync()
    world.tenant.update_group(keep, description="changed")
    world.tenant.hard_delete_group(gone)
    world.add_group(42, "New", [])
    kinds = {type(op) for op in world.plan().operations}
    assert kinds == {Add, Modify, Delete}
    assert Rename not in kinds
