"""The Directory port over LDAP, for Active Directory and Samba AD.

Speaks through python-ldap (libldap) when it is installed and ldap3 otherwise
(``client=`` picks one; see :mod:`writeback.adapters.ldap_clients` for why and
what each costs); everything below holds for both, and the contract tests run
against both. One connection, opened on first use over TLS with certificate
and host-name validation (``ldaps://``, or ``ldap://`` with StartTLS before
the bind; there is no way to turn validation off) and reused; after a
connection failure it is dropped and the next call opens a new one. Reads that
fail on a reused connection are tried once more on a fresh one (a DC drops
idle connections after MaxConnIdleTime); writes never are, the caller decides.

Finding groups: ``adminDescription`` is not indexed (a subtree search on it
costs the DC 2.5 ms at 1,000 groups, 12.7 ms at 5,000), objectGUID is. So
every read remembers each group's objectGUID, and :meth:`find_groups` asks for
the remembered ones in one search over the target OU ORing their GUIDs; an
object found that way counts only if it still carries that group's anchor
(else it is a miss), and an object moved out of the OU is simply not found.
The misses are looked for next by the sAMAccountName we give the groups we
create (``Group_`` and the start of the objectId; indexed), under the same
anchor check: after an initial sync no GUID is known yet (an add does not
return it, and AD offers no post-read control), and the first event of each
group would otherwise pay a scan of the whole OU. What is still missing (a
new group, one Connect or an admin named otherwise) is found in one more
search ORing their anchors: one subtree scan for all of them, not one each.
Two objects carrying one anchor are refused
(:class:`DuplicateAnchor`), as a full read reports them; an object that an
admin gives our anchor after we cached the original's GUID (or beside the
one found by its name) is only seen by the anchor search (a miss, or the
full sync, which reports the duplicate).

Scope guard — nothing outside the target OU, and nothing that does not carry
our anchor ``adminDescription=Group_<objectId>``, is ever modified or deleted:

* every DN an operation touches must be strictly below the target OU (DNs are
  compared unescaped and case-folded, since AD escapes differently than we do);
  a Rename names exactly one ``CN=`` RDN and keeps its parent, or moves the
  object to the target OU or an OU below it (``new_parent``, a placement rule),
  never elsewhere; a member added by DN (a nested group created in the same run,
  before it has a SID) must be an object below the target OU carrying an anchor
  of ours;
* an Add must carry ``adminDescription`` equal to its group's anchor and be a
  group; a replace may never change or clear ``adminDescription``;
* Modify, Rename and Delete only go to a DN this instance has read, from
  ``find_group(s)``/``iter_groups``, carrying exactly that group's anchor
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

Reads of single groups use the extended-DN control (1.2.840.113556.1.4.529,
string form), so every ``member`` value is ``<GUID=...>;<SID=S-...>;CN=...``
(no ``<SID=>`` for members without one, such as contacts) and no search per
member is needed. A full read (:meth:`LdapDirectory.iter_groups`) does not: the
control made Samba format a GUID and a SID for every one of its 400,000 values
at 20,000 groups, nearly doubling the DC's CPU for the read (0.49 -> 0.86 s at
5,000 groups), while those values name only a few thousand distinct members.
So it reads plain DNs and asks the domain for each distinct DN's objectSid once
per read, in ORed ``distinguishedName`` searches (an indexed lookup); a group
with a member so not found (one in another domain, or renamed meanwhile) is read
again with the control, so no member is ever taken for one without a SID.
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

:meth:`apply_all` carries out many operations with up to ``pipeline_window``
requests outstanding on the connection (python-ldap; ldap3 sends one at a
time): each operation keeps every check above, and its outcome (requests, or
the error it alone ended with) is its own.

Not thread-safe: use one instance per thread. The objectGUID hints can be
shared by a process's instances (:class:`ObjectGuids`): every read verifies
them, so a hint one thread learnt saves the others the anchor scan (with one
cache per thread, an event's group was a miss whenever another worker had
read it last: the scan cost the DC more than the write).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from writeback.adapters.ldap_clients import (
    EXTENDED_DN_OID,
    CertificateRejected,
    Change,
    Client,
    ClientFailure,
    ConnectionFailed,
    Endpoint,
    Entry,
    ResultError,
    Scope,
    StartTlsFailed,
    linear_receiving,
    make_client,
)
from writeback.adapters.ldap_values import (
    BIND_CONFIG_RESULTS,
    CANONICAL_NAMES,
    TRANSIENT_RESULTS,
    VALUE_CONFLICT_RESULTS,
    ExtendedDn,
    decode,
    guid_filter_value,
    parse_extended_dn,
    parse_range,
    read_dn,
    result_name,
    sid_from_bytes,
    split_members,
    split_plain_members,
)
from writeback.domain.guard import (
    BUILTIN_GROUP_FLAG,
    Ancestry,
    ParentGroup,
    Principal,
    PrincipalKind,
    canonical_sid,
    is_sid,
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
    anchor_claims,
    anchor_for,
    group_id_from_anchor,
)
from writeback.domain.naming import (
    DnKey,
    dn_key,
    escape_filter_value,
    first_rdn,
    parent_of,
    sam_account_name_for,
    single_cn_rdn,
    strictly_within,
)
from writeback.domain.target import is_within
from writeback.errors import (
    ConfigError,
    DirectoryRefused,
    DuplicateAnchor,
    LdapUnavailable,
    PolicyRefused,
    WritebackError,
)

__all__ = ["EXTENDED_DN_OID", "DuplicateAnchor", "LdapDirectory", "LdapRefused", "linear_receiving"]

log = logging.getLogger(__name__)

#: The group's own SID comes with its extended DN, so objectSid is not asked for.
_GROUP_ATTRIBUTES = MANAGED_ATTRIBUTES
#: A full read, made without the extended-DN control, asks for the group's own
#: objectGUID and objectSid instead.
_PAGE_ATTRIBUTES = (*MANAGED_ATTRIBUTES, "objectGUID", "objectSid")
#: Member DNs per search when a full read resolves them (see the module's
#: docstring). Samba's cost for an ORed filter grows with the square of its
#: terms: measured for 5,000 DNs, 0.33 s of DC CPU in batches of 100, 0.57 s of
#: 200, 2.5 s of 1,000.
MEMBER_DN_BATCH = 40
#: ``member`` values per read (see the module's docstring).
RANGE_WINDOW = 50_000
#: Ids per search filter in :meth:`LdapDirectory.find_groups` (a filter of 500
#: GUIDs is some 30 KB, far below any DC's request limit).
FILTER_BATCH = 500
_ANCHORED = "(&(objectClass=group)(adminDescription=Group_*))"
#: SIDs, or DNs, per search filter of the guards' reads.
GUARD_BATCH = 200
#: Levels of nesting :meth:`LdapDirectory.group_ancestry` follows upward (AD allows
#: any depth; past this the groups not read yet count as unreadable: protected).
MAX_NESTING = 32
_PRINCIPAL_ATTRIBUTES = ("objectClass", "objectSid", "adminCount", "adminDescription")
_PARENT_ATTRIBUTES = ("objectSid", "adminCount", "groupType", "sAMAccountName", "memberOf")

_T = TypeVar("_T")


class LdapRefused(DirectoryRefused):
    """The DC answered with a result code that retrying cannot change."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


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


