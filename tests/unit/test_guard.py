"""The member and nesting guards' decisions, on plain data (domain/guard.py).

What the directory says comes in as Principal and Ancestry records; the tests
against the real DC (tests/integration/test_guards.py) show the adapters read
them that way.
"""

from __future__ import annotations

import pytest

from writeback.config import load_settings
from writeback.domain.guard import (
    Ancestry,
    GuardRules,
    GuardView,
    ParentGroup,
    Principal,
    PrincipalKind,
    frozen_groups,
    guard_desired,
    member_refusal,
    needs_lookup,
    protected_reason,
    sids_to_resolve,
    static_refusal,
)
from writeback.domain.mapping import MappingOptions, desired_group
from writeback.domain.model import CloudGroup, CloudMember, DirectoryGroup, SkipReason
from writeback.errors import ConfigError

DOMAIN = "S-1-5-21-3623811015-3361044348-30300820"
OU = "OU=Writeback,DC=corp,DC=example"
GID = "3a5c3221-c465-48c0-95b8-e9305786a271"
OTHER = "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d"


def user(rid: int, *, admin_count: bool = False) -> Principal:
    dn = f"CN=u{rid},CN=Users,DC=corp,DC=example"
    return Principal(f"{DOMAIN}-{rid}", dn, PrincipalKind.USER, admin_count=admin_count)


@pytest.mark.parametrize(
    ("sid", "reason", "says"),
    [
        (f"{DOMAIN}-500", SkipReason.MEMBER_PRIVILEGED, "Administrator"),
        (f"{DOMAIN}-502", SkipReason.MEMBER_PRIVILEGED, "krbtgt"),
        (f"{DOMAIN}-512", SkipReason.MEMBER_PRIVILEGED, "Domain Admins"),
        (f"{DOMAIN}-513", SkipReason.MEMBER_PRIVILEGED, "Domain Users"),
        (f"{DOMAIN}-519", SkipReason.MEMBER_PRIVILEGED, "Enterprise Admins"),
        (f"{DOMAIN}-527", SkipReason.MEMBER_PRIVILEGED, "Enterprise Key Admins"),
        (f"{DOMAIN}-999", SkipReason.MEMBER_PRIVILEGED, "reserved RID"),
        ("S-1-5-32-544", SkipReason.MEMBER_PRIVILEGED, "Administrators"),
        ("S-1-5-32-551", SkipReason.MEMBER_PRIVILEGED, "Backup Operators"),
        ("S-1-1-0", SkipReason.MEMBER_PRIVILEGED, "Everyone"),
        ("S-1-5-11", SkipReason.MEMBER_PRIVILEGED, "Authenticated Users"),
        ("S-1-5-18", SkipReason.MEMBER_PRIVILEGED, "Local System"),
        ("S-1-5-21-1-2-1001", SkipReason.MEMBER_PRIVILEGED, "not a domain account"),
        ("S-1-12-1-1-2-3-4", SkipReason.MEMBER_PRIVILEGED, "not a domain account"),
        ("CN=Administrator,CN=Users,DC=corp", SkipReason.MEMBER_PRIVILEGED, "not a SID"),
        ("S-1-5-21-1-2-3-1105)(x=*", SkipReason.MEMBER_PRIVILEGED, "not a SID"),
    ],
)
def test_well_known_principals_are_refused_without_asking_the_directory(
    sid: str, reason: SkipReason, says: str
) -> None:
    refused = static_refusal(sid, GuardRules())
    assert refused is not None
    assert refused[0] is reason and says in refused[1]
    assert needs_lookup([sid], GuardRules()) == []
    assert member_refusal(sid, user(1105), GuardRules()) == refused


def test_the_deny_list_comes_first_and_ignores_case() -> None:
    rules = GuardRules(deny=frozenset({f"{DOMAIN}-1105"}))
    refused = member_refusal("s-1-5-21-3623811015-3361044348-30300820-1105", user(1105), rules)
    assert refused is not None and refused[0] is SkipReason.MEMBER_DENIED
    assert "WRITEBACK_MEMBER_DENY" in refused[1]


