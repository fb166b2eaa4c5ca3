"""The member and nesting guards (issue 12) over what goes beyond V1 (issue 14):
the groups the rules and settings place, nested groups of ours, hidden
memberships. Pure: desired groups, the guards' view and the planner."""

from __future__ import annotations

import textwrap

from writeback.domain.guard import GuardRules, GuardView, Principal, PrincipalKind, guard_desired
from writeback.domain.mapping import MappingOptions, desired_group
from writeback.domain.model import (
    CloudGroup,
    CloudMember,
    DirectoryGroup,
    MemberKind,
    Modify,
    SkipReason,
)
from writeback.domain.nesting import MemberGroup, NestedGroups
from writeback.domain.planner import plan_group, sid_ref
from writeback.domain.rules import parse_rules
from writeback.service.guarding import member_sids_to_check

OU = "OU=Writeback,DC=corp,DC=example"
DOMAIN = "S-1-5-21-11-22-33"
DOMAIN_ADMINS = f"{DOMAIN}-512"
CHILD_SID = f"{DOMAIN}-2001"


def gid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def user(n: int) -> CloudMember:
    return CloudMember(f"10000000-0000-4000-8000-{n:012d}", sid=f"{DOMAIN}-{1000 + n}", synced=True)


def security(n: int, *members: CloudMember, name: str | None = None) -> CloudGroup:
    return CloudGroup(
        gid(n),
        name or f"SG {n}",
        group_types=(),
        security_enabled=True,
        mail_enabled=False,
        members=members,
    )


def principal(member: CloudMember) -> Principal:
    assert member.sid is not None
    return Principal(member.sid, f"CN={member.id},CN=Users,DC=corp,DC=example", PrincipalKind.USER)


def nesting() -> NestedGroups:
    return NestedGroups(
        {
            gid(2): MemberGroup(gid(2), sid=CHILD_SID),
            gid(3): MemberGroup(gid(3), dn=f"CN=Group_{gid(3)},{OU}"),
        },
        frozenset(),
    )


def parent() -> CloudGroup:
    return security(
        1,
        user(1),
        user(2),
        CloudMember(gid(2), MemberKind.GROUP),
        CloudMember(gid(3), MemberKind.GROUP),
    )


def current_parent(*sids: str) -> DirectoryGroup:
    return DirectoryGroup(f"CN=Group_{gid(1)},{OU}", gid(1), {}, member_sids=frozenset(sids))


def test_a_member_group_of_ours_needs_no_lookup_but_the_static_rules_still_hold() -> None:
    options = MappingOptions(OU, security_groups=True)
    desired = desired_group(parent(), options, nested=nesting())
    assert desired.nested_sids == {CHILD_SID}
    view = GuardView(principals={m.sid or "": principal(m) for m in (user(1), user(2))})
    guarded = guard_desired(desired, None, view)
    assert guarded.member_sids == {user(1).sid, user(2).sid, CHILD_SID}
    assert guarded.member_dns == {f"CN=Group_{gid(3)},{OU}"}
    assert not [s for s in guarded.skips if s.member]

    denied = guard_desired(
        desired, None, GuardView(rules=GuardRules(deny=frozenset({CHILD_SID})), principals={})
    )
    assert CHILD_SID not in denied.member_sids
    assert {(s.member, s.reason) for s in denied.skips if s.member} >= {
        (CHILD_SID, SkipReason.MEMBER_DENIED)
    }


def test_a_frozen_parent_gets_no_member_added_by_sid_or_by_dn() -> None:
    options = MappingOptions(OU, security_groups=True)
    desired = desired_group(parent(), options, nested=nesting())
    held = user(1).sid or ""
    view = GuardView(
        principals={m.sid or "": principal(m) for m in (user(1), user(2))},
        frozen={gid(1): ("CN=Backup Operators,CN=Builtin,DC=corp,DC=example (a built-in group)",)},
    )
    current = current_parent(held)
    guarded = guard_desired(desired, current, view)
    assert guarded.member_sids == {held}
    assert guarded.member_dns == frozenset()
    [frozen] = [s for s in guarded.skips if s.reason is SkipReason.GROUP_FROZEN]
    assert frozen.count == 3  # user 2, the child by SID, the child created by DN
    operation = plan_group(guarded, current, OU)  # its attributes are written still
    assert isinstance(operation, Modify)
    assert operation.changes.add_members == () and operation.changes.remove_members == ()


def test_a_hidden_membership_keeps_unknown_members_but_loses_refused_ones() -> None:
    hidden = CloudGroup(gid(1), "Board", members=(user(1),), members_hidden=True)
    desired = desired_group(hidden, MappingOptions(OU))
    assert desired.keep_members
    unknown = f"{DOMAIN}-3000"  # hidden from this app: kept
    current = current_parent(user(1).sid or "", unknown, DOMAIN_ADMINS)
    guarded = guard_desired(desired, current, GuardView())
    operation = plan_group(guarded, current, OU)
    assert isinstance(operation, Modify)
    assert operation.changes.remove_members == (sid_ref(DOMAIN_ADMINS),)
    assert operation.changes.add_members == ()


def test_the_directory_is_asked_about_members_of_every_group_in_scope() -> None:
    m365 = CloudGroup(gid(4), "Team", members=(user(4),))
    groups = [security(1, user(1)), m365]
    assert member_sids_to_check(groups, {}, MappingOptions(OU), GuardRules()) == {user(4).sid}
    both = MappingOptions(OU, security_groups=True)
    assert member_sids_to_check(groups, {}, both, GuardRules()) == {user(1).sid, user(4).sid}
    rules = parse_rules(
        textwrap.dedent(
            """
            [[rule]]
            name = "no security groups"
            kinds = ["security"]
            write = false

            [[rule]]
            name = "the rest"
            kinds = ["microsoft365"]
            """
        ),
        target_ou=OU,
    )
    scoped = MappingOptions(OU, rules=rules)
    assert member_sids_to_check(groups, {}, scoped, GuardRules()) == {user(4).sid}
    held = {gid(4): DirectoryGroup("CN=x," + OU, gid(4), {}, frozenset({user(4).sid or ""}))}
    assert member_sids_to_check(groups, held, scoped, GuardRules()) == set()