class _Read(NamedTuple):
    """A group as one read found it, with what identifies its object."""

    group: DirectoryGroup
    guid: str | None
    key: DnKey


@dataclass
class _Sent:
    """A pipelined write on its way: what to do once its answer is in."""

    index: int
    token: object
    dn: str
    group_id: str
    kind: str
    #: For a modify: the parts a value conflict needs to retry the difference.
    replace: Attributes = field(default_factory=dict)
    adds: Sequence[str] = ()
    removes: Sequence[str] = ()


_Found = dict[str, list[_Read]]
"""group id → every object a read found carrying its anchor."""


def _names_in_flight(operation: Operation, in_flight: set[DnKey]) -> bool:
    """Whether ``operation`` adds a member by the DN of an object with a write
    outstanding (a nested group created in the same run)."""
    if isinstance(operation, Add):
        added: Sequence[str] = operation.members
    elif isinstance(operation, Modify):
        added = operation.changes.add_members
    else:
        return False
    return any(not value.startswith("<") and dn_key(value) in in_flight for value in added)


class ObjectGuids:
    """group id → the objectGUID of the object a read last found carrying its
    anchor: hints for :meth:`LdapDirectory.find_groups`, safe to share between
    the adapters of one target OU in one process because each read checks the
    anchor of what a hint found (a wrong hint costs one anchor search)."""

    def __init__(self) -> None:
        self._guids: dict[str, str] = {}
        #: ids whose anchor a read saw on two objects: only the anchor search,
        #: which sees every copy, may find them until it sees one again.
        self._duplicated: set[str] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._guids)

    def get(self, group_id: str) -> str | None:
        return self._guids.get(group_id)

    def put(self, group_id: str, guid: str) -> None:
        with self._lock:
            self._guids[group_id] = guid

    def drop(self, group_id: str) -> None:
        with self._lock:
            self._guids.pop(group_id, None)

    def duplicated(self, group_id: str) -> bool:
        return group_id in self._duplicated

    def mark_duplicated(self, group_id: str, duplicated: bool = True) -> None:
        with self._lock:
            if duplicated:
                self._guids.pop(group_id, None)
                self._duplicated.add(group_id)
            else:
                self._duplicated.discard(group_id)


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
        client: str | None = None,
        pipeline_window: int = 8,
        guids: ObjectGuids | None = None,
    ) -> None:
        """``range_window``: read ``member`` in explicit slices of this many values
        (None: ask for all and let the DC choose, which Samba cannot do fast for
        very large groups; see the module's docstring). ``client``: 'python-ldap'
        or 'ldap3' (None: python-ldap when installed). ``pipeline_window``: writes
        :meth:`apply_all` keeps outstanding at once. ``guids``: objectGUID hints
        shared with this process's other instances for the same OU (else its own)."""
        scheme = url.partition("://")[0].lower()
        if scheme not in ("ldap", "ldaps") or "://" not in url:
            raise ConfigError(f"LDAP URL must start with ldaps:// or ldap:// (StartTLS): {url!r}")
        if not dn_key(target_ou):
            raise ConfigError("target OU must be a DN")
        if ca_file is not None and not os.path.isfile(ca_file):
            raise ConfigError(f"LDAP CA file not found: {ca_file}")
        if chunk_size < 1 or page_size < 1 or timeout <= 0 or pipeline_window < 1:
            raise ConfigError("chunk_size, page_size, timeout and pipeline_window must be positive")
        if range_window is not None and range_window < 1:
            raise ConfigError("range_window must be positive")
        self._url = url
        self._user = user
        self._endpoint = Endpoint(
            url=url, user=user, password=password, ca_file=ca_file, timeout=timeout
        )
        try:
            self._client: Client = make_client(client, self._endpoint)
        except (ValueError, ImportError) as exc:
            raise ConfigError(f"LDAP client: {exc}") from exc
        self._target_ou = target_ou
        self._chunk_size = chunk_size
        self._page_size = page_size
        self._range_window = range_window
        self._window = pipeline_window
        self._open = False
        self._requests = 0
        #: LDAP requests sent so far by kind ('search', 'modify', 'add', ...): what a
        #: call cost, for tests and benchmarks.
        self.request_counts: Counter[str] = Counter()
        #: ``member`` values read so far (group reads and conflict read-backs).
        self.member_values_read = 0
        #: DN (as a key) → the group id of the anchor it carried when we read it,
        #: and the other way round.
        self._seen: dict[DnKey, str] = {}
        self._dns_of: dict[str, set[DnKey]] = {}
        self._guids = ObjectGuids() if guids is None else guids
        self._ou_key = dn_key(target_ou)
        self._domain_dn = _domain_of(target_ou)
        self._schema: frozenset[str] | None = None

    @property
    def target_ou(self) -> str:
        return self._target_ou

    @property
    def client_name(self) -> str:
        """The LDAP library in use: 'python-ldap' or 'ldap3'."""
        return self._client.name

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
        self._open = False
        self._client.close()

    # ------------------------------------------------------------------ reads

    def schema_attributes(self) -> frozenset[str]:
        if self._schema is None:
            self._schema = self._read(self._read_schema)
        return self._schema

    def _read_schema(self) -> frozenset[str]:
        root = self._search("", "(objectClass=*)", "base", ["schemaNamingContext"], extended=False)
        schema_nc = decode(root[0].attributes.get("schemanamingcontext")) if root else ()
        if not schema_nc:
            raise LdapRefused("rootDSE has no schemaNamingContext", code=32)
        wanted = "".join(f"(lDAPDisplayName={escape_filter_value(n)})" for n in EXCHANGE_ATTRIBUTES)
        entries = self._search(
            schema_nc[0],
            f"(&(objectClass=attributeSchema)(|{wanted}))",
            "one",
            ["lDAPDisplayName"],
            extended=False,
        )
        known = {n.lower() for n in EXCHANGE_ATTRIBUTES}
        found = {v.lower() for e in entries for v in decode(e.attributes.get("ldapdisplayname"))}
        return frozenset(found & known)

    def find_group(self, group_id: str) -> DirectoryGroup | None:
        return self.find_groups([group_id]).get(group_id)

    def find_group_attributes(self, group_id: str) -> DirectoryGroup | None:
        """Like :meth:`find_group`, without reading ``member`` (``member_sids`` and
        ``other_members`` come back empty): one search whose size does not grow
        with the group's. For writes planned from member deltas."""
        return self.find_groups([group_id], members=False).get(group_id)

    def find_groups(
        self, group_ids: Sequence[str], *, members: bool = True
    ) -> dict[str, DirectoryGroup]:
        """The anchored objects of these ids (absent when there is none): one search
        for those whose objectGUID a read remembered, one more for the rest (see
        the module's docstring). Raises :class:`DuplicateAnchor` when an id's
        anchor is on more than one object, or on an object only in another case
        (not ours: it is never taken for the group), with what was found for the
        others."""
        ids = list(dict.fromkeys(group_ids))
        if not ids:
            return {}
        found = self._read(lambda: self._find_many(ids, members=members))
        result: dict[str, DirectoryGroup] = {}
        duplicates: dict[str, tuple[str, ...]] = {}
        for group_id in ids:
            self._forget(group_id)
            reads = found.get(group_id, [])
            if len(reads) > 1 or any(r.group.group_id != group_id for r in reads):
                duplicates[group_id] = tuple(r.group.dn for r in reads)
            elif reads:
                self._remember(*reads[0])
                result[group_id] = reads[0].group
        if duplicates:
            raise DuplicateAnchor(duplicates, result)
        return result

    def _find_many(self, ids: list[str], *, members: bool) -> dict[str, list[_Read]]:
        """By remembered GUID, then by our sAMAccountName, then by anchor: each
        pass only for what the ones before did not find (the module's docstring)."""
        wanted = [*_GROUP_ATTRIBUTES, self._member_attribute(0)] if members else _GROUP_ATTRIBUTES
        found: dict[str, list[_Read]] = {}
        by_guid: dict[str, str] = {}
        misses: list[str] = []
        suspects: list[str] = []
        for gid in ids:
            guid = self._guids.get(gid)
            if self._guids.duplicated(gid):
                suspects.append(gid)
            elif guid is None:
                misses.append(gid)
            else:
                by_guid[guid] = gid
        self._find_by_guid(by_guid, wanted, members, found)
        misses += [gid for gid in by_guid.values() if gid not in found]
        misses = [*self._find_by_name(misses, wanted, members, found), *suspects]
        self._find_by_anchor(misses, wanted, members, found)
        return found

    def _find_by_guid(
        self, by_guid: dict[str, str], wanted: Sequence[str], members: bool, found: _Found
    ) -> None:
        cached = list(by_guid)
        for start in range(0, len(cached), FILTER_BATCH):
            ors = "".join(
                f"(objectGUID={guid_filter_value(g)})" for g in cached[start : start + FILTER_BATCH]
            )
            entries = self._search(
                self._target_ou, f"(&(objectClass=group)(|{ors}))", "subtree", wanted
            )
            for entry in entries:
                got = self._parse(entry, members=members)
                if got is not None and by_guid.get(got.guid or "") == got.group.group_id:
                    found[got.group.group_id] = [got]

    def _find_by_name(
        self, ids: list[str], wanted: Sequence[str], members: bool, found: _Found
    ) -> list[str]:
        """Look ``ids`` up by the sAMAccountName a group we created has (an indexed
        lookup, unlike the anchor); an object counts only when it carries that
        group's anchor. Returns the ids still not found."""
        wanted_ids = set(ids)
        for start in range(0, len(ids), FILTER_BATCH):
            ors = "".join(
                f"(sAMAccountName={escape_filter_value(sam_account_name_for(g))})"
                for g in ids[start : start + FILTER_BATCH]
            )
            entries = self._search(
                self._target_ou, f"(&(objectClass=group)(|{ors}))", "subtree", wanted
            )
            for entry in entries:
                got = self._parse(entry, members=members)
                if got is not None and got.group.group_id in wanted_ids:
                    found[got.group.group_id] = [got]
        return [gid for gid in ids if gid not in found]

    def _find_by_anchor(
        self, ids: list[str], wanted: Sequence[str], members: bool, found: _Found
    ) -> None:
        """The one read that sees every object carrying an anchor: it finds
        duplicates, and decides whether an id is still duplicated."""
        for start in range(0, len(ids), FILTER_BATCH):
            chunk = set(ids[start : start + FILTER_BATCH])
            ors = "".join(
                f"(adminDescription={escape_filter_value(anchor_for(gid))})" for gid in chunk
            )
            entries = self._search(
                self._target_ou, f"(&(objectClass=group)(|{ors}))", "subtree", wanted
            )
            for entry in entries:
                got = self._parse(entry, members=members)
                if got is not None and got.group.group_id in chunk:
                    found.setdefault(got.group.group_id, []).append(got)
                elif got is None and (claim := self._claim(entry)) in chunk:
                    found.setdefault(claim, []).append(_claimant(entry))
            for gid in chunk:
                duplicated = len(found.get(gid, ())) > 1
                if duplicated or self._guids.duplicated(gid):
                    self._guids.mark_duplicated(gid, duplicated)

    def _claim(self, entry: Entry) -> str | None:
        """The group id an object below the OU claims with an anchor that is not
        canonical (another case): AD's case-blind filter matched it, so it stands in
        that group's way and is reported as a duplicate, never written."""
        anchor = decode(entry.attributes.get("admindescription"))
        _, key = read_dn(parse_extended_dn(entry.dn).dn)
        ou = self._ou_key
        if len(anchor) != 1 or len(key) <= len(ou) or key[len(key) - len(ou) :] != ou:
            return None
        claimed = anchor_claims(anchor[0])
        if claimed is not None:
            log.warning(
                "%s carries %r, not the canonical anchor of group %s: it is not ours and is "
                "never written",
                parse_extended_dn(entry.dn).dn,
                anchor[0],
                claimed,
            )
        return claimed

    def iter_groups(self) -> Generator[DirectoryGroup, None, None]:
        """Every anchored group, page by page. The next page is asked for before
        this one is parsed, so the DC builds it while this process parses (where
        the client can have two requests outstanding: python-ldap). Members come
        as plain DNs, resolved to SIDs once per read (see the module docstring).

        Every other read a page needs (those SIDs, ranged slices of big groups,
        a group read again with the extended-DN control) is made before the next
        page is asked for, with nothing else outstanding: Samba ends a paged
        search early, its next page coming back short and without a cookie, when
        another search on the connection is answered while a page is pending."""
        known_before = set(self._seen)
        found: set[DnKey] = set()
        counted: Counter[str] = Counter()
        resolved: dict[bytes, str] = {}
        page, cookie = self._read(lambda: self._collect_page(self._send_page(None)))
        while True:
            members = self._page_members(page, resolved)
            ahead = self._send_page(cookie) if cookie else None
            try:
                for entry, read in zip(page, members, strict=True):
                    got = self._parse(entry, read=read)
                    if got is None:
                        continue
                    counted[got.group.group_id] += 1
                    found.add(self._remember(*got))
                    yield got.group
            except BaseException:  # the caller stopped early, or a ranged read failed
                if ahead is not None:
                    self._client.abandon(ahead)
                raise
            if ahead is None:
                break
            page, cookie = self._collect_page(ahead)
        for key in known_before - found:
            self._drop_dn(key)
        for group_id, count in counted.items():
            if count > 1 or self._guids.duplicated(group_id):
                # only the anchor search, which sees every copy, finds it next time
                self._guids.mark_duplicated(group_id, count > 1)

    def _send_page(self, cookie: bytes | None) -> object:
        attributes = [*_PAGE_ATTRIBUTES, self._member_attribute(0)]
        return self._call(
            "search",
            self._target_ou,
            lambda c: c.send_search(
                self._target_ou,
                "subtree",
                _ANCHORED,
                attributes,
                extended=False,
                page_size=self._page_size,
                cookie=cookie,
            ),
        )

    def _collect_page(self, token: object) -> tuple[list[Entry], bytes | None]:
        client = self._client
        return self._mapped("search", self._target_ou, lambda: client.collect(token))

    def _page_members(self, page: list[Entry], resolved: dict[bytes, str]) -> list[_PageEntry]:
        """Each entry's own ids and every member of it, by SID or (without one) DN:
        the rest of a ranged ``member`` read, the DNs resolved through ``resolved``
        (added to first), or the group read again with the extended-DN control
        when one of them is not there."""
        self._resolve_member_dns(page, resolved)
        out: list[_PageEntry] = []
        for entry in page:
            guid, sid = _own_ids(entry)
            split = split_plain_members(self._member_values(entry, guid), resolved)
            if split is None:
                split = split_members(self._extended_members(guid, entry.dn))
            out.append(_PageEntry(guid, sid, *split))
        return out

    def _resolve_member_dns(self, page: list[Entry], resolved: dict[bytes, str]) -> None:
        """Add to ``resolved`` each member DN of ``page`` it lacks -> its objectSid
        (``""``: the object has none), ``MEMBER_DN_BATCH`` DNs per search from the
        domain's head. A DN not found stays out (its group is read with the
        extended-DN control instead), as does one the DC spells otherwise than in
        the member value: they are matched as the DC wrote both."""
        unknown: set[bytes] = set()
        for entry in page:
            for name, values in entry.attributes.items():
                if name.startswith("member") and name.partition(";")[0] == "member":
                    unknown.update(v for v in values if v not in resolved)
        wanted = sorted(unknown)
        for start in range(0, len(wanted), MEMBER_DN_BATCH):
            ors = "".join(
                f"(distinguishedName={escape_filter_value(dn.decode('utf-8', errors='replace'))})"
                for dn in wanted[start : start + MEMBER_DN_BATCH]
            )
            entries = self._search(
                self._domain_dn, f"(|{ors})", "subtree", ("objectSid",), extended=False
            )
            for entry in entries:
                raw = entry.attributes.get("objectsid") or []
                try:
                    resolved[entry.dn.encode("utf-8")] = sid_from_bytes(raw[0]) if raw else ""
                except ValueError:
                    continue  # left unresolved: the group is read with the control

    def _parse(
        self, entry: Entry, *, members: bool = True, read: _PageEntry | None = None
    ) -> _Read | None:
        """A DirectoryGroup from a search entry, with its objectGUID and DN key,
        reading the rest of a ranged member (members left empty when ``members``
        is False); None for an object without an anchor of ours, or outside.

        ``read``: the entry came without the extended-DN control (a full read),
        its ids and members as :meth:`_page_members` made them."""
        ref = parse_extended_dn(entry.dn)
        if read is not None:
            ref = ExtendedDn(ref.dn, read.guid, read.sid)
        attributes: dict[str, tuple[str, ...]] = {}
        for name, values in entry.attributes.items():
            canonical = CANONICAL_NAMES.get(name)
            if canonical is not None:
                attributes[canonical] = decode(values)
        anchor = attributes.get("adminDescription", ())
        group_id = group_id_from_anchor(anchor[0]) if len(anchor) == 1 else None
        if group_id is None:
            return None
        dn, key = read_dn(ref.dn)
        ou = self._ou_key
        if len(key) <= len(ou) or key[len(key) - len(ou) :] != ou:  # not strictly below
            return None
        sids: set[str] = set()
        others: set[str] = set()
        if read is not None:
            sids, others = read.sids, read.others
        elif members:
            sids, others = split_members(self._member_values(entry, ref.guid))
        group = DirectoryGroup(
            dn=dn,
            group_id=group_id,
            attributes=attributes,
            member_sids=frozenset(sids),
            other_members=frozenset(others),
            object_sid=ref.sid,
        )
        return _Read(group, ref.guid.lower() if ref.guid else None, key)

    def _member_attribute(self, low: int) -> str:
        if self._range_window is None:
            return "member" if low == 0 else f"member;range={low}-*"
        return f"member;range={low}-{low + self._range_window - 1}"

    def _member_values(self, entry: Entry, guid: str | None) -> list[bytes]:
        """Every member value: the slice in ``entry``, then ranged reads until ``*``."""
        values, next_low = _member_slice(entry, 0)
        base = f"<GUID={guid}>" if guid else parse_extended_dn(entry.dn).dn
        while next_low is not None:
            attribute = self._member_attribute(next_low)
            found = self._search(base, "(objectClass=*)", "base", [attribute])
            if not found:
                raise LdapRefused(f"group {base} vanished while reading its members", code=32)
            more, following = _member_slice(found[0], next_low)
            values.extend(more)
            if following is not None and following <= next_low:
                raise LdapRefused(f"ranged read of {base} made no progress at {next_low}", code=80)
            next_low = following
        self.member_values_read += len(values)
        return values

    def _extended_members(self, guid: str | None, dn: str) -> list[bytes]:
        """Every member value of one group read again with the extended-DN control."""
        base = f"<GUID={guid}>" if guid else dn
        found = self._search(base, "(objectClass=*)", "base", [self._member_attribute(0)])
        if not found:
            raise LdapRefused(f"group {base} vanished while reading its members", code=32)
        return self._member_values(found[0], guid)

    def _remember(self, group: DirectoryGroup, guid: str | None, key: DnKey | None = None) -> DnKey:
        key = dn_key(group.dn) if key is None else key
        previous = self._seen.get(key)
        if previous is not None and previous != group.group_id:
            self._dns_of.get(previous, set()).discard(key)
        self._seen[key] = group.group_id
        self._dns_of.setdefault(group.group_id, set()).add(key)
        if guid is not None:
            self._guids.put(group.group_id, guid)
        return key

    def _forget(self, group_id: str) -> None:
        """Nothing known about ``group_id`` any more (a read is about to say)."""
        for key in self._dns_of.pop(group_id, ()):
            self._seen.pop(key, None)
        self._guids.drop(group_id)

    def _drop_dn(self, key: DnKey) -> None:
        group_id = self._seen.pop(key, None)
        if group_id is not None:
            self._dns_of.get(group_id, set()).discard(key)

    # ------------------------------------------------------------- the guards' reads

    def resolve_sids(self, sids: Sequence[str]) -> dict[str, Principal]:
        """What the domain holds for each SID: searches from the domain's head
        ORing up to ``GUARD_BATCH`` SIDs each (objectSid is indexed, and AD and
        Samba take a SID's string form in a filter). Malformed SIDs are not asked."""
        wanted = [s for s in dict.fromkeys(canonical_sid(sid) for sid in sids) if is_sid(s)]
        if not wanted:
            return {}
        return self._read(lambda: self._resolve(wanted))

    def _resolve(self, sids: list[str]) -> dict[str, Principal]:
        found: dict[str, Principal] = {}
        for start in range(0, len(sids), GUARD_BATCH):
            # A validated SID is digits and dashes only: nothing to escape.
            ors = "".join(f"(objectSid={sid})" for sid in sids[start : start + GUARD_BATCH])
            entries = self._search(
                self._domain_dn, f"(|{ors})", "subtree", _PRINCIPAL_ATTRIBUTES, extended=False
            )
            for entry in entries:
                principal = self._principal(entry)
                if principal is not None:
                    found[principal.sid] = principal
        return found

    def _principal(self, entry: Entry) -> Principal | None:
        raw = entry.attributes.get("objectsid") or []
        try:
            sid = canonical_sid(sid_from_bytes(raw[0])) if raw else None
        except ValueError:
            sid = None
        if sid is None:
            return None
        dn, key = read_dn(entry.dn)
        kind = PrincipalKind.of(decode(entry.attributes.get("objectclass")))
        anchor = decode(entry.attributes.get("admindescription"))
        ou = self._ou_key
        ours = (
            kind is PrincipalKind.GROUP
            and len(anchor) == 1
            and len(key) > len(ou)
            and key[len(key) - len(ou) :] == ou
        )
        return Principal(
            sid=sid,
            dn=dn,
            kind=kind,
            admin_count=decode(entry.attributes.get("admincount")) == ("1",),
            group_id=group_id_from_anchor(anchor[0]) if ours else None,
        )

    def group_ancestry(self) -> Ancestry:
        """Our groups that are in any group (one search over the OU: ``memberOf`` is
        a back link every group has, so ``(memberOf=*)`` finds exactly those), then
        the groups they are in, level by level, ``GUARD_BATCH`` DNs per search. A
        group that cannot be found is reported unreadable (the guard takes it as
        protected). Usually one search that finds nothing."""
        return self._read(self._ancestry)

    def _ancestry(self) -> Ancestry:
        entries = self._search(
            self._target_ou,
            "(&(objectClass=group)(adminDescription=Group_*)(memberOf=*))",
            "subtree",
            ["adminDescription", "memberOf"],
            extended=False,
        )
        parents: dict[str, tuple[str, ...]] = {}
        ou = self._ou_key
        for entry in entries:
            anchor = decode(entry.attributes.get("admindescription"))
            group_id = group_id_from_anchor(anchor[0]) if len(anchor) == 1 else None
            _, key = read_dn(entry.dn)
            if group_id is None or len(key) <= len(ou) or key[len(key) - len(ou) :] != ou:
                continue
            above = tuple(read_dn(dn)[0] for dn in decode(entry.attributes.get("memberof")))
            parents[group_id] = (*parents.get(group_id, ()), *above)  # two objects: both count
        groups: dict[DnKey, ParentGroup] = {}
        frontier = list(dict.fromkeys(dn for dns in parents.values() for dn in dns))
        for _ in range(MAX_NESTING):
            frontier = [dn for dn in dict.fromkeys(frontier) if dn_key(dn) not in groups]
            if not frontier:
                break
            read = self._parent_groups(frontier)
            for dn in frontier:
                groups[dn_key(dn)] = read.get(dn_key(dn), ParentGroup(dn, readable=False))
            frontier = [dn for g in read.values() for dn in g.parents]
        return Ancestry(parents=parents, groups={g.dn: g for g in groups.values()})

    def _parent_groups(self, dns: list[str]) -> dict[DnKey, ParentGroup]:
        found: dict[DnKey, ParentGroup] = {}
        for start in range(0, len(dns), GUARD_BATCH):
            ors = "".join(
                f"(distinguishedName={escape_filter_value(dn)})"
                for dn in dns[start : start + GUARD_BATCH]
            )
            entries = self._search(
                self._domain_dn,
                f"(&(objectClass=group)(|{ors}))",
                "subtree",
                _PARENT_ATTRIBUTES,
                extended=False,
            )
            for entry in entries:
                dn, key = read_dn(entry.dn)
                raw = entry.attributes.get("objectsid") or []
                try:
                    sid = canonical_sid(sid_from_bytes(raw[0])) if raw else None
                except ValueError:
                    sid = None
                group_type = decode(entry.attributes.get("grouptype"))
                flags = int(group_type[0]) if group_type and _is_int(group_type[0]) else 0
                names = decode(entry.attributes.get("samaccountname"))
                found[key] = ParentGroup(
                    dn=dn,
                    sid=sid,
                    admin_count=decode(entry.attributes.get("admincount")) == ("1",),
                    builtin=bool(flags & BUILTIN_GROUP_FLAG),
                    name=names[0] if names else "",
                    parents=tuple(read_dn(p)[0] for p in decode(entry.attributes.get("memberof"))),
                )
        return found

    # ----------------------------------------------------------------- writes

    def apply(self, operation: Operation) -> int:
        before = self._requests
        if isinstance(operation, Add):
            self._add(operation)
        elif isinstance(operation, Modify):
            self._check_target(operation.dn, operation.group_id)
            self._check_replace(operation.changes, operation.group_id)
            self._check_member_adds(operation.changes.add_members)
            if operation.changes:
                self._write_changes(operation.dn, operation.group_id, operation.changes)
        elif isinstance(operation, Rename):
            self._rename(operation)
        elif isinstance(operation, Delete):
            self._delete(operation)
        else:  # pragma: no cover - Operation is a closed union
            raise PolicyRefused(f"unknown operation {operation!r}")
        return self._requests - before

    def apply_all(self, operations: Sequence[Operation]) -> list[int | WritebackError]:
        """:meth:`apply` for each operation, in order, with up to ``pipeline_window``
        single-request writes (an add, or a modify whose members fit a chunk)
        outstanding at once; the others wait for those and go alone. Each entry
        is that operation's requests or the error it ended with. After a write
        fails for want of the DC, the ones not yet sent fail the same way unsent."""
        results: list[int | WritebackError] = [0] * len(operations)
        pending: deque[_Sent] = deque()
        in_flight: set[DnKey] = set()
        lost: LdapUnavailable | None = None

        def settle_one() -> None:
            nonlocal lost
            sent = pending.popleft()
            in_flight.discard(dn_key(sent.dn))
            outcome = self._settle(sent)
            results[sent.index] = outcome
            if isinstance(outcome, LdapUnavailable) and lost is None:
                lost = outcome

        def settle_all() -> None:
            while pending:
                settle_one()

        for index, operation in enumerate(operations):
            if lost is not None:
                settle_all()
                results[index] = LdapUnavailable(f"not sent: {lost}")
                continue
            try:
                sent = self._send_single(index, operation, in_flight)
            except WritebackError as error:
                results[index] = error
                lost = error if isinstance(error, LdapUnavailable) else lost
                continue
            if sent is not None:
                pending.append(sent)
                in_flight.add(dn_key(sent.dn))
                while len(pending) >= self._window:
                    settle_one()
                continue
            settle_all()
            if lost is not None:
                results[index] = LdapUnavailable(f"not sent: {lost}")
                continue
            try:
                results[index] = self.apply(operation)
            except WritebackError as error:
                results[index] = error
                lost = error if isinstance(error, LdapUnavailable) else lost
        settle_all()
        return results

    def _send_single(self, index: int, operation: Operation, in_flight: set[DnKey]) -> _Sent | None:
        """Check and send ``operation`` without waiting, if it is one request; None
        when it is not (or its DN has a write outstanding): apply it alone."""
        if dn_key(operation.dn) in in_flight:
            return None
        if _names_in_flight(operation, in_flight):
            return None  # a member group still being written: its write must land first
        if isinstance(operation, Add) and len(operation.members) <= self._chunk_size:
            attributes = self._checked_add(operation)
            token = self._call("add", operation.dn, lambda c: c.send_add(operation.dn, attributes))
            return _Sent(index, token, operation.dn, operation.group_id, "add")
        if isinstance(operation, Modify):
            return self._send_modify(index, operation)
        return None

    def _send_modify(self, index: int, operation: Modify) -> _Sent | None:
        changes = operation.changes
        if not changes or len(changes.add_members) + len(changes.remove_members) > self._chunk_size:
            return None
        self._check_target(operation.dn, operation.group_id)
        self._check_replace(changes, operation.group_id)
        self._check_member_adds(changes.add_members)
        adds, removes = changes.add_members, changes.remove_members
        modlist = _modlist(operation.group_id, changes.replace, adds, removes)
        token = self._call("modify", operation.dn, lambda c: c.send_modify(operation.dn, modlist))
        return _Sent(
            index, token, operation.dn, operation.group_id, "modify", changes.replace, adds, removes
        )

    def _settle(self, sent: _Sent) -> int | WritebackError:
        before = self._requests
        try:
            try:
                self._wait(sent.kind, sent.dn, sent.token)
            except LdapRefused as refused:
                if sent.kind != "modify" or refused.code not in VALUE_CONFLICT_RESULTS:
                    raise
                self._resolve_conflict(
                    sent.dn,
                    sent.group_id,
                    sent.replace,
                    adds=sent.adds,
                    removes=sent.removes,
                    conflict=refused,
                )
        except WritebackError as error:
            return error
        if sent.kind == "add":
            self._seen_add(sent.dn, sent.group_id)
        return 1 + self._requests - before

    def _checked_add(self, op: Add) -> dict[str, list[str]]:
        """The scope and anchor checks of an add; its attributes with the first chunk."""
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
        self._check_member_adds(op.members)
        attributes: dict[str, list[str]] = {"objectClass": list(classes)}
        attributes.update(
            (name, list(values))
            for name, values in op.attributes.items()
            if values and name.lower() != "objectclass"
        )
        if op.members:
            attributes["member"] = list(op.members[: self._chunk_size])
        return attributes

    def _add(self, op: Add) -> None:
        attributes = self._checked_add(op)
        self._call("add", op.dn, lambda c: c.wait(c.send_add(op.dn, attributes)))
        self._seen_add(op.dn, op.group_id)
        for chunk in _chunks(op.members, self._chunk_size)[1:]:
            self._guarded_modify(op.dn, op.group_id, {}, adds=chunk, removes=())

    def _seen_add(self, dn: str, group_id: str) -> None:
        key = dn_key(dn)
        self._drop_dn(key)
        self._seen[key] = group_id
        self._dns_of.setdefault(group_id, set()).add(key)

    def _rename(self, op: Rename) -> None:
        self._check_target(op.dn, op.group_id)
        if not single_cn_rdn(op.new_rdn):
            raise PolicyRefused(f"refusing to rename {op.dn}: {op.new_rdn!r} is not one CN= RDN")
        new_parent = op.new_parent
        if new_parent is not None and not is_within(new_parent, self._target_ou):
            raise PolicyRefused(
                f"refusing to move {op.dn} to {new_parent}: not the target OU {self._target_ou} "
                "nor an OU below it"
            )
        new_dn = f"{op.new_rdn},{new_parent or parent_of(op.dn)}"
        self._check_scope(new_dn)
        self._check_replace(op.changes, op.group_id)
        self._check_member_adds(op.changes.add_members)
        if op.changes:
            self._write_changes(op.dn, op.group_id, op.changes)
        else:
            self._guarded_modify(op.dn, op.group_id, {}, adds=(), removes=())
        self._call("rename", op.dn, lambda c: c.rename(op.dn, op.new_rdn, new_parent))
        self._drop_dn(dn_key(op.dn))
        self._seen_add(new_dn, op.group_id)

    def _delete(self, op: Delete) -> None:
        self._check_target(op.dn, op.group_id)
        try:
            self._guarded_modify(op.dn, op.group_id, {}, adds=(), removes=())
            self._call("delete", op.dn, lambda c: c.delete(op.dn))
        except LdapRefused as refused:
            if refused.code != 32:  # noSuchObject: already gone, which is what we wanted
                raise
            log.info("delete of %s: object already gone", op.dn)
        self._drop_dn(dn_key(op.dn))
        self._guids.drop(op.group_id)

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

    def _check_member_adds(self, values: Sequence[str]) -> None:
        """A member added by DN rather than ``<SID=...>`` must be one of our groups:
        below the target OU and carrying an anchor of ours (nested groups created in
        the same run, which have no SID to name them by yet)."""
        for value in values:
            if value.startswith("<"):
                continue
            key = dn_key(value)
            if not strictly_within(value, self._target_ou):
                raise PolicyRefused(
                    f"refusing to add member {value}: a member named by DN must be a group "
                    f"of ours below the target OU {self._target_ou}"
                )
            if key not in self._seen and self.anchored_at(value) is None:
                raise PolicyRefused(f"refusing to add member {value}: it carries no anchor of ours")

    def anchored_at(self, dn: str) -> str | None:
        """The group id whose anchor the object at ``dn`` (below the target OU)
        carries, remembered for the checks above; None when there is none."""
        if not strictly_within(dn, self._target_ou):
            return None
        try:
            entries = self._read(
                lambda: self._search(dn, "(objectClass=group)", "base", ["adminDescription"])
            )
        except LdapRefused as refused:
            if refused.code == 32:  # noSuchObject
                return None
            raise
        if not entries:
            return None
        anchor = decode(entries[0].attributes.get("admindescription"))
        group_id = group_id_from_anchor(anchor[0]) if len(anchor) == 1 else None
        if group_id is not None:
            self._seen_add(dn, group_id)
        return group_id

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
        """One modify that only succeeds while ``dn`` carries ``group_id``'s anchor
        (on a value conflict, see :meth:`_resolve_conflict`)."""
        modlist = _modlist(group_id, replace, adds, removes)
        try:
            self._call("modify", dn, lambda c: c.wait(c.send_modify(dn, modlist)))
        except LdapRefused as refused:
            if refused.code not in VALUE_CONFLICT_RESULTS:
                raise
            self._resolve_conflict(
                dn, group_id, replace, adds=adds, removes=removes, conflict=refused
            )

    def _resolve_conflict(
        self,
        dn: str,
        group_id: str,
        replace: Attributes,
        *,
        adds: Sequence[str],
        removes: Sequence[str],
        conflict: LdapRefused,
    ) -> None:
        """After a modify refused for a value conflict, read the group back once:
        another anchor is a policy refusal; otherwise the member values that no
        longer make a difference are dropped and the modify is sent again."""
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
            modlist = _modlist(group_id, replace, adds, removes)
            self._call("modify", dn, lambda c: c.wait(c.send_modify(dn, modlist)))

    def _read_back(self, dn: str) -> tuple[tuple[str, ...], _Members]:
        entries = self._search(
            dn, "(objectClass=*)", "base", ["adminDescription", self._member_attribute(0)]
        )
        members = _Members()
        if not entries:
            return (), members
        entry = entries[0]
        for raw in self._member_values(entry, parse_extended_dn(entry.dn).guid):
            ref = parse_extended_dn(raw.decode("utf-8", errors="replace"))
            if ref.sid:
                members.sids.add(ref.sid.upper())
            if ref.guid:
                members.guids.add(ref.guid.lower())
            members.dns.add(dn_key(ref.dn))
        return decode(entry.attributes.get("admindescription")), members

    # ------------------------------------------------------------- transport

    def _read(self, read: Callable[[], _T]) -> _T:
        """Run a read; once more on a new connection if a reused one had died."""
        reused = self._open
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
        scope: Scope,
        attributes: Iterable[str],
        *,
        extended: bool = True,
    ) -> list[Entry]:
        wanted = list(attributes)
        entries, _ = self._call(
            "search",
            base,
            lambda c: c.collect(
                c.send_search(base, scope, search_filter, wanted, extended=extended)
            ),
        )
        return entries

    def _call(self, what: str, dn: str, send: Callable[[Client], _T]) -> _T:
        """Send one request; map failures to our errors."""
        client = self._connection()
        self._requests += 1
        self.request_counts[what] += 1
        log.debug("LDAP %s %s", what, dn)
        return self._mapped(what, dn, lambda: send(client))

    def _wait(self, what: str, dn: str, token: object) -> None:
        """The answer to a request :meth:`_call` sent without waiting."""
        client = self._client
        self._mapped(what, dn, lambda: client.wait(token))

    def _mapped(self, what: str, dn: str, run: Callable[[], _T]) -> _T:
        doing = f"LDAP {what} of {dn!r}"
        try:
            return run()
        except ResultError as failure:
            name, message = result_name(failure.code), failure.detail
            text = f"{doing}: {name} ({failure.code}): {message}".rstrip(": ")
            if failure.code in TRANSIENT_RESULTS:
                self.close()
                raise LdapUnavailable(text) from failure
            raise LdapRefused(text, code=failure.code) from failure
        except ClientFailure as failure:
            raise self._failure(failure, doing) from failure
        except WritebackError:
            raise
        except Exception as exc:  # a library may raise more than its own errors; we raise ours
            self.close()
            detail = self._endpoint.scrub(str(exc)) or type(exc).__name__
            raise DirectoryRefused(f"{doing}: {type(exc).__name__}: {detail}") from exc

    def _connection(self) -> Client:
        if self._open and not self._client.closed:
            return self._client
        self._open = False
        try:
            self._client.open()
        except ResultError as failure:
            self.close()
            code = failure.code
            text = (
                f"LDAP bind to {self._url} as {self._user!r}: {result_name(code)} ({code}): "
                f"{failure.detail}"
            )
            if code in BIND_CONFIG_RESULTS:
                raise ConfigError(text) from failure
            if code in TRANSIENT_RESULTS:
                raise LdapUnavailable(text) from failure
            raise LdapRefused(text, code=code) from failure
        except ClientFailure as failure:
            raise self._failure(failure, f"connecting to {self._url}") from failure
        except Exception as exc:  # a library may raise more than its own errors; we raise ours
            self.close()
            detail = self._endpoint.scrub(str(exc)) or type(exc).__name__
            raise LdapUnavailable(f"connecting to {self._url}: {detail}") from exc
        self._open = True
        log.debug("LDAP connection to %s opened with %s", self._url, self._client.name)
        return self._client

    def _failure(self, failure: ClientFailure, doing: str) -> WritebackError:
        """The error for what a client raised; the connection is dropped."""
        self.close()
        if isinstance(failure, CertificateRejected):
            return ConfigError(f"{doing}: {failure.detail}")
        if isinstance(failure, StartTlsFailed):
            return ConfigError(f"{doing}: {failure.detail}")
        if isinstance(failure, ConnectionFailed):
            return LdapUnavailable(f"{doing}: {failure.detail}")
        return DirectoryRefused(f"{doing}: {failure.detail}")


