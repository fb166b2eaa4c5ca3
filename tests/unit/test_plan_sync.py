"""plan_sync reads Graph and AD at the same time, AD on the calling thread.

The two sides here are in-memory doubles of the ports (no I/O is the point:
only the threading is under test); the real adapters are driven by
tests/integration/test_sync.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import cast

import pytest

from writeback.domain.guard import Ancestry, GuardRules, ParentGroup, Principal, PrincipalKind
from writeback.domain.mapping import MappingOptions
from writeback.domain.model import (
    CloudGroup,
    CloudMember,
    DirectoryGroup,
    MemberKind,
    Skip,
    SkipReason,
)
from writeback.errors import GraphUnavailable, LdapUnavailable
from writeback.ports import CloudSnapshot, CloudSource
from writeback.ports import Directory as DirectoryPort
from writeback.service.reconcile import (
    Plan,
    SyncPolicy,
    _frozen_view,
    _PlanAhead,
    build_plan,
    guard_view,
    plan_sync,
)

OU = "OU=W,DC=corp,DC=example"
WAIT = 10.0


def gid(n: int) -> str:
    return f"00000000-0000-0000-0000-{n:012d}"


class Cloud:
    """A snapshot that only completes once the directory has started reading."""

    def __init__(self, started_ad: threading.Event, *, fail: bool = False) -> None:
        self.started_ad = started_ad
        self.fail = fail
        self.thread: threading.Thread | None = None
        self.started = threading.Event()

    def snapshot(self) -> CloudSnapshot:
        self.thread = threading.current_thread()
        self.started.set()
        assert self.started_ad.wait(WAIT), "the AD read did not run meanwhile"
        if self.fail:
            raise GraphUnavailable("graph down")
        return CloudSnapshot((CloudGroup(gid(1), "G1"),), frozenset())


class Directory:
    """Anchored groups 1 and 2, read only while the snapshot is under way."""

    def __init__(self, cloud: Cloud, started_ad: threading.Event, *, fail: bool = False) -> None:
        self.cloud = cloud
        self.started_ad = started_ad
        self.fail = fail
        self.thread: threading.Thread | None = None

    def schema_attributes(self) -> frozenset[str]:
        return frozenset()

    def resolve_sids(self, sids: object) -> dict[str, object]:
        return {}

    def group_ancestry(self) -> Ancestry:
        return Ancestry()

    def iter_groups(self) -> Iterator[DirectoryGroup]:
        self.thread = threading.current_thread()
        assert self.cloud.started.wait(WAIT), "the Graph read did not run meanwhile"
        self.started_ad.set()
        if self.fail:
            raise LdapUnavailable("dc down")
        for n in (1, 2):
            yield DirectoryGroup(f"CN=Group_{gid(n)},{OU}", gid(n), {"displayName": (f"G{n}",)})


def sides(
    *, cloud_fails: bool = False, ad_fails: bool = False
) -> tuple[Cloud, Directory, CloudSource, DirectoryPort]:
    """The doubles, and the same as the ports (they have only what plan_sync calls)."""
    started_ad = threading.Event()
    cloud = Cloud(started_ad, fail=cloud_fails)
    directory = Directory(cloud, started_ad, fail=ad_fails)
    return cloud, directory, cast(CloudSource, cloud), cast(DirectoryPort, directory)


def test_both_sides_are_read_at_once_and_ad_on_the_calling_thread() -> None:
    cloud, directory, source, port = sides()
    plan = plan_sync(source, port, MappingOptions(target_ou=OU), SyncPolicy())
    assert directory.thread is threading.current_thread()
    assert cloud.thread is not None and cloud.thread is not threading.current_thread()
    assert plan.groups_in_cloud == 1 and plan.groups_in_directory == 2
    assert [op.group_id for op in plan.deletes] == [gid(2)]


def test_a_failed_read_on_either_side_fails_the_plan() -> None:
    *_, source, port = sides(cloud_fails=True)
    with pytest.raises(GraphUnavailable):
        plan_sync(source, port, MappingOptions(target_ou=OU), SyncPolicy())
    *_, source, port = sides(ad_fails=True)
    with pytest.raises(LdapUnavailable):
        plan_sync(source, port, MappingOptions(target_ou=OU), SyncPolicy())


# ------------------------------------------------------------ planning ahead

DOMAIN = "S-1-5-21-1-2-3"
DENIED = f"{DOMAIN}-1999"
PROTECTED = f"CN=Protected,{OU}"


def user(n: int) -> CloudMember:
    return CloudMember(f"u{n}", MemberKind.USER, sid=f"{DOMAIN}-{1000 + n}", synced=True)


def unified(n: int, *members: int) -> CloudGroup:
    return CloudGroup(
        gid(n), f"G{n}", group_types=("Unified",), members=tuple(user(m) for m in members)
    )


def held(n: int, *members: int, sids: tuple[str, ...] = ()) -> DirectoryGroup:
    return DirectoryGroup(
        f"CN=Group_{gid(n)},{OU}",
        gid(n),
        {"displayName": (f"G{n}",)},
        member_sids=frozenset((*(f"{DOMAIN}-{1000 + m}" for m in members), *sids)),
    )


class Lookups:
    """The directory's answers to the guards: users 1-99 exist; group 8 is nested
    in a protected group."""

    def __init__(self) -> None:
        self.resolved: list[str] = []
        self.ancestry_reads = 0

    def resolve_sids(self, sids: list[str]) -> dict[str, Principal]:
        self.resolved.extend(sids)
        return {
            sid: Principal(sid, f"CN={sid},{OU}", PrincipalKind.USER)
            for sid in sids
            if 1000 < int(sid.rsplit("-", 1)[1]) < 1100
        }

    def group_ancestry(self) -> Ancestry:
        self.ancestry_reads += 1
        return Ancestry(
            parents={gid(8): (PROTECTED,)},
            groups={PROTECTED: ParentGroup(PROTECTED, sid=f"{DOMAIN}-512")},
        )


def ahead_world() -> tuple[CloudSnapshot, list[DirectoryGroup]]:
    """Groups of every kind the plan can meet, AD's copies in read order."""
    snapshot = CloudSnapshot(
        (
            unified(1, 1, 2),  # converged members, a new name below
            unified(2, 1, 3),  # one member to add that AD does not hold yet
            unified(3, 4),  # anchor on two objects
            unified(5),  # not in AD: added
            unified(6, *range(1, 8)),  # over the member limit
            unified(8, 1, 2),  # frozen, members held
            replace(  # a member on the deny list, held by AD
                unified(9, 5),
                members=(user(5), CloudMember("ud", MemberKind.USER, sid=DENIED, synced=True)),
            ),
            CloudGroup(gid(10), "security", group_types=(), security_enabled=True),  # not V1's
        ),
        frozenset(),
    )
    current = [
        replace(held(1, 1, 2), attributes={"displayName": ("old",)}),
        held(2, 1),
        held(3, 4),
        held(4, 1),  # orphan
        held(6, 1),
        held(8, 1, 2),
        held(9, 5, sids=(DENIED,)),
        replace(held(3, 4), dn=f"CN=Twin,{OU}"),
    ]
    return snapshot, current


