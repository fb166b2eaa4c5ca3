"""The stand-in's directory: users, groups, devices and contacts, with their history.

Every change takes a sequence number and a timestamp, and every change to an
existing object leaves an undo record, so the directory can be read *as of*
any earlier sequence number: that is how the server serves a replica that
lags (a group created since answers 404, a changed one its old properties and
members, a deleted one still answers). Reading as of now takes no copies.
"""

from __future__ import annotations

import bisect
import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

USER_TYPE = "#microsoft.graph.user"
GROUP_TYPE = "#microsoft.graph.group"
DEVICE_TYPE = "#microsoft.graph.device"
CONTACT_TYPE = "#microsoft.graph.orgContact"

KIND_TYPES = {
    "user": USER_TYPE,
    "group": GROUP_TYPE,
    "device": DEVICE_TYPE,
    "contact": CONTACT_TYPE,
}

#: Group properties the stand-in stores and returns by default (v1.0), by their
#: Graph (camelCase) names.
GROUP_PROPERTIES = (
    "displayName",
    "description",
    "mail",
    "mailNickname",
    "proxyAddresses",
    "groupTypes",
    "visibility",
    "mailEnabled",
    "securityEnabled",
    "onPremisesSyncEnabled",
    "isAssignableToRole",
)
#: "Returned only on $select. Supported only on the Get group API (GET /groups/{ID})."
SINGLE_GET_PROPERTIES = ("hideFromAddressLists",)
#: On the beta endpoint only (v1.0 has no such property).
BETA_PROPERTIES = ("writebackConfiguration",)
#: Without it, an app is shown no member of a HiddenMembership group (Graph
#: answers as if the group had none) and no such group in a member's memberOf.
MEMBER_READ_HIDDEN = "Member.Read.Hidden"
HIDDEN_MEMBERSHIP = "HiddenMembership"
USER_PROPERTIES = ("displayName", "onPremisesSecurityIdentifier", "onPremisesSyncEnabled")

_GROUP_FIELD_NAMES = {
    "display_name": "displayName",
    "description": "description",
    "mail": "mail",
    "mail_nickname": "mailNickname",
    "proxy_addresses": "proxyAddresses",
    "group_types": "groupTypes",
    "visibility": "visibility",
    "mail_enabled": "mailEnabled",
    "security_enabled": "securityEnabled",
    "on_premises_sync_enabled": "onPremisesSyncEnabled",
    "is_assignable_to_role": "isAssignableToRole",
    "hide_from_address_lists": "hideFromAddressLists",
    "writeback_configuration": "writebackConfiguration",
}
_STORED_GROUP_PROPERTIES = (*GROUP_PROPERTIES, *SINGLE_GET_PROPERTIES, *BETA_PROPERTIES)
_USER_FIELD_NAMES = {
    "display_name": "displayName",
    "sid": "onPremisesSecurityIdentifier",
    "synced": "onPremisesSyncEnabled",
}

#: One undone change: (seq, the object's seq before it, "prop"|"member"|"life", key, old value).
_Undo = tuple[int, int, str, str, Any]


@dataclass
class _Obj:
    """A directory object: its properties and when each last changed."""

    id: str
    kind: str
    props: dict[str, Any]
    prop_seq: dict[str, int]
    created_seq: int
    seq: int
    soft_deleted_seq: int | None = None
    #: groups only: member id -> (present, seq of the last add/remove)
    members: dict[str, tuple[bool, int]] = field(default_factory=dict)
    live_members: int = 0
    #: when it first came to exist (``created_seq`` moves on a restore; this does not)
    born_seq: int = 0
    #: when it was deleted for good (it is then kept for reads of the past only)
    gone_seq: int | None = None
    #: what each change after creation replaced, oldest first
    undo: list[_Undo] = field(default_factory=list)


