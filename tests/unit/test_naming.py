from hypothesis import given
from hypothesis import strategies as st

from writeback.domain.model import group_id_from_anchor
from writeback.domain.naming import (
    MAX_CN,
    DnFormat,
    _escaped_dn_key,
    _plain_dn_key,
    canonical_dn,
    cn_for,
    dn_for,
    dn_key,
    escape_dn_value,
    escape_filter_value,
    first_rdn,
    parent_of,
    sam_account_name_for,
    strictly_within,
    unescape_dn_value,
)

GID = "3a5c3221-c465-48c0-95b8-e9305786a271"


def test_objectid_format_is_connects_default() -> None:
    assert cn_for(GID, "Sales", DnFormat.OBJECT_ID) == f"Group_{GID}"


def test_displayname_format_appends_last_12_of_object_id() -> None:
    assert cn_for(GID, "Administrators", DnFormat.DISPLAY_NAME) == "Administrators_e9305786a271"


def test_displayname_format_trims_and_caps_at_64() -> None:
    cn = cn_for(GID, "  " + "x" * 100 + "  ", DnFormat.DISPLAY_NAME)
    assert len(cn) == MAX_CN
    assert cn.endswith("_e9305786a271")
    assert cn.startswith("x")


def test_displayname_of_only_spaces_still_names_the_group() -> None:
    assert cn_for(GID, "   ", DnFormat.DISPLAY_NAME) == "Group_e9305786a271"


def test_control_characters_are_dropped_from_cn() -> None:
    assert cn_for(GID, "a\nb\x00c", DnFormat.DISPLAY_NAME) == "a b c_e9305786a271"


def test_escape_specials_leading_hash_and_edge_spaces() -> None:
    assert escape_dn_value('a,b+c"d\\e<f>g;h=i') == 'a\\,b\\+c\\"d\\\\e\\<f\\>g\\;h\\=i'
    assert escape_dn_value("#x") == "\\#x"
    assert escape_dn_value("x#") == "x#"
    assert escape_dn_value(" x ") == "\\ x\\ "


def test_filter_escaping() -> None:
    assert escape_filter_value("a*(b)\\c\x00") == "a\\2a\\28b\\29\\5cc\\00"


def test_sam_account_name_is_deterministic_and_short() -> None:
    sam = sam_account_name_for(GID)
    assert sam == "Group_3a5c3221c46548"
    assert len(sam) <= 20


def test_parent_and_first_rdn_respect_escaped_commas() -> None:
    dn = dn_for("a,b", "OU=W,DC=x")
    assert dn == "CN=a\\,b,OU=W,DC=x"
    assert parent_of(dn) == "OU=W,DC=x"
    assert first_rdn(dn) == "CN=a\\,b"


def test_strictly_within_is_case_insensitive_and_not_fooled_by_suffixes() -> None:
    assert strictly_within("CN=g,OU=W,DC=x", "ou=w, dc=X")
    assert not strictly_within("OU=W,DC=x", "OU=W,DC=x")
    assert not strictly_within("CN=g,OU=NotW,DC=x", "OU=W,DC=x")
    assert not strictly_within("CN=g\\,OU=W,DC=x,OU=Other,DC=x", "OU=W,DC=x")


def test_unescape_hex_pairs_as_utf8() -> None:
    assert unescape_dn_value("caf\\C3\\A9\\2C") == "café,"


@given(st.text())
def test_escape_round_trips(value: str) -> None:
    assert unescape_dn_value(escape_dn_value(value)) == value


@given(st.text(min_size=1), st.text(min_size=1))
def test_a_child_dn_is_always_within_its_parent(cn: str, ou: str) -> None:
    parent = f"OU={escape_dn_value(ou)},DC=example,DC=com"
    dn = dn_for(cn, parent)
    assert parent_of(dn) == parent
    assert strictly_within(dn, parent)


def test_canonical_dn_drops_escapes_a_dc_added_and_keeps_the_needed_ones() -> None:
    assert canonical_dn("CN=On call\\?_12,OU=W,DC=x") == "CN=On call?_12,OU=W,DC=x"
    assert canonical_dn("CN=caf\\C3\\A9,OU=M365\\, Groups,DC=x") == "CN=café,OU=M365\\, Groups,DC=x"
    assert canonical_dn("cn=a+sn=b,OU=W") == "cn=a+sn=b,OU=W"


@given(st.text(min_size=1), st.text(min_size=1))
def test_canonical_dn_keeps_our_own_dns_and_their_identity(cn: str, ou: str) -> None:
    dn = dn_for(cn, f"OU={escape_dn_value(ou)},DC=example,DC=com")
    assert canonical_dn(dn) == dn
    assert dn_key(canonical_dn(dn)) == dn_key(dn)


def test_only_a_guid_after_the_prefix_makes_an_anchor_ours() -> None:
    assert group_id_from_anchor(f"Group_{GID}") == GID
    for text in ("Group_Finance", "Group_", f"Group_{GID}x", f"group_{GID}", GID):
        assert group_id_from_anchor(text) is None


@given(st.text(alphabet=st.sampled_from("ab=, +CNOUé\t"), max_size=40))
def test_a_dn_without_escapes_keys_as_the_escape_aware_parser_keys_it(dn: str) -> None:
    # dn_key parses a DN without a backslash by splitting on commas; the
    # escape-aware parser must agree on every such string, blanks and empty RDNs too.
    assert _plain_dn_key(dn) == _escaped_dn_key(dn)