def test_only_users_without_admin_count_and_our_own_groups_resolve_to_a_member() -> None:
    sid = f"{DOMAIN}-1105"
    rules = GuardRules()
    assert member_refusal(sid, user(1105), rules) is None
    cases = {
        SkipReason.MEMBER_UNRESOLVED: None,
        SkipReason.MEMBER_PROTECTED: user(1105, admin_count=True),
        SkipReason.MEMBER_NOT_A_USER_OBJECT: Principal(sid, "CN=pc,DC=x", PrincipalKind.COMPUTER),
    }
    for reason, principal in cases.items():
        refused = member_refusal(sid, principal, rules)
        assert refused is not None and refused[0] is reason, (reason, refused)
    not_ours = Principal(sid, f"CN=Helpdesk,{OU}", PrincipalKind.GROUP)
    assert member_refusal(sid, not_ours, rules) == (
        SkipReason.MEMBER_NOT_A_USER_OBJECT,
        f"{sid} is a group, not a user: CN=Helpdesk,{OU}",
    )
    foreign = Principal(sid, "CN=x,CN=ForeignSecurityPrincipals,DC=x", PrincipalKind.FOREIGN)
    assert member_refusal(sid, foreign, rules) is not None
    # The one exception: a group of ours (a nested cloud group), by its SID.
    ours = Principal(sid, f"CN=Group_{OTHER},{OU}", PrincipalKind.GROUP, group_id=OTHER)
    assert member_refusal(sid, ours, rules) is None


def test_protected_groups_are_recognised_by_every_rule() -> None:
    rules = GuardRules(protected=frozenset({f"{DOMAIN}-2001"}))
    protected = {
        "admin count": ParentGroup("CN=a,DC=x", f"{DOMAIN}-3000", admin_count=True),
        "built-in flag": ParentGroup("CN=b,DC=x", "S-1-5-32-555", builtin=True),
        "domain admins": ParentGroup("CN=c,DC=x", f"{DOMAIN}-512"),
        "cert publishers": ParentGroup("CN=d,DC=x", f"{DOMAIN}-517"),
        "dnsadmins": ParentGroup("CN=e,DC=x", f"{DOMAIN}-1101", name="DnsAdmins"),
        "listed": ParentGroup("CN=f,DC=x", f"{DOMAIN}-2001"),
        "unreadable": ParentGroup("CN=g,DC=x", readable=False),
    }
    for what, group in protected.items():
        assert protected_reason(group, rules) is not None, what
    plain = [
        ParentGroup("CN=h,DC=x", f"{DOMAIN}-2002", name="Sales"),
        ParentGroup("CN=i,DC=x", f"{DOMAIN}-513"),  # Domain Users grants nothing
        ParentGroup("CN=j,DC=x", f"{DOMAIN}-525"),  # Protected Users restricts
    ]
    for group in plain:
        assert protected_reason(group, rules) is None, group


def test_nesting_is_followed_upward_through_cycles_and_unreadable_groups() -> None:
    a, b, loop1, loop2 = "CN=A,OU=x,DC=x", "CN=B,OU=x,DC=x", "CN=L1,DC=x", "CN=L2,DC=x"
    bo = "CN=Backup Operators,CN=Builtin,DC=x"
    ancestry = Ancestry(
        parents={GID: (a,), OTHER: (loop1,), "c" * 8: ("CN=Gone,DC=x",)},
        groups={
            a: ParentGroup(a, f"{DOMAIN}-2100", parents=(b,)),
            b: ParentGroup(b, f"{DOMAIN}-2101", parents=(bo,)),
            bo: ParentGroup(bo, "S-1-5-32-551", builtin=True, admin_count=True),
            loop1: ParentGroup(loop1, f"{DOMAIN}-2102", parents=(loop2,)),
            loop2: ParentGroup(loop2, f"{DOMAIN}-2103", parents=(loop1.lower(),)),
        },
    )
    frozen = frozen_groups(ancestry, GuardRules())
    assert set(frozen) == {GID, "c" * 8}
    assert frozen[GID] == (f"{bo} (adminCount=1 (protected by AdminSDHolder))",)
    assert "could not be read" in frozen["c" * 8][0]
    listed = frozen_groups(ancestry, GuardRules(protected=frozenset({f"{DOMAIN}-2103"})))
    assert OTHER in listed and "WRITEBACK_PROTECTED_GROUPS" in listed[OTHER][0]


def cloud(*sids: str) -> CloudGroup:
    members = tuple(CloudMember(f"u{n}", sid=sid, synced=True) for n, sid in enumerate(sids))
    return CloudGroup(GID, "Sales", members=members)


