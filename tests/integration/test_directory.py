"""LdapDirectory against a real Samba AD DC.

Every assertion about directory state reads it back over the harness's own
admin connection, never through the adapter under test.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from ldap3 import BASE, MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE
from ldap3.protocol.formatters.formatters import format_sid

from writeback.adapters.directory import (
    MEMBER_DN_BATCH,
    DuplicateAnchor,
    LdapDirectory,
    ObjectGuids,
)
from writeback.adapters.ldap_clients import python_ldap_available
from writeback.adapters.ldap_values import RESULT_NAMES
from writeback.domain.mapping import EXCHANGE_ATTRIBUTES
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
from writeback.domain.naming import dn_for, dn_key, rdn_for, sam_account_name_for
from writeback.errors import (
    ConfigError,
    DirectoryRefused,
    LdapUnavailable,
    PermanentError,
    PolicyRefused,
)
from writeback_sandbox.samba import new_ca_pem

if TYPE_CHECKING:
    from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba

#: Extended-DN control with value SEQUENCE { INTEGER 1 }: GUID and SID as strings
#: (without a value, Samba answers in hex).
EXTENDED_DN = ("1.2.840.113556.1.4.529", False, b"\x30\x03\x02\x01\x01")
HOSTILE_NAMES = [
    'a, b + c "d" \\ <e> ; f = g',
    "#leading hash",
    "  leading and trailing spaces  ",
    "Отдел продаж 営業部 المبيعات",
    "x=y\\",
]
CROWD = 12_000
CLIENTS = ("python-ldap", "ldap3")

MakeOu = Callable[["SambaDC"], str]
OpenDirectory = Callable[..., LdapDirectory]


# --- fixtures and helpers --------------------------------------------------------------


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest) -> str:
    """Each LDAP client the adapter can use in turn: the contract is the same."""
    name: str = request.param
    if name == "python-ldap" and not python_ldap_available():
        if os.environ.get("CI"):
            pytest.fail("python-ldap is not installed (scripts/bootstrap.sh installs it)")
        pytest.skip("python-ldap is not installed")
    return name


@pytest.fixture
def open_directory(client: str) -> Iterator[OpenDirectory]:
    opened: list[LdapDirectory] = []

    def open_(dc: SambaDC, ou: str, **options: Any) -> LdapDirectory:
        directory = dc.directory(ou, client=client, **options)
        assert directory.client_name == client
        opened.append(directory)
        return directory

    yield open_
    for directory in opened:
        directory.close()


@pytest.fixture(scope="module")
def crowd(samba_dc: SambaDC) -> list[str]:
    """SIDs of CROWD users, made once per module for the chunking and range tests."""
    token = uuid.uuid4().hex[:8]
    names = [f"c{token}{i:05d}" for i in range(CROWD)]
    sids = samba_dc.create_users(samba_dc.create_ou(f"crowd-{token}"), names)
    return [sids[name] for name in names]


def new_id() -> str:
    return str(uuid.uuid4())


def refs(sids: Any) -> tuple[str, ...]:
    return tuple(f"<SID={sid}>" for sid in sids)


def add_op(gid: str, dn: str, members: Any = (), **attributes: tuple[str, ...]) -> Add:
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


def read(dc: SambaDC, dn: str, *attributes: str) -> dict[str, list[str]] | None:
    """An entry's attributes (lower-case names, text values) or None when it is gone."""
    conn = dc.connection(raise_exceptions=False)
    try:
        conn.search(dn, "(objectClass=*)", BASE, attributes=list(attributes or ["*"]))
        if conn.result["result"] == 32:
            return None
        assert conn.result["result"] == 0, conn.result
        raw = conn.response[0]["raw_attributes"]
        return {
            name.lower(): [v.decode("utf-8", "replace") for v in values]
            for name, values in raw.items()
            if values
        }
    finally:
        conn.unbind()


def member_sids(dc: SambaDC, dn: str) -> set[str]:
    """Members' SIDs as the DC reports them (extended DN), read independently."""
    conn = dc.connection(raise_exceptions=False)
    try:
        conn.search(dn, "(objectClass=*)", BASE, attributes=["member"], controls=[EXTENDED_DN])
        assert conn.result["result"] == 0, conn.result
        values = conn.response[0]["raw_attributes"].get("member") or []
        return {m.group(1) for v in values if (m := re.search(r"<SID=([^>]+)>", v.decode()))}
    finally:
        conn.unbind()


def admin_modify(dc: SambaDC, dn: str, changes: dict[str, Any]) -> None:
    conn = dc.connection(raise_exceptions=False)
    try:
        assert conn.modify(dn, changes), conn.result
    finally:
        conn.unbind()


def admin_add(dc: SambaDC, dn: str, classes: list[str], attributes: dict[str, Any]) -> None:
    conn = dc.connection(raise_exceptions=False)
    try:
        assert conn.add(dn, classes, attributes), conn.result
    finally:
        conn.unbind()


def admin_delete(dc: SambaDC, dn: str) -> None:
    conn = dc.connection(raise_exceptions=False)
    try:
        assert conn.delete(dn), conn.result
    finally:
        conn.unbind()


def admin_group(dc: SambaDC, dn: str, anchor: str | None = None) -> None:
    attributes: dict[str, Any] = {"sAMAccountName": "g" + uuid.uuid4().hex[:18]}
    if anchor is not None:
        attributes["adminDescription"] = anchor
    admin_add(dc, dn, ["top", "group"], attributes)


def users(dc: SambaDC, ou: str, count: int) -> list[str]:
    """SIDs of ``count`` new users (sAMAccountName is the name: unique per domain)."""
    token = uuid.uuid4().hex[:10]
    names = [f"u{token}{i}" for i in range(count)]
    sids = dc.create_users(dc.create_ou("People", ou), names)
    return [sids[name] for name in names]


def same_dn(a: str, b: str) -> bool:
    return dn_key(a) == dn_key(b)


# --- reads -----------------------------------------------------------------------------


def test_schema_attributes_of_a_plain_forest(
    samba_dc: SambaDC, open_directory: OpenDirectory
) -> None:
    directory = open_directory(samba_dc, samba_dc.base_dn)
    assert directory.schema_attributes() == frozenset()


