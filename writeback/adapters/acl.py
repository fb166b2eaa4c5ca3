"""Writes the service account's delegation (or a deletion guard) into the OU's DACL.

A read-modify-write of ``nTSecurityDescriptor`` with the SD-flags control
(1.2.840.113556.1.4.801) set to DACL only, so the owner, group and SACL are
neither read nor written and an administrator without SeSecurityPrivilege can
run it. ACEs already present are not added twice; the DACL is read back
afterwards, so a DC that silently dropped an ACE is reported, not trusted.

Before a grant the target is checked on the DC itself, beyond the DN rules of
:mod:`writeback.domain.target`: it must be an ``organizationalUnit`` that is
neither one of the domain's well-known containers (``wellKnownObjects`` and
``otherWellKnownObjects`` of the domain head, which follow a redirected Users or
Computers container, ``redirusr``/``redircmp``) nor below one; and unless
forced, it must hold no group that is not ours (no ``Group_<objectId>`` anchor)
or that AdminSDHolder protects (``adminCount=1``), since every group in the
subtree receives the delegation. A revoke is never refused: it only removes.

Binds as an administrator given on the command line (the service account cannot
grant itself anything), over TLS with the certificate validated, as the
directory adapter does. Raises only :mod:`writeback.errors` types.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ldap3 import BASE, MODIFY_REPLACE, NONE, SIMPLE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.protocol.microsoft import security_descriptor_control

from writeback.adapters.ldap_values import (
    TRANSIENT_RESULTS,
    result_name,
    sid_from_bytes,
)
from writeback.domain.model import group_id_from_anchor
from writeback.domain.target import domain_dn, is_within
from writeback.errors import ConfigError, DirectoryRefused, LdapUnavailable, WritebackError
from writeback.permissions import (
    Ace,
    SecurityDescriptor,
    delegation,
    parse_security_descriptor,
    revocable,
)

DACL_SECURITY_INFORMATION = 0x4
BAD_DN_RESULTS = frozenset({32, 34})  # noSuchObject, invalidDNSyntax
#: How many refused groups the error lists by name.
LISTED = 20


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
    force: bool = False,
    ca_file: str | None = None,
    timeout: float = 30.0,
) -> Grant:
    """Add (or with ``revoke`` remove) ``aces_for(<account's objectSid>)`` on the OU.

    A grant is refused (:class:`ConfigError`) on a target that is not an OU of
    the domain's own, or, unless ``force``, whose subtree holds groups that are
    not ours or are protected (see the module docstring).
    """
    conn = _bind(url, admin_user, admin_password, ca_file, timeout)
    try:
        sid = _object_sid(conn, account_dn, admin_password)
        aces = aces_for(sid)
        if revoke:
            aces = revocable(aces)
        else:  # the groups below only matter when something is allowed on them
            grants = any(ace.allow for ace in aces)
            check_target(conn, target_ou, admin_password, force=force or not grants)
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


def check_target(conn: Any, target_ou: str, password: str, *, force: bool = False) -> None:
    """Refuse a target the DC shows to be unsafe for the delegation (module docstring)."""
    _call(
        conn,
        "search",
        target_ou,
        password,
        lambda: conn.search(target_ou, "(objectClass=*)", BASE, attributes=["objectClass"]),
    )
    entry = conn.response[0] if conn.response else {}
    classes = {value.lower() for value in _texts(entry, "objectClass")}
    if "organizationalunit" not in classes:
        raise ConfigError(f"--ou {target_ou!r} is not an organizationalUnit on the DC")
    for name, container in _well_known_containers(conn, domain_dn(target_ou), password):
        if is_within(target_ou, container) or is_within(container, target_ou):
            where = "is" if is_within(target_ou, container) else "holds"
            raise ConfigError(
                f"--ou {target_ou!r} {where} the domain's well-known {name} container "
                f"({container}): its objects must not receive the delegation"
            )
    if force:
        return
    foreign = _foreign_groups(conn, target_ou, password)
    if foreign:
        listed = "; ".join(foreign[:LISTED])
        more = f"; and {len(foreign) - LISTED} more" if len(foreign) > LISTED else ""
        raise ConfigError(
            f"--ou {target_ou!r} already holds {len(foreign)} group(s) that are not "
            f"writeback's or are protected, which would receive the delegation: {listed}{more}. "
            "Move them out, or pass --force if each one may be written by the service account"
        )


#: wellKnownObjects GUIDs (MS-ADTS 6.1.1.4) by the name used in messages.
_WELL_KNOWN_NAMES = {
    "a9d1ca15768811d1aded00c04fd8d5cd": "Users",
    "aa312825768811d1aded00c04fd8d5cd": "Computers",
    "a361b2ffffd211d1aa4b00c04fd7d83a": "Domain Controllers",
    "ab1d30f3768811d1aded00c04fd8d5cd": "System",
    "2fbac1870ade11d297c400c04fd8d5cd": "Infrastructure",
    "18e2ea80684f11d2b9aa00c04f79f805": "Deleted Objects",
    "ab8153b7768811d1aded00c04fd8d5cd": "LostAndFound",
    "22b70c67d56e4efb91e9300fca3dc1aa": "ForeignSecurityPrincipals",
    "09460c08ae1e4a4ea0f64aee7daa1e5a": "Program Data",
    "f4be92a4c777485e878e9421d53087db": "Microsoft",
    "6227f0af1fc2410d8e3bb10615bb5b0f": "NTDS Quotas",
    "1eb93889e40c45df9f0c64d23bbb6237": "Managed Service Accounts",
    "683a24e2e8164bd3af86ac3c2cf3f981": "Keys",
}


def _well_known_containers(conn: Any, domain: str, password: str) -> list[tuple[str, str]]:
    """(name, DN) of the domain head's well-known containers, redirected ones included."""
    if not domain:
        return []
    attributes = ["wellKnownObjects", "otherWellKnownObjects"]
    _call(
        conn,
        "search",
        domain,
        password,
        lambda: conn.search(domain, "(objectClass=*)", BASE, attributes=attributes),
    )
    found = []
    for attribute in attributes:
        for value in _texts(conn.response[0], attribute) if conn.response else ():
            # DN-Binary (MS-ADTS 3.1.1.2.2.2.4): B:32:<GUID hex>:<DN>
            parts = value.split(":", 3)
            if len(parts) == 4 and parts[0].upper() == "B":
                guid = parts[2].lower()
                found.append((_WELL_KNOWN_NAMES.get(guid, f"({guid})"), parts[3]))
    return found


def _foreign_groups(conn: Any, target_ou: str, password: str) -> list[str]:
    """Groups below the target without our anchor, or with adminCount=1, as 'DN (why)'."""
    found = []
    try:
        entries = conn.extend.standard.paged_search(
            target_ou,
            "(objectClass=group)",
            SUBTREE,
            attributes=["adminDescription", "adminCount"],
            paged_size=1000,
            generator=True,
        )
        for entry in entries:
            if entry.get("type") != "searchResEntry":
                continue
            anchor = _texts(entry, "adminDescription")
            protected = "1" in _texts(entry, "adminCount")
            ours = bool(anchor) and group_id_from_anchor(anchor[0]) is not None
            if protected or not ours:
                why = "adminCount=1" if protected else "no Group_<objectId> anchor"
                found.append(f"{entry['dn']} ({why})")
    except (LDAPException, OSError) as exc:
        raise LdapUnavailable(
            f"LDAP search below {target_ou!r}: {_scrub(str(exc), password)}"
        ) from None
    result = conn.result or {}
    code = int(result.get("result", 0))
    if code:
        error = LdapUnavailable if code in TRANSIENT_RESULTS else DirectoryRefused
        raise error(f"LDAP search below {target_ou!r}: {result_name(code)} ({code})")
    return found


def _texts(entry: dict[str, Any], attribute: str) -> list[str]:
    raw = entry.get("raw_attributes", {})
    values: list[Any] = next((v for k, v in raw.items() if k.lower() == attribute.lower()), [])
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


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
