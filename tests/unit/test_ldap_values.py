"""The LDAP adapter's pure parsing rules: extended DNs, DN keys, ranges, SIDs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from writeback.adapters.ldap_values import (
    MemberRange,
    guid_filter_value,
    parse_extended_dn,
    parse_range,
    read_dn,
    sid_from_bytes,
    split_members,
    split_plain_members,
)
from writeback.domain.naming import (
    canonical_dn,
    dn_for,
    dn_key,
    single_cn_rdn,
    strictly_within,
)

HOSTILE = ['a, b + c "d" \\ <e> ; f = g', "#hash", "  spaced  ", "Отдел 営業部", "x=y\\"]


def test_extended_dn_with_guid_and_sid() -> None:
    value = "<GUID=3208fd0a-2a34-48f6-8cdd-4f33e840c5d2>;<SID=S-1-5-21-1-2-3-3102>;CN=g\\<1\\>,DC=x"
    ref = parse_extended_dn(value)
    assert ref.guid == "3208fd0a-2a34-48f6-8cdd-4f33e840c5d2"
    assert ref.sid == "S-1-5-21-1-2-3-3102"
    assert ref.dn == "CN=g\\<1\\>,DC=x"


def test_extended_dn_without_sid_and_plain_dn() -> None:
    assert parse_extended_dn("<GUID=abc>;CN=contact,DC=x").sid is None
    assert parse_extended_dn("<GUID=abc>;CN=contact,DC=x").dn == "CN=contact,DC=x"
    assert parse_extended_dn("CN=plain,DC=x").dn == "CN=plain,DC=x"
    assert parse_extended_dn("<SID=S-1-5-32-544>").sid == "S-1-5-32-544"


@pytest.mark.parametrize("name", HOSTILE)
def test_dn_keys_ignore_how_a_value_is_escaped(name: str) -> None:
    ours = dn_for(name, "OU=Groups,DC=x,DC=test")
    hex_escaped = ours.replace("\\;", "\\3B").replace("\\=", "\\3D").replace("\\#", "\\23")
    assert dn_key(ours) == dn_key(hex_escaped)
    assert dn_key(ours) == dn_key(ours.upper().replace("OU=GROUPS", "ou=groups"))
    assert dn_key(ours)[0] == ("cn", name.casefold())


def test_strictly_within() -> None:
    base = "OU=Groups,DC=x,DC=test"
    assert strictly_within("CN=a,OU=Groups,DC=x,DC=test", base)
    assert strictly_within("CN=a,OU=Child,ou=groups, DC=x,DC=test", base)
    assert not strictly_within(base, base)
    assert not strictly_within("CN=a,OU=Other,DC=x,DC=test", base)
    assert not strictly_within("CN=a\\,OU=Groups,DC=x,DC=test", base)
    assert not strictly_within("CN=a,OU=XGroups,DC=x,DC=test", base)
    assert not strictly_within("<GUID=abc>", base)


def test_single_cn_rdn() -> None:
    assert single_cn_rdn("CN=a\\, b")
    assert single_cn_rdn("cn=\\#x\\+y")
    assert not single_cn_rdn("CN=a,OU=b")
    assert not single_cn_rdn("CN=a+sn=b")
    assert not single_cn_rdn("OU=a")
    assert not single_cn_rdn("CN=")
    assert not single_cn_rdn("CN=  ")


def test_parse_range() -> None:
    assert parse_range("member") is None
    assert parse_range("member;range=0-1499") == MemberRange(0, 1499)
    assert parse_range("member;range=1500-*") == MemberRange(1500, None)
    with pytest.raises(ValueError):
        parse_range("member;range=a-b")


def test_sid_from_bytes() -> None:
    raw = bytes.fromhex(
        "010500000000000515000000" + "01000000" + "02000000" + "03000000" + "1e0c0000"
    )
    assert sid_from_bytes(raw) == "S-1-5-21-1-2-3-3102"
    assert sid_from_bytes(bytes.fromhex("01020000000000052000000020020000")) == "S-1-5-32-544"
    with pytest.raises(ValueError):
        sid_from_bytes(raw[:-1])


def test_split_members_agrees_with_parse_extended_dn() -> None:
    guid = "3208fd0a-2a34-48f6-8cdd-4f33e840c5d2"
    values = [
        f"<GUID={guid}>;<SID=S-1-5-21-1-2-3-3102>;CN=user,DC=x",
        f"<GUID={guid}>;CN=contact\\, by hand,DC=x",  # no SID: a contact
        f"<GUID={guid}>;CN=g\\>;\\<SID=S-1-9,DC=x",  # looks like a SID only inside the DN
        "<SID=S-1-5-32-544>;CN=Administrators,CN=Builtin,DC=x",  # SID without a GUID
        "CN=plain,DC=x",
        f"<GUID={guid}>;<SID=S-1-5-21-9>;CN=Отдел 営業部,DC=x",
        *(f"<GUID={guid}>;<SID=S-1-5-21-{i}>;CN={name},DC=x" for i, name in enumerate(HOSTILE)),
    ]
    sids, others = split_members(v.encode() for v in values)
    expected_sids = {r.sid for v in values if (r := parse_extended_dn(v)).sid}
    expected_others = {r.dn for v in values if not (r := parse_extended_dn(v)).sid}
    assert sids == expected_sids
    assert others == expected_others
    assert "CN=g\\>;\\<SID=S-1-9,DC=x" in others
    assert "CN=plain,DC=x" in others


def test_split_plain_members_names_each_dn_by_its_resolved_sid() -> None:
    guid = "3208fd0a-2a34-48f6-8cdd-4f33e840c5d2"
    resolved = {
        b"CN=user,DC=x": "S-1-5-21-1-2-3-3102",
        "CN=Отдел 営業部,DC=x".encode(): "S-1-5-21-9",
        b"CN=contact\\, by hand,DC=x": "",  # found, without a SID: a contact
    }
    values = [*resolved, f"<GUID={guid}>;<SID=S-1-5-21-7>;CN=later slice,DC=x".encode()]
    split = split_plain_members(values, resolved)
    assert split == (
        {"S-1-5-21-1-2-3-3102", "S-1-5-21-9", "S-1-5-21-7"},
        {"CN=contact\\, by hand,DC=x"},
    )
    assert split_plain_members([], resolved) == (set(), set())


def test_split_plain_members_refuses_to_guess_an_unresolved_dn() -> None:
    """A DN not resolved is not taken for a member without a SID (it would be
    removed by DN): the caller reads the group again with the extended-DN control."""
    resolved = {b"CN=user,DC=x": "S-1-5-21-1"}
    assert split_plain_members([b"CN=user,DC=x", b"CN=elsewhere,DC=y"], resolved) is None
    assert split_plain_members([b"cn=USER,dc=x"], resolved) is None  # spelt otherwise


def test_guid_filter_value_is_the_objectguid_bytes_escaped() -> None:
    guid = "c89c1df6-553d-4e78-b14f-c91745a788fa"
    raw = b"\xf6\x1d\x9c\xc8=UxN\xb1O\xc9\x17E\xa7\x88\xfa"  # as Samba returns objectGUID
    assert guid_filter_value(guid) == "".join(f"\\{b:02x}" for b in raw)
    assert guid_filter_value(guid.upper()) == guid_filter_value(guid)
    with pytest.raises(ValueError):
        guid_filter_value("not a guid")


_DN_TEXT = st.text(alphabet=st.sampled_from(list('aZ0 =,+"\\<>;#\t\x00é?-_')), max_size=30)


@given(st.lists(st.tuples(_DN_TEXT, _DN_TEXT), min_size=1, max_size=5))
def test_read_dn_is_canonical_dn_and_its_key(parts: list[tuple[str, str]]) -> None:
    for dn in (",".join(f"{a}={v}" for a, v in parts), ",".join(a + v for a, v in parts)):
        canonical = canonical_dn(dn)
        assert read_dn(dn) == (canonical, dn_key(canonical))


def test_read_dn_of_plain_and_escaped_dns() -> None:
    plain = "CN=Group_3208fd0a-2a34-48f6-8cdd-4f33e840c5d2,OU=M365 Groups,DC=corp,DC=example"
    assert read_dn(plain) == (plain, dn_key(plain))
    assert read_dn("CN=On call\\?,OU=x,DC=y")[0] == "CN=On call?,OU=x,DC=y"
    assert read_dn("CN=a\\,b,DC=y") == ("CN=a\\,b,DC=y", (("cn", "a,b"), ("dc", "y")))