def test_schema_attributes_of_an_exchange_forest(
    exchange_dc: SambaDC, open_directory: OpenDirectory
) -> None:
    directory = open_directory(exchange_dc, exchange_dc.base_dn)
    assert directory.schema_attributes() == {n.lower() for n in EXCHANGE_ATTRIBUTES}


def test_add_with_members_by_sid(
    any_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(any_dc)
    sids = users(any_dc, ou, 3)
    target = any_dc.create_ou("Groups", ou)
    directory = open_directory(any_dc, target)
    exchange = "mailnickname" in directory.schema_attributes()
    gid = new_id()
    dn = dn_for(f"Group_{gid}", target)
    extra: dict[str, tuple[str, ...]] = {
        "mail": ("sales@contoso.com",),
        "proxyAddresses": ("SMTP:sales@contoso.com", "smtp:sales@contoso.onmicrosoft.com"),
    }
    if exchange:
        extra |= {
            "mailNickname": ("sales",),
            "msExchRecipientTypeDetails": (str(2**43),),
            "msExchRecipientDisplayType": ("1",),
        }

    assert directory.apply(add_op(gid, dn, sids[:2], **extra)) == 1

    entry = read(any_dc, dn)
    assert entry is not None
    assert entry["admindescription"] == [anchor_for(gid)]
    assert entry["grouptype"] == ["8"]
    assert "description" not in entry, "empty values are omitted"
    assert sorted(entry["proxyaddresses"]) == sorted(extra["proxyAddresses"])
    assert member_sids(any_dc, dn) == set(sids[:2])
    if exchange:
        assert entry["mailnickname"] == ["sales"]
        assert entry["msexchrecipienttypedetails"] == [str(2**43)]
    else:
        assert "mailnickname" not in entry

    group = directory.find_group(gid)
    assert group is not None
    assert same_dn(group.dn, dn)
    assert group.group_id == gid
    assert group.member_sids == set(sids[:2])
    assert group.other_members == frozenset()
    assert group.attributes["groupType"] == ("8",)
    assert group.attributes["displayName"] == (f"Group {gid[:8]}",)
    assert not group.attributes.get("description")
    conn = any_dc.connection(raise_exceptions=False)
    try:
        conn.search(dn, "(objectClass=*)", BASE, attributes=["objectSid"])
        assert group.object_sid == format_sid(conn.response[0]["raw_attributes"]["objectSid"][0])
    finally:
        conn.unbind()
    if exchange:
        assert group.attributes["msExchRecipientDisplayType"] == ("1",)


def test_exchange_attribute_on_a_plain_forest_is_refused_permanently(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    directory = open_directory(samba_dc, ou)
    gid = new_id()
    dn = dn_for(f"Group_{gid}", ou)
    with pytest.raises(DirectoryRefused) as refused:
        directory.apply(add_op(gid, dn, mailNickname=("sales",)))
    assert isinstance(refused.value, PermanentError)
    assert read(samba_dc, dn) is None


def test_find_group_after_rename_and_move_to_child_ou(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    child = samba_dc.create_ou("Child", ou)
    directory = open_directory(samba_dc, ou)
    gid = new_id()
    directory.apply(add_op(gid, dn_for("Original", ou)))
    conn = samba_dc.connection(raise_exceptions=False)
    try:
        assert conn.modify_dn(dn_for("Original", ou), "CN=Moved by admin", new_superior=child)
    finally:
        conn.unbind()

    group = directory.find_group(gid)
    assert group is not None
    assert same_dn(group.dn, dn_for("Moved by admin", child))
    # and the moved object is what may be written now, not the old DN
    assert directory.apply(Modify(gid, group.dn, Changes(replace={"description": ("x",)}))) == 1
    with pytest.raises(PolicyRefused):
        directory.apply(Delete(gid, dn_for("Original", ou)))


def test_find_group_ignores_unanchored_namesakes_and_anchored_objects_outside(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    target = samba_dc.create_ou("Target", ou)
    outside = samba_dc.create_ou("Outside", ou)
    gid = new_id()
    admin_group(samba_dc, dn_for(f"Group_{gid}", target))  # same name, no anchor
    admin_group(samba_dc, dn_for(f"Group_{gid}", outside), anchor_for(gid))
    admin_group(samba_dc, dn_for("lookalike", target), anchor_for(gid) + "0")  # not an id
    other = new_id()
    admin_group(samba_dc, dn_for("other", target), anchor_for(other))
    directory = open_directory(samba_dc, target)

    assert directory.find_group(gid) is None
    assert [g.group_id for g in directory.iter_groups()] == [other]
    assert directory.find_group("*") is None, "the id is escaped, never a wildcard"


def test_find_group_refuses_a_duplicated_anchor(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    gid = new_id()
    first, second = dn_for("First", ou), dn_for("Second", ou)
    admin_group(samba_dc, first, anchor_for(gid))
    admin_group(samba_dc, second, anchor_for(gid))
    directory = open_directory(samba_dc, ou)
    with pytest.raises(DirectoryRefused) as refused:
        directory.find_group(gid)
    assert "CN=First" in str(refused.value) and "CN=Second" in str(refused.value)


def test_iter_groups_pages_through_every_anchored_group(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    sids = users(samba_dc, ou, 3)
    target = samba_dc.create_ou("Groups", ou)
    setup = open_directory(samba_dc, target)
    ids = [new_id() for _ in range(25)]
    for i, gid in enumerate(ids):
        setup.apply(add_op(gid, dn_for(f"G{i:02d}", target), sids[: i % 4]))
    admin_group(samba_dc, dn_for("Not ours", target))
    admin_group(samba_dc, dn_for("Not a GUID anchor", target), "Something else")

    directory = open_directory(samba_dc, target, page_size=10)
    groups = {g.group_id: g for g in directory.iter_groups()}
    assert set(groups) == set(ids)
    for i, gid in enumerate(ids):
        assert groups[gid].member_sids == set(sids[: i % 4])
        assert same_dn(groups[gid].dn, dn_for(f"G{i:02d}", target))
    # what iter_groups saw may be written; a group deleted meanwhile no longer may
    gone = groups[ids[0]]
    assert directory.apply(Delete(gone.group_id, gone.dn)) == 2
    assert read(samba_dc, gone.dn) is None
    with pytest.raises(PolicyRefused):
        directory.apply(Modify(gone.group_id, gone.dn, Changes(replace={"info": ("x",)})))


def test_a_full_read_pages_on_while_groups_are_read_in_slices(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    """The ranged reads of a page's groups are made before the next page is asked
    for: Samba ended the paged search early when one was answered while a page
    was pending (with python-ldap, which keeps both outstanding), and the groups
    of the pages after were missing from the full read."""
    ou = make_ou(samba_dc)
    sids = users(samba_dc, ou, 5)
    target = samba_dc.create_ou("Groups", ou)
    setup = open_directory(samba_dc, target)
    ids = [new_id() for _ in range(12)]
    for i, gid in enumerate(ids):
        setup.apply(add_op(gid, dn_for(f"G{i:02d}", target), sids[: 1 + i % 5]))

    directory = open_directory(samba_dc, target, page_size=4, range_window=2)
    groups = {g.group_id: g for g in directory.iter_groups()}
    assert set(groups) == set(ids)
    for i, gid in enumerate(ids):
        assert groups[gid].member_sids == set(sids[: 1 + i % 5])


def test_a_full_read_resolves_member_dns_as_a_read_of_each_group_would(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    """iter_groups reads members as plain DNs and asks the domain for their SIDs;
    what it returns is what find_group, reading with the extended-DN control, does:
    users by SID, a contact by DN, and a member the domain's search cannot find (an
    object of the configuration partition) by DN too, from the group read again
    with the control, never guessed."""
    ou = make_ou(samba_dc)
    sids = users(samba_dc, ou, 3)
    target = samba_dc.create_ou("Groups", ou)
    setup = open_directory(samba_dc, target)
    plain, with_contact, with_foreign = new_id(), new_id(), new_id()
    setup.apply(add_op(plain, dn_for("Plain", target), sids))
    setup.apply(add_op(with_contact, dn_for("Contact", target), sids[:1]))
    setup.apply(add_op(with_foreign, dn_for("Foreign", target), sids[1:]))
    contact = dn_for("Contact, by hand", ou)
    admin_add(samba_dc, contact, ["top", "contact"], {})
    admin_modify(samba_dc, dn_for("Contact", target), {"member": [(MODIFY_ADD, [contact])]})
    site = f"CN=Default-First-Site-Name,CN=Sites,CN=Configuration,{samba_dc.base_dn}"
    admin_modify(samba_dc, dn_for("Foreign", target), {"member": [(MODIFY_ADD, [site])]})

    directory = open_directory(samba_dc, target)
    groups = {g.group_id: g for g in directory.iter_groups()}
    # the page, one search resolving its 5 distinct DNs, one read of Foreign again
    assert directory.request_counts == {"search": 3}
    assert groups[plain].member_sids == set(sids) and not groups[plain].other_members
    assert groups[with_contact].member_sids == {sids[0]}
    assert [dn_key(m) for m in groups[with_contact].other_members] == [dn_key(contact)]
    assert groups[with_foreign].member_sids == set(sids[1:])
    assert [dn_key(m) for m in groups[with_foreign].other_members] == [dn_key(site)]
    for gid, group in groups.items():
        alone = open_directory(samba_dc, target).find_group(gid)
        assert alone is not None
        assert (alone.member_sids, alone.other_members) == (
            group.member_sids,
            group.other_members,
        )
        assert alone.object_sid == group.object_sid and alone.object_sid is not None
    # the objectGUIDs it learnt are the objects': find_groups finds all three by them
    directory.request_counts.clear()
    assert set(directory.find_groups(list(groups))) == set(groups)
    assert directory.request_counts == {"search": 1}


# --- batched reads: find_groups ---------------------------------------------------------


def make_groups(
    dc: SambaDC, ou: str, open_directory: OpenDirectory, count: int, sids: list[str]
) -> list[str]:
    """``count`` groups written by the adapter, group i with the first i % 4 members."""
    writer = open_directory(dc, ou)
    ids = [new_id() for _ in range(count)]
    for i, gid in enumerate(ids):
        writer.apply(add_op(gid, dn_for(f"Group_{gid}", ou), sids[: i % 4]))
    return ids


def searches(directory: LdapDirectory, read: Callable[[], Any]) -> tuple[Any, int]:
    """What ``read`` returned and how many LDAP searches it sent."""
    before = Counter(directory.request_counts)
    value = read()
    sent = directory.request_counts - before
    assert set(sent) <= {"search"}, f"reads write nothing: {sent}"
    return value, sent["search"]


@pytest.mark.parametrize("count", [20, 100])
def test_find_groups_reads_many_groups_in_one_search(
    count: int, samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    sids = users(samba_dc, ou, 3)
    target = samba_dc.create_ou("Groups", ou)
    ids = make_groups(samba_dc, target, open_directory, count, sids)
    unknown = [new_id(), new_id()]
    directory = open_directory(samba_dc, target)

    # Nothing cached yet: one search ORing their sAMAccountNames (indexed) finds
    # them all, and the unknown ones cost one search ORing their anchors.
    found, sent = searches(directory, lambda: directory.find_groups([*ids, *unknown]))
    assert sent == 2
    assert set(found) == set(ids)
    for i, gid in enumerate(ids):
        assert found[gid].member_sids == set(sids[: i % 4])
        assert same_dn(found[gid].dn, dn_for(f"Group_{gid}", target))
        assert found[gid].object_sid and found[gid].object_sid.startswith("S-1-5-21-")

    # Now every GUID is known: one search ORing them, and the misses two more.
    again, sent = searches(directory, lambda: directory.find_groups(ids))
    assert sent == 1
    assert again == found
    _, sent = searches(directory, lambda: directory.find_groups([*ids, *unknown]))
    assert sent == 3

    # Without members: still one search, and no member value read.
    values_before = directory.member_values_read
    bare, sent = searches(directory, lambda: directory.find_groups(ids, members=False))
    assert sent == 1 and directory.member_values_read == values_before
    assert set(bare) == set(ids)
    assert all(g.member_sids == frozenset() for g in bare.values())
    assert {g: bare[g].attributes for g in ids} == {g: found[g].attributes for g in ids}

    # What find_groups read may be written, in the same request count as ever.
    gid = ids[1]
    change = Changes(replace={"description": ("batched",)}, add_members=refs(sids[2:]))
    assert directory.apply(Modify(gid, found[gid].dn, change)) == 1
    assert member_sids(samba_dc, found[gid].dn) == {sids[0], sids[2]}


def test_iter_groups_fills_the_guid_cache(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    ids = make_groups(samba_dc, ou, open_directory, 20, [])
    directory = open_directory(samba_dc, ou)
    assert {g.group_id for g in directory.iter_groups()} == set(ids)
    found, sent = searches(directory, lambda: directory.find_groups(ids))
    assert sent == 1 and set(found) == set(ids)


def test_guid_hints_shared_between_instances_save_the_anchor_search(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    ids = make_groups(samba_dc, ou, open_directory, 6, [])
    hints = ObjectGuids()
    first = open_directory(samba_dc, ou, guids=hints)
    second = open_directory(samba_dc, ou, guids=hints)
    found, sent = searches(first, lambda: first.find_groups(ids))
    assert sent == 1 and len(hints) == len(ids)

    # What one worker learnt, the other uses: one GUID search, no anchor scan.
    again, sent = searches(second, lambda: second.find_groups(ids))
    assert sent == 1 and again == found

    # A hint is verified, never trusted: a deleted group is absent for both.
    gone = ids[0]
    assert first.apply(Delete(gone, found[gone].dn)) >= 1
    assert hints.get(gone) is None
    assert gone not in second.find_groups(ids)

    # An on-prem edit that strips the anchor leaves a hint pointing at an object
    # that is no longer ours: the GUID search finds it, the anchor check refuses
    # it, the anchor search confirms it is absent.
    stripped = ids[1]
    with samba_dc.connection() as conn:
        assert conn.modify(found[stripped].dn, {"adminDescription": [(MODIFY_REPLACE, ["theirs"])]})
    assert hints.get(stripped) is not None
    result, sent = searches(second, lambda: second.find_groups(ids[1:]))
    assert sent == 3, "the GUID search, then by name and by anchor for the refused hint"
    assert set(result) == set(ids[2:])


def test_iter_groups_stopped_early_leaves_the_connection_usable(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    ids = make_groups(samba_dc, ou, open_directory, 25, [])
    directory = open_directory(samba_dc, ou, page_size=10)
    groups = directory.iter_groups()
    first = [next(groups) for _ in range(5)]  # the second page is on its way meanwhile
    groups.close()
    assert directory.request_counts["search"] == 2
    assert set(directory.find_groups(ids)) == set(ids)
    assert {g.group_id for g in directory.iter_groups()} == set(ids)
    assert {g.group_id for g in first} <= set(ids)


def test_find_groups_follows_a_move_within_the_ou_but_not_out_of_it(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    target = samba_dc.create_ou("Target", ou)
    child = samba_dc.create_ou("Child", target)
    outside = samba_dc.create_ou("Outside", ou)
    stays, moves_in, moves_out = make_groups(samba_dc, target, open_directory, 3, [])
    directory = open_directory(samba_dc, target)
    before = directory.find_groups([stays, moves_in, moves_out])
    assert len(before) == 3

    conn = samba_dc.connection(raise_exceptions=False)
    try:
        assert conn.modify_dn(before[moves_in].dn, "CN=Moved in", new_superior=child)
        assert conn.modify_dn(before[moves_out].dn, "CN=Moved out", new_superior=outside)
    finally:
        conn.unbind()

    after, sent = searches(directory, lambda: directory.find_groups([stays, moves_in, moves_out]))
    assert sent == 3, "the GUID search, then by name and by anchor for the one it missed"
    assert set(after) == {stays, moves_in}
    assert same_dn(after[moves_in].dn, dn_for("Moved in", child))
    # the moved object is what may be written now; nothing outside the OU ever is
    assert directory.apply(Modify(moves_in, after[moves_in].dn, Changes({"info": ("x",)}))) == 1
    for dn in (before[moves_in].dn, before[moves_out].dn, dn_for("Moved out", outside)):
        with pytest.raises(PolicyRefused):
            directory.apply(Delete(moves_out if "out" in dn else moves_in, dn))
    assert read(samba_dc, dn_for("Moved out", outside)) is not None
    # and the GUID of the group gone from the OU is forgotten: by name, then by anchor
    _, sent = searches(directory, lambda: directory.find_groups([moves_out]))
    assert sent == 2


def test_find_groups_treats_an_edited_anchor_as_a_miss(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    cleared, handed_over, retargeted, kept = make_groups(samba_dc, ou, open_directory, 4, [])
    directory = open_directory(samba_dc, ou)
    before = directory.find_groups([cleared, handed_over, retargeted, kept])
    other = new_id()
    # an admin clears one anchor, moves one to a new object, points one at another group
    admin_modify(samba_dc, before[cleared].dn, {"adminDescription": [(MODIFY_DELETE, [])]})
    admin_modify(
        samba_dc,
        before[handed_over].dn,
        {"adminDescription": [(MODIFY_REPLACE, ["Handed over"])]},
    )
    successor = dn_for("Successor", ou)
    admin_group(samba_dc, successor, anchor_for(handed_over))
    admin_modify(
        samba_dc,
        before[retargeted].dn,
        {"adminDescription": [(MODIFY_REPLACE, [anchor_for(other)])]},
    )

    ids = [cleared, handed_over, retargeted, kept]
    after, sent = searches(directory, lambda: directory.find_groups(ids))
    assert sent == 3, "by GUID; by name, which finds only objects without the anchor; by anchor"
    assert set(after) == {handed_over, kept}
    assert same_dn(after[handed_over].dn, successor)
    # the objects that lost the anchor may not be written for those groups any more
    for gid in (cleared, handed_over, retargeted):
        with pytest.raises(PolicyRefused):
            directory.apply(Modify(gid, before[gid].dn, Changes({"info": ("x",)})))
    found_other = directory.find_groups([other])
    assert same_dn(found_other[other].dn, before[retargeted].dn)


def test_find_groups_refuses_duplicated_anchors_and_returns_the_rest(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    fine, copied = make_groups(samba_dc, ou, open_directory, 2, [])
    directory = open_directory(samba_dc, ou)
    originals = directory.find_groups([fine, copied])
    twin = dn_for("Twin", ou)
    admin_group(samba_dc, twin, anchor_for(copied))

    # Nothing cached: the object we created is found by its sAMAccountName, which
    # no twin can share; the twin is never what gets written.
    fresh = open_directory(samba_dc, ou)
    found = fresh.find_groups([fine, copied])
    assert dn_key(found[copied].dn) == dn_key(originals[copied].dn)
    with pytest.raises(PolicyRefused):
        fresh.apply(Modify(copied, twin, Changes({"info": ("x",)})))

    # A full read reports the pair, and from then on only the anchor search, which
    # sees both, finds that group: refused, with what was found for the others.
    assert sorted(g.group_id for g in fresh.iter_groups()) == sorted([fine, copied, copied])
    with pytest.raises(DuplicateAnchor) as refused:
        fresh.find_groups([fine, copied])
    assert isinstance(refused.value, DirectoryRefused)
    assert set(refused.value.duplicates) == {copied}
    assert sorted(dn_key(d) for d in refused.value.duplicates[copied]) == sorted(
        [dn_key(originals[copied].dn), dn_key(twin)]
    )
    assert set(refused.value.found) == {fine}
    with pytest.raises(DirectoryRefused, match="2 objects carry the anchor"):
        fresh.find_group(copied)
    # neither object may be written for that group from this read
    for dn in (originals[copied].dn, twin):
        with pytest.raises(PolicyRefused):
            fresh.apply(Modify(copied, dn, Changes({"info": ("x",)})))
    assert fresh.apply(Modify(fine, refused.value.found[fine].dn, Changes({"info": ("x",)}))) == 1
    # the instance that had the GUID cached sees both as well after a full read
    assert sorted(g.group_id for g in directory.iter_groups()) == sorted([fine, copied, copied])
    with pytest.raises(DuplicateAnchor):
        directory.find_groups([copied])

    # Once the twin is gone, the anchor search sees one object again and clears it.
    admin_delete(samba_dc, twin)
    again = directory.find_groups([copied])
    assert dn_key(again[copied].dn) == dn_key(originals[copied].dn)
    _, sent = searches(directory, lambda: directory.find_groups([copied]))
    assert sent == 1, "by GUID again"

    # Two objects named otherwise (as Connect or an admin may have) carrying one
    # anchor: nothing cached, the anchor search sees both at once.
    adopted = new_id()
    admin_group(samba_dc, dn_for("Copy one", ou), anchor_for(adopted))
    admin_group(samba_dc, dn_for("Copy two", ou), anchor_for(adopted))
    with pytest.raises(DuplicateAnchor):
        open_directory(samba_dc, ou).find_groups([adopted])


def test_find_groups_escapes_ids_and_stays_in_the_ou(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    target = samba_dc.create_ou("Target", ou)
    outside = samba_dc.create_ou("Outside", ou)
    gid = new_id()
    admin_group(samba_dc, dn_for("Outside copy", outside), anchor_for(gid))
    (inside,) = make_groups(samba_dc, target, open_directory, 1, [])
    directory = open_directory(samba_dc, target)
    assert directory.find_groups(["*", "x)(adminDescription=*", gid]) == {}
    assert set(directory.find_groups([inside, "*"])) == {inside}
    assert directory.find_groups([]) == {}


# --- batched writes: apply_all ----------------------------------------------------------


def test_apply_all_keeps_every_guard_and_each_failure_is_its_own(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    sids = users(samba_dc, ou, 4)
    target = samba_dc.create_ou("Groups", ou)
    outside = samba_dc.create_ou("Outside", ou)
    existing = make_groups(samba_dc, target, open_directory, 6, sids)
    directory = open_directory(samba_dc, target, chunk_size=3)
    groups = directory.find_groups(existing)
    renamed, deleted, repurposed, raced, chunked, plain = existing
    admin_modify(
        samba_dc, groups[repurposed].dn, {"adminDescription": [(MODIFY_REPLACE, ["Not ours"])]}
    )
    # someone else already added sids[3] to the raced group
    admin_modify(samba_dc, groups[raced].dn, {"member": [(MODIFY_ADD, [f"<SID={sids[3]}>"])]})
    new = [new_id() for _ in range(12)]
    clash = new_id()
    operations: list[Operation] = [
        *(add_op(gid, dn_for(f"New {i}", target), sids[:2]) for i, gid in enumerate(new)),
        Modify(plain, groups[plain].dn, Changes({"description": ("pipelined",)})),
        Modify(repurposed, groups[repurposed].dn, Changes({"description": ("pwned",)})),
        Modify(raced, groups[raced].dn, Changes(add_members=refs(sids[3:]))),
        Rename(renamed, groups[renamed].dn, "CN=Renamed", Changes({"info": ("r",)})),
        Delete(deleted, groups[deleted].dn),
        add_op(clash, dn_for("Clash", target), sAMAccountName=(sam_account_name_for(new[0]),)),
        add_op(new_id(), dn_for("Outside", outside)),
        Modify(chunked, groups[chunked].dn, Changes(add_members=refs(sids))),
        Add(new_id(), dn_for("Big", target), add_op(new[0], "").attributes, refs(sids)),
    ]
    results = directory.apply_all(operations)

    assert results[:12] == [1] * 12
    assert all(
        member_sids(samba_dc, dn_for(f"New {i}", target)) == set(sids[:2]) for i in range(12)
    )
    plain_at, repurposed_at, raced_at, renamed_at, deleted_at, clash_at, outside_at = range(12, 19)
    assert results[plain_at] == 1
    assert isinstance(results[repurposed_at], PolicyRefused)
    assert results[raced_at] == 2, "refused, read back, nothing left to add"
    assert results[renamed_at] == 2
    assert results[deleted_at] == 2
    assert isinstance(results[clash_at], DirectoryRefused)
    assert isinstance(results[outside_at], PolicyRefused)
    assert results[19] == 2, "4 members in chunks of 3: two modifies, sent alone"
    assert isinstance(results[20], PolicyRefused), "an Add's anchor must be its own group's"

    entry = read(samba_dc, groups[plain].dn)
    assert entry is not None and entry["description"] == ["pipelined"]
    after = read(samba_dc, groups[repurposed].dn)
    assert after is not None and "description" not in after
    assert read(samba_dc, groups[deleted].dn) is None
    renamed_entry = read(samba_dc, dn_for("Renamed", target))
    assert renamed_entry is not None and renamed_entry["info"] == ["r"]
    assert read(samba_dc, dn_for("Clash", target)) is None
    assert read(samba_dc, dn_for("Outside", outside)) is None
    assert sids[3] in member_sids(samba_dc, groups[raced].dn)
    assert member_sids(samba_dc, groups[chunked].dn) == set(sids)
    # what apply_all added may be written next, as after apply
    assert directory.apply(Delete(new[0], dn_for("New 0", target))) == 2


def test_apply_all_after_the_dc_stops_fails_the_rest_transiently(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    directory = open_directory(samba_dc, ou)
    ids = make_groups(samba_dc, ou, open_directory, 3, [])
    groups = directory.find_groups(ids)
    samba_dc.stop()
    try:
        results = directory.apply_all(
            [Modify(g, groups[g].dn, Changes({"info": ("x",)})) for g in ids]
        )
    finally:
        samba_dc.start()
    assert all(isinstance(r, LdapUnavailable) for r in results), results
    assert directory.apply_all(
        [Modify(g, groups[g].dn, Changes({"info": ("y",)})) for g in ids]
    ) == [1, 1, 1]


# --- the scope guard -------------------------------------------------------------------


def test_apply_refuses_objects_outside_the_target_ou(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    target = samba_dc.create_ou("Target", ou)
    outside = samba_dc.create_ou("Outside", ou)
    gid = new_id()
    victim = dn_for(f"Group_{gid}", outside)
    admin_group(samba_dc, victim, anchor_for(gid))
    directory = open_directory(samba_dc, target)
    before = read(samba_dc, victim)

    operations: list[Operation] = [
        Modify(gid, victim, Changes(replace={"description": ("pwned",)})),
        Delete(gid, victim),
        Rename(gid, victim, "CN=renamed"),
        Delete(gid, target),
        Add(gid, dn_for("x", outside), add_op(gid, "").attributes),
        Add(gid, target, add_op(gid, "").attributes),
    ]
    for operation in operations:
        with pytest.raises(PolicyRefused):
            directory.apply(operation)
    assert read(samba_dc, victim) == before
    assert read(samba_dc, target) is not None
    assert read(samba_dc, dn_for("x", outside)) is None


def test_apply_refuses_objects_without_our_anchor(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    gid = new_id()
    plain = dn_for(f"Group_{gid}", ou)
    admin_group(samba_dc, plain)
    never_read = dn_for("Anchored but never read", ou)
    admin_group(samba_dc, never_read, anchor_for(gid))
    directory = open_directory(samba_dc, ou)
    before = read(samba_dc, plain), read(samba_dc, never_read)

    for dn in (plain, never_read):
        for operation in (
            Modify(gid, dn, Changes(replace={"description": ("pwned",)})),
            Delete(gid, dn),
            Rename(gid, dn, "CN=renamed"),
        ):
            with pytest.raises(PolicyRefused):
                directory.apply(operation)
    assert (read(samba_dc, plain), read(samba_dc, never_read)) == before


def test_apply_refuses_an_object_with_another_groups_anchor(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    mine, theirs = new_id(), new_id()
    dn = dn_for("Theirs", ou)
    admin_group(samba_dc, dn, anchor_for(theirs))
    directory = open_directory(samba_dc, ou)
    assert directory.find_group(theirs) is not None
    before = read(samba_dc, dn)

    for operation in (
        Modify(mine, dn, Changes(replace={"description": ("pwned",)})),
        Modify(theirs, dn, Changes(replace={"adminDescription": (anchor_for(mine),)})),
        Modify(theirs, dn, Changes(replace={"adminDescription": ()})),
        Delete(mine, dn),
        Rename(mine, dn, "CN=renamed"),
    ):
        with pytest.raises(PolicyRefused):
            directory.apply(operation)
    assert read(samba_dc, dn) == before


def test_add_must_carry_our_anchor_and_be_a_group(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    directory = open_directory(samba_dc, ou)
    gid = new_id()
    dn = dn_for("New", ou)
    good = add_op(gid, dn).attributes
    bad = [
        {k: v for k, v in good.items() if k != "adminDescription"},
        {**good, "adminDescription": (anchor_for(new_id()),)},
        {**good, "adminDescription": (anchor_for(gid), "second")},
        {**good, "objectClass": ("top", "contact")},
    ]
    for attributes in bad:
        with pytest.raises(PolicyRefused):
            directory.apply(Add(gid, dn, attributes))
    assert read(samba_dc, dn) is None


def test_the_dc_checks_the_anchor_at_write_time(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    """Seen with our anchor, then re-purposed by an admin: the DC refuses the write."""
    ou = make_ou(samba_dc)
    sids = users(samba_dc, ou, 2)
    target = samba_dc.create_ou("Groups", ou)
    directory = open_directory(samba_dc, target)
    gid = new_id()
    dn = dn_for("Ours, then not", target)
    directory.apply(add_op(gid, dn, sids[:1]))
    group = directory.find_group(gid)
    assert group is not None
    admin_modify(samba_dc, dn, {"adminDescription": [(MODIFY_REPLACE, ["Owned by someone else"])]})
    before = read(samba_dc, dn)

    for operation in (
        Modify(gid, dn, Changes(replace={"description": ("pwned",)}, add_members=refs(sids[1:]))),
        Delete(gid, dn),
        Rename(gid, dn, "CN=renamed"),
    ):
        with pytest.raises(PolicyRefused):
            directory.apply(operation)
    assert read(samba_dc, dn) == before
    assert member_sids(samba_dc, dn) == set(sids[:1])

    admin_modify(samba_dc, dn, {"adminDescription": [(MODIFY_DELETE, [])]})
    with pytest.raises(PolicyRefused):
        directory.apply(Delete(gid, dn))
    assert read(samba_dc, dn) is not None


# --- members ---------------------------------------------------------------------------


def test_member_add_and_remove_by_sid_in_one_modify(
    any_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(any_dc)
    sids = users(any_dc, ou, 4)
    directory = open_directory(any_dc, ou)
    gid = new_id()
    dn = dn_for("Team", ou)
    directory.apply(add_op(gid, dn, sids[:2]))
    assert directory.find_group(gid) is not None

    change = Changes(
        replace={"description": ("new",), "mail": ()},
        add_members=refs(sids[2:]),
        remove_members=refs(sids[:1]),
    )
    assert directory.apply(Modify(gid, dn, change)) == 1
    assert member_sids(any_dc, dn) == set(sids[1:])
    entry = read(any_dc, dn)
    assert entry is not None and entry["description"] == ["new"]
    assert entry["admindescription"] == [anchor_for(gid)]


def test_member_changes_are_idempotent_under_races(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    sids = users(samba_dc, ou, 4)
    directory = open_directory(samba_dc, ou)
    gid = new_id()
    dn = dn_for("Raced", ou)
    directory.apply(add_op(gid, dn, sids[:2]))
    assert directory.find_group(gid) is not None
    # someone else already added sids[1] and removed sids[3] (never there)
    change = Changes(
        replace={"description": ("after the race",)},
        add_members=refs(sids[1:3]),
        remove_members=refs([sids[0], sids[3]]),
    )
    assert directory.apply(Modify(gid, dn, change)) == 3  # refused, read back, retried
    assert member_sids(samba_dc, dn) == {sids[1], sids[2]}
    entry = read(samba_dc, dn)
    assert entry is not None and entry["description"] == ["after the race"]
    # the same change again is a no-op, not an error
    directory.apply(Modify(gid, dn, change))
    assert member_sids(samba_dc, dn) == {sids[1], sids[2]}


def test_members_without_a_sid_are_other_members_and_can_be_removed(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    sids = users(samba_dc, ou, 1)
    target = samba_dc.create_ou("Groups", ou)
    directory = open_directory(samba_dc, target)
    gid = new_id()
    dn = dn_for("With contact", target)
    directory.apply(add_op(gid, dn, sids))
    contact = dn_for("Contact, by hand", ou)
    admin_add(samba_dc, contact, ["top", "contact"], {})
    admin_modify(samba_dc, dn, {"member": [(MODIFY_ADD, [contact])]})

    group = directory.find_group(gid)
    assert group is not None
    assert group.member_sids == set(sids)
    assert [dn_key(m) for m in group.other_members] == [dn_key(contact)]

    directory.apply(Modify(gid, dn, Changes(remove_members=tuple(group.other_members))))
    assert read(samba_dc, dn, "member") == {"member": [read_dn(samba_dc, sids[0])]}
    after = directory.find_group(gid)
    assert after is not None and after.other_members == frozenset()


def read_dn(dc: SambaDC, sid: str) -> str:
    conn = dc.connection(raise_exceptions=False)
    try:
        conn.search(f"<SID={sid}>", "(objectClass=*)", BASE, attributes=["cn"])
        return str(conn.response[0]["dn"])
    finally:
        conn.unbind()


def test_member_changes_are_chunked(
    samba_dc: SambaDC, crowd: list[str], make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    directory = open_directory(samba_dc, ou, chunk_size=5000)
    gid = new_id()
    dn = dn_for("Crowd", ou)

    assert directory.apply(add_op(gid, dn, crowd)) == 3  # one add, two modifies
    assert member_sids(samba_dc, dn) == set(crowd)
    group = directory.find_group(gid)
    assert group is not None and group.member_sids == set(crowd)

    change = Changes(replace={"description": ("emptied",)}, remove_members=refs(crowd))
    assert directory.apply(Modify(gid, dn, change)) == 3
    assert member_sids(samba_dc, dn) == set()
    entry = read(samba_dc, dn)
    assert entry is not None and entry["description"] == ["emptied"]

    mixed = Changes(add_members=refs(crowd[:8000]))
    assert directory.apply(Modify(gid, dn, mixed)) == 2
    swap = Changes(add_members=refs(crowd[8000:]), remove_members=refs(crowd[:8000]))
    assert directory.apply(Modify(gid, dn, swap)) == 3
    assert member_sids(samba_dc, dn) == set(crowd[8000:])


def test_large_groups_are_read_completely_with_ranged_retrieval(
    samba_dc: SambaDC,
    crowd: list[str],
    make_ou: MakeOu,
    open_directory: OpenDirectory,
) -> None:
    ou = make_ou(samba_dc)
    writer = open_directory(samba_dc, ou)
    big, small = new_id(), new_id()
    writer.apply(add_op(big, dn_for("Big", ou), crowd[:3500]))
    writer.apply(add_op(small, dn_for("Small", ou), crowd[:5]))

    plain = open_directory(samba_dc, ou).find_group(big)
    assert plain is not None and plain.member_sids == set(crowd[:3500])

    ranged = open_directory(samba_dc, ou, range_window=1000)
    group = ranged.find_group(big)
    assert group is not None and group.member_sids == set(crowd[:3500])
    assert ranged.request_counts == {"search": 4}, "one search, then 3 ranged reads"
    assert ranged.member_values_read == 3500

    ranged.request_counts.clear()
    groups = {g.group_id: g for g in ranged.iter_groups()}
    assert groups[big].member_sids == set(crowd[:3500])
    assert groups[small].member_sids == set(crowd[:5])
    # one page, its first slices' 1,000 to 1,005 distinct DNs resolved, the big one's ranged reads
    resolving = ranged.request_counts["search"] - 4
    assert ranged.request_counts.keys() == {"search"}
    assert math.ceil(1000 / MEMBER_DN_BATCH) <= resolving <= math.ceil(1005 / MEMBER_DN_BATCH)

    ranged.request_counts.clear()
    both = ranged.find_groups([big, small])
    assert both[big].member_sids == set(crowd[:3500])
    assert both[small].member_sids == set(crowd[:5])
    assert ranged.request_counts == {"search": 4}, "one GUID search, ranged reads of the big one"


# --- names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_via_add_and_rename(
    name: str, samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    directory = open_directory(samba_dc, ou)
    gid = new_id()
    dn = dn_for(name, ou)
    directory.apply(add_op(gid, dn))
    assert read(samba_dc, dn, "cn") == {"cn": [name]}
    group = directory.find_group(gid)
    assert group is not None and same_dn(group.dn, dn)

    renamed = "renamed " + name[::-1]
    assert directory.apply(Rename(gid, group.dn, rdn_for(renamed), Changes())) == 2
    assert read(samba_dc, dn) is None
    assert read(samba_dc, dn_for(renamed, ou), "cn") == {"cn": [renamed]}
    again = directory.find_group(gid)
    assert again is not None and same_dn(again.dn, dn_for(renamed, ou))

    back = Changes(replace={"displayName": (name,)})
    assert directory.apply(Rename(gid, again.dn, rdn_for(name), back)) == 2
    assert read(samba_dc, dn, "cn", "displayName") == {"cn": [name], "displayname": [name]}


def test_rename_stays_in_its_parent_and_names_one_cn(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    directory = open_directory(samba_dc, ou)
    gid = new_id()
    dn = dn_for("Stay", ou)
    directory.apply(add_op(gid, dn))
    for new_rdn in (f"CN=Away,{samba_dc.base_dn}", "OU=Stay", "CN=a+sn=b", "CN="):
        with pytest.raises(PolicyRefused):
            directory.apply(Rename(gid, dn, new_rdn))
    assert read(samba_dc, dn) is not None


# --- errors ----------------------------------------------------------------------------


def test_a_stopped_dc_is_transient_and_the_next_call_reconnects(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    directory = open_directory(samba_dc, ou)
    gid = new_id()
    dn = dn_for("Survivor", ou)
    directory.apply(add_op(gid, dn))
    assert directory.find_group(gid) is not None
    samba_dc.stop()
    try:
        with pytest.raises(LdapUnavailable):
            directory.find_group(gid)
        with pytest.raises(LdapUnavailable):
            directory.apply(Modify(gid, dn, Changes(replace={"description": ("x",)})))
    finally:
        samba_dc.start()
    assert directory.apply(Modify(gid, dn, Changes(replace={"description": ("back",)}))) == 1
    entry = read(samba_dc, dn)
    assert entry is not None and entry["description"] == ["back"]


def test_refusals_by_the_dc_are_permanent_and_name_code_and_dn(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    directory = open_directory(samba_dc, ou)
    gid = new_id()
    dn = dn_for("Refused", ou)
    directory.apply(add_op(gid, dn))
    assert directory.find_group(gid) is not None

    errors = []
    operations: tuple[Operation, ...] = (
        Modify(gid, dn, Changes(replace={"notAnAttribute": ("x",)})),
        add_op(gid, dn),  # already exists
        add_op(new_id(), dn_for("Other", ou), sAMAccountName=(sam_account_name_for(gid),)),
    )
    for operation in operations:
        with pytest.raises(DirectoryRefused) as refused:
            directory.apply(operation)
        errors.append(str(refused.value))
    for message in errors:
        assert any(name in message for name in RESULT_NAMES.values()), message
        assert "OU=" in message
        assert samba_dc.admin_password not in message
    assert "entryAlreadyExists" in errors[1]
    # the connection survives a refusal
    assert directory.find_group(gid) is not None


def test_tls_is_validated_and_starttls_works(
    samba_dc: SambaDC, make_ou: MakeOu, client: str, tmp_path: Path
) -> None:
    ou = make_ou(samba_dc)
    starttls = LdapDirectory(
        url=samba_dc.ldap_url,
        user=samba_dc.admin_dn,
        password=samba_dc.admin_password,
        target_ou=ou,
        ca_file=samba_dc.ca_file,
        client=client,
    )
    with starttls:
        assert starttls.find_group(new_id()) is None
    untrusted = LdapDirectory(
        url=samba_dc.ldaps_url,
        user=samba_dc.admin_dn,
        password=samba_dc.admin_password,
        target_ou=ou,
        client=client,
    )
    with untrusted, pytest.raises(ConfigError, match="certificate"):
        untrusted.find_group(new_id())
    other_ca = new_ca_pem(tmp_path / "other-ca.pem")
    for url in (samba_dc.ldaps_url, samba_dc.ldap_url):
        wrong_ca = LdapDirectory(
            url=url,
            user=samba_dc.admin_dn,
            password=samba_dc.admin_password,
            target_ou=ou,
            ca_file=other_ca,
            client=client,
        )
        with wrong_ca, pytest.raises(ConfigError, match="certificate"):
            wrong_ca.find_group(new_id())
    # The DC's own address as a number: it reaches the DC, but is not a name the
    # certificate was issued for (its subjectAltName holds the dotted IP and a DNS name).
    as_number = int(ipaddress.IPv4Address(samba_dc.address))
    misnamed = LdapDirectory(
        url=f"ldaps://{as_number}:636",
        user=samba_dc.admin_dn,
        password=samba_dc.admin_password,
        target_ou=ou,
        ca_file=samba_dc.ca_file,
        client=client,
    )
    with misnamed, pytest.raises(ConfigError, match="certificate"):
        misnamed.find_group(new_id())
    secret = "Not-the-password-" + uuid.uuid4().hex
    wrong = LdapDirectory(
        url=samba_dc.ldaps_url,
        user=samba_dc.admin_dn,
        password=secret,
        target_ou=ou,
        ca_file=samba_dc.ca_file,
        client=client,
    )
    with wrong, pytest.raises(ConfigError) as refused:
        wrong.find_group(new_id())
    assert "invalidCredentials" in str(refused.value)
    assert secret not in str(refused.value) and secret not in repr(wrong)


def test_results_are_directory_groups(
    samba_dc: SambaDC, make_ou: MakeOu, open_directory: OpenDirectory
) -> None:
    ou = make_ou(samba_dc)
    directory = open_directory(samba_dc, ou)
    gid = new_id()
    directory.apply(add_op(gid, dn_for("Typed", ou), proxyAddresses=("SMTP:a@b.c",)))
    group = directory.find_group(gid)
    assert isinstance(group, DirectoryGroup)
    assert all(isinstance(v, tuple) for v in group.attributes.values())
    assert set(group.attributes) <= {
        "adminDescription",
        "groupType",
        "displayName",
        "description",
        "info",
        "mail",
        "proxyAddresses",
        *EXCHANGE_ATTRIBUTES,
    }
    assert group.attributes["proxyAddresses"] == ("SMTP:a@b.c",)
