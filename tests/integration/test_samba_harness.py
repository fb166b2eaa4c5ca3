"""The Samba AD harness itself, and the facts about Samba the product relies on.

These tests pin down how the real DC behaves (TLS, ``<SID=...>`` references,
extended DNs, ranged retrieval, controls, schema), so a Samba upgrade that
changes any of it shows up here first. The facts are summed up in the
docstring of ``writeback_sandbox.samba``.
"""

from __future__ import annotations

import re
import socket
import ssl
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ldap3
import pytest
from ldap3 import BASE, MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE
from ldap3.core.exceptions import LDAPException

from writeback_sandbox import samba
from writeback_sandbox.samba import SambaDC, new_ca_pem

pytestmark = pytest.mark.samba

MakeOu = Callable[..., str]

#: Extended DN control, value SEQUENCE { INTEGER 1 }: GUID and SID as strings.
EXTENDED_DN = ("1.2.840.113556.1.4.529", False, b"\x30\x03\x02\x01\x01")
PERMISSIVE_MODIFY = "1.2.840.113556.1.4.1413"
ASSERTION = "1.3.6.1.1.12"
EXTENDED_DN_VALUE = re.compile(
    r"^<GUID=[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}>;"
    r"<SID=(S-1-5-21-\d+-\d+-\d+-\d+)>;CN=.+$"
)
EXCHANGE_VALUES = {
    "mailNickname": "team-nick",
    "msExchRecipientTypeDetails": "8589934592",
    "msExchRecipientDisplayType": "1073741833",
    "msExchRequireAuthToSendTo": "TRUE",
    "msExchHideFromAddressLists": "FALSE",
}


def token() -> str:
    return uuid.uuid4().hex[:8]


def entry(conn: ldap3.Connection, dn: str, *attributes: str, **kw: Any) -> dict[str, Any]:
    """raw_attributes of one entry, read with a base search."""
    conn.search(dn, "(objectClass=*)", BASE, attributes=list(attributes), **kw)
    assert len(conn.response) == 1, conn.result
    raw: dict[str, Any] = conn.response[0]["raw_attributes"]
    return raw


def texts(values: list[bytes]) -> list[str]:
    return [value.decode() for value in values]


def ber(tag: int, content: bytes) -> bytes:
    assert len(content) < 128
    return bytes([tag, len(content)]) + content


def assertion_control(attribute: str, value: str, critical: bool) -> tuple[str, bool, bytes]:
    """RFC 4528 assertion control; its value is the filter (attribute=value) in BER."""
    match = ber(0x04, attribute.encode()) + ber(0x04, value.encode())
    return (ASSERTION, critical, ber(0xA3, match))  # [3] equalityMatch


# --- TLS ------------------------------------------------------------------------------


def test_ldaps_bind_validates_the_dc_certificate(samba_dc: SambaDC) -> None:
    context = ssl.create_default_context(cafile=samba_dc.ca_file)
    with (
        socket.create_connection((samba_dc.address, 636), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=samba_dc.address) as tls,
    ):
        cert = tls.getpeercert()
    assert cert is not None
    assert ("IP Address", samba_dc.address) in cert["subjectAltName"]
    assert ("DNS", samba_dc.dns_name) in cert["subjectAltName"]

    conn = samba_dc.connection()
    try:
        assert conn.bound
        assert samba_dc.ldaps_url == f"ldaps://{samba_dc.address}:636"
        assert entry(conn, samba_dc.base_dn, "objectSid")["objectSid"]
    finally:
        conn.unbind()


def test_starttls_on_389_binds(samba_dc: SambaDC) -> None:
    conn = samba_dc.connection(start_tls=True)
    try:
        assert conn.bound and conn.tls_started
        assert samba_dc.ldap_url == f"ldap://{samba_dc.address}:389"
        assert entry(conn, samba_dc.base_dn, "objectSid")["objectSid"]
    finally:
        conn.unbind()


