"""Low-privilege accounts on the test DC, the ``permissions`` command run as an
administrator would run it (password on standard input), and the DACL reads and
writes the permission tests make."""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass

import pytest
from ldap3 import BASE
from ldap3.protocol.microsoft import security_descriptor_control

from writeback import cli
from writeback.adapters.ldap_values import sid_from_bytes
from writeback.permissions import Right, SecurityDescriptor, parse_security_descriptor, sid_to_bytes
from writeback_sandbox.samba import SambaDC

DACL = 0x4  # DACL_SECURITY_INFORMATION, for the SD-flags control


@dataclass(frozen=True)
class Account:
    dn: str
    sam: str
    password: str = "Wr1teback-Svc-" + uuid.uuid4().hex[:12]


def create_account(dc: SambaDC, ou: str, prefix: str = "svc") -> Account:
    """An enabled user with a password and no rights beyond a plain domain user's."""
    sam = f"{prefix}{uuid.uuid4().hex[:10]}"
    account = Account(f"CN={sam},{ou}", sam)
    conn = dc.connection()
    try:
        assert conn.add(
            account.dn,
            ["top", "person", "organizationalPerson", "user"],
            {
                "sAMAccountName": sam,
                "unicodePwd": f'"{account.password}"'.encode("utf-16-le"),
                "userAccountControl": 512,
            },
        ), conn.result
    finally:
        conn.unbind()
    return account


def run_permissions(
    dc: SambaDC, ou: str, account_dn: str, monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str]:
    """``permissions --account <dn> --ou <ou> ARGS`` with --apply as Administrator."""
    monkeypatch.setenv("WRITEBACK_LDAP_URL", dc.ldaps_url)
    monkeypatch.setenv("WRITEBACK_LDAP_CA_FILE", dc.ca_file)
    monkeypatch.setattr("sys.stdin", io.StringIO(dc.admin_password + "\n"))
    out = io.StringIO()
    argv = ["permissions", "--account", account_dn, "--ou", ou, *args]
    if "--apply" in args:
        argv += ["--admin-user", dc.admin_dn]
    return cli.main(argv, out), out.getvalue()


def object_sid(dc: SambaDC, dn: str) -> str:
    conn = dc.connection()
    try:
        conn.search(dn, "(objectClass=*)", BASE, attributes=["objectSid"])
        return sid_from_bytes(conn.response[0]["raw_attributes"]["objectSid"][0])
    finally:
        conn.unbind()


def dacl_of(dc: SambaDC, dn: str) -> list[bytes]:
    """The DACL of ``dn`` (raw ACEs), read as Administrator with the DACL SD flag."""
    conn = dc.connection()
    try:
        conn.search(
            dn,
            "(objectClass=*)",
            BASE,
            attributes=["nTSecurityDescriptor"],
            controls=security_descriptor_control(sdflags=DACL),
        )
        raw = conn.response[0]["raw_attributes"]["nTSecurityDescriptor"][0]
    finally:
        conn.unbind()
    return parse_security_descriptor(raw).dacl or []


def widened_dacl(dc: SambaDC, dn: str) -> bytes:
    """The security descriptor (DACL part) of ``dn`` with an ``Everyone: write
    property`` ACE in front: what an account with WRITE_DAC would write to hand
    its rights to anyone (issue 12, finding 3)."""
    everyone = (
        bytes([0x00, 0x00, 20, 0])  # ACCESS_ALLOWED_ACE, no flags, 20 bytes
        + int(Right.WRITE_PROPERTY).to_bytes(4, "little")
        + sid_to_bytes("S-1-1-0")
    )
    dacl = [everyone, *dacl_of(dc, dn)]
    return SecurityDescriptor(control=0x8004, dacl=dacl).to_bytes()
