"""Pure planning beyond V1: group types, moves, hidden memberships, nested groups,
out-of-scope objects, and their order in a plan."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from typing import Any

from writeback.config import SoftDeletePolicy
from writeback.domain.mapping import (
    EXCHANGE_ATTRIBUTES,
    MAIL_UNIVERSAL_SECURITY_GROUP,
    REMOTE_GROUP_MAILBOX,
    GroupType,
    MappingOptions,
    OutOfScope,
    Placement,
    desired_group,
)
from writeback.domain.model import (
    Add,
    CloudGroup,
    CloudMember,
    DirectoryGroup,
    MemberKind,
    Modify,
    Rename,
    SkipReason,
)
from writeback.domain.naming import DnFormat
from writeback.domain.nesting import MemberGroup, NestedGroups, creation_order, cycle_edges
from writeback.domain.planner import plan_group
from writeback.domain.rules import parse_rules
from writeback.ports import CloudSnapshot
from writeback.service.reconcile import SyncPolicy, build_plan

OU = "OU=Writeback,DC=corp,DC=example"
EXCHANGE = frozenset(n.lower() for n in EXCHANGE_ATTRIBUTES)
SID = "S-1-5-21-1-2-3-1001"
SID2 = "S-1-5-21-1-2-3-1002"


def gid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def user(n: int) -> CloudMember:
    return CloudMember(f"10000000-0000-4000-8000-{n:012d}", sid=f"S-1-5-21-1-2-3-{n}", synced=True)


def security(n: int, *members: CloudMember, name: str | None = None, **fields: Any) -> CloudGroup:
    return CloudGroup(
        gid(n),
        name or f"SG {n}",
        group_types=(),
        security_enabled=True,
        mail_enabled=False,
        members=members,
        **fields,
    )


def child(n: int) -> CloudMember:
    return CloudMember(gid(n), MemberKind.GROUP)


def test_security_and_mail_enabled_security_groups_map_to_their_types() -> None:
    options = MappingOptions(OU, schema_attributes=EXCHANGE, security_groups=True)
    plain = desired_group(security(1, user(5), mail="stray@contoso.com"), options).attributes
    assert plain["groupType"] == ("-2147483640",)
    assert plain["mail"] == () and plain["proxyAddresses"] == () and plain["mailNickname"] == ()
    assert plain["msExchRecipientTypeDetails"] == ()
    assert plain["info"][0].startswith("Security group ")
    mesg = CloudGroup(
        gid(2),
        "Ops",
        mail="ops@contoso.com",
        mail_nickname="ops",
        proxy_addresses=("SMTP:ops@contoso.com",),
        group_types=(),
        security_enabled=True,
        mail_enabled=True,
    )
    mailed = desired_group(mesg, options).attributes
    assert mailed["groupType"] == ("-2147483640",)
    assert mailed["mail"] == ("ops@contoso.com",)
    assert mailed["msExchRecipientTypeDetails"] == (MAIL_UNIVERSAL_SECURITY_GROUP,)
    assert mailed["msExchRecipientDisplayType"] == ("1073741833",)
    m365 = CloudGroup(gid(3), "Team", mail="team@contoso.com")
    v1 = desired_group(m365, replace(options, group_type=GroupType.SECURITY)).attributes
    assert v1["msExchRecipientTypeDetails"] == (REMOTE_GROUP_MAILBOX,)
    assert v1["mail"] == ("team@contoso.com",)  # V1's security type keeps the mail


def test_hide_from_address_lists_only_when_asked_and_read() -> None:
    group = CloudGroup(gid(1), "Team", mail="t@contoso.com", hide_from_address_lists=True)
    options = MappingOptions(OU, schema_attributes=EXCHANGE)
    assert "msExchHideFromAddressLists" not in desired_group(group, options).attributes
    honoured = replace(options, hide_from_address_lists=True)
    assert desired_group(group, honoured).attributes["msExchHideFromAddressLists"] == ("TRUE",)
    shown = replace(group, hide_from_address_lists=False)
    assert desired_group(shown, honoured).attributes["msExchHideFromAddressLists"] == ()
    unread = replace(group, hide_from_address_lists=None)
    assert "msExchHideFromAddressLists" not in desired_group(unread, honoured).attributes


def test_a_rule_moves_the_object_and_v1_leaves_it_where_an_admin_put_it() -> None:
    options = MappingOptions(OU, security_groups=True)
    group = security(1, user(5))
    in_child = DirectoryGroup(
        f"CN=Group_{gid(1)},OU=Moved by admin,{OU}",
        gid(1),
        desired_group(group, options).attributes,
        frozenset({user(5).sid or ""}),
    )
    assert plan_group(desired_group(group, options), in_child, OU) is None
    placed = Placement("finance", f"OU=Finance,{OU}", DnFormat.OBJECT_ID, GroupType.SECURITY)
    op = plan_group(desired_group(group, options, placed), in_child, OU)
    assert op == Rename(gid(1), in_child.dn, f"CN=Group_{gid(1)}", new_parent=f"OU=Finance,{OU}")
    created = plan_group(desired_group(security(2), options, placed), None, OU)
    assert isinstance(created, Add) and created.dn == f"CN=Group_{gid(2)},OU=Finance,{OU}"


def test_a_hidden_membership_never_loses_members() -> None:
    options = MappingOptions(OU)
    group = CloudGroup(gid(1), "Hidden", visibility="HiddenMembership", members_hidden=True)
    desired = desired_group(group, options)
    assert [s.reason for s in desired.skips] == [SkipReason.HIDDEN_MEMBERSHIP]
    current = DirectoryGroup(
        f"CN=Group_{gid(1)},{OU}",
        gid(1),
        desired.attributes,
        frozenset({SID, SID2}),
        frozenset({f"CN=contact,{OU}"}),
    )
    assert plan_group(desired, current, OU) is None
    seen = replace(group, members=(CloudMember("u", sid="S-1-5-21-1-2-3-77", synced=True),))
    op = plan_group(desired_group(seen, options), current, OU)
    assert isinstance(op, Modify)
    assert op.changes.add_members == ("<SID=S-1-5-21-1-2-3-77>",)
    assert op.changes.remove_members == ()


def test_member_groups_by_sid_by_dn_or_skipped_with_the_reason() -> None:
    options = MappingOptions(OU, security_groups=True)
    nested = NestedGroups(
        {
            gid(2): MemberGroup(gid(2), sid=SID2),
            gid(3): MemberGroup(gid(3), dn=f"CN=Group_{gid(3)},{OU}"),
            gid(4): MemberGroup(gid(4), sid="S-1-5-21-1-2-3-4", universal=False),
            gid(6): MemberGroup(gid(6), sid="S-1-5-21-1-2-3-6"),
        },
        frozenset({(gid(1), gid(6))}),
    )
    parent = security(1, user(9), child(2), child(3), child(4), child(5), child(6))
    desired = desired_group(parent, options, nested=nested)
    assert desired.member_sids == {SID2, user(9).sid}
    assert desired.member_dns == {f"CN=Group_{gid(3)},{OU}"}
    assert desired.nested_sids == {SID2}  # ours, read from its anchored object
    reasons = {s.reason: s.count for s in desired.skips}
    assert reasons == {
        SkipReason.MEMBER_GROUP_NOT_UNIVERSAL: 1,
        SkipReason.MEMBER_GROUP_NOT_WRITTEN: 1,
        SkipReason.MEMBER_GROUP_CYCLE: 1,
    }
    v1 = desired_group(parent, MappingOptions(OU), nested=nested)  # nesting off: as V1
    assert {s.reason for s in v1.skips} == {SkipReason.MEMBER_NOT_A_USER}
    add = plan_group(desired, None, OU)
    assert isinstance(add, Add)
    assert add.members[-1] == f"CN=Group_{gid(3)},{OU}"


def test_children_created_in_the_same_run_come_first_and_cycles_are_cut() -> None:
    rules = parse_rules('[[rule]]\nkinds = ["security"]\n', target_ou=OU)
    options = MappingOptions(OU, rules=rules)
    groups = (
        security(1, user(1), child(2)),  # 1 contains 2 contains 3
        security(2, user(2), child(3)),
        security(3, user(3)),
        security(7, user(7), child(8)),  # 7 and 8 contain each other
        security(8, user(8), child(7)),
    )
    plan = build_plan(CloudSnapshot(groups, frozenset()), [], options, SyncPolicy())
    order = [op.group_id for op in plan.operations]
    assert order.index(gid(3)) < order.index(gid(2)) < order.index(gid(1))
    adds = {op.group_id: op for op in plan.operations if isinstance(op, Add)}
    assert f"CN=Group_{gid(2)},{OU}" in adds[gid(1)].members
    assert not any(m.startswith("CN=") for m in adds[gid(7)].members + adds[gid(8)].members)
    cycles = [s for s in plan.skips if s.reason is SkipReason.MEMBER_GROUP_CYCLE]
    assert sorted(s.group_id for s in cycles) == [gid(7), gid(8)]
    assert plan.rules == dict.fromkeys(adds, "rule 1")


def test_cycle_edges_and_creation_order_helpers() -> None:
    assert cycle_edges({"a": ["a"], "b": ["c"], "c": []}) == {("a", "a")}
    add_child = Add(gid(2), f"CN=c,{OU}", {})
    add_parent = Add(gid(1), f"CN=p,{OU}", {}, (f"cn=C,{OU}",))
    assert creation_order([add_parent, add_child]) == [add_child, add_parent]


def directory_group(group: CloudGroup, options: MappingOptions) -> DirectoryGroup:
    desired = desired_group(group, options)
    return DirectoryGroup(f"CN=Group_{group.id},{OU}", group.id, desired.attributes)


def test_out_of_scope_objects_are_kept_or_deleted_behind_the_threshold() -> None:
    rules = parse_rules(
        textwrap.dedent(
            """
            [[rule]]
            name = "only FIN"
            display_name = "FIN*"
            """
        ),
        target_ou=OU,
    )
    options = MappingOptions(OU, rules=rules)
    kept_groups = (security(1, name="FIN one"), security(2, name="Other"), security(3, name="Else"))
    current = [directory_group(g, MappingOptions(OU, security_groups=True)) for g in kept_groups]
    snapshot = CloudSnapshot(kept_groups, frozenset())
    plan = build_plan(snapshot, current, options, SyncPolicy())
    assert plan.deletes == []
    kept = {s.group_id: s for s in plan.skips if s.reason is SkipReason.OUT_OF_SCOPE}
    assert set(kept) == {gid(2), gid(3)}
    assert "kept as it is" in kept[gid(2)].detail
    deleting = replace(options, out_of_scope=OutOfScope.DELETE)
    held = build_plan(snapshot, current, deleting, SyncPolicy(delete_threshold=1))
    assert held.deletes == [] and held.deletes_blocked is not None
    assert {s.group_id for s in held.skips if s.reason is SkipReason.DELETE_THRESHOLD} == {
        gid(2),
        gid(3),
    }
    allowed = build_plan(
        snapshot,
        current,
        deleting,
        SyncPolicy(delete_threshold=1, allow_deletes=True, soft_delete=SoftDeletePolicy.KEEP),
    )
    assert sorted(d.group_id for d in allowed.deletes) == [gid(2), gid(3)]
