"""Any text a group owner can type survives the trip to AD, or is refused with a reason.

Property-based (hypothesis) against the real Samba DCs: display names, mail
nicknames (Exchange-prepared forest) and descriptions go through the mapping,
the planner and the real LDAP adapter, and are read back over the harness's
admin connection. What may differ from the input is exactly what the mapping
documents (NUL removed, cut to the schema's rangeUpper, blank means absent);
what the DC refuses must come back as ``DirectoryRefused`` naming the result.
Search filters built with ``escape_filter_value`` find exactly the object
whatever the value holds. Example counts stay small for CI time.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from ldap3 import BASE, LEVEL

from tests.conftest import MakeOu
from writeback.adapters.directory import LdapDirectory
from writeback.domain.mapping import MappingOptions, desired_group
from writeback.domain.model import CloudGroup
from writeback.domain.naming import MAX_CN, DnFormat, escape_filter_value
from writeback.domain.planner import plan_group
from writeback.errors import DirectoryRefused
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba

EXAMPLES = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Any Unicode text (surrogates cannot be UTF-8, so hypothesis leaves them out), weighted
# towards the characters DNs, filters and AD care about.
SPECIALS = ',+"\\<>;=#*()\x00 \t\n\u00a0\u200b\ufeffé漢🙂'
HOSTILE = st.text(st.sampled_from(SPECIALS) | st.characters(), max_size=300)
#: Samba's filter parser needs control characters hex-escaped (a raw trailing CR matches
#: nothing), which ``escape_filter_value`` leaves as RFC 4515 allows; writeback filters
#: only on GUID anchors, so the filter property is checked on text without them.
NO_CONTROLS = st.text(
    st.sampled_from(',+"\\<>;=#*() \u00a0\u200bé漢🙂')
    | st.characters(exclude_categories=("Cc", "Cs")),
    max_size=100,
)


def samba_matches(value: str) -> bool:
    """False for text that begins or ends in white space other than ASCII spaces (NBSP,
    EM SPACE, U+3000...). Samba stores such a value exactly, but its equality match
    never finds it, escaped or not (measured on 4.17 for U+00A0, U+2000, U+2003,
    U+205F and U+3000, also next to ASCII spaces); inside a value they match.
    writeback filters only on anchors and names it made, which never begin or end so."""
    core = value.strip(" ")
    return not core or not (core[0].isspace() or core[-1].isspace())


def cleaned(value: str, limit: int) -> list[str] | None:
    """What the mapping documents for a text attribute: NUL dropped, cut, blank = absent."""
    text = value.replace("\x00", "")[:limit]
    return [text] if text.strip() else None


def encodable(*texts: str) -> bool:
    """False for text with lone surrogates (valid in Graph's JSON, impossible in UTF-8)."""
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read(dc: SambaDC, dn: str, *attributes: str) -> dict[str, list[str]]:
    conn = dc.connection()
    try:
        assert conn.search(dn, "(objectClass=*)", BASE, attributes=list(attributes))
        found = conn.entries[0].entry_attributes_as_dict
        return {name.lower(): [str(v) for v in values] for name, values in found.items() if values}
    finally:
        conn.unbind()


def write(directory: LdapDirectory, options: MappingOptions, group: CloudGroup) -> str | None:
    """Create the group as the sync would; its DN, or None when the DC refused it."""
    desired = desired_group(group, options)
    operation = plan_group(desired, directory.find_group(group.id), options.target_ou)
    try:
        if operation is not None:
            directory.apply(operation)
    except DirectoryRefused as refused:
        assert "OU=" in str(refused) and str(refused).strip(), "a refusal must say what and where"
        return None
    found = directory.find_group(group.id)
    assert found is not None
    return found.dn


@pytest.fixture(scope="module")
def plain_ou(samba_dc: SambaDC) -> str:
    return samba_dc.create_ou(f"t-hostile-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def exchange_ou(exchange_dc: SambaDC) -> str:
    if not exchange_dc.is_running():
        exchange_dc.start()
    return exchange_dc.create_ou(f"t-hostile-{uuid.uuid4().hex[:8]}")


@EXAMPLES
@given(name=HOSTILE, description=HOSTILE)
def test_any_display_name_and_description_round_trip_in_displayname_format(
    samba_dc: SambaDC, plain_ou: str, name: str, description: str
) -> None:
    with samba_dc.directory(plain_ou) as directory:
        options = MappingOptions(target_ou=plain_ou, dn_format=DnFormat.DISPLAY_NAME)
        group = CloudGroup(str(uuid.uuid4()), name, description=description)
        dn = write(directory, options, group)
        if not encodable(name, description):
            assert dn is None, "text that is not UTF-8 must be refused"
            return
        assert dn is not None, "the DC refused a group the mapping produced"
        got = read(samba_dc, dn, "displayName", "description", "cn")
        assert got.get("displayname") == cleaned(name, 256)
        assert got.get("description") == cleaned(description, 1024)
        [cn] = got["cn"]
        assert len(cn) <= MAX_CN and cn.endswith("_" + group.id[-12:])


@EXAMPLES
@given(first=HOSTILE, second=HOSTILE)
def test_a_rename_between_any_two_names_lands_on_the_second(
    samba_dc: SambaDC, plain_ou: str, first: str, second: str
) -> None:
    assume(encodable(first, second))
    with samba_dc.directory(plain_ou) as directory:
        options = MappingOptions(target_ou=plain_ou, dn_format=DnFormat.DISPLAY_NAME)
        gid = str(uuid.uuid4())
        assert write(directory, options, CloudGroup(gid, first)) is not None
        dn = write(directory, options, CloudGroup(gid, second))
        assert dn is not None
        assert read(samba_dc, dn, "displayName").get("displayname") == cleaned(second, 256)
        assert (
            plan_group(
                desired_group(CloudGroup(gid, second), options), directory.find_group(gid), plain_ou
            )
            is None
        ), "a second sync must find nothing to write"


@EXAMPLES
@given(nickname=HOSTILE, name=HOSTILE)
def test_any_mail_nickname_round_trips_or_is_refused_with_a_reason(
    exchange_dc: SambaDC, exchange_ou: str, nickname: str, name: str
) -> None:
    with exchange_dc.directory(exchange_ou) as directory:
        options = MappingOptions(
            target_ou=exchange_ou, schema_attributes=directory.schema_attributes()
        )
        group = CloudGroup(str(uuid.uuid4()), name, mail_nickname=nickname)
        dn = write(directory, options, group)
        if not encodable(nickname, name):
            assert dn is None, "text that is not UTF-8 must be refused"
            return
        assert dn is not None, "the DC refused a group the mapping produced"
        got = read(exchange_dc, dn, "mailNickname", "displayName")
        assert got.get("mailnickname") == cleaned(nickname, 64)
        assert got.get("displayname") == cleaned(name, 256)


@EXAMPLES
@given(before=NO_CONTROLS, after=NO_CONTROLS)
def test_an_escaped_filter_value_matches_exactly_that_value(
    samba_dc: SambaDC, plain_ou: str, before: str, after: str
) -> None:
    # A token in the middle makes the value unique, so exactly one object may match;
    # an unescaped * ( ) \ around it would widen, break or reshape the filter.
    value = before + uuid.uuid4().hex + after
    assume(samba_matches(value))
    with samba_dc.directory(plain_ou) as directory:
        group = CloudGroup(str(uuid.uuid4()), value)
        assert write(directory, MappingOptions(target_ou=plain_ou), group) is not None
        conn = samba_dc.connection()
        try:
            conn.search(
                plain_ou,
                f"(&(objectClass=group)(displayName={escape_filter_value(value)}))",
                LEVEL,
                attributes=["adminDescription"],
            )
            anchors = [str(e.entry_attributes_as_dict["adminDescription"][0]) for e in conn.entries]
        finally:
            conn.unbind()
        assert anchors == [f"Group_{group.id}"]


def test_a_question_mark_in_the_display_name_survives_a_later_write(
    samba_dc: SambaDC, make_ou: MakeOu
) -> None:
    ou = make_ou(samba_dc)
    with samba_dc.directory(ou) as directory:
        options = MappingOptions(target_ou=ou, dn_format=DnFormat.DISPLAY_NAME)
        gid = str(uuid.uuid4())
        assert write(directory, options, CloudGroup(gid, "On call?")) is not None
        dn = write(directory, options, CloudGroup(gid, "On call?", description="rota"))
        assert dn is not None
        assert read(samba_dc, f"<GUID={guid_of(samba_dc, ou, gid)}>", "description") == {
            "description": ["rota"]
        }


def guid_of(dc: SambaDC, ou: str, gid: str) -> str:
    conn = dc.connection()
    try:
        conn.search(ou, f"(adminDescription=Group_{gid})", LEVEL, attributes=["objectGUID"])
        raw = conn.entries[0].entry_attributes_as_dict["objectGUID"][0]
        return str(uuid.UUID(bytes_le=raw))
    finally:
        conn.unbind()


def test_the_mapping_never_makes_a_value_the_schema_refuses(
    samba_dc: SambaDC, make_ou: MakeOu
) -> None:
    ou = make_ou(samba_dc)
    with samba_dc.directory(ou) as directory:
        options = MappingOptions(target_ou=ou, dn_format=DnFormat.DISPLAY_NAME)
        longest = CloudGroup(str(uuid.uuid4()), "n" * 5000, description="d" * 5000)
        dn = write(directory, options, longest)
        assert dn is not None
        got = read(samba_dc, dn, "displayName", "description")
        assert got == {"displayname": ["n" * 256], "description": ["d" * 1024]}
