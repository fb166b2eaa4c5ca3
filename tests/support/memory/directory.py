"""An in-memory AD domain (:class:`MemoryForest`) and the Directory port over it
(:class:`MemoryDirectory`), with the LDAP adapter's rules.

:class:`MemoryDirectory` keeps the rules of
:class:`writeback.adapters.directory.LdapDirectory`, so a test that passes on it
means the same as one on Samba:

* reads see only group objects under the target OU whose ``adminDescription``
  is exactly one value ``Group_<objectId>``, the id in lower case; two objects
  with one anchor, or an object whose anchor differs from ours only in case,
  make :meth:`~MemoryDirectory.find_groups` raise ``DuplicateAnchor`` naming
  them (with what it found for the other ids); ``find_groups(...,
  members=False)`` leaves the member sets empty;
* the guards' reads: :meth:`~MemoryDirectory.resolve_sids` answers what the
  forest holds for each SID (its kind, ``adminCount``, whether it is one of our
  groups), :meth:`~MemoryDirectory.group_ancestry` the groups our groups are in,
  level by level, as the LDAP adapter reads them through ``memberOf``;
* the scope guard: an Add must be strictly below the target OU, carry
  ``adminDescription`` equal to its group's anchor, be a group and keep its
  members out of the attributes; Modify, Rename and Delete go only to a DN
  this instance has read carrying exactly that group's anchor (forgotten when
  a later read no longer finds it); a replace never changes or clears
  ``adminDescription`` nor replaces ``member``; a Rename names one ``CN=`` RDN
  and stays in its parent. Refusals are ``PolicyRefused`` and change nothing;
* the DC's own check at write time: every modify deletes and re-adds our
  anchor, so an object re-purposed since it was read (another anchor, or
  none) refuses the whole request, read back as ``PolicyRefused``;
* one planned operation per :meth:`~MemoryDirectory.apply`, returning the LDAP
  requests it would take: an Add 1 (plus 1 per further chunk of
  ``chunk_size`` members), a Modify 1 per chunk (0 when it changes nothing),
  a Rename and a Delete 2 (the guard modify first); a member value already
  there (or already gone) costs a read-back and a retry of the difference,
  2 requests more; deleting an object that is gone is done after 1;
* what the DC refuses is ``DirectoryRefused``: a DN or sAMAccountName that is
  taken (sAMAccountName is unique in the whole domain), a parent that does
  not exist, an attribute the schema does not have (the Exchange attributes
  only exist in a forest created with them), a member SID of the domain that
  no object has (a modify tries twice, as the adapter's read-back retries
  it: 3 requests); a SID of another domain is taken, as AD takes it (a
  foreign security principal).

:class:`MemoryForest` is the domain itself, beneath any adapter: OUs, users
with SIDs, group objects, and the admin's hand (``admin_*``: changes made in
ADUC, outside writeback, with none of the rules above) and independent
reads (:meth:`MemoryForest.entry`). Several directories can share one forest,
as several connections share a DC.

Kinder than AD: no latency, no connection to lose, no MaxValRange paging,
no replication between DCs, values are not checked against the schema's
sizes or syntaxes. Faults are scheduled per method name on
:attr:`MemoryDirectory.faults` (``fail_after("apply", ...)`` is a write that
happened whose answer was lost).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from tests.support.memory.faults import Faults
from writeback.adapters.ldap_values import CANONICAL_NAMES, parse_extended_dn
from writeback.domain.guard import (
    BUILTIN_GROUP_FLAG,
    Ancestry,
    ParentGroup,
    Principal,
    PrincipalKind,
    canonical_sid,
    is_sid,
)
from writeback.domain.mapping import BASE_ATTRIBUTES, EXCHANGE_ATTRIBUTES
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
    canonical_dn,
    dn_key,
    escape_dn_value,
    parent_of,
    single_cn_rdn,
    strictly_within,
)
from writeback.domain.target import is_within
from writeback.errors import DirectoryRefused, DuplicateAnchor, PolicyRefused, WritebackError
from writeback.ports import apply_each

#: The attributes every forest's group class has (lower case), besides the Exchange ones.
_BASE_SCHEMA = frozenset(
    n.lower() for n in (*BASE_ATTRIBUTES, "objectClass", "sAMAccountName", "cn", "member")
)
_EXCHANGE = frozenset(n.lower() for n in EXCHANGE_ATTRIBUTES)
_T = TypeVar("_T")
#: groupType of a global and of a built-in security group, as AD stores them.
_GLOBAL_SECURITY = str(0x2 - 0x80000000)
_BUILTIN_SECURITY = str(0x5 - 0x80000000)
#: What every domain holds from its creation (name, container, RID or SID, kind,
#: adminCount): the principals the guards must recognise.
_WELL_KNOWN = (
    ("Administrator", "Users", 500, "user", True),
    ("krbtgt", "Users", 502, "user", True),
    ("Domain Admins", "Users", 512, "group", True),
    ("Domain Users", "Users", 513, "group", False),
    ("Enterprise Admins", "Users", 519, "group", True),
    ("Administrators", "Builtin", "S-1-5-32-544", "builtin", True),
    ("Backup Operators", "Builtin", "S-1-5-32-551", "builtin", True),
    ("Remote Desktop Users", "Builtin", "S-1-5-32-555", "builtin", False),
)


@dataclass(frozen=True)
class Entry:
    """An object as an independent read sees it: attribute names in lower case."""

    dn: str
    attributes: dict[str, tuple[str, ...]]
    member_sids: frozenset[str] = frozenset()
    #: Member DNs of objects without a SID (contacts an admin added).
    other_members: frozenset[str] = frozenset()
    object_sid: str | None = None

    def get(self, name: str) -> tuple[str, ...]:
        return self.attributes.get(name.lower(), ())


@dataclass
class _Object:
    dn: str
    attributes: dict[str, tuple[str, ...]]  # lower-case names, non-empty values
    object_sid: str | None
    member_sids: set[str] = field(default_factory=set)
    other_members: set[DnKey] = field(default_factory=set)

    @property
    def classes(self) -> set[str]:
        return {c.lower() for c in self.attributes.get("objectclass", ())}


class MemoryForest:
    """One AD domain in memory (see the module docstring). Thread-safe."""

    def __init__(
        self, base_dn: str = "DC=example,DC=com", *, schema_attributes: Iterable[str] = ()
    ) -> None:
        """``schema_attributes``: the Exchange attributes this forest's schema has
        (none for a plain forest; :data:`EXCHANGE_ATTRIBUTES` for a prepared one)."""
        self.base_dn = base_dn
        self.domain_sid = "S-1-5-21-3623811015-3361044348-30300820"
        self.schema_attributes = frozenset(n.lower() for n in schema_attributes) & _EXCHANGE
        self.lock = threading.RLock()
        self._containers: dict[DnKey, str] = {dn_key(base_dn): base_dn}
        self._objects: dict[DnKey, _Object] = {}
        self._rids = itertools.count(1100)
        for container in ("Users", "Builtin"):
            dn = f"CN={container},{base_dn}"
            self._containers[dn_key(dn)] = dn
        for name, container, rid, kind, protected in _WELL_KNOWN:
            self._put(self._well_known(name, container, rid, kind, protected=protected))

    def _well_known(
        self, name: str, container: str, rid: int | str, kind: str, *, protected: bool
    ) -> _Object:
        sid = rid if isinstance(rid, str) else f"{self.domain_sid}-{rid}"
        dn = f"CN={escape_dn_value(name)},CN={container},{self.base_dn}"
        values: dict[str, tuple[str, ...]] = {"samaccountname": (name,)}
        if kind == "user":
            values["objectclass"] = ("top", "person", "organizationalPerson", "user")
        else:
            values["objectclass"] = ("top", "group")
            values["grouptype"] = (_BUILTIN_SECURITY if kind == "builtin" else _GLOBAL_SECURITY,)
        if protected:
            values["admincount"] = ("1",)
        return _Object(dn, values, sid)

    def well_known_dn(self, name: str) -> str:
        """The DN of one of the well-known objects every domain holds (``_WELL_KNOWN``)."""
        for known, container, *_ in _WELL_KNOWN:
            if known == name:
                return f"CN={escape_dn_value(known)},CN={container},{self.base_dn}"
        raise KeyError(name)

    def sid_of(self, dn: str) -> str:
        with self.lock:
            sid = self._object(dn).object_sid
            assert sid is not None, f"{dn} has no SID"
            return sid

    def admin_add_computer(self, name: str, parent: str | None = None) -> str:
        """A computer object (a user too, by its classes); returns its SID."""
        with self.lock:
            parent = parent or self.base_dn
            self._require_container(parent)
            dn = f"CN={escape_dn_value(name)},{parent}"
            sid = self._new_sid()
            classes = ("top", "person", "organizationalPerson", "user", "computer")
            self._put(_Object(dn, {"objectclass": classes, "samaccountname": (name + "$",)}, sid))
            return sid

    # ------------------------------------------------------------------ the admin's hand

    def add_ou(self, name: str, parent: str | None = None) -> str:
        with self.lock:
            parent = parent or self.base_dn
            self._require_container(parent)
            dn = f"OU={escape_dn_value(name)},{parent}"
            if dn_key(dn) in self._containers or dn_key(dn) in self._objects:
                raise ValueError(f"{dn} exists")
            self._containers[dn_key(dn)] = dn
            return dn

    def add_user(self, name: str, parent: str | None = None) -> str:
        """A user object (``name`` is its cn and sAMAccountName); returns its SID."""
        with self.lock:
            parent = parent or self.base_dn
            self._require_container(parent)
            dn = f"CN={escape_dn_value(name)},{parent}"
            sid = self._new_sid()
            self._put(_Object(dn, {"objectclass": ("top", "user"), "samaccountname": (name,)}, sid))
            return sid

    def add_users(self, names: Iterable[str], parent: str | None = None) -> list[str]:
        return [self.add_user(name, parent) for name in names]

    def add_contact(self, name: str, parent: str | None = None) -> str:
        """A contact (no SID); returns its DN."""
        with self.lock:
            parent = parent or self.base_dn
            self._require_container(parent)
            dn = f"CN={escape_dn_value(name)},{parent}"
            self._put(_Object(dn, {"objectclass": ("top", "contact")}, None))
            return dn

    def admin_add_group(
        self,
        dn: str,
        *,
        anchor: str | None = None,
        attributes: Attributes | None = None,
        member_sids: Iterable[str] = (),
        other_members: Iterable[str] = (),
    ) -> str:
        """A group made by hand, anywhere (no scope guard); returns its SID."""
        with self.lock:
            self._require_container(parent_of(dn))
            values = {k.lower(): tuple(v) for k, v in (attributes or {}).items() if v}
            values.setdefault("objectclass", ("top", "group"))
            values.setdefault("samaccountname", (f"admin{next(self._rids)}",))
            if anchor is not None:
                values["admindescription"] = (anchor,)
            obj = _Object(dn, values, self._new_sid(), set(member_sids))
            obj.other_members = {dn_key(d) for d in other_members}
            self._put(obj)
            assert obj.object_sid is not None
            return obj.object_sid

    def admin_set(self, dn: str, attribute: str, values: Sequence[str]) -> None:
        """Replace (or with no values, clear) one attribute, as an admin would."""
        with self.lock:
            obj = self._object(dn)
            if values:
                obj.attributes[attribute.lower()] = tuple(values)
            else:
                obj.attributes.pop(attribute.lower(), None)

    def admin_members(
        self,
        dn: str,
        *,
        add: Iterable[str] = (),
        remove: Iterable[str] = (),
        add_dns: Iterable[str] = (),
    ) -> None:
        """Change a group's members by hand: SIDs to add or remove, DNs of objects without one."""
        with self.lock:
            obj = self._object(dn)
            obj.member_sids |= set(add)
            obj.member_sids -= set(remove)
            for member_dn in add_dns:  # an object with a SID is read back by its SID, as in AD
                member = self._objects.get(dn_key(member_dn))
                if member is not None and member.object_sid:
                    obj.member_sids.add(member.object_sid)
                else:
                    obj.other_members.add(dn_key(member_dn))

    def admin_move(self, dn: str, new_dn: str) -> None:
        """Rename or move an object by hand (anywhere the parent exists)."""
        with self.lock:
            obj = self._object(dn)
            self._require_container(parent_of(new_dn))
            if dn_key(new_dn) in self._objects:
                raise ValueError(f"{new_dn} exists")
            del self._objects[dn_key(dn)]
            obj.dn = new_dn
            self._objects[dn_key(new_dn)] = obj

    def admin_delete(self, dn: str) -> None:
        with self.lock:
            del self._objects[dn_key(dn)]

    def entry(self, dn: str) -> Entry | None:
        """The object at ``dn`` read independently of any adapter, or None."""
        with self.lock:
            obj = self._objects.get(dn_key(dn))
            if obj is None and dn_key(dn) in self._containers:
                name = dn.partition("=")[2].partition(",")[0]
                return Entry(dn, {"objectclass": ("top", "organizationalUnit"), "ou": (name,)})
            return None if obj is None else self._entry(obj)

    def entries(self, base: str | None = None) -> list[Entry]:
        """Every object below ``base`` (default: the whole domain), in creation order."""
        with self.lock:
            base = base or self.base_dn
            return [self._entry(o) for o in self._objects.values() if strictly_within(o.dn, base)]

    def directory(self, target_ou: str, **options: int) -> MemoryDirectory:
        """A Directory port scoped to ``target_ou``, like ``LdapDirectory(target_ou=...)``."""
        return MemoryDirectory(self, target_ou, **options)

    # ------------------------------------------------------------------ internals

    def _entry(self, obj: _Object) -> Entry:
        return Entry(
            dn=obj.dn,
            attributes=dict(obj.attributes),
            member_sids=frozenset(obj.member_sids),
            other_members=frozenset(self._dn_of(k) for k in obj.other_members),
            object_sid=obj.object_sid,
        )

    def _dn_of(self, key: DnKey) -> str:
        obj = self._objects.get(key)
        return obj.dn if obj is not None else ",".join(f"{a.upper()}={v}" for a, v in key)

    def _new_sid(self) -> str:
        return f"{self.domain_sid}-{next(self._rids)}"

    def _require_container(self, dn: str) -> None:
        if dn_key(dn) not in self._containers:
            raise DirectoryRefused(f"LDAP add of {dn!r}: noSuchObject (32): no such parent")

    def _object(self, dn: str) -> _Object:
        obj = self._objects.get(dn_key(dn))
        if obj is None:
            raise KeyError(f"no object {dn}")
        return obj

    def _put(self, obj: _Object) -> None:
        key = dn_key(obj.dn)
        if key in self._objects or key in self._containers:
            raise DirectoryRefused(f"LDAP add of {obj.dn!r}: entryAlreadyExists (68)")
        sam = obj.attributes.get("samaccountname", ())
        if sam and any(
            o.attributes.get("samaccountname", ("",))[0].lower() == sam[0].lower()
            for o in self._objects.values()
        ):
            raise DirectoryRefused(
                f"LDAP add of {obj.dn!r}: entryAlreadyExists (68): "
                f"sAMAccountName {sam[0]} is already in use in the domain"
            )
        self._objects[key] = obj

    def _principal_sids(self) -> set[str]:
        return {o.object_sid for o in self._objects.values() if o.object_sid}

    def _groups_under(self, base: str) -> list[_Object]:
        return [
            o
            for o in self._objects.values()
            if "group" in o.classes and strictly_within(o.dn, base)
        ]


