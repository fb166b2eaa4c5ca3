"""The Directory port over LDAP (ldap3), for Active Directory and Samba AD.

One connection, opened on first use over TLS with certificate and host-name
validation (``ldaps://``, or ``ldap://`` with StartTLS before the bind; there is
no way to turn validation off) and reused; after a connection failure it is
dropped and the next call opens a new one. Reads that fail on a reused
connection are tried once more on a fresh one (a DC drops idle connections
after MaxConnIdleTime); writes never are, the caller decides.

Scope guard — nothing outside the target OU, and nothing that does not carry
our anchor ``adminDescription=Group_<objectId>``, is ever modified or deleted:

* every DN an operation touches must be strictly below the target OU (DNs are
  compared unescaped and case-folded, since AD escapes differently than we do);
  a Rename keeps its parent and names exactly one ``CN=`` RDN;
* an Add must carry ``adminDescription`` equal to its group's anchor and be a
  group; a replace may never change or clear ``adminDescription``;
* Modify, Rename and Delete only go to a DN this instance has read, from
  ``find_group``/``iter_groups``, carrying exactly that group's anchor
  (remembered per DN, updated on add, rename and delete, forgotten when a later
  read no longer finds it);
* and the server checks it too, at the moment of the write. The LDAP assertion
  control (RFC 4528, 1.3.6.1.1.12) would be the natural tool, but AD does not
  implement it (MS-ADTS 3.1.1.3.4.1 does not list it) and neither does Samba
  4.17: it is not in supportedControl, a critical one is answered with
  unavailableCriticalExtension and a non-critical one is silently ignored (the
  write goes through even when the assertion is false). So every modify
  instead carries ``delete adminDescription: Group_<id>`` + ``add
  adminDescription: Group_<id>``: a modify is atomic, and deleting a value the
  object does not hold fails (noSuchAttribute), so the whole request — member
  and attribute changes included — is refused unless the object still carries
  our anchor, and changes nothing when it does. A Delete or Rename first sends
  such a guard-only modify (one request more), then the delete or modify-DN;
  a Rename's attribute changes ride in that first modify.

Refusals raise :class:`~writeback.errors.PolicyRefused`: the checks in this
process before any request is sent, the DC's anchor check after a modify it
refused as a whole (so nothing changed). Deleting an object that is already
gone counts as done.

Members are written by ``<SID=S-...>`` reference, in chunks of ``chunk_size``
values (one add plus one modify per further chunk; one modify per chunk). The
permissive-modify control (1.2.840.113556.1.4.1413) is not used: Samba
advertises it and honours it for ordinary attributes, but not for ``member``
(linked attributes still fail: entryAlreadyExists on adding a present member,
unwillingToPerform on removing an absent one), and it would defeat the anchor
check above (it turns deleting a missing value into a no-op). Instead, when a
modify fails with a value conflict, the group is read back once and the
request retried with only the member values that still make a difference —
idempotent under races on both servers, at the cost of two requests only when
a race actually happens. A read-back that shows another anchor raises
PolicyRefused.

Reads use the extended-DN control (1.2.840.113556.1.4.529, string form), so
every ``member`` value is ``<GUID=...>;<SID=S-...>;CN=...`` (no ``<SID=>`` for
members without one, such as contacts) and no search per member is needed.
Windows DCs return at most MaxValRange values of ``member`` per read and mark
the slice (``member;range=0-1499``); the rest is read by ranged base
searches on the group's ``<GUID=...>``, only for groups that need it (ldap3's
own auto-range is off: its follow-up searches drop the controls). Samba
publishes ``MaxValRange=1500`` in its query policy but does not enforce it: a
plain read returns every value, and its time grows much faster than the group
(150,000 members: 1.6 s; 250,000: not within 10 minutes, the DC at 4 GB).
So ``member`` is always asked for in explicit slices of ``range_window``
values (50,000 by default: a 250,000-member group is read in 7 s, a group
under 50,000 still in one search); a Windows DC answers with its smaller
MaxValRange slices, which the same loop reads on.

Errors: connection failures, timeouts and busy/unavailable/timeLimitExceeded/
other results raise :class:`~writeback.errors.LdapUnavailable`; any other
result code raises :class:`~writeback.errors.DirectoryRefused` naming the code,
the DN and the server's message; an untrusted certificate or a refused bind
raises :class:`~writeback.errors.ConfigError`. The password never appears in
a message or a log line.

Not thread-safe: use one instance per thread.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import MethodType
from typing import Any, TypeVar

from ldap3 import (
    BASE,
    LEVEL,
    MODIFY_ADD,
    MODIFY_DELETE,
    MODIFY_REPLACE,
    NONE,
    SIMPLE,
    SUBTREE,
    Connection,
    Server,
    Tls,
)
from ldap3.core.exceptions import (
    LDAPCertificateError,
    LDAPCommunicationError,
    LDAPException,
    LDAPMaximumRetriesError,
    LDAPResponseTimeoutError,
    LDAPSocketReceiveError,
    LDAPStartTLSError,
    communication_exception_factory,
)
from ldap3.strategy.base import BaseStrategy

from writeback.adapters.ldap_values import (
    BIND_CONFIG_RESULTS,
    CANONICAL_NAMES,
    TRANSIENT_RESULTS,
    VALUE_CONFLICT_RESULTS,
    decode,
    parse_extended_dn,
    parse_range,
    result_name,
    sid_from_bytes,
)
from writeback.domain.mapping import EXCHANGE_ATTRIBUTES, MANAGED_ATTRIBUTES
from writeback.domain.model import (
    Add,
    Attributes,
    Changes,
    Delete,
    DirectoryGroup,
    Modify,
    Operation,
    Rename,
    anchor_for,
    group_id_from_anchor,
)
from writeback.domain.naming import (
    DnKey,
    canonical_dn,
    dn_key,
    escape_filter_value,
    parent_of,
    single_cn_rdn,
    strictly_within,
)
from writeback.errors import (
    ConfigError,
    DirectoryRefused,
    LdapUnavailable,
    PolicyRefused,
    WritebackError,
)

log = logging.getLogger(__name__)

#: Extended-DN control, value SEQUENCE { INTEGER 1 }: GUID and SID as strings.
EXTENDED_DN_OID = "1.2.840.113556.1.4.529"
_EXTENDED_DN = (EXTENDED_DN_OID, True, b"\x30\x03\x02\x01\x01")
_PAGED_RESULTS_OID = "1.2.840.113556.1.4.319"

_GROUP_ATTRIBUTES = (*MANAGED_ATTRIBUTES, "objectSid")
#: ``member`` values per read (see the module's docstring).
RANGE_WINDOW = 50_000


def linear_receiving(strategy: Any) -> list[bytes]:
    """ldap3's ``SyncStrategy.receiving`` without its quadratic buffer.

    ldap3 appends every piece the socket returns to a ``bytes`` object, copying
    everything received so far each time. A large entry that arrives in many
    small pieces (a group of 50,000 members is some 6 MB of extended DNs, and a
    DC that has to build it streams it slowly) then costs seconds of CPU: 7.8 s
    to read such a group cold from Samba, 0.6 s with this buffer. Same contract:
    the complete LDAP messages received (as ``bytes``), stopping once the buffer
    is empty after at least one, or when the peer closes; a socket error closes
    the connection and raises ldap3's ``LDAPSocketReceiveError``. Only for
    connections without SASL signing (ours bind with SIMPLE over TLS).
    """
    messages: list[bytes] = []
    buffer = bytearray()
    while True:
        try:
            data = strategy.connection.socket.recv(strategy.socket_size)
        except (OSError, AttributeError) as error:
            strategy.connection.last_error = f"error receiving data: {error}"
            with contextlib.suppress(OSError, LDAPException):
                strategy.close()
            raise communication_exception_factory(LDAPSocketReceiveError, type(error)(str(error)))(
                strategy.connection.last_error
            ) from error
        if not data:
            return messages
        buffer += data
        while True:
            length = BaseStrategy.compute_ldap_message_size(buffer)
            if length == -1 or len(buffer) < length:
                break
            messages.append(bytes(buffer[:length]))
            del buffer[:length]
        if messages and not buffer:
            return messages


_T = TypeVar("_T")


class LdapRefused(DirectoryRefused):
    """The DC answered with a result code that retrying cannot change."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Entry:
    dn: str
    attributes: dict[str, list[bytes]]