def test_simple_bind_without_tls_is_refused(samba_dc: SambaDC) -> None:
    server = ldap3.Server(samba_dc.address, port=389, get_info=ldap3.NONE)
    conn = ldap3.Connection(server, samba_dc.admin_dn, samba_dc.admin_password)
    conn.open()
    try:
        assert not conn.bind()
        assert conn.result["result"] == 8  # strongerAuthRequired
    finally:
        conn.unbind()


def test_a_certificate_from_another_ca_is_rejected(samba_dc: SambaDC, tmp_path: Path) -> None:
    other_ca = new_ca_pem(tmp_path / "other-ca.pem")
    context = ssl.create_default_context(cafile=other_ca)
    with (
        socket.create_connection((samba_dc.address, 636), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw, server_hostname=samba_dc.address)
    with pytest.raises(LDAPException):
        samba_dc.connection(ca_file=other_ca, connect_timeout=5)
    with pytest.raises(LDAPException):
        samba_dc.connection(ca_file=other_ca, start_tls=True, connect_timeout=5)


# --- objects, SIDs, extended DNs ------------------------------------------------------


def test_users_resolve_by_sid(samba_dc: SambaDC, make_ou: MakeOu) -> None:
    ou = make_ou(samba_dc)
    assert ou.startswith("OU=t-") and ou.endswith(samba_dc.base_dn)
    child = samba_dc.create_ou("People", ou)
    assert child == f"OU=People,{ou}"
    names = [f"u{token()}{i}" for i in range(5)]
    sids = samba_dc.create_users(child, names)

    assert set(sids) == set(names)
    domain_sid = samba_dc.domain_sid()
    conn = samba_dc.connection()
    try:
        for name, sid in sids.items():
            assert sid.startswith(domain_sid + "-")
            found = entry(conn, f"<SID={sid}>", "sAMAccountName", "objectClass")
            assert conn.response[0]["dn"].lower() == f"CN={name},{child}".lower()
            assert texts(found["sAMAccountName"]) == [name]
            assert "user" in texts(found["objectClass"])
    finally:
        conn.unbind()


def test_members_by_sid_read_back_with_extended_dns(any_dc: SambaDC, make_ou: MakeOu) -> None:
    ou = make_ou(any_dc)
    sids = any_dc.create_users(ou, [f"m{token()}{i}" for i in range(3)])
    group = any_dc.create_group(ou, f"g{token()}")
    conn = any_dc.connection()
    try:
        conn.modify(group, {"member": [(MODIFY_ADD, [f"<SID={s}>" for s in sids.values()])]})
        values = texts(entry(conn, group, "member", controls=[EXTENDED_DN])["member"])
        assert len(values) == 3
        matched = [EXTENDED_DN_VALUE.match(value) for value in values]
        assert all(matched), values
        assert {m.group(1) for m in matched if m} == set(sids.values())

        first = next(iter(sids.values()))
        conn.modify(group, {"member": [(MODIFY_DELETE, [f"<SID={first}>"])]})
        left = texts(entry(conn, group, "member", controls=[EXTENDED_DN])["member"])
        assert all(f"<SID={first}>" not in value for value in left)
        assert len(left) == 2
    finally:
        conn.unbind()


def test_ranged_retrieval_of_a_group_over_1500_members(samba_dc: SambaDC, make_ou: MakeOu) -> None:
    ou = make_ou(samba_dc)
    sids = samba_dc.create_users(ou, [f"r{token()}{i:04d}" for i in range(1600)])
    assert len(set(sids.values())) == 1600
    group = samba_dc.create_group(ou, f"big{token()}", member_sids=list(sids.values()))
    conn = samba_dc.connection(auto_range=False, return_empty_attributes=False)
    try:
        # Unlike Windows (MaxValRange 1500), Samba sends every value at once...
        plain = entry(conn, group, "member")
        assert list(plain) == ["member"] and len(plain["member"]) == 1600
        # ...but honours an explicit range, answering with AD-style names.
        head = entry(conn, group, "member;range=0-1499")
        assert list(head) == ["member;range=0-1499"] and len(head["member;range=0-1499"]) == 1500
        tail = entry(conn, group, "member;range=1500-*")
        assert list(tail) == ["member;range=1500-*"] and len(tail["member;range=1500-*"]) == 100
        past = entry(conn, group, "member;range=1550-1700")
        assert list(past) == ["member;range=1550-*"]
        assert set(head["member;range=0-1499"]) | set(tail["member;range=1500-*"]) == set(
            plain["member"]
        )
    finally:
        conn.unbind()


def test_bulk_users_are_real_and_later_sids_do_not_collide(
    samba_dc: SambaDC, make_ou: MakeOu, monkeypatch: pytest.MonkeyPatch
) -> None:
    ou = make_ou(samba_dc)
    monkeypatch.setattr(samba, "OFFLINE_BATCH", 120)  # three transactions, as for 300,000
    bulk = samba_dc.create_users(ou, [f"b{token()}{i:03d}" for i in range(300)], offline=True)
    assert samba_dc.is_running()
    later = samba_dc.create_users(ou, [f"l{token()}{i}" for i in range(5)], offline=False)
    assert not set(bulk.values()) & set(later.values())
    assert len(set(bulk.values())) == 300

    group = samba_dc.create_group(ou, f"g{token()}")
    conn = samba_dc.connection()
    try:
        picked = [*list(bulk.values())[-2:], *later.values()]
        conn.modify(group, {"member": [(MODIFY_ADD, [f"<SID={sid}>" for sid in picked])]})
        values = texts(entry(conn, group, "member", controls=[EXTENDED_DN])["member"])
        assert {m.group(1) for v in values if (m := EXTENDED_DN_VALUE.match(v))} == set(picked)
        name, sid = next(iter(bulk.items()))
        found = entry(conn, f"<SID={sid}>", "sAMAccountName", "objectClass", "userAccountControl")
        assert texts(found["sAMAccountName"]) == [name]
        assert texts(found["objectClass"]) == ["top", "person", "organizationalPerson", "user"]
        # The one-level index was rebuilt: a LEVEL search finds every bulk user.
        conn.search(ou, "(objectClass=user)", ldap3.LEVEL, attributes=["cn"], paged_size=500)
        assert len(conn.response) >= 300
    finally:
        conn.unbind()


def test_stop_and_start_keep_the_data(samba_dc: SambaDC, make_ou: MakeOu) -> None:
    ou = make_ou(samba_dc)
    name = f"s{token()}"
    sid = samba_dc.create_users(ou, [name])[name]
    samba_dc.stop()
    try:
        assert not samba_dc.is_running()
        with pytest.raises(LDAPException):
            samba_dc.connection(connect_timeout=2)
    finally:
        samba_dc.start()
    assert samba_dc.is_running()
    conn = samba_dc.connection()
    try:
        assert texts(entry(conn, f"<SID={sid}>", "sAMAccountName")["sAMAccountName"]) == [name]
    finally:
        conn.unbind()


# --- schema ---------------------------------------------------------------------------


def test_base_schema_lacks_exchange_attributes_but_groups_take_proxy_addresses_and_info(
    samba_dc: SambaDC, make_ou: MakeOu
) -> None:
    ou = make_ou(samba_dc)
    group = samba_dc.create_group(ou, f"g{token()}")
    conn = samba_dc.connection(raise_exceptions=False)
    try:
        conn.search(samba_dc.schema_dn, "(lDAPDisplayName=mailNickname)", ldap3.LEVEL)
        assert conn.response == []
        conn.modify(
            group,
            {
                "proxyAddresses": [(MODIFY_REPLACE, ["SMTP:team@wb.test", "smtp:alias@wb.test"])],
                "info": [(MODIFY_REPLACE, ["notes"])],
                "mail": [(MODIFY_REPLACE, ["team@wb.test"])],
            },
        )
        assert conn.result["result"] == 0, conn.result
        for attribute, value in EXCHANGE_VALUES.items():
            conn.modify(group, {attribute: [(MODIFY_REPLACE, [value])]})
            assert conn.result["result"] == 16, (attribute, conn.result)  # noSuchAttribute
    finally:
        conn.unbind()


def test_exchange_forest_takes_the_exchange_attributes_on_groups(
    exchange_dc: SambaDC, make_ou: MakeOu
) -> None:
    assert exchange_dc.exchange_schema
    ou = make_ou(exchange_dc)
    group = exchange_dc.create_group(ou, f"g{token()}", attributes={"mailNickname": "first"})
    conn = exchange_dc.connection()
    try:
        conn.modify(group, {k: [(MODIFY_REPLACE, [v])] for k, v in EXCHANGE_VALUES.items()})
        found = entry(conn, group, *EXCHANGE_VALUES)
        assert {k: texts(v) for k, v in found.items()} == {
            k: [v] for k, v in EXCHANGE_VALUES.items()
        }
        conn.search(ou, "(mailNickname=team-nick)", attributes=["cn"])
        assert [e["dn"] for e in conn.response if e["type"] == "searchResEntry"] == [group]
    finally:
        conn.unbind()


# --- controls -------------------------------------------------------------------------


def test_permissive_modify_covers_plain_attributes_but_not_member(
    samba_dc: SambaDC, make_ou: MakeOu
) -> None:
    ou = make_ou(samba_dc)
    sids = list(samba_dc.create_users(ou, [f"p{token()}{i}" for i in range(2)]).values())
    group = samba_dc.create_group(ou, f"g{token()}", member_sids=sids[:1])
    conn = samba_dc.connection(raise_exceptions=False)
    permissive = [(PERMISSIVE_MODIFY, False, None)]
    try:
        conn.search("", "(objectClass=*)", BASE, attributes=["supportedControl"])
        assert PERMISSIVE_MODIFY in texts(conn.response[0]["raw_attributes"]["supportedControl"])

        conn.modify(group, {"proxyAddresses": [(MODIFY_ADD, ["smtp:a@wb.test"])]})
        assert conn.result["result"] == 0
        again = {"proxyAddresses": [(MODIFY_ADD, ["smtp:a@wb.test"])]}
        missing = {"proxyAddresses": [(MODIFY_DELETE, ["smtp:gone@wb.test"])]}
        conn.modify(group, again)
        assert conn.result["result"] == 20  # attributeOrValueExists
        conn.modify(group, missing)
        assert conn.result["result"] == 16  # noSuchAttribute
        conn.modify(group, again, controls=permissive)
        assert conn.result["result"] == 0
        conn.modify(group, missing, controls=permissive)
        assert conn.result["result"] == 0

        add_member = {"member": [(MODIFY_ADD, [f"<SID={sids[0]}>"])]}
        drop_stranger = {"member": [(MODIFY_DELETE, [f"<SID={sids[1]}>"])]}
        for controls in (None, permissive, [(PERMISSIVE_MODIFY, True, None)]):
            conn.modify(group, add_member, controls=controls)
            assert conn.result["result"] == 68, conn.result  # entryAlreadyExists
            conn.modify(group, drop_stranger, controls=controls)
            assert conn.result["result"] == 53, conn.result  # unwillingToPerform
    finally:
        conn.unbind()


def test_assertion_control_is_not_supported(samba_dc: SambaDC, make_ou: MakeOu) -> None:
    ou = make_ou(samba_dc)
    group = samba_dc.create_group(ou, f"g{token()}")
    conn = samba_dc.connection(raise_exceptions=False)
    try:
        conn.search("", "(objectClass=*)", BASE, attributes=["supportedControl"])
        assert ASSERTION not in texts(conn.response[0]["raw_attributes"]["supportedControl"])

        change = {"description": [(MODIFY_REPLACE, ["critical"])]}
        conn.modify(group, change, controls=[assertion_control("objectClass", "group", True)])
        assert conn.result["result"] == 12  # unavailableCriticalExtension
        assert entry(conn, group, "description").get("description", []) == []

        # A non-critical assertion is ignored: the modify applies although it is false.
        change = {"description": [(MODIFY_REPLACE, ["ignored"])]}
        conn.modify(group, change, controls=[assertion_control("objectClass", "user", False)])
        assert conn.result["result"] == 0
        assert texts(entry(conn, group, "description")["description"]) == ["ignored"]
    finally:
        conn.unbind()
