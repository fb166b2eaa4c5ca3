"""The CloudSource contract: GraphCloud (msgraph-sdk over HTTP) against the Graph stand-in
and the in-memory cloud answer the same reads the same way.

Each implementation is a *rig* (:class:`CloudRig`): a tenant to seed (the
stand-in's ``Tenant`` and ``MemoryCloud`` take the same calls) and the port
that reads it. To add an implementation, write a factory and add one line to
:data:`CLOUDS`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import pytest

from tests.support.memory import MemoryCloud
from writeback.adapters.graph import GraphCloud
from writeback.domain.model import CloudGroup, CloudMember, MemberKind
from writeback.errors import DeltaExpired
from writeback.ports import CloudSource, GroupDelta, GroupGone
from writeback_sandbox.graph_standin import GraphStandIn, Tenant


class TenantLike(Protocol):
    """The seeding calls the Graph stand-in's Tenant and MemoryCloud share."""

    def add_user(
        self, user_id: str, *, sid: str | None, synced: bool, display_name: str = ""
    ) -> None: ...

    def delete_user(self, user_id: str) -> None: ...

    def add_device(self, device_id: str) -> None: ...

    def add_contact(self, contact_id: str) -> None: ...

    def add_group(
        self,
        group_id: str,
        *,
        display_name: str,
        description: str | None = None,
        mail: str | None = None,
        mail_nickname: str | None = None,
        proxy_addresses: Sequence[str] = (),
        group_types: Sequence[str] = ("Unified",),
        visibility: str | None = "Private",
        members: Iterable[str] = (),
    ) -> None: ...

    def update_group(self, group_id: str, **fields: Any) -> None: ...

    def add_members(self, group_id: str, member_ids: Iterable[str]) -> None: ...

    def remove_members(self, group_id: str, member_ids: Iterable[str]) -> None: ...

    def soft_delete_group(self, group_id: str) -> None: ...

    def restore_group(self, group_id: str) -> None: ...

    def hard_delete_group(self, group_id: str) -> None: ...

    def expire_delta_tokens(self) -> None: ...


@dataclass(frozen=True)
class CloudRig:
    tenant: TenantLike
    cloud: CloudSource


@contextmanager
def graph_standin(request: pytest.FixtureRequest) -> Iterator[CloudRig]:
    """GraphCloud over real HTTP to the stand-in, with small pages so paging is exercised."""
    tenant = Tenant()
    with GraphStandIn(tenant, page_size=3, member_page_size=2) as standin:
        cloud = GraphCloud(base_url=standin.url, max_attempts=2, max_wait=0.05, backoff=0.01)
        try:
            yield CloudRig(tenant, cloud)
        finally:
            cloud.close()


@contextmanager
def memory_cloud(request: pytest.FixtureRequest) -> Iterator[CloudRig]:
    cloud = MemoryCloud()
    yield CloudRig(cloud, cloud)


#: Every cloud implementation the contract runs against, by test id.
CLOUDS: dict[str, Callable[[pytest.FixtureRequest], AbstractContextManager[CloudRig]]] = {
    "graph-standin": graph_standin,
    "memory": memory_cloud,
}


@pytest.fixture(params=sorted(CLOUDS))
def rig(request: pytest.FixtureRequest) -> Iterator[CloudRig]:
    with CLOUDS[request.param](request) as made:
        yield made


def oid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"contract:{name}"))


@dataclass(frozen=True)
class People:
    synced: list[str]
    cloud_only: str
    nested: str
    device: str
    contact: str


def seed(tenant: TenantLike, *, users: int = 4) -> People:
    """Synced users with SIDs, a cloud-only user, a nested group, a device, a contact."""
    synced = [oid(f"user{i}") for i in range(users)]
    for i, user in enumerate(synced):
        tenant.add_user(user, sid=f"S-1-5-21-7-8-9-{1100 + i}", synced=True, display_name=f"u{i}")
    cloud_only = oid("cloud-only")
    tenant.add_user(cloud_only, sid=None, synced=False)
    nested = oid("nested")
    tenant.add_group(nested, display_name="Nested security group", group_types=())
    device, contact = oid("device"), oid("contact")
    tenant.add_device(device)
    tenant.add_contact(contact)
    return People(synced, cloud_only, nested, device, contact)


def by_id(groups: Iterable[CloudGroup]) -> dict[str, CloudGroup]:
    return {g.id: g for g in groups}


def kinds(members: Iterable[CloudMember]) -> dict[str, MemberKind]:
    return {m.id: m.kind for m in members}


# -- one group -----------------------------------------------------------------------------