def test_groups_planned_while_ad_is_read_give_the_plan_made_after_it() -> None:
    snapshot, current = ahead_world()
    options = replace(MappingOptions(target_ou=OU), member_limit=5)
    policy = SyncPolicy(guard=GuardRules(deny=frozenset({DENIED})))
    lookups = Lookups()
    port = cast(DirectoryPort, lookups)
    guard = guard_view(snapshot.groups, current, port, options, policy)
    after = build_plan(snapshot, current, options, policy, guard)
    asked_after = sorted(lookups.resolved)

    lookups.resolved.clear()
    ahead = _PlanAhead(options, policy)
    ahead.view = _frozen_view(port, policy)
    ahead.pending.extend(current)
    while ahead.pending:
        ahead.step(snapshot)
    rest = [group for group in snapshot.groups if group.id not in ahead.plans]
    guard = guard_view(rest, current, port, options, policy, base=ahead.view)
    made = build_plan(snapshot, current, options, policy, guard, ahead=ahead.plans)

    assert made == after
    # planned ahead: what needs no lookup, the twin's too (set aside by build_plan)
    assert sorted(ahead.plans) == [gid(1), gid(3), gid(6), gid(8), gid(9)]
    assert sorted(lookups.resolved) == asked_after == [f"{DOMAIN}-1003"]
    assert lookups.ancestry_reads == 2  # once per plan: the ahead plan reads it first
    kinds = {op.group_id: op.kind for op in made.operations}
    assert kinds == {
        gid(1): "modify",  # its name
        gid(2): "modify",  # its new member
        gid(4): "delete",
        gid(5): "add",
        gid(8): "modify",  # its attributes; no member withheld, none to add
        gid(9): "modify",  # the denied SID out
    }
    reasons = {(s.group_id, s.reason) for s in made.skips}
    assert (gid(3), SkipReason.DUPLICATE_ANCHOR) in reasons
    assert (gid(6), SkipReason.OVER_MEMBER_LIMIT) in reasons
    assert (gid(8), SkipReason.GROUP_FROZEN) in reasons
    assert (gid(9), SkipReason.MEMBER_DENIED) in reasons
    assert made.deletes_blocked is None


def test_nothing_is_planned_ahead_when_groups_can_hold_groups() -> None:
    snapshot, current = ahead_world()
    options = replace(MappingOptions(target_ou=OU), security_groups=True)
    policy = SyncPolicy()
    port = cast(DirectoryPort, Lookups())
    guard = guard_view(snapshot.groups, current, port, options, policy)
    after = build_plan(snapshot, current, options, policy, guard)
    bogus = {gid(1): Plan(skips=[Skip(gid(1), SkipReason.OUT_OF_SCOPE, "made up")])}
    assert build_plan(snapshot, current, options, policy, guard, ahead=bogus) == after
