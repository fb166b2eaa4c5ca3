"""The Directory contract: LdapDirectory on a real Samba DC and the in-memory directory
keep the same rules (round trips, the scope guard, what a read finds, what it costs).

Each implementation is a *rig* (:class:`DirectoryRig`): the adapter scoped to a
fresh target OU, an OU beside it, users, and the admin's hand and eyes (objects
made and changed outside writeback, state read back independently of the
adapter under test). To add an implementation, write a rig and add one line
to :data:`DIRECTORIES`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import pytest
from ldap3 import BASE, MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE

from tests.support.memory import Entry, MemoryForest
from writeback.adapters.ldap_values import parse_extended_dn, sid_from_bytes
from writeback.domain.guard import GuardRules, PrincipalKind, frozen_groups
from writeback.domain.model import (
    Add,
    Changes,
    Delete,
    DirectoryGroup,
    Modify,
    Operation,
    Rename,
    anchor_for,
)
from writeback.domain.naming import dn_for, dn_key, sam_account_name_for
from writeback.errors import DirectoryRefused, DuplicateAnchor, PermanentError, PolicyRefused
from writeback.ports import Directory

if TYPE_CHECKING:
    from writeback_sandbox.samba import SambaDC

#: Extended-DN control asking for the string form: <GUID=...>;<SID=S-...>;CN=...
EXTENDED_DN = ("1.2.840.113556.1.4.529", False, b"\x30\x03\x02\x01\x01")


class DirectoryRig(Protocol):
    """A directory under test: ``directory`` is scoped to ``target``."""

    directory: Directory
    target: str
    #: An OU beside the target (outside the scope).
    outside: str

    def open(self, *, chunk_size: int = 5000) -> Directory:
        """Another adapter on ``target`` (a new connection: it has read nothing)."""
        ...

    def users(self, count: int) -> list[str]:
        """SIDs of ``count`` new users."""
        ...

    def contact(self, name: str) -> str:
        """The DN of a new contact (an object without a SID)."""
        ...

    def admin_group(self, dn: str, anchor: str | None = None) -> None: ...

    def admin_set(self, dn: str, attribute: str, values: Sequence[str]) -> None: ...

    def admin_add_member(self, dn: str, member_dn: str) -> None: ...

    def admin_remove_member(self, dn: str, member_dn: str) -> None: ...

    def admin_delete(self, dn: str) -> None: ...

    def read(self, dn: str) -> Entry | None:
        """The object at ``dn`` read independently of the adapter under test."""
        ...

    def well_known(self, name: str) -> str:
        """The DN of one of the objects every domain holds (Administrator, Domain Admins...)."""
        ...

    def sid_of(self, dn: str) -> str: ...

    def computer(self, name: str) -> str:
        """The SID of a new computer object."""
        ...


class SambaRig:
    """LdapDirectory on the session's Samba DC, in an OU of this test's own."""

    def __init__(self, dc: SambaDC, root: str) -> None:
        self.dc = dc
        self.target = dc.create_ou("Target", root)
        self.outside = dc.create_ou("Outside", root)
        self._people = dc.create_ou("People", root)
        self._token = uuid.uuid4().hex[:8]
        self._count = 0
        self._opened: list[Directory] = []
        self.directory = self.open()

    def open(self, *, chunk_size: int = 5000) -> Directory:
        directory = self.dc.directory(self.target, chunk_size=chunk_size)
        self._opened.append(directory)
        return directory

    def close(self) -> None:
        for directory in self._opened:
            directory.close()

    def users(self, count: int) -> list[str]:
        names = [f"u{self._token}{self._count + i}" for i in range(count)]
        self._count += count
        sids = self.dc.create_users(self._people, names)
        return [sids[name] for name in names]

    def contact(self, name: str) -> str:
        dn = dn_for(name, self._people)
        self._modify(lambda c: c.add(dn, ["top", "contact"], {}))
        return dn

    def admin_group(self, dn: str, anchor: str | None = None) -> None:
        attributes: dict[str, Any] = {"sAMAccountName": "g" + uuid.uuid4().hex[:18]}
        if anchor is not None:
            attributes["adminDescription"] = anchor
        self._modify(lambda c: c.add(dn, ["top", "group"], attributes))

    def admin_set(self, dn: str, attribute: str, values: Sequence[str]) -> None:
        change = (MODIFY_REPLACE, list(values)) if values else (MODIFY_DELETE, [])
        self._modify(lambda c: c.modify(dn, {attribute: [change]}))

    def admin_add_member(self, dn: str, member_dn: str) -> None:
        self._modify(lambda c: c.modify(dn, {"member": [(MODIFY_ADD, [member_dn])]}))

    def admin_remove_member(self, dn: str, member_dn: str) -> None:
        self._modify(lambda c: c.modify(dn, {"member": [(MODIFY_DELETE, [member_dn])]}))

    def admin_delete(self, dn: str) -> None:
        self._modify(lambda c: c.delete(dn))

    def well_known(self, name: str) -> str:
        container = "Builtin" if name in ("Administrators", "Backup Operators") else "Users"
        return f"CN={name},CN={container},{self.dc.base_dn}"

    def sid_of(self, dn: str) -> str:
        entry = self.read(dn)
        assert entry is not None and entry.object_sid is not None
        return entry.object_sid

    def computer(self, name: str) -> str:
        dn = dn_for(name, self._people)
        classes = ["top", "person", "organizationalPerson", "user", "computer"]
        self._modify(lambda c: c.add(dn, classes, {"sAMAccountName": f"c{self._token}{name}$"}))
        return self.sid_of(dn)

    def _modify(self, change: Callable[[Any], bool]) -> None:
        conn = self.dc.connection(raise_exceptions=False)
        try:
            assert change(conn), conn.result
        finally:
            conn.unbind()

    def read(self, dn: str) -> Entry | None:
        conn = self.dc.connection(raise_exceptions=False)
        try:
            conn.search(
                dn,
                "(objectClass=*)",
                BASE,
                attributes=["*", "objectSid"],
                controls=[EXTENDED_DN],
            )
            if conn.result["result"] == 32:
                return None
            assert conn.result["result"] == 0, conn.result
            raw = conn.response[0]["raw_attributes"]
        finally:
            conn.unbind()
        attributes: dict[str, tuple[str, ...]] = {}
        sids: set[str] = set()
        others: set[str] = set()
        object_sid = None
        for name, values in raw.items():
            lowered = name.lower()
            if lowered == "objectsid" and values:
                object_sid = sid_from_bytes(values[0])
            elif lowered == "member":
                for value in values:
                    ref = parse_extended_dn(value.decode())
                    if ref.sid:
                        sids.add(ref.sid)
                    else:
                        others.add(ref.dn)
            elif values:
                attributes[lowered] = tuple(v.decode("utf-8", "replace") for v in values)
        return Entry(dn, attributes, frozenset(sids), frozenset(others), object_sid)


class MemoryRig:
    """The in-memory directory over a forest of its own."""

    def __init__(self) -> None:
        self.forest = MemoryForest("DC=contoso,DC=test")
        root = self.forest.add_ou(f"t-{uuid.uuid4().hex[:8]}")
        self.target = self.forest.add_ou("Target", root)
        self.outside = self.forest.add_ou("Outside", root)
        self._people = self.forest.add_ou("People", root)
        self._count = 0
        self.directory = self.open()

    def open(self, *, chunk_size: int = 5000) -> Directory:
        return self.forest.directory(self.target, chunk_size=chunk_size)

    def users(self, count: int) -> list[str]:
        names = [f"user{self._count + i}" for i in range(count)]
        self._count += count
        return self.forest.add_users(names, self._people)

    def contact(self, name: str) -> str:
        return self.forest.add_contact(name, self._people)

    def admin_group(self, dn: str, anchor: str | None = None) -> None:
        self.forest.admin_add_group(dn, anchor=anchor)

    def admin_set(self, dn: str, attribute: str, values: Sequence[str]) -> None:
        self.forest.admin_set(dn, attribute, values)

    def admin_add_member(self, dn: str, member_dn: str) -> None:
        self.forest.admin_members(dn, add_dns=[member_dn])

    def admin_remove_member(self, dn: str, member_dn: str) -> None:
        self.forest.admin_members(dn, remove=[self.forest.sid_of(member_dn)])

    def admin_delete(self, dn: str) -> None:
        self.forest.admin_delete(dn)

    def read(self, dn: str) -> Entry | None:
        return self.forest.entry(dn)

    def well_known(self, name: str) -> str:
        return self.forest.well_known_dn(name)

    def sid_of(self, dn: str) -> str:
        return self.forest.sid_of(dn)

    def computer(self, name: str) -> str:
        return self.forest.admin_add_computer(name, self._people)


@contextmanager
def samba_directory(request: pytest.FixtureRequest) -> Iterator[DirectoryRig]:
    dc: SambaDC = request.getfixturevalue("samba_dc")
    make_ou: Callable[[SambaDC], str] = request.getfixturevalue("make_ou")
    rig = SambaRig(dc, make_ou(dc))
    try:
        yield rig
    finally:
        rig.close()


@contextmanager
def memory_directory(request: pytest.FixtureRequest) -> Iterator[DirectoryRig]:
    yield MemoryRig()


#: Every directory implementation the contract runs against, by test id.
DIRECTORIES: dict[str, Callable[[pytest.FixtureRequest], AbstractContextManager[DirectoryRig]]] = {
    "samba": samba_directory,
    "memory": memory_directory,
}
_MARKS = {"samba": [pytest.mark.samba]}


@pytest.fixture(
    params=[pytest.param(name, marks=_MARKS.get(name, [])) for name in sorted(DIRECTORIES)]
)
def rig(request: pytest.FixtureRequest) -> Iterator[DirectoryRig]:
    with DIRECTORIES[request.param](request) as made:
        yield made


# -- helpers -----------------------------------------------------------------------------


def new_id() -> str:
    return str(uuid.uuid4())


def refs(sids: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"<SID={sid}>" for sid in sids)


def add_op(gid: str, dn: str, members: Sequence[str] = (), **attributes: tuple[str, ...]) -> Add:
    values: dict[str, tuple[str, ...]] = {
        "objectClass": ("top", "group"),
        "sAMAccountName": (sam_account_name_for(gid),),
        "adminDescription": (anchor_for(gid),),
        "groupType": ("8",),
        "displayName": (f"Group {gid[:8]}",),
        "description": (),
    }
    values.update(attributes)
    return Add(gid, dn, values, refs(members))


def added(rig: DirectoryRig, name: str, members: Sequence[str] = ()) -> tuple[str, str]:
    """A group writeback created and has read back: (group id, dn)."""
    gid = new_id()
    dn = dn_for(name, rig.target)
    assert rig.directory.apply(add_op(gid, dn, members)) == 1
    assert rig.directory.find_group(gid) is not None
    return gid, dn


def found(rig: DirectoryRig, gid: str) -> DirectoryGroup:
    group = rig.directory.find_group(gid)
    assert group is not None
    return group


def same_dn(a: str, b: str) -> bool:
    return dn_key(a) == dn_key(b)


# -- round trips -------------------------------------------------------------------------


def test_an_add_reads_back_with_its_attributes_members_and_sid(rig: DirectoryRig) -> None:
    sids = rig.users(3)
    gid = new_id()
    dn = dn_for(f"Group_{gid}", rig.target)
    extra = {
        "mail": ("sales@contoso.com",),
        "proxyAddresses": ("SMTP:sales@contoso.com", "smtp:sales@contoso.onmicrosoft.com"),
    }
    assert rig.directory.apply(add_op(gid, dn, sids[:2], **extra)) == 1

    entry = rig.read(dn)
    assert entry is not None
    assert entry.get("adminDescription") == (anchor_for(gid),)
    assert entry.get("groupType") == ("8",)
    assert entry.get("description") == (), "empty values are left out"
    assert entry.member_sids == set(sids[:2])
    group = found(rig, gid)
    assert same_dn(group.dn, dn)
    assert group.group_id == gid
    assert group.member_sids == set(sids[:2])
    assert group.other_members == frozenset()
    assert group.attributes["displayName"] == (f"Group {gid[:8]}",)
    assert sorted(group.attributes["proxyAddresses"]) == sorted(extra["proxyAddresses"])
    assert "description" not in group.attributes
    assert group.object_sid is not None and group.object_sid == entry.object_sid
    assert rig.directory.schema_attributes() == frozenset()  # a plain forest


def test_a_modify_replaces_clears_and_changes_members_in_one_request(rig: DirectoryRig) -> None:
    sids = rig.users(4)
    gid, dn = added(rig, "Team", sids[:2])
    change = Changes(
        replace={"description": ("new",), "displayName": ()},
        add_members=refs(sids[2:]),
        remove_members=refs(sids[:1]),
    )
    assert rig.directory.apply(Modify(gid, dn, change)) == 1
    entry = rig.read(dn)
    assert entry is not None
    assert entry.member_sids == set(sids[1:])
    assert entry.get("description") == ("new",)
    assert entry.get("displayName") == ()
    assert entry.get("adminDescription") == (anchor_for(gid),)
    assert rig.directory.apply(Modify(gid, dn, Changes())) == 0


def test_member_values_already_there_cost_a_read_back_and_converge(rig: DirectoryRig) -> None:
    sids = rig.users(4)
    gid, dn = added(rig, "Raced", sids[:2])
    # another writer already added sids[1]; sids[3] was never a member
    change = Changes(
        replace={"description": ("after the race",)},
        add_members=refs(sids[1:3]),
        remove_members=refs([sids[0], sids[3]]),
    )
    assert rig.directory.apply(Modify(gid, dn, change)) == 3  # refused, read back, retried
    entry = rig.read(dn)
    assert entry is not None
    assert entry.member_sids == {sids[1], sids[2]}
    assert entry.get("description") == ("after the race",)
    rig.directory.apply(Modify(gid, dn, change))  # the same change again is no error
    assert (rig.read(dn) or entry).member_sids == {sids[1], sids[2]}


def test_a_rename_moves_the_anchor_with_it(rig: DirectoryRig) -> None:
    gid, dn = added(rig, "Before")
    rename = Rename(gid, dn, "CN=After", Changes(replace={"description": ("renamed",)}))
    assert rig.directory.apply(rename) == 2
    new_dn = dn_for("After", rig.target)
    assert rig.read(dn) is None
    entry = rig.read(new_dn)
    assert entry is not None and entry.get("description") == ("renamed",)
    group = found(rig, gid)
    assert same_dn(group.dn, new_dn)
    assert rig.directory.apply(Rename(gid, group.dn, "CN=Again")) == 2
    assert rig.read(dn_for("Again", rig.target)) is not None


def test_a_delete_takes_two_requests_and_a_gone_object_counts_as_deleted(
    rig: DirectoryRig,
) -> None:
    gid, dn = added(rig, "Doomed")
    assert rig.directory.apply(Delete(gid, dn)) == 2
    assert rig.read(dn) is None
    assert rig.directory.find_group(gid) is None

    other, other_dn = added(rig, "Deleted by hand meanwhile")
    rig.admin_delete(other_dn)
    assert rig.directory.apply(Delete(other, other_dn)) == 1  # the guard found nothing
    with pytest.raises(PolicyRefused):  # and it is forgotten: never read again
        rig.directory.apply(Modify(other, other_dn, Changes(replace={"info": ("x",)})))


def test_member_values_go_in_chunks_of_chunk_size(rig: DirectoryRig) -> None:
    sids = rig.users(9)
    directory = rig.open(chunk_size=2)
    gid = new_id()
    dn = dn_for("Chunked", rig.target)
    assert directory.apply(add_op(gid, dn, sids[:5])) == 3  # the add, then two modifies
    assert directory.find_group(gid) is not None
    change = Changes(add_members=refs(sids[5:]), remove_members=refs(sids[:1]))
    assert directory.apply(Modify(gid, dn, change)) == 3  # five values, two a modify
    entry = rig.read(dn)
    assert entry is not None and entry.member_sids == set(sids[1:])


def test_members_without_a_sid_are_other_members_and_can_be_removed(rig: DirectoryRig) -> None:
    sids = rig.users(1)
    gid, dn = added(rig, "With contact", sids)
    contact = rig.contact("Contact, by hand")
    rig.admin_add_member(dn, contact)

    group = found(rig, gid)
    assert group.member_sids == set(sids)
    assert [dn_key(m) for m in group.other_members] == [dn_key(contact)]
    assert (
        rig.directory.apply(Modify(gid, dn, Changes(remove_members=tuple(group.other_members))))
        == 1
    )
    after = found(rig, gid)
    assert after.other_members == frozenset()
    assert after.member_sids == set(sids)


# -- reads ---------------------------------------------------------------------------------


def test_find_group_sees_only_anchored_groups_inside_the_target(rig: DirectoryRig) -> None:
    gid = new_id()
    rig.admin_group(dn_for(f"Group_{gid}", rig.target))  # the same name, no anchor
    rig.admin_group(dn_for(f"Group_{gid}", rig.outside), anchor_for(gid))  # outside
    rig.admin_group(dn_for("lookalike", rig.target), anchor_for(gid) + "0")  # not an id
    rig.admin_group(dn_for("not a guid", rig.target), "Group_Finance")
    other = new_id()
    rig.admin_group(dn_for("other", rig.target), anchor_for(other))

    assert rig.directory.find_group(gid) is None
    assert rig.directory.find_group("*") is None, "the id is escaped, never a wildcard"
    assert [g.group_id for g in rig.directory.iter_groups()] == [other]


def test_find_group_refuses_a_duplicated_anchor(rig: DirectoryRig) -> None:
    gid = new_id()
    rig.admin_group(dn_for("First", rig.target), anchor_for(gid))
    rig.admin_group(dn_for("Second", rig.target), anchor_for(gid))
    with pytest.raises(DirectoryRefused) as refused:
        rig.directory.find_group(gid)
    assert "CN=First" in str(refused.value) and "CN=Second" in str(refused.value)


def test_find_groups_answers_hits_only_and_members_false_leaves_members_out(
    rig: DirectoryRig,
) -> None:
    sids = rig.users(2)
    first, _ = added(rig, "First", sids)
    second, _ = added(rig, "Second", sids[:1])
    missing = new_id()
    reader = rig.open()

    full = reader.find_groups([first, missing, second, first])
    assert set(full) == {first, second}
    assert full[first].member_sids == set(sids)
    bare = reader.find_groups([first, missing], members=False)
    assert set(bare) == {first}
    assert bare[first].member_sids == frozenset()
    assert bare[first].other_members == frozenset()
    assert bare[first].attributes == full[first].attributes
    assert bare[first].object_sid == full[first].object_sid


def test_iter_groups_lists_every_anchored_group_with_members(rig: DirectoryRig) -> None:
    sids = rig.users(3)
    made = {added(rig, f"G{i:02d}", sids[: i % 4])[0]: sids[: i % 4] for i in range(6)}
    rig.admin_group(dn_for("Not ours", rig.target))
    groups = {g.group_id: g for g in rig.open().iter_groups()}
    assert set(groups) == set(made)
    for gid, members in made.items():
        assert groups[gid].member_sids == set(members)


def test_what_was_read_may_be_written_by_that_reader_only(rig: DirectoryRig) -> None:
    gid, dn = added(rig, "Read by one")
    other = rig.open()
    change = Modify(gid, dn, Changes(replace={"description": ("x",)}))
    with pytest.raises(PolicyRefused):
        other.apply(change)  # this connection never read it
    groups = {g.group_id: g for g in other.iter_groups()}
    assert other.apply(Modify(gid, groups[gid].dn, change.changes)) == 1


# -- the scope guard ---------------------------------------------------------------------


def test_nothing_outside_the_target_ou_is_written(rig: DirectoryRig) -> None:
    gid = new_id()
    victim = dn_for(f"Group_{gid}", rig.outside)
    rig.admin_group(victim, anchor_for(gid))
    before = rig.read(victim)
    operations: list[Operation] = [
        Modify(gid, victim, Changes(replace={"description": ("pwned",)})),
        Delete(gid, victim),
        Rename(gid, victim, "CN=renamed"),
        Delete(gid, rig.target),
        add_op(gid, dn_for("x", rig.outside)),
        add_op(gid, rig.target),
    ]
    for operation in operations:
        with pytest.raises(PolicyRefused):
            rig.directory.apply(operation)
    assert rig.read(victim) == before
    assert rig.read(rig.target) is not None
    assert rig.read(dn_for("x", rig.outside)) is None


def test_nothing_without_our_anchor_or_never_read_is_written(rig: DirectoryRig) -> None:
    gid = new_id()
    plain = dn_for(f"Group_{gid}", rig.target)
    rig.admin_group(plain)
    never_read = dn_for("Anchored but never read", rig.target)
    rig.admin_group(never_read, anchor_for(gid))
    before = rig.read(plain), rig.read(never_read)
    for dn in (plain, never_read):
        for operation in (
            Modify(gid, dn, Changes(replace={"description": ("pwned",)})),
            Delete(gid, dn),
            Rename(gid, dn, "CN=renamed"),
        ):
            with pytest.raises(PolicyRefused):
                rig.directory.apply(operation)
    assert (rig.read(plain), rig.read(never_read)) == before


def test_another_groups_object_and_our_anchor_are_never_changed(rig: DirectoryRig) -> None:
    mine, theirs = new_id(), new_id()
    dn = dn_for("Theirs", rig.target)
    rig.admin_group(dn, anchor_for(theirs))
    assert rig.directory.find_group(theirs) is not None
    before = rig.read(dn)
    for operation in (
        Modify(mine, dn, Changes(replace={"description": ("pwned",)})),
        Modify(theirs, dn, Changes(replace={"adminDescription": (anchor_for(mine),)})),
        Modify(theirs, dn, Changes(replace={"adminDescription": ()})),
        Modify(theirs, dn, Changes(replace={"member": ()})),
        Delete(mine, dn),
        Rename(mine, dn, "CN=renamed"),
    ):
        with pytest.raises(PolicyRefused):
            rig.directory.apply(operation)
    assert rig.read(dn) == before


def test_an_add_must_carry_our_anchor_and_be_a_group(rig: DirectoryRig) -> None:
    gid = new_id()
    dn = dn_for("New", rig.target)
    good = dict(add_op(gid, dn).attributes)
    bad = [
        {k: v for k, v in good.items() if k != "adminDescription"},
        {**good, "adminDescription": (anchor_for(new_id()),)},
        {**good, "adminDescription": (anchor_for(gid), "second")},
        {**good, "objectClass": ("top", "contact")},
        {**good, "member": ("<SID=S-1-5-32-544>",)},
    ]
    for attributes in bad:
        with pytest.raises(PolicyRefused):
            rig.directory.apply(Add(gid, dn, attributes))
    assert rig.read(dn) is None


def test_a_rename_stays_in_its_parent_and_names_one_cn(rig: DirectoryRig) -> None:
    gid, dn = added(rig, "Stay")
    for new_rdn in (f"CN=Away,{rig.outside}", "OU=Stay", "CN=a+sn=b", "CN="):
        with pytest.raises(PolicyRefused):
            rig.directory.apply(Rename(gid, dn, new_rdn))
    assert rig.read(dn) is not None


def test_the_anchor_is_checked_again_at_write_time(rig: DirectoryRig) -> None:
    """Read with our anchor, then re-purposed by an admin: the write is refused whole."""
    sids = rig.users(2)
    gid, dn = added(rig, "Ours, then not", sids[:1])
    rig.admin_set(dn, "adminDescription", ["Owned by someone else"])
    before = rig.read(dn)
    for operation in (
        Modify(gid, dn, Changes(replace={"description": ("pwned",)}, add_members=refs(sids[1:]))),
        Delete(gid, dn),
        Rename(gid, dn, "CN=renamed"),
    ):
        with pytest.raises(PolicyRefused):
            rig.directory.apply(operation)
    assert rig.read(dn) == before
    rig.admin_set(dn, "adminDescription", [])
    with pytest.raises(PolicyRefused):
        rig.directory.apply(Delete(gid, dn))
    assert rig.read(dn) is not None


# -- what the DC refuses -------------------------------------------------------------------


def test_what_the_dc_refuses_is_a_permanent_directory_refusal(rig: DirectoryRig) -> None:
    gid, dn = added(rig, "Refused")
    taken = dn_for("Taken by hand", rig.target)
    rig.admin_group(taken)
    nobody = re.sub(r"-\d+$", "-999999", rig.users(1)[0])  # the domain's, no object's
    operations: tuple[Operation, ...] = (
        Modify(gid, dn, Changes(replace={"notAnAttribute": ("x",)})),
        Modify(gid, dn, Changes(replace={"mailNickname": ("sales",)})),  # a plain forest
        add_op(gid, dn),  # the DN exists
        add_op(new_id(), taken),  # the DN is taken by an object that is not ours
        add_op(new_id(), dn_for("Other", rig.target), sAMAccountName=(sam_account_name_for(gid),)),
        Modify(gid, dn, Changes(add_members=refs([nobody]))),
    )
    for operation in operations:
        with pytest.raises(DirectoryRefused) as refused:
            rig.directory.apply(operation)
        assert isinstance(refused.value, PermanentError)
        assert not isinstance(refused.value, PolicyRefused)
    assert rig.read(dn_for("Other", rig.target)) is None
    entry = rig.read(dn)
    assert entry is not None and entry.member_sids == frozenset()
    assert entry.get("mailNickname") == ()
    assert rig.directory.find_group(gid) is not None  # the adapter survives a refusal
    with pytest.raises(DirectoryRefused):
        rig.directory.apply(add_op(new_id(), dn_for("With nobody", rig.target), [nobody]))
    assert rig.read(dn_for("With nobody", rig.target)) is None


def test_a_sid_of_another_domain_is_taken_as_a_foreign_principal(rig: DirectoryRig) -> None:
    gid, dn = added(rig, "With a foreigner")
    foreign = "S-1-5-21-1-2-3-4444"
    assert rig.directory.apply(Modify(gid, dn, Changes(add_members=refs([foreign])))) == 1
    assert found(rig, gid).member_sids == {foreign}


# -- what the guards read ----------------------------------------------------------------


def test_resolve_sids_says_what_each_sid_is_in_bulk(rig: DirectoryRig) -> None:
    plain, protected = rig.users(2)
    rig.admin_set(_user_dn(rig, protected), "adminCount", ["1"])
    machine = rig.computer("Desk1")
    gid, dn = added(rig, "Ours")
    ours = rig.sid_of(dn)
    theirs_dn = dn_for("Theirs", rig.outside)
    rig.admin_group(theirs_dn)
    theirs = rig.sid_of(theirs_dn)
    administrator = rig.sid_of(rig.well_known("Administrator"))
    missing = administrator.rsplit("-", 1)[0] + "-987654"
    asked = [plain, protected.lower(), machine, ours, theirs, administrator, missing, "junk"]

    found = rig.open().resolve_sids(asked)

    assert set(found) == {plain, protected, machine, ours, theirs, administrator}
    assert (found[plain].kind, found[plain].admin_count) == (PrincipalKind.USER, False)
    assert (found[protected].kind, found[protected].admin_count) == (PrincipalKind.USER, True)
    assert found[machine].kind is PrincipalKind.COMPUTER
    assert (found[ours].kind, found[ours].group_id) == (PrincipalKind.GROUP, gid)
    assert same_dn(found[ours].dn, dn)
    assert (found[theirs].kind, found[theirs].group_id) == (PrincipalKind.GROUP, None)
    assert found[administrator].admin_count
    assert rig.directory.resolve_sids([]) == {}


def _user_dn(rig: DirectoryRig, sid: str) -> str:
    """The DN of a user the rig made, found by its SID."""
    [principal] = rig.directory.resolve_sids([sid]).values()
    return principal.dn


def test_group_ancestry_reads_the_nesting_upward(rig: DirectoryRig) -> None:
    nested, direct, alone = (added(rig, name) for name in ("Nested", "Direct", "Alone"))
    middle, top, plain = (dn_for(n, rig.outside) for n in ("Middle", "Top", "Plain"))
    for group in (middle, top, plain):
        rig.admin_group(group)
    rig.admin_set(top, "adminCount", ["1"])
    rig.admin_add_member(middle, nested[1])
    rig.admin_add_member(top, middle)
    rig.admin_add_member(plain, direct[1])
    rig.admin_add_member(direct[1], alone[1])  # one of ours in another of ours

    ancestry = rig.open().group_ancestry()

    def keys(dns: Sequence[str]) -> set[object]:
        return {dn_key(dn) for dn in dns}

    assert set(ancestry.parents) == {nested[0], direct[0], alone[0]}
    assert keys(ancestry.parents[nested[0]]) == keys([middle])
    assert keys(ancestry.parents[alone[0]]) == keys([direct[1]])
    groups = {dn_key(dn): g for dn, g in ancestry.groups.items()}
    assert keys([d for d in ancestry.groups]) == keys([middle, top, plain, direct[1]])
    assert keys(groups[dn_key(middle)].parents) == keys([top])
    assert groups[dn_key(top)].admin_count and not groups[dn_key(middle)].admin_count
    assert groups[dn_key(top)].sid == rig.sid_of(top)
    frozen = frozen_groups(ancestry, GuardRules())
    assert set(frozen) == {nested[0]}
    listed = GuardRules(protected=frozenset({rig.sid_of(plain)}))
    assert set(frozen_groups(ancestry, listed)) == {nested[0], direct[0], alone[0]}


def test_a_builtin_group_reads_as_one(rig: DirectoryRig) -> None:
    gid, dn = added(rig, "Nested into Backup Operators")
    operators = rig.well_known("Backup Operators")
    rig.admin_add_member(operators, dn)
    try:
        ancestry = rig.open().group_ancestry()
        [parent] = ancestry.parents[gid]
        group = ancestry.groups[parent]
        assert group.builtin and group.sid == "S-1-5-32-551"
        assert "built-in" in frozen_groups(ancestry, GuardRules())[gid][0] or group.admin_count
    finally:
        rig.admin_remove_member(operators, dn)


def test_an_anchor_in_another_case_is_not_ours_and_stands_in_the_way(rig: DirectoryRig) -> None:
    gid, other = new_id(), new_id()
    upper = dn_for("Upper", rig.target)
    rig.admin_group(upper, "Group_" + gid.upper())
    rig.admin_group(dn_for("Other", rig.target), anchor_for(other))
    reader = rig.open()
    with pytest.raises(DuplicateAnchor) as refused:
        reader.find_groups([gid, other])
    assert set(refused.value.duplicates) == {gid}
    assert [dn_key(d) for d in refused.value.duplicates[gid]] == [dn_key(upper)]
    assert set(refused.value.found) == {other}, "the others of the read go on"
    assert [g.group_id for g in reader.iter_groups()] == [other]
    with pytest.raises(PolicyRefused):  # never read as ours, so never written
        reader.apply(Delete(gid, upper))
    assert rig.read(upper) is not None