def _domain_of(dn: str) -> str:
    """The domain's head of a DN: its trailing ``DC=`` RDNs."""
    parts: list[str] = []
    rest = dn
    while rest.strip():
        rdn = first_rdn(rest).strip()
        parts.append(rdn)
        rest = parent_of(rest)
    tail: list[str] = []
    for rdn in reversed(parts):
        if rdn.partition("=")[0].strip().casefold() != "dc":
            break
        tail.insert(0, rdn)
    return ",".join(tail) or dn


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _claimant(entry: Entry) -> _Read:
    """An object claiming an anchor without being ours, as a read of it (for the
    duplicate report only: it is never remembered, so never written)."""
    ref = parse_extended_dn(entry.dn)
    dn, key = read_dn(ref.dn)
    anchor = decode(entry.attributes.get("admindescription"))
    group = DirectoryGroup(dn=dn, group_id=anchor[0] if anchor else "", attributes={})
    return _Read(group, None, key)


class _PageEntry(NamedTuple):
    """One entry of a full read's page: its own ids, and its members."""

    guid: str | None
    sid: str | None
    sids: set[str]
    others: set[str]


def _own_ids(entry: Entry) -> tuple[str | None, str | None]:
    """An entry's objectGUID and objectSid as strings, from its attributes."""
    guids = entry.attributes.get("objectguid") or []
    sids = entry.attributes.get("objectsid") or []
    guid = str(uuid.UUID(bytes_le=guids[0])) if guids and len(guids[0]) == 16 else None
    try:
        sid = sid_from_bytes(sids[0]) if sids else None
    except ValueError:
        sid = None
    return guid, sid