def _at(obj: _Obj | None, as_of: int | None) -> _Obj | None:
    """The object as it was at sequence ``as_of`` (None: now), or None if it did not exist."""
    if obj is None:
        return None
    if as_of is None:
        return obj if obj.gone_seq is None else None
    if obj.born_seq > as_of or (obj.gone_seq is not None and obj.gone_seq <= as_of):
        return None
    if not obj.undo or obj.undo[-1][0] <= as_of:
        return obj
    view = _Obj(
        obj.id,
        obj.kind,
        dict(obj.props),
        dict(obj.prop_seq),
        obj.created_seq,
        obj.seq,
        obj.soft_deleted_seq,
        dict(obj.members),
        obj.live_members,
        obj.born_seq,
    )
    for seq, before, what, key, old in reversed(obj.undo):
        if seq <= as_of:
            break
        view.seq = before
        _undo(view, what, key, old)
    return view


def _undo(view: _Obj, what: str, key: str, old: Any) -> None:
    """Put back what one change replaced."""
    if what == "prop":
        value, prop_seq = old
        if prop_seq is None:
            view.props.pop(key, None)
            view.prop_seq.pop(key, None)
        else:
            view.props[key] = value
            view.prop_seq[key] = prop_seq
    elif what == "member":
        current = view.members.get(key)
        if current is not None and current[0]:
            view.live_members -= 1
        if old is None:
            view.members.pop(key, None)
        else:
            view.members[key] = old
            if old[0]:
                view.live_members += 1
    else:
        view.soft_deleted_seq, view.created_seq = old


