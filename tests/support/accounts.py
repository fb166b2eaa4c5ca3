"""Low-privilege accounts on the test DC, and the ``permissions`` command run as an
administrator would run it (password on standard input)."""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass

import pytest
from ldap3 import BASE

from writeback import cli
from writeback.adapters.ldap_values import sid_from_bytes
from writeback_sandbox.samba import SambaDC


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