@dataclass
class _Members:
    """Current members as read back, for filtering a retried member change."""

    sids: set[str] = field(default_factory=set)
    guids: set[str] = field(default_factory=set)
    dns: set[DnKey] = field(default_factory=set)

    def holds(self, value: str) -> bool:
        ref = parse_extended_dn(value)
        if ref.sid:
            return ref.sid.upper() in self.sids
        if ref.guid:
            return ref.guid.lower() in self.guids
        return dn_key(ref.dn) in self.dns


class LdapDirectory:
    """AD (or Samba) under one target OU, as the service layer sees it."""

    def __init__(
        self,
        *,
        url: str,
        user: str,
        password: str,
        target_ou: str,
        ca_file: str | None = None,
        chunk_size: int = 5000,
        page_size: int = 1000,
        timeout: float = 30.0,
        range_window: int | None = RANGE_WINDOW,
    ) -> None:
        """``range_window``: read ``member`` in explicit slices of this many values
        (None: ask for all and let the DC choose, which Samba cannot do fast for
        very large groups; see the module's docstring)."""
        scheme = url.partition("://")[0].lower()
        if scheme not in ("ldap", "ldaps") or "://" not in url:
            raise ConfigError(f"LDAP URL must start with ldaps:// or ldap:// (StartTLS): {url!r}")
        if not dn_key(target_ou):
            raise ConfigError("target OU must be a DN")
        if ca_file is not None and not os.path.isfile(ca_file):
            raise ConfigError(f"LDAP CA file not found: {ca_file}")
        if chunk_size < 1 or page_size < 1 or timeout <= 0:
            raise ConfigError("chunk_size, page_size and timeout must be positive")
        if range_window is not None and range_window < 1:
            raise ConfigError("range_window must be positive")
        self._url = url
        self._ldaps = scheme == "ldaps"
        self._user = user
        self._password = password
        self._target_ou = target_ou
        self._ca_file = ca_file
        self._chunk_size = chunk_size
        self._page_size = page_size
        self._timeout = timeout
        self._range_window = range_window
        self._conn: Any = None
        self._requests = 0
        #: ``member`` values read so far (group reads and conflict read-backs): a
        #: measure of what a read cost, for tests and benchmarks.
        self.member_values_read = 0
        #: DN (as a key) → the group id of the anchor it carried when we read it.
        self._seen: dict[DnKey, str] = {}
        self._schema: frozenset[str] | None = None

    @property
    def target_ou(self) -> str:
        return self._target_ou

    def __repr__(self) -> str:
        return (
            f"LdapDirectory(url={self._url!r}, user={self._user!r}, target_ou={self._target_ou!r})"
        )

    def __enter__(self) -> LdapDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unbind and drop the connection; the next call opens a new one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.unbind()
            except (LDAPException, OSError):  # already gone: nothing to release
                log.debug("unbind failed; connection already closed")

    # ------------------------------------------------------------------ reads

    def schema_attributes(self) -> frozenset[str]:
        if self._schema is None:
            self._schema = self._read(self._read_schema)
        return self._schema

    def _read_schema(self) -> frozenset[str]:
        root = self._search("", "(objectClass=*)", BASE, ["schemaNamingContext"], extended=False)
        schema_nc = decode(root[0].attributes.get("schemanamingcontext")) if root else ()
        if not schema_nc:
            raise LdapRefused("rootDSE has no schemaNamingContext", code=32)
        wanted = "".join(f"(lDAPDisplayName={escape_filter_value(n)})" for n in EXCHANGE_ATTRIBUTES)
        entries = self._search(
            schema_nc[0],
            f"(&(objectClass=attributeSchema)(|{wanted}))",
            LEVEL,
            ["lDAPDisplayName"],
            extended=False,
        )
        known = {n.lower() for n in EXCHANGE_ATTRIBUTES}
        found = {v.lower() for e in entries for v in decode(e.attributes.get("ldapdisplayname"))}
        return frozenset(found & known)

    def find_group(self, group_id: str) -> DirectoryGroup | None:
        return self._find_and_remember(group_id, members=True)

    def find_groups(
        self, group_ids: Sequence[str], *, members: bool = True
    ) -> dict[str, DirectoryGroup]:
        """The anchored objects of these ids (absent when there is none)."""
        found: dict[str, DirectoryGroup] = {}
        for group_id in dict.fromkeys(group_ids):
            group = self._find_and_remember(group_id, members=members)
            if group is not None:
                found[group_id] = group
        return found

    def find_group_attributes(self, group_id: str) -> DirectoryGroup | None:
        """Like :meth:`find_group`, without reading ``member`` (``member_sids`` and
        ``other_members`` come back empty): one search whose size does not grow
        with the group's. For writes planned from member deltas."""
        return self._find_and_remember(group_id, members=False)

    def _find_and_remember(self, group_id: str, *, members: bool) -> DirectoryGroup | None:
        group = self._read(lambda: self._find(group_id, members=members))
        for key in [k for k, gid in self._seen.items() if gid == group_id]:
            del self._seen[key]
        if group is not None:
            self._remember(group)
        return group

    def _find(self, group_id: str, *, members: bool = True) -> DirectoryGroup | None:
        anchor = escape_filter_value(anchor_for(group_id))
        wanted = [*_GROUP_ATTRIBUTES, self._member_attribute(0)] if members else _GROUP_ATTRIBUTES
        entries = self._search(
            self._target_ou,
            f"(&(objectClass=group)(adminDescription={anchor}))",
            SUBTREE,
            list(wanted),
        )
        found = (self._group(entry, members=members) for entry in entries)
        groups = [g for g in found if g is not None]
        if len(groups) > 1:
            dns = "; ".join(g.dn for g in groups)
            raise DirectoryRefused(
                f"{len(groups)} objects carry the anchor of group {group_id}: {dns}"
            )
        return groups[0] if groups else None

    def iter_groups(self) -> Iterator[DirectoryGroup]:
        known_before = set(self._seen)
        found: set[DnKey] = set()
        cookie: bytes | None = None
        first = True
        while first or cookie:
            page, cookie = self._read(lambda: self._page(None)) if first else self._page(cookie)
            first = False
            for entry in page:
                group = self._group(entry)
                if group is None:
                    continue
                found.add(self._remember(group))
                yield group
        for key in known_before - found:
            self._seen.pop(key, None)

    def _page(self, cookie: bytes | None) -> tuple[list[_Entry], bytes | None]:
        return self._search_paged(
            self._target_ou,
            "(&(objectClass=group)(adminDescription=Group_*))",
            [*_GROUP_ATTRIBUTES, self._member_attribute(0)],
            cookie,
        )

    def _group(self, entry: _Entry, *, members: bool = True) -> DirectoryGroup | None:
        """A DirectoryGroup from a search entry, reading the rest of a ranged member
        (members left empty when ``members`` is False)."""
        ref = parse_extended_dn(entry.dn)
        attributes: dict[str, tuple[str, ...]] = {}
        object_sid = ref.sid
        for name, values in entry.attributes.items():
            if name == "objectsid" and values:
                object_sid = sid_from_bytes(values[0])
            elif name in CANONICAL_NAMES:
                attributes[CANONICAL_NAMES[name]] = decode(values)
        anchor = attributes.get("adminDescription", ())
        group_id = group_id_from_anchor(anchor[0]) if len(anchor) == 1 else None
        if group_id is None:
            return None
        sids: set[str] = set()
        others: set[str] = set()
        for value in self._member_values(entry, ref.guid) if members else ():
            member = parse_extended_dn(value)
            if member.sid:
                sids.add(member.sid)
            else:
                others.add(member.dn)
        return DirectoryGroup(
            dn=canonical_dn(ref.dn),
            group_id=group_id,
            attributes=attributes,
            member_sids=frozenset(sids),
            other_members=frozenset(others),
            object_sid=object_sid,
        )

    def _member_attribute(self, low: int) -> str:
        if self._range_window is None:
            return "member" if low == 0 else f"member;range={low}-*"
        return f"member;range={low}-{low + self._range_window - 1}"

    def _member_values(self, entry: _Entry, guid: str | None) -> list[str]:
        """Every member value: the slice in ``entry``, then ranged reads until ``*``."""
        values, next_low = _member_slice(entry, 0)
        base = f"<GUID={guid}>" if guid else parse_extended_dn(entry.dn).dn
        while next_low is not None:
            attribute = self._member_attribute(next_low)
            found = self._search(base, "(objectClass=*)", BASE, [attribute])
            if not found:
                raise LdapRefused(f"group {base} vanished while reading its members", code=32)
            more, following = _member_slice(found[0], next_low)
            values.extend(more)
            if following is not None and following <= next_low:
                raise LdapRefused(f"ranged read of {base} made no progress at {next_low}", code=80)
            next_low = following
        self.member_values_read += len(values)
        return values

    def _remember(self, group: DirectoryGroup) -> DnKey:
        key = dn_key(group.dn)
        self._seen[key] = group.group_id
        return key

    # ----------------------------------------------------------------- writes

    def apply(self, operation: Operation) -> int:
        before = self._requests
        if isinstance(operation, Add):
            self._add(operation)
        elif isinstance(operation, Modify):
            self._check_target(operation.dn, operation.group_id)
            self._check_replace(operation.changes, operation.group_id)
            if operation.changes:
                self._write_changes(operation.dn, operation.group_id, operation.changes)
        elif isinstance(operation, Rename):
            self._rename(operation)
        elif isinstance(operation, Delete):
            self._delete(operation)
        else:  # pragma: no cover - Operation is a closed union
            raise PolicyRefused(f"unknown operation {operation!r}")
        return self._requests - before

    def _add(self, op: Add) -> None:
        self._check_scope(op.dn)
        anchor = _values(op.attributes, "adminDescription")
        if anchor != (anchor_for(op.group_id),):
            raise PolicyRefused(
                f"refusing to add {op.dn}: adminDescription must be {anchor_for(op.group_id)!r}, "
                f"not {anchor!r}"
            )
        classes = _values(op.attributes, "objectClass") or ("top", "group")
        if "group" not in {c.lower() for c in classes}:
            raise PolicyRefused(f"refusing to add {op.dn}: objectClass {classes!r} is not a group")
        if _values(op.attributes, "member"):
            raise PolicyRefused(
                f"refusing to add {op.dn}: members go in Add.members, not attributes"
            )
        attributes: dict[str, list[str]] = {
            name: list(values)
            for name, values in op.attributes.items()
            if values and name.lower() != "objectclass"
        }
        chunks = _chunks(op.members, self._chunk_size)
        if chunks:
            attributes["member"] = list(chunks[0])
        self._call("add", op.dn, lambda c: c.add(op.dn, list(classes), attributes))
        self._seen[dn_key(op.dn)] = op.group_id
        for chunk in chunks[1:]:
            self._guarded_modify(op.dn, op.group_id, {}, adds=chunk, removes=())

    def _rename(self, op: Rename) -> None:
        self._check_target(op.dn, op.group_id)
        if not single_cn_rdn(op.new_rdn):
            raise PolicyRefused(f"refusing to rename {op.dn}: {op.new_rdn!r} is not one CN= RDN")
        new_dn = f"{op.new_rdn},{parent_of(op.dn)}"
        self._check_scope(new_dn)
        self._check_replace(op.changes, op.group_id)
        if op.changes:
            self._write_changes(op.dn, op.group_id, op.changes)
        else:
            self._guarded_modify(op.dn, op.group_id, {}, adds=(), removes=())
        self._call("rename", op.dn, lambda c: c.modify_dn(op.dn, op.new_rdn, delete_old_dn=True))
        self._seen.pop(dn_key(op.dn), None)
        self._seen[dn_key(new_dn)] = op.group_id

    def _delete(self, op: Delete) -> None:
        self._check_target(op.dn, op.group_id)
        try:
            self._guarded_modify(op.dn, op.group_id, {}, adds=(), removes=())
            self._call("delete", op.dn, lambda c: c.delete(op.dn))
        except LdapRefused as refused:
            if refused.code != 32:  # noSuchObject: already gone, which is what we wanted
                raise
            log.info("delete of %s: object already gone", op.dn)
        self._seen.pop(dn_key(op.dn), None)

    def _check_scope(self, dn: str) -> None:
        if not strictly_within(dn, self._target_ou):
            raise PolicyRefused(
                f"refusing to write {dn}: not below the target OU {self._target_ou}"
            )

    def _check_target(self, dn: str, group_id: str) -> None:
        """Only objects read back carrying exactly this group's anchor may change."""
        self._check_scope(dn)
        seen = self._seen.get(dn_key(dn))
        if seen is None:
            raise PolicyRefused(
                f"refusing to write {dn}: not read carrying adminDescription="
                f"{anchor_for(group_id)} (find_group or iter_groups first)"
            )
        if seen != group_id:
            raise PolicyRefused(
                f"refusing to write {dn} for group {group_id}: "
                f"it carries the anchor of group {seen}"
            )

    @staticmethod
    def _check_replace(changes: Changes, group_id: str) -> None:
        for name, values in changes.replace.items():
            if name.lower() == "admindescription" and tuple(values) != (anchor_for(group_id),):
                raise PolicyRefused(
                    f"refusing to change adminDescription of group {group_id} to {tuple(values)!r}"
                )
            if name.lower() == "member":
                raise PolicyRefused("members change by add/remove values, never by replace")

    def _write_changes(self, dn: str, group_id: str, changes: Changes) -> None:
        """One modify when the member values fit a chunk, else one per chunk."""
        values = [("remove", v) for v in changes.remove_members]
        values += [("add", v) for v in changes.add_members]
        chunks = _chunks(values, self._chunk_size) or [()]
        for i, chunk in enumerate(chunks):
            self._guarded_modify(
                dn,
                group_id,
                changes.replace if i == 0 else {},
                adds=[v for kind, v in chunk if kind == "add"],
                removes=[v for kind, v in chunk if kind == "remove"],
            )

    def _guarded_modify(
        self,
        dn: str,
        group_id: str,
        replace: Attributes,
        *,
        adds: Sequence[str],
        removes: Sequence[str],
    ) -> None:
        """One modify that only succeeds while ``dn`` carries ``group_id``'s anchor.

        On a value conflict, reads the group back once: another anchor is a
        policy refusal; otherwise the member values that no longer make a
        difference are dropped and the modify is sent again.
        """
        try:
            self._call(
                "modify", dn, lambda c: c.modify(dn, _modlist(group_id, replace, adds, removes))
            )
            return
        except LdapRefused as refused:
            if refused.code not in VALUE_CONFLICT_RESULTS:
                raise
            conflict = refused
        anchor, members = self._read_back(dn)
        if anchor != (anchor_for(group_id),):
            raise PolicyRefused(
                f"refusing to write {dn} for group {group_id}: the DC reports adminDescription "
                f"{anchor!r} (changed since it was read); nothing was written"
            ) from conflict
        if not (adds or removes):
            raise conflict
        adds = [v for v in adds if not members.holds(v)]
        removes = [v for v in removes if members.holds(v)]
        log.info("modify of %s: members changed concurrently, retrying the difference", dn)
        if adds or removes or replace:
            self._call(
                "modify", dn, lambda c: c.modify(dn, _modlist(group_id, replace, adds, removes))
            )

    def _read_back(self, dn: str) -> tuple[tuple[str, ...], _Members]:
        entries = self._search(
            dn, "(objectClass=*)", BASE, ["adminDescription", self._member_attribute(0)]
        )
        members = _Members()
        if not entries:
            return (), members
        entry = entries[0]
        for value in self._member_values(entry, parse_extended_dn(entry.dn).guid):
            ref = parse_extended_dn(value)
            if ref.sid:
                members.sids.add(ref.sid.upper())
            if ref.guid:
                members.guids.add(ref.guid.lower())
            members.dns.add(dn_key(ref.dn))
        return decode(entry.attributes.get("admindescription")), members

    # ------------------------------------------------------------- transport

    def _read(self, read: Callable[[], _T]) -> _T:
        """Run a read; once more on a new connection if a reused one had died."""
        reused = self._conn is not None
        try:
            return read()
        except LdapUnavailable:
            if not reused:
                raise
            log.info("LDAP read failed on a reused connection; retrying once on a new one")
            return read()

    def _search(
        self,
        base: str,
        search_filter: str,
        scope: str,
        attributes: Iterable[str],
        *,
        extended: bool = True,
    ) -> list[_Entry]:
        controls = [_EXTENDED_DN] if extended else None
        response, _ = self._call(
            "search",
            base,
            lambda c: c.search(
                base,
                search_filter,
                search_scope=scope,
                attributes=list(attributes),
                controls=controls,
            ),
        )
        return _entries(response)

    def _search_paged(
        self, base: str, search_filter: str, attributes: Iterable[str], cookie: bytes | None
    ) -> tuple[list[_Entry], bytes | None]:
        response, result = self._call(
            "search",
            base,
            lambda c: c.search(
                base,
                search_filter,
                search_scope=SUBTREE,
                attributes=list(attributes),
                controls=[_EXTENDED_DN],
                paged_size=self._page_size,
                paged_cookie=cookie,
            ),
        )
        control = (result.get("controls") or {}).get(_PAGED_RESULTS_OID) or {}
        next_cookie = (control.get("value") or {}).get("cookie")
        return _entries(response), (bytes(next_cookie) if next_cookie else None)

    def _call(
        self, what: str, dn: str, send: Callable[[Any], object]
    ) -> tuple[Any, dict[str, Any]]:
        """Send one request; map failures to our errors. Returns (response, result)."""
        conn = self._connection()
        self._requests += 1
        log.debug("LDAP %s %s", what, dn)
        try:
            send(conn)
        except Exception as exc:  # ldap3 raises more than LDAPException; we raise only ours
            raise self._failure(exc, f"LDAP {what} of {dn!r}") from exc
        result: dict[str, Any] = conn.result or {}
        code = int(result.get("result", 80))
        if code != 0:
            name, message = result_name(code), self._scrub(str(result.get("message") or ""))
            text = f"LDAP {what} of {dn!r}: {name} ({code}): {message}".rstrip(": ")
            if code in TRANSIENT_RESULTS:
                self.close()
                raise LdapUnavailable(text)
            raise LdapRefused(text, code=code)
        return conn.response, result

    def _connection(self) -> Any:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._conn = None
        tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=self._ca_file)
        server = Server(
            self._url, use_ssl=self._ldaps, tls=tls, get_info=NONE, connect_timeout=self._timeout
        )
        conn = Connection(
            server,
            user=self._user,
            password=self._password,
            authentication=SIMPLE,
            raise_exceptions=False,
            auto_range=False,
            auto_referrals=False,
            return_empty_attributes=False,
            receive_timeout=max(1, math.ceil(self._timeout)),  # ldap3 packs it as an int
        )
        if conn.sasl_mechanism is None and hasattr(conn.strategy, "receiving"):
            conn.strategy.receiving = MethodType(linear_receiving, conn.strategy)
        self._conn = conn
        try:
            conn.open()
            if not self._ldaps and not conn.start_tls():
                raise ConfigError(f"StartTLS with {self._url} failed")
            bound = conn.bind()
        except WritebackError:
            self.close()
            raise
        except Exception as exc:  # ldap3 raises more than LDAPException; we raise only ours
            raise self._failure(exc, f"connecting to {self._url}") from exc
        if not bound:
            result = conn.result or {}
            code = int(result.get("result", 80))
            text = (
                f"LDAP bind to {self._url} as {self._user!r}: {result_name(code)} ({code}): "
                f"{self._scrub(str(result.get('message') or ''))}"
            )
            self.close()
            if code in BIND_CONFIG_RESULTS:
                raise ConfigError(text)
            if code in TRANSIENT_RESULTS:
                raise LdapUnavailable(text)
            raise LdapRefused(text, code=code)
        return conn

    def _failure(self, exc: Exception, doing: str) -> WritebackError:
        """The error for an exception ldap3 raised; the connection is dropped."""
        self.close()
        detail = self._scrub(str(exc)) or type(exc).__name__
        if isinstance(exc, (LDAPCertificateError, ssl.SSLCertVerificationError)):
            ca = self._ca_file or "the system trust store"
            return ConfigError(f"{doing}: TLS certificate not trusted by {ca}: {detail}")
        if isinstance(
            exc,
            (
                LDAPCommunicationError,
                LDAPResponseTimeoutError,
                LDAPStartTLSError,
                LDAPMaximumRetriesError,
                OSError,
            ),
        ):
            return LdapUnavailable(f"{doing}: {detail}")
        return DirectoryRefused(f"{doing}: {type(exc).__name__}: {detail}")

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text