def _member_slice(entry: Entry, low: int) -> tuple[list[bytes], int | None]:
    """The member values in ``entry`` and where the next slice starts (None: done)."""
    for name, values in entry.attributes.items():
        if not name.startswith("member") or name.partition(";")[0] != "member":
            continue
        try:
            bounds = parse_range(name)
        except ValueError as exc:
            raise LdapRefused(str(exc), code=2) from exc
        if bounds is None or bounds.high is None:
            return list(values), None
        if bounds.low != low:
            raise LdapRefused(f"asked for members from {low}, got {name}", code=2)
        return list(values), bounds.high + 1
    return [], None


def _modlist(
    group_id: str, replace: Attributes, adds: Sequence[str], removes: Sequence[str]
) -> list[Change]:
    """The modify's changes, starting with the anchor check (delete+add of the anchor)."""
    anchor = anchor_for(group_id)
    changes: list[Change] = [
        ("delete", "adminDescription", [anchor]),
        ("add", "adminDescription", [anchor]),
    ]
    for name, values in replace.items():
        if name.lower() != "admindescription":  # equal to the anchor: checked before
            changes.append(("replace", name, list(values)))
    if removes:
        changes.append(("delete", "member", list(removes)))
    if adds:
        changes.append(("add", "member", list(adds)))
    return changes


def _values(attributes: Mapping[str, Sequence[str]], name: str) -> tuple[str, ...]:
    lowered = name.lower()
    for key, values in attributes.items():
        if key.lower() == lowered:
            return tuple(values)
    return ()


def _chunks(values: Sequence[_T], size: int) -> list[Sequence[_T]]:
    return [values[i : i + size] for i in range(0, len(values), size)]