def test_get_group_reads_properties_and_user_members_only(rig: CloudRig) -> None:
    people = seed(rig.tenant)
    gid = oid("sales")
    rig.tenant.add_group(
        gid,
        display_name="Sales",
        description="Sales team",
        mail="sales@contoso.com",
        mail_nickname="sales",
        proxy_addresses=["SMTP:sales@contoso.com", "smtp:sales@contoso.onmicrosoft.com"],
        visibility="Public",
        members=[*people.synced, people.cloud_only, people.nested, people.device, people.contact],
    )

    group = rig.cloud.get_group(gid)

    assert group is not None
    assert (group.id, group.display_name, group.description) == (gid, "Sales", "Sales team")
    assert (group.mail, group.mail_nickname, group.visibility) == (
        "sales@contoso.com",
        "sales",
        "Public",
    )
    assert group.proxy_addresses == ("SMTP:sales@contoso.com", "smtp:sales@contoso.onmicrosoft.com")
    assert group.is_unified
    members = {m.id: m for m in group.members}
    assert set(members) == {*people.synced, people.cloud_only}  # the users cast
    assert all(m.kind is MemberKind.USER for m in members.values())
    assert (members[people.synced[2]].sid, members[people.synced[2]].synced) == (
        "S-1-5-21-7-8-9-1102",
        True,
    )
    assert (members[people.cloud_only].sid, members[people.cloud_only].synced) == (None, False)


def test_get_group_answers_none_for_missing_and_recycled_and_reads_other_kinds(
    rig: CloudRig,
) -> None:
    people = seed(rig.tenant)
    recycled, gone = oid("recycled"), oid("gone")
    rig.tenant.add_group(recycled, display_name="Recycled")
    rig.tenant.add_group(gone, display_name="Gone")
    rig.tenant.soft_delete_group(recycled)
    rig.tenant.hard_delete_group(gone)

    assert rig.cloud.get_group(recycled) is None
    assert rig.cloud.get_group(gone) is None
    assert rig.cloud.get_group(oid("never")) is None
    nested = rig.cloud.get_group(people.nested)
    assert nested is not None and not nested.is_unified  # returned: the caller decides
    assert rig.cloud.soft_deleted_group_ids() == {recycled}


def test_get_groups_answers_every_id_with_gone_ones_told_apart(rig: CloudRig) -> None:
    people = seed(rig.tenant)
    live, recycled, gone = oid("live"), oid("recycled"), oid("gone")
    rig.tenant.add_group(live, display_name="Live", members=people.synced[:2])
    rig.tenant.add_group(recycled, display_name="Recycled")
    rig.tenant.add_group(gone, display_name="Gone")
    rig.tenant.soft_delete_group(recycled)
    rig.tenant.hard_delete_group(gone)

    found = rig.cloud.get_groups([live, recycled, gone, live, oid("never")])

    assert set(found) == {live, recycled, gone, oid("never")}
    group = found[live]
    assert isinstance(group, CloudGroup)
    assert {m.id for m in group.members} == set(people.synced[:2])
    assert found[recycled] == GroupGone(soft_deleted=True)
    assert found[gone] == GroupGone(soft_deleted=False)
    assert found[oid("never")] == GroupGone(soft_deleted=False)


def test_resolve_users_finds_the_existing_ones_with_their_sids(rig: CloudRig) -> None:
    people = seed(rig.tenant)
    rig.tenant.delete_user(people.synced[3])
    ids = [*people.synced, people.cloud_only, oid("never"), people.synced[0]]

    found = rig.cloud.resolve_users(ids)

    assert set(found) == {*people.synced[:3], people.cloud_only}
    assert found[people.synced[1]] == CloudMember(
        people.synced[1], MemberKind.USER, sid="S-1-5-21-7-8-9-1101", synced=True
    )
    assert (found[people.cloud_only].sid, found[people.cloud_only].synced) == (None, False)
    assert rig.cloud.resolve_users([]) == {}


# -- everything ------------------------------------------------------------------------------


def test_snapshot_lists_unified_groups_with_every_member_kind(rig: CloudRig) -> None:
    people = seed(rig.tenant)
    team, empty, recycled = oid("team"), oid("empty"), oid("recycled")
    rig.tenant.add_group(
        team,
        display_name="Team",
        mail="team@contoso.com",
        members=[*people.synced, people.cloud_only, people.nested, people.device, people.contact],
    )
    rig.tenant.add_group(empty, display_name="Empty")
    rig.tenant.add_group(recycled, display_name="Recycled", members=people.synced[:1])
    rig.tenant.soft_delete_group(recycled)

    snapshot = rig.cloud.snapshot()

    groups = by_id(snapshot.groups)
    assert set(groups) == {team, empty}  # not the security group, not the recycled one
    assert groups[team].display_name == "Team" and groups[team].mail == "team@contoso.com"
    assert kinds(groups[team].members) == {
        **dict.fromkeys([*people.synced, people.cloud_only], MemberKind.USER),
        people.nested: MemberKind.GROUP,
        people.device: MemberKind.DEVICE,
        people.contact: MemberKind.CONTACT,
    }
    users = {m.id: m for m in groups[team].members if m.kind is MemberKind.USER}
    assert (users[people.synced[0]].sid, users[people.synced[0]].synced) == (
        "S-1-5-21-7-8-9-1100",
        True,
    )
    assert (users[people.cloud_only].sid, users[people.cloud_only].synced) == (None, False)
    assert groups[empty].members == ()
    assert snapshot.soft_deleted == {recycled}
    assert snapshot.groups_delta_link