def test_guard_desired_leaves_refused_members_out_one_skip_each() -> None:
    good, admin, ghost = f"{DOMAIN}-1105", f"{DOMAIN}-500", f"{DOMAIN}-1999"
    desired = desired_group(cloud(good, admin, ghost), MappingOptions(target_ou=OU))
    view = GuardView(principals={good: user(1105)})
    guarded = guard_desired(desired, None, view)
    assert guarded.member_sids == {good}
    skips = {(s.member, s.reason) for s in guarded.skips}
    assert skips == {(admin, SkipReason.MEMBER_PRIVILEGED), (ghost, SkipReason.MEMBER_UNRESOLVED)}
    assert guard_desired(desired, None, GuardView()).member_sids == frozenset()


def test_a_frozen_group_gets_no_member_added_but_keeps_its_removals() -> None:
    kept, new, gone = f"{DOMAIN}-1105", f"{DOMAIN}-1106", f"{DOMAIN}-1107"
    desired = desired_group(cloud(kept, new), MappingOptions(target_ou=OU))
    current = DirectoryGroup(f"CN=Group_{GID},{OU}", GID, {}, member_sids=frozenset({kept, gone}))
    view = GuardView(
        principals={kept: user(1105), new: user(1106)},
        frozen={GID: ("CN=Domain Admins,CN=Users,DC=x (a privileged domain group)",)},
    )
    guarded = guard_desired(desired, current, view)
    assert guarded.member_sids == {kept}, "no addition; the member AD holds stays"
    [frozen] = [s for s in guarded.skips if s.reason is SkipReason.GROUP_FROZEN]
    assert frozen.count == 1 and frozen.alert and "Domain Admins" in frozen.detail
    # gone is not desired, so the planner removes it: removals still flow.
    assert gone not in guarded.member_sids
    # A group not created yet cannot be nested anywhere: nothing to freeze.
    assert guard_desired(desired, None, view).member_sids == {kept, new}


def test_the_guard_settings_are_sids_and_named_when_wrong() -> None:
    env = {
        "WRITEBACK_TARGET_OU": OU,
        "WRITEBACK_LDAP_URL": "ldaps://dc.corp.example",
        "WRITEBACK_LDAP_USER": "svc",
        "WRITEBACK_LDAP_PASSWORD": "pw",
        "WRITEBACK_MEMBER_DENY": f"{DOMAIN}-1105, s-1-5-21-1-2-3-4444;\n{DOMAIN}-1106",
        "WRITEBACK_PROTECTED_GROUPS": f"{DOMAIN}-2001",
    }
    settings = load_settings(env)
    assert settings.guard_rules == GuardRules(
        deny=frozenset({f"{DOMAIN}-1105", "S-1-5-21-1-2-3-4444", f"{DOMAIN}-1106"}),
        protected=frozenset({f"{DOMAIN}-2001"}),
    )
    for name in ("WRITEBACK_MEMBER_DENY", "WRITEBACK_PROTECTED_GROUPS"):
        with pytest.raises(ConfigError, match=name):
            load_settings({**env, name: "CN=Domain Admins,CN=Users,DC=corp"})


def test_members_ad_holds_are_checked_by_the_rules_that_need_no_directory() -> None:
    held, new, admin = f"{DOMAIN}-1105", f"{DOMAIN}-1106", f"{DOMAIN}-512"
    desired = desired_group(cloud(held, new, admin), MappingOptions(target_ou=OU))
    current = DirectoryGroup(f"CN=Group_{GID},{OU}", GID, {}, member_sids=frozenset({held, admin}))
    assert sids_to_resolve(desired.member_sids, current.member_sids, GuardRules()) == [new]
    guarded = guard_desired(desired, current, GuardView(principals={new: user(1106)}))
    assert guarded.member_sids == {held, new}, "Domain Admins goes, even though AD holds it"
    denied = GuardView(rules=GuardRules(deny=frozenset({held})), principals={new: user(1106)})
    assert guard_desired(desired, current, denied).member_sids == {new}


def test_refused_members_are_reported_in_sid_order_whether_held_or_new() -> None:
    sids = [f"{DOMAIN}-{rid}" for rid in (519, 500, 512, 1500, 1400)]
    desired = desired_group(cloud(*sids), MappingOptions(target_ou=OU))
    current = DirectoryGroup(f"CN=Group_{GID},{OU}", GID, {}, member_sids=frozenset(sids[:3]))
    for _ in range(2):  # the second time the static rules answer from what they passed
        guarded = guard_desired(desired, current, GuardView())
        members = [s.member for s in guarded.skips]
        assert members == sorted(sids), "held ones by the static rules, new ones unresolved"
        assert guarded.member_sids == frozenset()