class MemoryDirectory:
    """The Directory port over a :class:`MemoryForest` (see the module docstring).

    Like LdapDirectory, one instance is one connection's view: what it has read
    is what it may write."""

    def __init__(
        self, forest: MemoryForest, target_ou: str, *, chunk_size: int = 5000, page_size: int = 1000
    ) -> None:
        if chunk_size < 1 or page_size < 1:
            raise ValueError("chunk_size and page_size must be positive")
        self.forest = forest
        self.target_ou = target_ou
        self.faults = Faults()
        #: Port calls by method name.
        self.calls: Counter[str] = Counter()
        #: LDAP requests the calls so far would have taken (searches and writes).
        self.requests = 0
        self._chunk_size = chunk_size
        self._page_size = page_size
        self._seen: dict[DnKey, str] = {}

    def __repr__(self) -> str:
        return f"MemoryDirectory(target_ou={self.target_ou!r})"

    # ------------------------------------------------------------------ reads

    def schema_attributes(self) -> frozenset[str]:
        self._enter("schema_attributes")
        self.requests += 2  # rootDSE, then the schema container
        return self.forest.schema_attributes

    def find_group(self, group_id: str) -> DirectoryGroup | None:
        self._enter("find_group")
        try:
            return self._find_and_remember(group_id, members=True)
        except _Duplicate as duplicate:
            raise DuplicateAnchor({duplicate.group_id: duplicate.dns}) from None

    def find_groups(
        self, group_ids: Sequence[str], *, members: bool = True
    ) -> dict[str, DirectoryGroup]:
        self._enter("find_groups")
        found: dict[str, DirectoryGroup] = {}
        duplicates: dict[str, tuple[str, ...]] = {}
        for group_id in dict.fromkeys(group_ids):
            try:
                group = self._find_and_remember(group_id, members=members)
            except _Duplicate as duplicate:
                duplicates[group_id] = duplicate.dns
                continue
            if group is not None:
                found[group_id] = group
        if duplicates:
            raise DuplicateAnchor(duplicates, found)
        return found

    # ------------------------------------------------------------------ the guards' reads

    def resolve_sids(self, sids: Sequence[str]) -> dict[str, Principal]:
        self._enter("resolve_sids")
        wanted = [s for s in dict.fromkeys(canonical_sid(sid) for sid in sids) if is_sid(s)]
        self.requests += math.ceil(len(wanted) / _GUARD_BATCH)
        found: dict[str, Principal] = {}
        with self.forest.lock:
            by_sid = {
                canonical_sid(o.object_sid): o
                for o in self.forest._objects.values()
                if o.object_sid
            }
            for sid in wanted:
                obj = by_sid.get(sid)
                if obj is not None:
                    found[sid] = self._principal(sid, obj)
        return found

    def _principal(self, sid: str, obj: _Object) -> Principal:
        kind = PrincipalKind.of(obj.classes)
        ours = kind is PrincipalKind.GROUP and strictly_within(obj.dn, self.target_ou)
        anchor = obj.attributes.get("admindescription", ())
        return Principal(
            sid=sid,
            dn=canonical_dn(obj.dn),
            kind=kind,
            admin_count=obj.attributes.get("admincount") == ("1",),
            group_id=group_id_from_anchor(anchor[0]) if ours and len(anchor) == 1 else None,
        )

    def group_ancestry(self) -> Ancestry:
        self._enter("group_ancestry")
        self.requests += 1  # the search over the OU for our groups in any group
        with self.forest.lock:
            objects = list(self.forest._objects.values())
            parents_of = {
                dn_key(o.dn): tuple(
                    canonical_dn(g.dn)
                    for g in objects
                    if "group" in g.classes and o.object_sid in g.member_sids
                )
                for o in objects
                if "group" in o.classes
            }
            parents: dict[str, tuple[str, ...]] = {}
            for obj in self.forest._groups_under(self.target_ou):
                anchor = obj.attributes.get("admindescription", ())
                group_id = group_id_from_anchor(anchor[0]) if len(anchor) == 1 else None
                above = parents_of.get(dn_key(obj.dn), ())
                if group_id is not None and above:
                    parents[group_id] = (*parents.get(group_id, ()), *above)
            groups: dict[DnKey, ParentGroup] = {}
            frontier = [dn for dns in parents.values() for dn in dns]
            while frontier:
                frontier = [dn for dn in dict.fromkeys(frontier) if dn_key(dn) not in groups]
                if not frontier:
                    break
                self.requests += math.ceil(len(frontier) / _GUARD_BATCH)
                for dn in frontier:
                    groups[dn_key(dn)] = self._parent(dn, parents_of)
                frontier = [p for dn in frontier for p in groups[dn_key(dn)].parents]
        return Ancestry(parents=parents, groups={g.dn: g for g in groups.values()})

    def _parent(self, dn: str, parents_of: dict[DnKey, tuple[str, ...]]) -> ParentGroup:
        obj = self.forest._objects.get(dn_key(dn))
        if obj is None:
            return ParentGroup(dn, readable=False)
        group_type = obj.attributes.get("grouptype", ("0",))[0]
        return ParentGroup(
            dn=canonical_dn(obj.dn),
            sid=obj.object_sid,
            admin_count=obj.attributes.get("admincount") == ("1",),
            builtin=bool(int(group_type) & BUILTIN_GROUP_FLAG),
            name=obj.attributes.get("samaccountname", ("",))[0],
            parents=parents_of.get(dn_key(obj.dn), ()),
        )

    def iter_groups(self) -> Iterator[DirectoryGroup]:
        self._enter("iter_groups")
        with self.forest.lock:
            objects = self.forest._groups_under(self.target_ou)
            groups = [g for g in (self._group(o, members=True) for o in objects) if g is not None]
        self.requests += max(1, math.ceil(len(objects) / self._page_size))
        known_before = set(self._seen)
        found: set[DnKey] = set()
        for group in groups:
            found.add(self._remember(group))
            yield group
        for key in known_before - found:
            self._seen.pop(key, None)

    def _find_and_remember(self, group_id: str, *, members: bool) -> DirectoryGroup | None:
        self.requests += 1
        anchor = anchor_for(group_id).casefold()
        with self.forest.lock:
            candidates = [
                o
                for o in self.forest._groups_under(self.target_ou)
                if anchor in (v.casefold() for v in o.attributes.get("admindescription", ()))
            ]
            groups = [g for g in (self._group(o, members=members) for o in candidates) if g]
            claims = [
                canonical_dn(o.dn)
                for o in candidates
                if self._group(o, members=False) is None
                and len(o.attributes.get("admindescription", ())) == 1
                and anchor_claims(o.attributes["admindescription"][0]) == group_id
            ]
        if len(groups) > 1 or claims:
            raise _Duplicate(group_id, (*(g.dn for g in groups), *claims))
        for key in [k for k, gid in self._seen.items() if gid == group_id]:
            del self._seen[key]
        if groups:
            self._remember(groups[0])
            return groups[0]
        return None

    def _group(self, obj: _Object, *, members: bool) -> DirectoryGroup | None:
        anchor = obj.attributes.get("admindescription", ())
        group_id = group_id_from_anchor(anchor[0]) if len(anchor) == 1 else None
        if group_id is None:
            return None
        attributes = {
            CANONICAL_NAMES[name]: values
            for name, values in obj.attributes.items()
            if name in CANONICAL_NAMES
        }
        return DirectoryGroup(
            dn=canonical_dn(obj.dn),
            group_id=group_id,
            attributes=attributes,
            member_sids=frozenset(obj.member_sids) if members else frozenset(),
            other_members=(
                frozenset(self.forest._dn_of(k) for k in obj.other_members)
                if members
                else frozenset()
            ),
            object_sid=obj.object_sid,
        )

    def _remember(self, group: DirectoryGroup) -> DnKey:
        key = dn_key(group.dn)
        self._seen[key] = group.group_id
        return key

    # ------------------------------------------------------------------ writes

    def apply_all(self, operations: Sequence[Operation]) -> list[int | WritebackError]:
        return apply_each(self.apply, operations)

    def apply(self, operation: Operation) -> int:
        self._enter("apply")
        before = self.requests
        with self.forest.lock:
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
        self.faults.after("apply")
        return self.requests - before

    def _add(self, op: Add) -> None:
        self._check_scope(op.dn)
        names = {name.lower(): tuple(values) for name, values in op.attributes.items()}
        anchor = names.get("admindescription", ())
        if anchor != (anchor_for(op.group_id),):
            raise PolicyRefused(
                f"refusing to add {op.dn}: adminDescription must be {anchor_for(op.group_id)!r}, "
                f"not {anchor!r}"
            )
        classes = names.get("objectclass") or ("top", "group")
        if "group" not in {c.lower() for c in classes}:
            raise PolicyRefused(f"refusing to add {op.dn}: objectClass {classes!r} is not a group")
        if names.get("member"):
            raise PolicyRefused(
                f"refusing to add {op.dn}: members go in Add.members, not attributes"
            )
        chunks = _chunks(op.members, self._chunk_size)
        self.requests += 1
        forest = self.forest
        self._check_schema(names, op.dn, "add")
        forest._require_container(parent_of(op.dn))
        sids, others, missing = self._member_values(chunks[0] if chunks else ())
        if missing:
            raise DirectoryRefused(
                f"LDAP add of {op.dn!r}: unwillingToPerform (53): no such member {missing[0]}"
            )
        values = {name: v for name, v in names.items() if v}
        values["objectclass"] = tuple(classes)
        obj = _Object(op.dn, values, forest._new_sid(), set(sids), others)
        forest._put(obj)
        self._seen[dn_key(op.dn)] = op.group_id
        for chunk in chunks[1:]:
            self._guarded_modify(op.dn, op.group_id, {}, adds=chunk, removes=())

    def _rename(self, op: Rename) -> None:
        self._check_target(op.dn, op.group_id)
        if not single_cn_rdn(op.new_rdn):
            raise PolicyRefused(f"refusing to rename {op.dn}: {op.new_rdn!r} is not one CN= RDN")
        if op.new_parent is not None and not is_within(op.new_parent, self.target_ou):
            raise PolicyRefused(f"refusing to move {op.dn} to {op.new_parent}: outside the OU")
        new_dn = f"{op.new_rdn},{op.new_parent or parent_of(op.dn)}"
        self._check_scope(new_dn)
        self._check_replace(op.changes, op.group_id)
        if op.new_parent is not None:
            self.forest._require_container(op.new_parent)
        if op.changes:
            self._write_changes(op.dn, op.group_id, op.changes)
        else:
            self._guarded_modify(op.dn, op.group_id, {}, adds=(), removes=())
        self.requests += 1
        forest = self.forest
        obj = forest._objects.get(dn_key(op.dn))
        if obj is None:
            raise DirectoryRefused(f"LDAP rename of {op.dn!r}: noSuchObject (32)")
        if dn_key(new_dn) != dn_key(op.dn) and dn_key(new_dn) in forest._objects:
            raise DirectoryRefused(f"LDAP rename of {op.dn!r}: entryAlreadyExists (68)")
        del forest._objects[dn_key(op.dn)]
        obj.dn = new_dn
        forest._objects[dn_key(new_dn)] = obj
        self._seen.pop(dn_key(op.dn), None)
        self._seen[dn_key(new_dn)] = op.group_id

    def _delete(self, op: Delete) -> None:
        self._check_target(op.dn, op.group_id)
        forest = self.forest
        if dn_key(op.dn) not in forest._objects:
            self.requests += 1  # the guard modify answers noSuchObject: already gone
        else:
            self._guarded_modify(op.dn, op.group_id, {}, adds=(), removes=())
            self.requests += 1
            del forest._objects[dn_key(op.dn)]
        self._seen.pop(dn_key(op.dn), None)

    def _check_scope(self, dn: str) -> None:
        if not strictly_within(dn, self.target_ou):
            raise PolicyRefused(f"refusing to write {dn}: not below the target OU {self.target_ou}")

    def _check_target(self, dn: str, group_id: str) -> None:
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

    def _check_schema(self, names: Iterable[str], dn: str, what: str) -> None:
        known = _BASE_SCHEMA | self.forest.schema_attributes
        unknown = sorted({n.lower() for n in names} - known)
        if unknown:
            raise DirectoryRefused(
                f"LDAP {what} of {dn!r}: undefinedAttributeType (17): {', '.join(unknown)}"
            )

    def _member_values(self, values: Iterable[str]) -> tuple[set[str], set[DnKey], list[str]]:
        """Member values split into SIDs and DNs, and those that name no object:
        a SID of this domain nothing has (AD answers unwillingToPerform), or a
        DN that does not exist. A SID of another domain is accepted: AD makes a
        foreign security principal for it."""
        sids: set[str] = set()
        dns: set[DnKey] = set()
        missing: list[str] = []
        forest = self.forest
        principals = forest._principal_sids()
        for value in values:
            ref = parse_extended_dn(value)
            if ref.sid:
                ours = ref.sid.startswith(forest.domain_sid + "-")
                if ours and ref.sid not in principals:
                    missing.append(ref.sid)
                sids.add(ref.sid)
            elif dn_key(ref.dn) in forest._objects:
                dns.add(dn_key(ref.dn))
            else:
                missing.append(ref.dn)
        return sids, dns, missing

    def _write_changes(self, dn: str, group_id: str, changes: Changes) -> None:
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
        """One modify that only succeeds while ``dn`` carries ``group_id``'s anchor;
        on a value conflict, a read-back and a retry of the difference."""
        self.requests += 1
        obj = self.forest._objects.get(dn_key(dn))
        if obj is None:
            raise DirectoryRefused(f"LDAP modify of {dn!r}: noSuchObject (32)")
        self._check_schema(replace, dn, "modify")
        add_sids, add_dns, missing = self._member_values(adds)
        remove_sids, remove_dns = _split(removes)
        anchor = (anchor_for(group_id),)
        conflict = (
            bool(missing)
            or obj.attributes.get("admindescription", ()) != anchor
            or bool(add_sids & obj.member_sids)
            or bool(add_dns & obj.other_members)
            or bool(remove_sids - obj.member_sids)
            or bool(remove_dns - obj.other_members)
        )
        if conflict:
            self.requests += 1  # the read-back
            current = obj.attributes.get("admindescription", ())
            if current != anchor:
                raise PolicyRefused(
                    f"refusing to write {dn} for group {group_id}: the DC reports "
                    f"adminDescription {current!r} (changed since it was read); nothing was written"
                )
            if not (adds or removes):
                raise DirectoryRefused(f"LDAP modify of {dn!r}: attributeOrValueExists (20)")
            add_sids -= obj.member_sids
            add_dns -= obj.other_members
            remove_sids &= obj.member_sids
            remove_dns &= obj.other_members
            if not (add_sids or add_dns or remove_sids or remove_dns or replace):
                return
            self.requests += 1  # the retry
            if missing:  # it fails again, for the same reason
                raise DirectoryRefused(
                    f"LDAP modify of {dn!r}: unwillingToPerform (53): no such member {missing[0]}"
                )
        for name, values in replace.items():
            if name.lower() == "admindescription":
                continue
            if values:
                obj.attributes[name.lower()] = tuple(values)
            else:
                obj.attributes.pop(name.lower(), None)
        obj.member_sids = (obj.member_sids - remove_sids) | add_sids
        obj.other_members = (obj.other_members - remove_dns) | add_dns

    def close(self) -> None:
        """Nothing to release (an LDAP connection would be unbound)."""

    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        self.faults.before(method)


#: SIDs, or DNs, per search of the guards' reads (the LDAP adapter's GUARD_BATCH).
_GUARD_BATCH = 200


class _Duplicate(Exception):
    """Inside the directory: one id's anchor is claimed by more than one object."""

    def __init__(self, group_id: str, dns: tuple[str, ...]) -> None:
        super().__init__(group_id)
        self.group_id = group_id
        self.dns = dns


def _split(values: Iterable[str]) -> tuple[set[str], set[DnKey]]:
    sids: set[str] = set()
    dns: set[DnKey] = set()
    for value in values:
        ref = parse_extended_dn(value)
        if ref.sid:
            sids.add(ref.sid)
        else:
            dns.add(dn_key(ref.dn))
    return sids, dns


def _chunks(values: Sequence[_T], size: int) -> list[Sequence[_T]]:
    return [values[i : i + size] for i in range(0, len(values), size)]