class Tenant:
    """Thread-safe in-memory directory: users, groups, devices, contacts.

    Every change takes a new sequence number; delta tokens are sequence numbers,
    so an incremental round returns exactly what changed after its token. The
    reads take ``as_of`` (a sequence number, None for now) to read the past.
    History is kept for the tenant's lifetime: it grows with the changes made
    after objects are created, not with the tenant's size.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._seq = 0
        #: monotonic time of each sequence number (index seq - 1)
        self._times: list[float] = []
        self._epoch = secrets.token_hex(4)
        self._groups: dict[str, _Obj] = {}
        self._users: dict[str, _Obj] = {}
        #: deleted for good, kept so the past can be read (id -> object)
        self._gone_groups: dict[str, _Obj] = {}
        self._gone_users: dict[str, _Obj] = {}
        self._others: dict[str, str] = {}  # devices and contacts: id -> kind
        self._kinds: dict[str, str] = {}  # every id ever seen -> kind, for removed members
        self._member_of: dict[str, set[str]] = {}  # member id -> group ids (present only)
        self._hard_deleted_groups: dict[str, int] = {}
        self._hard_deleted_users: dict[str, int] = {}
        #: called (under the tenant's lock) with (group id, changeType, seq) per group change
        self._listeners: list[Callable[[str, str, int], None]] = []

    # ----------------------------------------------------------------- listeners

    def add_listener(self, listener: Callable[[str, str, int], None]) -> None:
        """Call ``listener(group_id, change_type, seq)`` after every group change.

        ``change_type`` is what Graph notifies: ``updated`` for a create, an
        update, a membership change, a soft delete or a restore; ``deleted``
        for a permanent delete. The listener runs under the tenant's lock, so
        it must be quick and must not call back into the tenant."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[str, str, int], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _notify(self, group_ids: Iterable[str], change_type: str, seq: int) -> None:
        for group_id in group_ids:
            for listener in self._listeners:
                listener(group_id, change_type, seq)

    # ----------------------------------------------------------------- helpers

    def _next(self) -> int:
        self._seq += 1
        self._times.append(time.monotonic())
        return self._seq

    def _claim_id(self, object_id: str, kind: str) -> None:
        if object_id in self._groups or object_id in self._users or object_id in self._others:
            raise ValueError(f"object {object_id!r} already exists")
        self._kinds[object_id] = kind
        self._hard_deleted_groups.pop(object_id, None)
        self._hard_deleted_users.pop(object_id, None)
        self._gone_groups.pop(object_id, None)
        self._gone_users.pop(object_id, None)

    def _live_group(self, group_id: str) -> _Obj:
        group = self._groups.get(group_id)
        if group is None:
            raise KeyError(f"no group {group_id!r}")
        if group.soft_deleted_seq is not None:
            raise KeyError(f"group {group_id!r} is soft-deleted")
        return group

    def _kind_of(self, object_id: str) -> str:
        if object_id in self._users:
            return "user"
        if object_id in self._groups:
            return "group"
        kind = self._others.get(object_id)
        if kind is None:
            raise KeyError(f"no directory object {object_id!r} to add as a member")
        return kind

    def _set_member(
        self, group: _Obj, member_id: str, present: bool, seq: int, *, undo: bool = True
    ) -> bool:
        current = group.members.get(member_id)
        if (current is not None and current[0]) == present:
            return False
        if undo:
            group.undo.append((seq, group.seq, "member", member_id, current))
        group.members[member_id] = (present, seq)
        group.seq = seq
        if present:
            group.live_members += 1
            self._member_of.setdefault(member_id, set()).add(group.id)
        else:
            group.live_members -= 1
            owners = self._member_of.get(member_id)
            if owners is not None:
                owners.discard(group.id)
                if not owners:
                    del self._member_of[member_id]
        return True

    def _drop_from_all_groups(self, member_id: str, seq: int) -> None:
        for group_id in sorted(self._member_of.get(member_id, set())):
            self._set_member(self._groups[group_id], member_id, False, seq)

    @staticmethod
    def _update(obj: _Obj, props: dict[str, Any], seq: int) -> None:
        for name, value in props.items():
            if obj.props.get(name) != value:
                old = (obj.props.get(name), obj.prop_seq.get(name))
                obj.undo.append((seq, obj.seq, "prop", name, old))
                obj.props[name] = value
                obj.prop_seq[name] = seq
                obj.seq = seq

    @staticmethod
    def _life(obj: _Obj, seq: int) -> None:
        """Record the lifecycle fields before a soft delete or restore changes them."""
        obj.undo.append((seq, obj.seq, "life", "", (obj.soft_deleted_seq, obj.created_seq)))

    # ----------------------------------------------------------------- users

    def add_user(
        self, user_id: str, *, sid: str | None, synced: bool, display_name: str = ""
    ) -> None:
        with self._lock:
            self._claim_id(user_id, "user")
            seq = self._next()
            props: dict[str, Any] = {
                "displayName": display_name or user_id,
                "onPremisesSecurityIdentifier": sid,
                "onPremisesSyncEnabled": True if synced else None,
            }
            self._users[user_id] = _Obj(
                user_id, "user", props, dict.fromkeys(props, seq), seq, seq, born_seq=seq
            )

    def update_user(self, user_id: str, **fields: Any) -> None:
        """Change ``display_name``, ``sid`` or ``synced`` (snake or camel case names)."""
        with self._lock:
            user = self._users[user_id]
            props = _camel_fields(fields, _USER_FIELD_NAMES, USER_PROPERTIES)
            if "onPremisesSyncEnabled" in props:
                props["onPremisesSyncEnabled"] = True if props["onPremisesSyncEnabled"] else None
            self._update(user, props, self._next())

    def delete_user(self, user_id: str) -> None:
        """Delete a user for good: it leaves every group and delta reports it removed."""
        with self._lock:
            if user_id not in self._users:
                raise KeyError(f"no user {user_id!r}")
            seq = self._next()
            parents = sorted(self._member_of.get(user_id, set()))
            self._drop_from_all_groups(user_id, seq)
            user = self._users.pop(user_id)
            user.gone_seq = seq
            self._gone_users[user_id] = user
            self._hard_deleted_users[user_id] = seq
            self._notify(parents, "updated", seq)

    # ----------------------------------------------------------------- others

    def add_device(self, device_id: str) -> None:
        with self._lock:
            self._claim_id(device_id, "device")
            self._others[device_id] = "device"

    def add_contact(self, contact_id: str) -> None:
        with self._lock:
            self._claim_id(contact_id, "contact")
            self._others[contact_id] = "contact"

    # ----------------------------------------------------------------- groups

    def add_group(
        self,
        group_id: str,
        *,
        display_name: str,
        description: str | None = None,
        mail: str | None = None,
        mail_nickname: str | None = None,
        proxy_addresses: Sequence[str] = (),
        group_types: Sequence[str] = ("Unified",),
        visibility: str | None = "Private",
        members: Iterable[str] = (),
        security_enabled: bool | None = None,
        mail_enabled: bool | None = None,
        on_premises_sync_enabled: bool = False,
        is_assignable_to_role: bool = False,
        hide_from_address_lists: bool = False,
        writeback_configuration: dict[str, Any] | None = None,
    ) -> None:
        """A group. Defaults as Graph makes them: a Unified group is mail-enabled and
        not security-enabled, another group security-enabled (and mail-enabled when
        it has an address); ``onPremisesSyncEnabled`` is null unless synced;
        ``writebackConfiguration`` (beta) has null members unless given."""
        with self._lock:
            member_ids = list(members)
            for member_id in member_ids:
                self._kind_of(member_id)
            self._claim_id(group_id, "group")
            seq = self._next()
            unified = any(t.lower() == "unified" for t in group_types)
            props: dict[str, Any] = {
                "displayName": display_name,
                "description": description,
                "mail": mail,
                "mailNickname": mail_nickname,
                "proxyAddresses": list(proxy_addresses),
                "groupTypes": list(group_types),
                "visibility": visibility,
                "mailEnabled": (unified or mail is not None)
                if mail_enabled is None
                else mail_enabled,
                "securityEnabled": (not unified) if security_enabled is None else security_enabled,
                "onPremisesSyncEnabled": True if on_premises_sync_enabled else None,
                "isAssignableToRole": is_assignable_to_role,
                "hideFromAddressLists": hide_from_address_lists,
                "writebackConfiguration": _writeback_configuration(writeback_configuration),
            }
            group = _Obj(
                group_id, "group", props, dict.fromkeys(props, seq), seq, seq, born_seq=seq
            )
            self._groups[group_id] = group
            for member_id in member_ids:
                # Before its creation the group did not exist: nothing to undo.
                self._set_member(group, member_id, True, seq, undo=False)
            self._notify((group_id,), "updated", seq)

    def update_group(self, group_id: str, **fields: Any) -> None:
        """Change properties; names as in :meth:`add_group` (or Graph's camelCase)."""
        with self._lock:
            group = self._live_group(group_id)
            props = _camel_fields(fields, _GROUP_FIELD_NAMES, _STORED_GROUP_PROPERTIES)
            if "writebackConfiguration" in props:
                props["writebackConfiguration"] = _writeback_configuration(
                    props["writebackConfiguration"]
                )
            if "onPremisesSyncEnabled" in props:
                props["onPremisesSyncEnabled"] = True if props["onPremisesSyncEnabled"] else None
            for name in ("proxyAddresses", "groupTypes"):
                if name in props:
                    props[name] = list(props[name] or ())
            seq = self._next()
            self._update(group, props, seq)
            if group.seq == seq:
                self._notify((group_id,), "updated", seq)

    def add_members(self, group_id: str, member_ids: Iterable[str]) -> None:
        with self._lock:
            group = self._live_group(group_id)
            ids = list(member_ids)
            for member_id in ids:
                self._kind_of(member_id)
            seq = self._next()
            for member_id in ids:
                self._set_member(group, member_id, True, seq)
            if group.seq == seq:
                self._notify((group_id,), "updated", seq)

    def remove_members(self, group_id: str, member_ids: Iterable[str]) -> None:
        with self._lock:
            group = self._live_group(group_id)
            seq = self._next()
            for member_id in member_ids:
                self._set_member(group, member_id, False, seq)
            if group.seq == seq:
                self._notify((group_id,), "updated", seq)

    def soft_delete_group(self, group_id: str) -> None:
        """Move a group to the recycle bin (members are kept for a restore)."""
        with self._lock:
            group = self._live_group(group_id)
            seq = self._next()
            self._life(group, seq)
            group.soft_deleted_seq = seq
            group.seq = seq
            self._notify((group_id,), "updated", seq)

    def restore_group(self, group_id: str) -> None:
        """Bring a group back from the recycle bin; delta reports it whole again."""
        with self._lock:
            group = self._groups.get(group_id)
            if group is None or group.soft_deleted_seq is None:
                raise KeyError(f"group {group_id!r} is not in the recycle bin")
            seq = self._next()
            self._life(group, seq)
            group.soft_deleted_seq = None
            group.created_seq = seq
            group.seq = seq
            self._notify((group_id,), "updated", seq)

    def hard_delete_group(self, group_id: str) -> None:
        """Delete a group for good (from live or from the recycle bin)."""
        with self._lock:
            group = self._groups.get(group_id)
            if group is None:
                raise KeyError(f"no group {group_id!r}")
            seq = self._next()
            parents = sorted(self._member_of.get(group_id, set()))
            self._drop_from_all_groups(group_id, seq)
            for member_id, (present, _) in list(group.members.items()):
                if present:
                    self._set_member(group, member_id, False, seq)
            del self._groups[group_id]
            group.gone_seq = seq
            self._gone_groups[group_id] = group
            self._hard_deleted_groups[group_id] = seq
            self._notify(parents, "updated", seq)
            self._notify((group_id,), "deleted", seq)

    def expire_delta_tokens(self) -> None:
        """Make every delta and skip token issued so far unknown (410 on use)."""
        with self._lock:
            self._epoch = secrets.token_hex(4)

    # ----------------------------------------------------------------- reads

    @property
    def sequence(self) -> int:
        with self._lock:
            return self._seq

    @property
    def epoch(self) -> str:
        with self._lock:
            return self._epoch

    def sequence_at(self, when: float) -> int:
        """The last sequence number reached at monotonic time ``when``."""
        with self._lock:
            return bisect.bisect_right(self._times, when)

    def changed_at(self, seq: int) -> float | None:
        """The monotonic time of change ``seq`` (None before the first change)."""
        with self._lock:
            return self._times[seq - 1] if 0 < seq <= len(self._times) else None

    def group_ids(self, *, include_soft_deleted: bool = False) -> list[str]:
        with self._lock:
            return [
                g.id
                for g in self._groups.values()
                if include_soft_deleted or g.soft_deleted_seq is None
            ]

    def unified_group_ids(self) -> list[str]:
        """Live Microsoft 365 groups, in creation order."""
        with self._lock:
            return [
                g.id
                for g in self._groups.values()
                if g.soft_deleted_seq is None
                and any(str(t).lower() == "unified" for t in g.props["groupTypes"])
            ]

    def soft_deleted_group_ids(self, *, as_of: int | None = None) -> list[str]:
        """Groups in the recycle bin (at sequence ``as_of``), oldest deletion first."""
        with self._lock:
            deleted = [g for g in self._group_views(as_of) if g.soft_deleted_seq is not None]
            deleted.sort(key=lambda g: g.soft_deleted_seq or 0)
            return [g.id for g in deleted]

    def user_ids(self) -> list[str]:
        with self._lock:
            return list(self._users)

    def member_ids(self, group_id: str) -> list[str]:
        with self._lock:
            group = self._groups[group_id]
            return [m for m, (present, _) in group.members.items() if present]

    def group_properties(self, group_id: str) -> dict[str, Any]:
        with self._lock:
            return {name: _copy(value) for name, value in self._groups[group_id].props.items()}

    def kind(self, object_id: str) -> str | None:
        with self._lock:
            return self._kinds.get(object_id)

    # ------------------------------------------------- snapshots for the server

    def _group_views(self, as_of: int | None) -> list[_Obj]:
        """Every group that existed at ``as_of`` (live or binned), as it was, in creation order."""
        return _views(self._groups, self._gone_groups, as_of)

    def _user_views(self, as_of: int | None) -> list[_Obj]:
        return _views(self._users, self._gone_users, as_of)

    def _group(self, group_id: str, as_of: int | None) -> _Obj | None:
        return _at(self._groups.get(group_id) or self._gone_groups.get(group_id), as_of)

    def _user(self, user_id: str, as_of: int | None) -> _Obj | None:
        return _at(self._users.get(user_id) or self._gone_users.get(user_id), as_of)

    def _upto(self, as_of: int | None) -> int:
        return self._seq if as_of is None else min(as_of, self._seq)

    def _group_json(
        self, group: _Obj, select: Sequence[str] | None, *, single: bool = False, beta: bool = False
    ) -> dict[str, Any]:
        """The group as Graph shows it: the default properties, or those selected
        that this call returns (hideFromAddressLists on a single GET that selects it,
        writebackConfiguration on beta only; elsewhere they are left out)."""
        names = GROUP_PROPERTIES if select is None else [s for s in select if s in group.props]
        out: dict[str, Any] = {"id": group.id}
        for name in names:
            if name in SINGLE_GET_PROPERTIES and not (single and select is not None):
                continue
            if name in BETA_PROPERTIES and not beta:
                continue
            out[name] = _copy(group.props[name])
        return out

    @staticmethod
    def _hides_members(group: _Obj, hidden_ok: bool) -> bool:
        return not hidden_ok and group.props.get("visibility") == HIDDEN_MEMBERSHIP

    def _member_entry(self, member_id: str, present: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "@odata.type": KIND_TYPES.get(
                self._kinds.get(member_id, ""), "#microsoft.graph.directoryObject"
            ),
            "id": member_id,
        }
        if not present:
            entry["@removed"] = {"reason": "deleted"}
        return entry

    def groups_round(
        self,
        since: int | None,
        select: Sequence[str] | None,
        ids: Sequence[str] | None = None,
        *,
        as_of: int | None = None,
        hidden_ok: bool = True,
    ) -> tuple[int, list[tuple[dict[str, Any], list[dict[str, Any]]]]]:
        """Items of one groups delta round: (group json, member entries) pairs;
        only the groups in ``ids`` when given (a ``$filter=id eq`` round). Read
        as of ``as_of`` (a replica that lags); a token ahead of it gets nothing
        and keeps its place. Without ``hidden_ok`` (Member.Read.Hidden) the member
        entries of a HiddenMembership group are left out."""
        select_members = select is not None and "members" in select
        wanted = None if ids is None else frozenset(ids)
        items: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        with self._lock:
            upto = self._upto(as_of)
            if since is not None and upto <= since:
                return since, []
            for group in self._group_views(as_of):
                if wanted is not None and group.id not in wanted:
                    continue
                with_members = select_members and not self._hides_members(group, hidden_ok)
                if since is None or group.created_seq > since:
                    if group.soft_deleted_seq is not None:
                        continue  # created (or restored) and binned before this round
                    members = (
                        [self._member_entry(m, True) for m, (p, _) in group.members.items() if p]
                        if with_members
                        else []
                    )
                    items.append((self._group_json(group, select), members))
                    continue
                if group.seq <= since:
                    continue
                if group.soft_deleted_seq is not None:
                    items.append(({"id": group.id, "@removed": {"reason": "changed"}}, []))
                    continue
                changed = [n for n, s in group.prop_seq.items() if s > since]
                if select is not None:
                    changed = [n for n in changed if n in select]
                body: dict[str, Any] = {"id": group.id}
                for name in changed:
                    body[name] = _copy(group.props[name])
                members = (
                    [self._member_entry(m, p) for m, (p, s) in group.members.items() if s > since]
                    if with_members
                    else []
                )
                if len(body) > 1 or members:
                    items.append((body, members))
            items.extend(
                ({"id": group_id, "@removed": {"reason": "deleted"}}, [])
                for group_id in _deleted_between(self._hard_deleted_groups, since, upto)
                if wanted is None or group_id in wanted
            )
        return upto, items

    def users_round(
        self, since: int | None, select: Sequence[str] | None, *, as_of: int | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        items: list[dict[str, Any]] = []
        with self._lock:
            upto = self._upto(as_of)
            if since is not None and upto <= since:
                return since, []
            for user in self._user_views(as_of):
                if since is None or user.created_seq > since:
                    names: Iterable[str] = USER_PROPERTIES if select is None else select
                elif user.seq > since:
                    names = [n for n, s in user.prop_seq.items() if s > since]
                    if select is not None:
                        names = [n for n in names if n in select]
                else:
                    continue
                body: dict[str, Any] = {"id": user.id}
                for name in names:
                    if name in user.props:
                        body[name] = user.props[name]
                items.append(body)
            items.extend(
                {"id": user_id, "@removed": {"reason": "deleted"}}
                for user_id in _deleted_between(self._hard_deleted_users, since, upto)
            )
        return upto, items

    def users_by_id(
        self, ids: Sequence[str], select: Sequence[str] | None, *, as_of: int | None = None
    ) -> list[dict[str, Any]]:
        """The existing users among ``ids`` (a ``$filter=id in (...)`` list)."""
        names = USER_PROPERTIES if select is None else [s for s in select if s != "id"]
        out: list[dict[str, Any]] = []
        with self._lock:
            for user_id in dict.fromkeys(ids):
                user = self._user(user_id, as_of)
                if user is None:
                    continue
                body: dict[str, Any] = {"id": user.id}
                for name in names:
                    body[name] = user.props.get(name)
                out.append(body)
        return out

    def group_for_read(
        self,
        group_id: str,
        select: Sequence[str] | None,
        *,
        as_of: int | None = None,
        beta: bool = False,
    ) -> dict[str, Any] | None:
        with self._lock:
            group = self._group(group_id, as_of)
            if group is None or group.soft_deleted_seq is not None:
                return None
            return self._group_json(group, select, single=True, beta=beta)

    def groups_list(
        self,
        select: Sequence[str] | None,
        ids: Sequence[str] | None = None,
        *,
        as_of: int | None = None,
        beta: bool = False,
    ) -> list[dict[str, Any]]:
        """Live groups (``GET /groups``), those of ``ids`` only when given."""
        wanted = None if ids is None else frozenset(ids)
        with self._lock:
            return [
                self._group_json(group, select, beta=beta)
                for group in self._group_views(as_of)
                if group.soft_deleted_seq is None and (wanted is None or group.id in wanted)
            ]

    def group_members(
        self, group_id: str, *, as_of: int | None = None, hidden_ok: bool = True
    ) -> list[dict[str, Any]] | None:
        """The groups among a group's direct members (``/members/microsoft.graph.group``)."""
        with self._lock:
            group = self._group(group_id, as_of)
            if group is None or group.soft_deleted_seq is not None:
                return None
            if self._hides_members(group, hidden_ok):
                return []
            out: list[dict[str, Any]] = []
            for member_id, (present, _) in group.members.items():
                child = self._group(member_id, as_of) if present else None
                if child is not None and child.soft_deleted_seq is None:
                    out.append({"@odata.type": GROUP_TYPE, "id": child.id})
            return out

    def member_of(
        self, object_id: str, *, as_of: int | None = None, hidden_ok: bool = True
    ) -> list[dict[str, Any]] | None:
        """The groups ``object_id`` is a direct member of (``/memberOf/microsoft.graph.group``);
        without ``hidden_ok`` HiddenMembership groups are left out, as Graph does."""
        with self._lock:
            if self._group(object_id, as_of) is None and self._user(object_id, as_of) is None:
                return None
            out: list[dict[str, Any]] = []
            if as_of is None:  # now: the index of present memberships
                views = [self._groups[g] for g in sorted(self._member_of.get(object_id, ()))]
            else:
                views = self._group_views(as_of)
            for group in views:
                if group.soft_deleted_seq is not None or self._hides_members(group, hidden_ok):
                    continue
                entry = group.members.get(object_id)
                if entry is not None and entry[0]:
                    out.append({"@odata.type": GROUP_TYPE, "id": group.id})
            return out

    def deleted_group(self, group_id: str, *, as_of: int | None = None) -> dict[str, Any] | None:
        """The group as ``/directory/deletedItems/{id}`` shows it, if it is in the bin."""
        with self._lock:
            group = self._group(group_id, as_of)
            if group is None or group.soft_deleted_seq is None:
                return None
            return {
                "@odata.type": GROUP_TYPE,
                "id": group.id,
                "displayName": group.props.get("displayName"),
                "deletedSeq": group.soft_deleted_seq,
            }

    def user_members(
        self,
        group_id: str,
        select: Sequence[str] | None,
        *,
        as_of: int | None = None,
        hidden_ok: bool = True,
    ) -> list[dict[str, Any]] | None:
        with self._lock:
            group = self._group(group_id, as_of)
            if group is None or group.soft_deleted_seq is not None:
                return None
            names = USER_PROPERTIES if select is None else [s for s in select if s != "id"]
            out: list[dict[str, Any]] = []
            if self._hides_members(group, hidden_ok):
                return out
            for member_id, (present, _) in group.members.items():
                user = self._user(member_id, as_of) if present else None
                if user is None:
                    continue
                body: dict[str, Any] = {"@odata.type": USER_TYPE, "id": user.id}
                for name in names:
                    body[name] = user.props.get(name)
                out.append(body)
            return out


def _views(live: dict[str, _Obj], gone: dict[str, _Obj], as_of: int | None) -> list[_Obj]:
    """The objects that existed at ``as_of``, as they were then, in creation order."""
    if as_of is None:
        return list(live.values())
    objs = list(live.values())
    deleted_since = [o for o in gone.values() if o.gone_seq is not None and o.gone_seq > as_of]
    if deleted_since:
        objs.extend(deleted_since)
        objs.sort(key=lambda o: o.born_seq)
    return [view for obj in objs if (view := _at(obj, as_of)) is not None]


def _deleted_between(deleted: dict[str, int], since: int | None, upto: int) -> list[str]:
    """Ids deleted for good after ``since`` and up to ``upto`` (none in a full round)."""
    if since is None:
        return []
    return [object_id for object_id, seq in deleted.items() if since < seq <= upto]


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return dict(value)
    return list(value) if isinstance(value, list) else value


def _writeback_configuration(value: dict[str, Any] | None) -> dict[str, Any]:
    """Graph's (beta) groupWritebackConfiguration: isEnabled and onPremisesGroupType."""
    value = value or {}
    unknown = set(value) - {"isEnabled", "onPremisesGroupType"}
    if unknown:
        raise TypeError(f"unknown writebackConfiguration fields {sorted(unknown)}")
    return {
        "isEnabled": value.get("isEnabled"),
        "onPremisesGroupType": value.get("onPremisesGroupType"),
    }


def _camel_fields(
    fields: dict[str, Any], names: dict[str, str], allowed: Sequence[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in fields.items():
        camel = names.get(name, name)
        if camel not in allowed:
            raise TypeError(f"unknown field {name!r}")
        out[camel] = value
    return out
