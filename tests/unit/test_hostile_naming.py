"""Properties of naming and mapping for any text a group owner can type.

``test_naming.py`` checks that DN escaping round-trips through our own
unescaping; here filter values are decoded back by RFC 4515's rules, and the
CN and the managed attributes are checked to stay inside what AD accepts
whatever the input. The real DC's side
of the same properties is ``tests/integration/test_hostile_roundtrip.py``.
"""

from __future__ import annotations

import re
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from writeback.domain.mapping import MappingOptions, managed_attributes, smtp_proxy_addresses
from writeback.domain.model import CloudGroup
from writeback.domain.naming import (
    MAX_CN,
    MAX_SAM,
    DnFormat,
    cn_for,
    escape_filter_value,
    sam_account_name_for,
)

OU = "OU=Writeback,DC=corp,DC=example"
SPECIALS = ',+"\\<>;=#*()\x00 \t\n\u00a0\u200b\ufeffé漢🙂'
HOSTILE = st.text(st.sampled_from(SPECIALS) | st.characters(), max_size=200)
GIDS = st.uuids().map(str)
LIMITS = {"displayName": 256, "description": 1024, "mail": 256, "mailNickname": 64}
EXCHANGE = MappingOptions(
    target_ou=OU,
    schema_attributes=frozenset(
        {"mailnickname", "msexchrecipienttypedetails", "msexchrecipientdisplaytype"}
    ),
)


def unescape_filter(value: str) -> str:
    """RFC 4515's decoding: ``\\XX`` is the byte 0xXX of the UTF-8 value."""
    # surrogatepass: Graph's JSON can carry lone surrogates, escaping must not choke on them
    encoded = value.encode("utf-8", "surrogatepass")
    raw = re.sub(rb"\\([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), encoded)
    return raw.decode("utf-8", "surrogatepass")


@given(HOSTILE)
def test_an_escaped_filter_value_has_no_live_specials_and_decodes_back(value: str) -> None:
    escaped = escape_filter_value(value)
    assert not set(escaped) & set("*()\x00")
    assert re.fullmatch(r"(?:[^\\]|\\[0-9a-fA-F]{2})*", escaped)
    assert unescape_filter(escaped) == value


@given(HOSTILE, GIDS)
def test_any_display_name_gives_a_cn_ad_accepts(name: str, gid: str) -> None:
    cn = cn_for(gid, name, DnFormat.DISPLAY_NAME)
    assert 0 < len(cn) <= MAX_CN
    assert cn.endswith("_" + gid[-12:])
    assert cn.isprintable() and cn == cn.strip() and "  " not in cn


@given(GIDS)
def test_sam_account_names_fit(gid: str) -> None:
    assert len(sam_account_name_for(gid)) <= MAX_SAM


@settings(max_examples=200)
@given(name=HOSTILE, description=HOSTILE, mail=HOSTILE, nickname=HOSTILE)
def test_managed_attributes_stay_within_the_schema_for_any_text(
    name: str, description: str, mail: str, nickname: str
) -> None:
    group = CloudGroup(
        str(uuid.uuid4()), name, description=description, mail=mail, mail_nickname=nickname
    )
    attributes = managed_attributes(group, EXCHANGE)
    for attribute, limit in LIMITS.items():
        values = attributes[attribute]
        assert len(values) <= 1
        for value in values:
            assert len(value) <= limit and "\x00" not in value and value.strip()
    given_values = {"displayName": name, "description": description, "mailNickname": nickname}
    for attribute, text in given_values.items():
        if "\x00" not in text and text.strip() and len(text) <= LIMITS[attribute]:
            assert attributes[attribute] == (text,), "clean text is written verbatim"


@given(st.lists(HOSTILE | st.sampled_from(["SMTP:a@x.com", "smtp:A@X.com", "X500:/o=x"])))
def test_proxy_addresses_are_smtp_unique_and_primary_first(proxies: list[str]) -> None:
    group = CloudGroup(str(uuid.uuid4()), "g", proxy_addresses=tuple(proxies))
    written = smtp_proxy_addresses(group)
    assert all(p.startswith(("SMTP:", "smtp:")) and p[5:].strip() for p in written)
    assert sum(p.startswith("SMTP:") for p in written) <= 1
    assert not any(p.startswith("SMTP:") for p in written[1:])
    lowered = [p[5:].lower() for p in written]
    assert len(lowered) == len(set(lowered))