def test_group_changes_since_a_snapshot_and_an_expired_link(rig: CloudRig) -> None:
    people = seed(rig.tenant)
    ids = {name: oid(name) for name in ("renamed", "grown", "quiet", "recycled", "deleted")}
    for name, gid in ids.items():
        rig.tenant.add_group(gid, display_name=name, members=people.synced[:1])
    link = rig.cloud.snapshot().groups_delta_link
    assert link is not None

    rig.tenant.update_group(ids["renamed"], display_name="Renamed")
    rig.tenant.add_members(ids["grown"], people.synced[1:3])
    rig.tenant.soft_delete_group(ids["recycled"])
    rig.tenant.hard_delete_group(ids["deleted"])
    changes = rig.cloud.group_changes(link)

    assert set(changes.changed) == {ids["renamed"], ids["grown"]}
    assert changes.soft_deleted == {ids["recycled"]}
    assert changes.hard_deleted == {ids["deleted"]}
    assert changes.delta_link is not None
    quiet = rig.cloud.group_changes(changes.delta_link)
    assert (quiet.changed, quiet.soft_deleted, quiet.hard_deleted) == ((), frozenset(), frozenset())

    rig.tenant.restore_group(ids["recycled"])
    assert quiet.delta_link is not None
    assert rig.cloud.group_changes(quiet.delta_link).changed == (ids["recycled"],)

    rig.tenant.expire_delta_tokens()
    with pytest.raises(DeltaExpired):
        rig.cloud.group_changes(link)


# -- member deltas -----------------------------------------------------------------------------


def delta(rig: CloudRig, gid: str, link: str | None) -> GroupDelta:
    assert link is not None
    found = rig.cloud.group_delta(gid, link)
    assert found is not None
    return found


def test_a_group_delta_reports_member_changes_since_its_link(rig: CloudRig) -> None:
    people = seed(rig.tenant)
    gid = oid("team")
    rig.tenant.add_group(gid, display_name="Team", members=people.synced[:2])
    link = rig.cloud.group_delta_link(gid)

    nothing = delta(rig, gid, link)
    assert (nothing.added, nothing.removed) == ((), ())
    assert nothing.group is not None and nothing.group.display_name == "Team"

    rig.tenant.add_members(gid, [people.synced[2], people.device])
    rig.tenant.remove_members(gid, [people.synced[0]])
    rig.tenant.update_group(gid, display_name="Team, renamed")
    changed = delta(rig, gid, link)

    assert kinds(changed.added) == {
        people.synced[2]: MemberKind.USER,
        people.device: MemberKind.DEVICE,
    }
    assert all(m.sid is None for m in changed.added)  # SIDs are resolved separately
    assert kinds(changed.removed) == {people.synced[0]: MemberKind.USER}
    assert changed.group is not None
    assert changed.group.display_name == "Team, renamed"
    assert changed.group.members == ()
    after = delta(rig, gid, changed.delta_link)
    assert (after.added, after.removed) == ((), ())


def test_a_group_delta_of_a_recycled_group_or_an_expired_link(rig: CloudRig) -> None:
    people = seed(rig.tenant)
    gid, other = oid("team"), oid("other")
    rig.tenant.add_group(gid, display_name="Team", members=people.synced[:2])
    rig.tenant.add_group(other, display_name="Other", members=people.synced[:1])
    link, other_link = rig.cloud.group_delta_link(gid), rig.cloud.group_delta_link(other)
    assert link is not None and other_link is not None

    rig.tenant.soft_delete_group(gid)
    rig.tenant.add_members(other, people.synced[1:2])
    assert delta(rig, gid, link).group is None
    both = rig.cloud.group_deltas({gid: link, other: other_link})
    assert set(both) == {gid, other}
    other_delta = both[other]
    assert isinstance(other_delta, GroupDelta)
    assert [m.id for m in other_delta.added] == people.synced[1:2]

    rig.tenant.expire_delta_tokens()
    assert rig.cloud.group_delta(other, other_link) is None  # read it in full instead