def _entries(response: Any) -> list[_Entry]:
    entries = []
    for item in response or ():
        if item.get("type") != "searchResEntry":
            continue
        raw = item.get("raw_attributes") or {}
        attributes = {str(name).lower(): list(values or ()) for name, values in raw.items()}
        entries.append(_Entry(dn=str(item.get("dn") or ""), attributes=attributes))
    return entries


def _member_slice(entry: _Entry, low: int) -> tuple[list[str], int | None]:
    """The member values in ``entry`` and where the next slice starts (None: done)."""
    for name, values in entry.attributes.items():
        if name.partition(";")[0] != "member":
            continue
        try:
            bounds = parse_range(name)
        except ValueError as exc:
            raise LdapRefused(str(exc), code=2) from exc
        members = list(decode(values))
        if bounds is None or bounds.high is None:
            return members, None
        if bounds.low != low:
            raise LdapRefused(f"asked for members from {low}, got {name}", code=2)
        return members, bounds.high + 1
    return [], None


def _modlist(
    group_id: str, replace: Attributes, adds: Sequence[str], removes: Sequence[str]
) -> dict[str, list[tuple[str, list[str]]]]:
    """The modify's change list, starting with the anchor check (delete+add of the anchor)."""
    anchor = anchor_for(group_id)
    changes: dict[str, list[tuple[str, list[str]]]] = {
        "adminDescription": [(MODIFY_DELETE, [anchor]), (MODIFY_ADD, [anchor])]
    }
    for name, values in replace.items():
        if name.lower() != "admindescription":  # equal to the anchor: checked before
            changes[name] = [(MODIFY_REPLACE, list(values))]
    member: list[tuple[str, list[str]]] = []
    if removes:
        member.append((MODIFY_DELETE, list(removes)))
    if adds:
        member.append((MODIFY_ADD, list(adds)))
    if member:
        changes["member"] = member
    return changes


def _values(attributes: Attributes, name: str) -> tuple[str, ...]:
    lowered = name.lower()
    for key, values in attributes.items():
        if key.lower() == lowered:
            return tuple(values)
    return ()


def _chunks(values: Sequence[_T], size: int) -> list[Sequence[_T]]:
    return [values[i : i + size] for i in range(0, len(values), size)]
