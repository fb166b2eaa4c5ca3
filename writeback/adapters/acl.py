"""Writes the service account's delegation (or a deletion guard) into the OU's DACL.

A read-modify-write of ``nTSecurityDescriptor`` with the SD-flags control
(1.2.840.113556.1.4.801) set to DACL only, so the owner, group and SACL are
neither read nor written and an administrator without SeSecurityPrivilege can
run it. ACEs already present are not added twice; the DACL is read back
afterwards, so a DC that silently dropped an ACE is reported, not trusted.

Binds as an administrator given on the command line (the service account cannot
grant itself anything), over TLS with the certificate validated, as the
directory adapter does. Raises only :mod:`writeback.errors` types.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ldap3 import BASE, MODIFY_REPLACE, NONE, SIMPLE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.protocol.microsoft import security_descriptor_control

from writeback.adapters.ldap_values import (
    TRANSIENT_RESULTS,
    result_name,
    sid_from_bytes,
)
from writeback.errors import ConfigError, DirectoryRefused, LdapUnavailable, WritebackError
from writeback.permissions import (
    Ace,
    SecurityDescriptor,
    delegation,
    parse_security_descriptor,
)

DACL_SECURITY_INFORMATION = 0x4
BAD_DN_RESULTS = frozenset({32, 34})  # noSuchObject, invalidDNSyntax


@dataclass(frozen=True)
class Grant:
    """What ``update_dacl`` did: the account's SID, ACEs changed and already so."""

    sid: str
    changed: int
    unchanged: int


def update_dacl(
    *,
    url: str,
    admin_user: str,
    admin_password: str,
    target_ou: str,
    account_dn: str,
    aces_for: Callable[[str], tuple[Ace, ...]] = delegation,
    revoke: bool = False,
    ca_file: str | None = None,
    timeout: float = 30.0,
) -> Grant:
    """Add (or with ``revoke`` remove) ``aces_for(<account's objectSid>)`` on the OU."""
    conn = _bind(url, admin_user, admin_password, ca_file, timeout)
    try:
        sid = _object_sid(conn, account_dn, admin_password)
        aces = aces_for(sid)
        current = _read_dacl(conn, target_ou, admin_password)
        todo = [ace for ace in aces if current.has(ace) == revoke]
        if todo:
            wanted = current.revoking(todo) if revoke else current.granting(todo)
            _write_dacl(conn, target_ou, wanted, admin_password)
            after = _read_dacl(conn, target_ou, admin_password)
            if any(after.has(ace) == revoke for ace in aces):
                raise DirectoryRefused(f"the DC did not keep the DACL change on {target_ou!r}")
        return Grant(sid=sid, changed=len(todo), unchanged=len(aces) - len(todo))
    finally:
        conn.unbind()


def _bind(url: str, user: str, password: str, ca_file: str | None, timeout: float) -> Any:
    scheme = url.partition("://")[0].lower()
    if scheme not in {"ldap", "ldaps"}:
        raise ConfigError(f"LDAP URL must start with ldaps:// or ldap:// (StartTLS): {url!r}")
    tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file)
    server = Server(url, use_ssl=scheme == "ldaps", tls=tls, get_info=NONE, connect_timeout=timeout)
    conn = Connection(
        server,
        user=user,
        password=password,
        authentication=SIMPLE,
        raise_exceptions=False,
        receive_timeout=max(1, int(timeout)),
    )
    try:
        conn.open()
        if scheme == "ldap" and not conn.start_tls():
            raise ConfigError(f"StartTLS with {url} failed")
        bound = conn.bind()
    except WritebackError:
        conn.unbind()
        raise
    except (LDAPException, OSError, ssl.SSLError) as exc:
        conn.unbind()
        raise LdapUnavailable(f"connecting to {url}: {_scrub(str(exc), password)}") from None
    if not bound:
        code = int((conn.result or {}).get("result", 49))
        conn.unbind()
        error = LdapUnavailable if code in TRANSIENT_RESULTS else ConfigError
        raise error(f"LDAP bind to {url} as {user!r} refused: {result_name(code)} ({code})")
    return conn


def _object_sid(conn: Any, dn: str, password: str) -> str:
    _call(
        conn,
        "search",
        dn,
        password,
        lambda: conn.search(dn, "(objectClass=*)", BASE, attributes=["objectSid"]),
    )
    raw = conn.response[0]["raw_attributes"].get("objectSid") if conn.response else None
    if not raw:
        raise ConfigError(f"--account {dn!r} has no objectSid: not a user, group or computer")
    return sid_from_bytes(raw[0])


def _read_dacl(conn: Any, dn: str, password: str) -> SecurityDescriptor:
    control = security_descriptor_control(sdflags=DACL_SECURITY_INFORMATION)
    _call(
        conn,
        "search",
        dn,
        password,
        lambda: conn.search(
            dn, "(objectClass=*)", BASE, attributes=["nTSecurityDescriptor"], controls=control
        ),
    )
    raw = conn.response[0]["raw_attributes"].get("nTSecurityDescriptor") if conn.response else None
    if not raw:
        raise DirectoryRefused(f"cannot read the security descriptor of {dn!r} (no READ_CONTROL?)")
    try:
        return parse_security_descriptor(raw[0])
    except ValueError as exc:
        raise DirectoryRefused(f"security descriptor of {dn!r}: {exc}") from None


def _write_dacl(conn: Any, dn: str, sd: SecurityDescriptor, password: str) -> None:
    control = security_descriptor_control(sdflags=DACL_SECURITY_INFORMATION)
    changes = {"nTSecurityDescriptor": [(MODIFY_REPLACE, [sd.to_bytes()])]}
    _call(conn, "modify", dn, password, lambda: conn.modify(dn, changes, controls=control))


def _call(conn: Any, what: str, dn: str, password: str, send: Callable[[], bool]) -> None:
    """Send one request; a failure becomes our error (a missing DN is a bad argument)."""
    try:
        if send():
            return
    except (LDAPException, OSError) as exc:
        raise LdapUnavailable(f"LDAP {what} of {dn!r}: {_scrub(str(exc), password)}") from None
    result = conn.result or {}
    code = int(result.get("result", 80))
    message = _scrub(str(result.get("message") or ""), password)
    text = f"LDAP {what} of {dn!r}: {result_name(code)} ({code}) {message}".rstrip()
    if code in BAD_DN_RESULTS:
        raise ConfigError(text)
    if code in TRANSIENT_RESULTS:
        raise LdapUnavailable(text)
    raise DirectoryRefused(text)


def _scrub(text: str, password: str) -> str:
    return text.replace(password, "***") if password else text
