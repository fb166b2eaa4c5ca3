"""A local stand-in for the few Microsoft Graph v1.0 calls writeback makes.

It serves, on loopback, an in-memory tenant with the response shapes Graph
documents, so the real msgraph-sdk can be driven end to end in tests and
benchmarks without a tenant:

* ``GET /groups/delta`` and ``GET /users/delta``: full and incremental rounds,
  ``@odata.nextLink`` with an opaque ``$skiptoken``, ``@odata.deltaLink`` with
  a ``$deltatoken`` (which carries the ``$select`` of the first call, as Graph
  does), ``$deltatoken=latest``, ``members@delta`` with ``@removed`` entries,
  removed objects as ``{"id", "@removed": {"reason": "changed"|"deleted"}}``,
  a large group's members split over several pages (the group reappears on a
  later page with the rest of its ``members@delta``), 410 Gone for an unknown
  or expired token; ``$filter=id eq '{id}'`` (up to 50 joined by ``or``)
  narrows a round, and the delta token it ends with, to those groups;
* ``GET /users?$filter=id in ('{id}', ...)`` (or ``id eq``; at most 15 ids, as
  Graph allows in one ``in``) with ``$select``;
* ``GET /groups/{id}`` (404 ``Request_ResourceNotFound`` when missing or in the
  recycle bin);
* ``GET /groups/{id}/members/microsoft.graph.user`` (also ``graph.user``, the
  form msgraph-sdk sends), paged by ``$top`` (1..999, default 100);
* ``GET /directory/deletedItems/microsoft.graph.group`` (also ``graph.group``).

Subscriptions and change notifications, as Graph runs them for groups:

* ``POST /subscriptions`` (resource ``groups`` or ``groups/{id}``; changeType;
  notification and lifecycle URLs https, or http on loopback; expiry at most
  41,760 minutes ahead; clientState at most 128 characters), after the
  validation handshake against both URLs (``?validationToken=`` answered with
  a 200 ``text/plain`` echo within 10 s, else 400); ``GET /subscriptions``
  (expired ones are gone), ``GET``/``PATCH``/``DELETE /subscriptions/{id}``,
  ``POST /subscriptions/{id}/reauthorize``;
* every group change in the :class:`Tenant` (create, update, members, soft
  delete, restore: ``updated``; permanent delete: ``deleted``) is POSTed as a
  changeNotificationCollection to each matching subscription's URL by a
  background thread, retried after a non-2xx or no answer in time, optionally
  several items per POST; test hooks: :attr:`GraphStandIn.deliveries`,
  ``send_lifecycle``, ``pause_delivery``/``resume_delivery``,
  ``redeliver_last``, ``wait_idle``.

Everything else answers with Graph's error shape. Faults (429/503/500 with
optional ``Retry-After``, slow answers, dropped connections) can be injected,
and every request is logged for assertions on request counts.

Pure stdlib. A round is materialised once, on its first page, into serialised
pages held under a server-side cursor, so paging is O(page) and a round is a
consistent snapshot of the tenant at its start.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import heapq
import json
import random
import re
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

API_VERSION = "v1.0"

USER_TYPE = "#microsoft.graph.user"
GROUP_TYPE = "#microsoft.graph.group"
DEVICE_TYPE = "#microsoft.graph.device"
CONTACT_TYPE = "#microsoft.graph.orgContact"

_KIND_TYPES = {
    "user": USER_TYPE,
    "group": GROUP_TYPE,
    "device": DEVICE_TYPE,
    "contact": CONTACT_TYPE,
}

#: Group properties the stand-in stores, by their Graph (camelCase) names.
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
)
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
}
_USER_FIELD_NAMES = {
    "display_name": "displayName",
    "sid": "onPremisesSecurityIdentifier",
    "synced": "onPremisesSyncEnabled",
}

_MAX_TOP = 999
#: Graph's limits: ids in one groups-delta ``$filter``, values in one ``in`` clause.
_MAX_DELTA_FILTER_IDS = 50
_MAX_IN_VALUES = 15
_ID_EQ = re.compile(r"id\s+eq\s+'([^']+)'", re.IGNORECASE)
_ID_IN = re.compile(r"id\s+in\s*\(([^)]*)\)", re.IGNORECASE)
_QUOTED = re.compile(r"'([^']+)'")
_DEFAULT_TOP = 100
_MAX_CURSORS = 16

_JSON_CONTENT_TYPE = (
    "application/json;odata.metadata=minimal;odata.streaming=true;"
    "IEEE754Compatible=false;charset=utf-8"
)


# --------------------------------------------------------------------------- tenant


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


class Tenant:
    """Thread-safe in-memory directory: users, groups, devices, contacts.

    Every change takes a new sequence number; delta tokens are sequence numbers,
    so an incremental round returns exactly what changed after its token.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._seq = 0
        self._epoch = secrets.token_hex(4)
        self._groups: dict[str, _Obj] = {}
        self._users: dict[str, _Obj] = {}
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
        return self._seq

    def _claim_id(self, object_id: str, kind: str) -> None:
        if object_id in self._groups or object_id in self._users or object_id in self._others:
            raise ValueError(f"object {object_id!r} already exists")
        self._kinds[object_id] = kind
        self._hard_deleted_groups.pop(object_id, None)
        self._hard_deleted_users.pop(object_id, None)

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

    def _set_member(self, group: _Obj, member_id: str, present: bool, seq: int) -> bool:
        current = group.members.get(member_id)
        if (current is not None and current[0]) == present:
            return False
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
                obj.props[name] = value
                obj.prop_seq[name] = seq
                obj.seq = seq

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
            self._users[user_id] = _Obj(user_id, "user", props, dict.fromkeys(props, seq), seq, seq)

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
            del self._users[user_id]
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
    ) -> None:
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
                "mailEnabled": unified or mail is not None,
                "securityEnabled": not unified,
            }
            group = _Obj(group_id, "group", props, dict.fromkeys(props, seq), seq, seq)
            self._groups[group_id] = group
            for member_id in member_ids:
                self._set_member(group, member_id, True, seq)
            self._notify((group_id,), "updated", seq)

    def update_group(self, group_id: str, **fields: Any) -> None:
        """Change properties; names as in :meth:`add_group` (or Graph's camelCase)."""
        with self._lock:
            group = self._live_group(group_id)
            props = _camel_fields(fields, _GROUP_FIELD_NAMES, GROUP_PROPERTIES)
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

    def soft_deleted_group_ids(self) -> list[str]:
        with self._lock:
            deleted = [g for g in self._groups.values() if g.soft_deleted_seq is not None]
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

    def _group_json(self, group: _Obj, select: Sequence[str] | None) -> dict[str, Any]:
        names = GROUP_PROPERTIES if select is None else [s for s in select if s in group.props]
        out: dict[str, Any] = {"id": group.id}
        for name in names:
            out[name] = _copy(group.props[name])
        return out

    def _member_entry(self, member_id: str, present: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "@odata.type": _KIND_TYPES.get(
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
    ) -> tuple[int, list[tuple[dict[str, Any], list[dict[str, Any]]]]]:
        """Items of one groups delta round: (group json, member entries) pairs;
        only the groups in ``ids`` when given (a ``$filter=id eq`` round)."""
        with_members = select is not None and "members" in select
        wanted = None if ids is None else frozenset(ids)
        items: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        with self._lock:
            upto = self._seq
            for group in self._groups.values():
                if wanted is not None and group.id not in wanted:
                    continue
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
            if since is not None:
                for group_id, seq in self._hard_deleted_groups.items():
                    if seq > since and (wanted is None or group_id in wanted):
                        items.append(({"id": group_id, "@removed": {"reason": "deleted"}}, []))
        return upto, items

    def users_round(
        self, since: int | None, select: Sequence[str] | None
    ) -> tuple[int, list[dict[str, Any]]]:
        items: list[dict[str, Any]] = []
        with self._lock:
            upto = self._seq
            for user in self._users.values():
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
            if since is not None:
                for user_id, seq in self._hard_deleted_users.items():
                    if seq > since:
                        items.append({"id": user_id, "@removed": {"reason": "deleted"}})
        return upto, items

    def users_by_id(self, ids: Sequence[str], select: Sequence[str] | None) -> list[dict[str, Any]]:
        """The existing users among ``ids`` (a ``$filter=id in (...)`` list)."""
        names = USER_PROPERTIES if select is None else [s for s in select if s != "id"]
        out: list[dict[str, Any]] = []
        with self._lock:
            for user_id in dict.fromkeys(ids):
                user = self._users.get(user_id)
                if user is None:
                    continue
                body: dict[str, Any] = {"id": user.id}
                for name in names:
                    body[name] = user.props.get(name)
                out.append(body)
        return out

    def group_for_read(self, group_id: str, select: Sequence[str] | None) -> dict[str, Any] | None:
        with self._lock:
            group = self._groups.get(group_id)
            if group is None or group.soft_deleted_seq is not None:
                return None
            return self._group_json(group, select)

    def user_members(
        self, group_id: str, select: Sequence[str] | None
    ) -> list[dict[str, Any]] | None:
        with self._lock:
            group = self._groups.get(group_id)
            if group is None or group.soft_deleted_seq is not None:
                return None
            names = USER_PROPERTIES if select is None else [s for s in select if s != "id"]
            out: list[dict[str, Any]] = []
            for member_id, (present, _) in group.members.items():
                user = self._users.get(member_id) if present else None
                if user is None:
                    continue
                body: dict[str, Any] = {"@odata.type": USER_TYPE, "id": user.id}
                for name in names:
                    body[name] = user.props.get(name)
                out.append(body)
            return out


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


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


# --------------------------------------------------------------------------- server


@dataclass
class _Fault:
    status: int
    remaining: int | None
    retry_after: float | None
    path_contains: str
    rate: float | None
    rng: random.Random
    delay: float = 0.0
    disconnect: bool = False


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class _GraphError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


_ERROR_CODES = {
    400: "BadRequest",
    404: "Request_ResourceNotFound",
    405: "Request_BadRequest",
    410: "syncStateNotFound",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "serviceNotAvailable",
    504: "GatewayTimeout",
}


class GraphStandIn:
    """Graph v1.0 on ``http://127.0.0.1:<port>/v1.0`` backed by a :class:`Tenant`."""

    def __init__(
        self,
        tenant: Tenant | None = None,
        *,
        page_size: int = 100,
        member_page_size: int = 1000,
        delivery_retry_delays: Sequence[float] = (1.0, 5.0, 30.0),
        delivery_timeout: float = 3.0,
        delivery_batch_size: int = 1,
        delivery_batch_window: float = 0.0,
        validation_timeout: float = 10.0,
        tenant_id: str = "7d5b3a4e-1c2f-4e8a-9b6d-0a1b2c3d4e5f",
    ) -> None:
        """``delivery_*`` shape change-notification delivery: the waits between
        attempts after a failed POST (no answer, non-2xx, or slower than
        ``delivery_timeout``), the most items per POST, and how long to gather
        items before a POST. ``validation_timeout`` bounds the subscription
        handshake (10 s at Graph)."""
        if page_size < 1 or member_page_size < 1:
            raise ValueError("page sizes must be positive")
        if delivery_batch_size < 1 or delivery_timeout <= 0 or validation_timeout <= 0:
            raise ValueError("batch size and timeouts must be positive")
        self.tenant = tenant if tenant is not None else Tenant()
        self.page_size = page_size
        self.member_page_size = member_page_size
        self.requests: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._cursors: OrderedDict[str, tuple[str, list[bytes]]] = OrderedDict()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None
        # Subscriptions and notification delivery.
        self.tenant_id = tenant_id
        self.delivery_retry_delays = tuple(float(d) for d in delivery_retry_delays)
        self.delivery_timeout = delivery_timeout
        self.delivery_batch_size = delivery_batch_size
        self.delivery_batch_window = delivery_batch_window
        self.validation_timeout = validation_timeout
        #: the stand-in's clock for expirations; tests may replace it
        self.clock: Callable[[], datetime] = _utc_now
        #: one entry per notification POST attempt (test hook)
        self.deliveries: list[Delivery] = []
        self._subscriptions: dict[str, _Subscription] = {}
        self._delivery = threading.Condition(threading.Lock())
        self._fresh: list[tuple[str, str, dict[str, Any]]] = []
        self._fresh_since = 0.0
        self._scheduled: list[tuple[float, int, _Post]] = []
        self._post_counter = 0
        self._in_flight = 0
        self._paused = False
        self._delivery_stop = False
        self._delivery_thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> GraphStandIn:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
        server.standin = self
        port = server.server_address[1]
        self._url = f"http://127.0.0.1:{port}/{API_VERSION}"
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"graph-standin-{port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop_delivery()
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> GraphStandIn:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the Graph stand-in is not started")
        return self._url

    # ----------------------------------------------------------------- faults

    def inject(
        self,
        status: int,
        *,
        times: int = 1,
        retry_after: float | None = None,
        path_contains: str = "",
        rate: float | None = None,
        seed: int = 0,
    ) -> None:
        """Fail the next ``times`` matching requests (or a random share ``rate`` of
        them, forever) with ``status`` and Graph's error body; ``Retry-After``
        is sent when ``retry_after`` is given (fractions allowed, for fast tests).
        ``path_contains`` matches the URL-decoded path and query."""
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be within 0..1")
        if rate is None and times < 1:
            raise ValueError("times must be at least 1")
        fault = _Fault(
            status,
            None if rate is not None else times,
            retry_after,
            path_contains,
            rate,
            random.Random(seed),
        )
        with self._lock:
            self._faults.append(fault)

    def inject_delay(self, seconds: float, *, times: int = 1, path_contains: str = "") -> None:
        """Answer the next ``times`` matching requests normally, but ``seconds`` late."""
        with self._lock:
            self._faults.append(
                _Fault(0, times, None, path_contains, None, random.Random(0), delay=seconds)
            )

    def inject_disconnect(self, *, times: int = 1, path_contains: str = "") -> None:
        """Close the connection of the next ``times`` matching requests unanswered."""
        with self._lock:
            self._faults.append(
                _Fault(0, times, None, path_contains, None, random.Random(0), disconnect=True)
            )

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, target: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path_contains not in target:
                    continue
                if fault.rate is not None:
                    if fault.rng.random() < fault.rate:
                        return fault
                    continue
                if fault.remaining is not None and fault.remaining > 0:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
            return None

    # ----------------------------------------------------------------- log

    def _log(self, method: str, target: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, target, status))

    def count(self, path_contains: str = "") -> int:
        with self._lock:
            return sum(1 for _, target, _ in self.requests if path_contains in target)

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # ----------------------------------------------------------------- cursors

    def _new_cursor(self) -> str:
        return f"{self.tenant.epoch}.{secrets.token_urlsafe(18)}"

    def _save_cursor(self, cursor: str, kind: str, pages: list[bytes]) -> None:
        with self._lock:
            self._cursors[cursor] = (kind, pages)
            while len(self._cursors) > _MAX_CURSORS:
                self._cursors.popitem(last=False)

    def _load_page(self, kind: str, skiptoken: str) -> bytes:
        cursor, _, index_text = skiptoken.rpartition("~")
        with self._lock:
            saved = self._cursors.get(cursor)
            if saved is not None:
                self._cursors.move_to_end(cursor)
        if (
            saved is None
            or saved[0] != kind
            or not cursor.startswith(self.tenant.epoch + ".")
            or not index_text.isdigit()
            or int(index_text) >= len(saved[1])
        ):
            raise _GraphError(
                410,
                "syncStateNotFound",
                "The skip token is not valid or has expired.",
                self._location_header(kind),
            )
        return saved[1][int(index_text)]

    def _location_header(self, kind: str) -> tuple[tuple[str, str], ...]:
        if kind in ("groups", "users"):
            return (("Location", f"{self.url}/{kind}/delta"),)
        return ()

    # ----------------------------------------------------------------- routing

    def handle(self, method: str, target: str) -> _Response:
        """Answer one request; ``target`` is the raw request target."""
        if method != "GET":
            raise _GraphError(
                405, "Request_BadRequest", f"The HTTP method '{method}' is not allowed."
            )
        parts = urlsplit(target)
        path = unquote(parts.path)
        query: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            query[key.lower().lstrip("$")] = value
        prefix = f"/{API_VERSION}/"
        if not path.startswith(prefix):
            raise _GraphError(404, "BadRequest", "Invalid version.")
        segments = [s for s in path[len(prefix) :].split("/") if s]
        match segments:
            case ["groups", "delta" | "delta()"]:
                return self._delta("groups", query)
            case ["users", "delta" | "delta()"]:
                return self._delta("users", query)
            case ["users"]:
                return self._list_users(query)
            case ["groups", group_id]:
                return self._get_group(group_id, query)
            case ["groups", group_id, "members", "microsoft.graph.user" | "graph.user"]:
                return self._list_user_members(group_id, query)
            case ["directory", "deletedItems", "microsoft.graph.group" | "graph.group"]:
                return self._list_deleted_groups(query)
        last = segments[-1] if segments else ""
        raise _GraphError(400, "BadRequest", f"Resource not found for the segment '{last}'.")

    # ----------------------------------------------------------------- endpoints

    def _select(self, query: dict[str, str], kind: str) -> list[str] | None:
        raw = query.get("select")
        if raw is None:
            return None
        names = [n.strip() for n in raw.split(",") if n.strip()]
        allowed = (
            {"id", "members", *GROUP_PROPERTIES} if kind == "groups" else {"id", *USER_PROPERTIES}
        )
        type_name = "group" if kind == "groups" else "user"
        for name in names:
            if name not in allowed:
                raise _GraphError(
                    400,
                    "Request_BadRequest",
                    f"Could not find a property named '{name}' on type "
                    f"'microsoft.graph.{type_name}'.",
                )
        return names

    def _context(self, entity_set: str, select: Sequence[str] | None, suffix: str = "") -> str:
        shown = f"({','.join(s for s in select if s != 'members')})" if select else ""
        return f"{self.url}/$metadata#{entity_set}{shown}{suffix}"

    def _encode_delta_token(
        self,
        kind: str,
        seq: int,
        select: Sequence[str] | None,
        ids: Sequence[str] | None = None,
    ) -> str:
        payload = json.dumps(
            {
                "k": kind,
                "s": seq,
                "e": self.tenant.epoch,
                "q": list(select) if select is not None else None,
                "f": list(ids) if ids is not None else None,
            },
            separators=(",", ":"),
        ).encode()
        return base64.urlsafe_b64encode(payload).decode().rstrip("=")

    def _decode_delta_token(
        self, kind: str, token: str
    ) -> tuple[int, list[str] | None, list[str] | None]:
        try:
            padded = token + "=" * (-len(token) % 4)
            data = json.loads(base64.urlsafe_b64decode(padded.encode()))
            if (
                isinstance(data, dict)
                and data.get("k") == kind
                and data.get("e") == self.tenant.epoch
                and isinstance(data.get("s"), int)
            ):
                select, ids = data.get("q"), data.get("f")
                return (
                    int(data["s"]),
                    (list(select) if isinstance(select, list) else None),
                    ([str(i) for i in ids] if isinstance(ids, list) else None),
                )
        except (ValueError, binascii.Error, UnicodeDecodeError):
            pass
        raise _GraphError(
            410,
            "syncStateNotFound",
            "The delta token is not valid or has expired; restart with a full synchronization.",
            self._location_header(kind),
        )

    def _delta(self, kind: str, query: dict[str, str]) -> _Response:
        for option in ("top", "orderby", "expand"):
            if option in query:
                raise _GraphError(
                    400,
                    "Request_UnsupportedQuery",
                    f"Unsupported query option '${option}' for delta on {kind}.",
                )
        if "skiptoken" in query:
            return _json_response(self._load_page(kind, query["skiptoken"]))
        token = query.get("deltatoken")
        since: int | None = None
        ids = self._id_filter(query, kind)
        if token is not None and token.lower() == "latest":
            select = self._select(query, kind)
            body = {
                "@odata.context": self._context(kind, select),
                "@odata.deltaLink": self._delta_link(kind, self.tenant.sequence, select, ids),
                "value": [],
            }
            return _json_response(_dumps(body))
        if token is not None:
            since, select, ids = self._decode_delta_token(kind, token)
        else:
            select = self._select(query, kind)
        return self._delta_round(kind, since, select, ids)

    @staticmethod
    def _id_filter(query: dict[str, str], kind: str) -> list[str] | None:
        """The ids of a delta ``$filter=id eq '...' or id eq '...'`` (groups only, at most 50)."""
        raw = query.get("filter")
        if raw is None:
            return None
        clauses = re.split(r"\s+or\s+", raw.strip(), flags=re.IGNORECASE)
        ids = []
        for clause in clauses:
            match = _ID_EQ.fullmatch(clause.strip())
            if match is None or kind != "groups":
                raise _GraphError(
                    400,
                    "Request_UnsupportedQuery",
                    f"Unsupported or invalid query filter clause specified for delta on {kind}.",
                )
            ids.append(match.group(1))
        if len(ids) > _MAX_DELTA_FILTER_IDS:
            raise _GraphError(
                400,
                "Request_UnsupportedQuery",
                f"Too many ids in the filter: at most {_MAX_DELTA_FILTER_IDS}.",
            )
        return ids

    def _delta_round(
        self,
        kind: str,
        since: int | None,
        select: list[str] | None,
        ids: list[str] | None = None,
    ) -> _Response:
        pages: list[list[dict[str, Any]]]
        if kind == "groups":
            upto, group_items = self.tenant.groups_round(since, select, ids)
            pages = self._paginate_groups(group_items)
        else:
            upto, user_items = self.tenant.users_round(since, select)
            pages = [
                user_items[i : i + self.page_size]
                for i in range(0, len(user_items), self.page_size)
            ]
        if not pages:
            pages = [[]]
        context = self._context(kind, select)
        cursor = self._new_cursor()
        serialized: list[bytes] = []
        for index, page in enumerate(pages):
            body: dict[str, Any] = {"@odata.context": context}
            if index + 1 < len(pages):
                body["@odata.nextLink"] = f"{self.url}/{kind}/delta?$skiptoken={cursor}~{index + 1}"
            else:
                body["@odata.deltaLink"] = self._delta_link(kind, upto, select, ids)
            body["value"] = page
            serialized.append(_dumps(body))
        if len(serialized) > 1:
            self._save_cursor(cursor, kind, serialized)
        return _json_response(serialized[0])

    def _delta_link(
        self,
        kind: str,
        seq: int,
        select: Sequence[str] | None,
        ids: Sequence[str] | None = None,
    ) -> str:
        token = self._encode_delta_token(kind, seq, select, ids)
        return f"{self.url}/{kind}/delta?$deltatoken={token}"

    def _paginate_groups(
        self, items: list[tuple[dict[str, Any], list[dict[str, Any]]]]
    ) -> list[list[dict[str, Any]]]:
        """Pack items into pages of at most ``page_size`` objects and at most
        ``member_page_size`` member entries; a bigger member list is cut into
        chunks whose continuations (``id`` + ``members@delta`` only) go to the
        end of the round, so the group reappears on a later page."""
        chunk = self.member_page_size
        first: list[tuple[dict[str, Any], int]] = []
        later: list[tuple[dict[str, Any], int]] = []
        for body, members in items:
            if not members:
                first.append((body, 0))
                continue
            head = dict(body)
            head["members@delta"] = members[:chunk]
            first.append((head, len(head["members@delta"])))
            for start in range(chunk, len(members), chunk):
                part = members[start : start + chunk]
                later.append(({"id": body["id"], "members@delta": part}, len(part)))
        pages: list[list[dict[str, Any]]] = []
        page: list[dict[str, Any]] = []
        used = 0
        for body, weight in first + later:
            if page and (len(page) >= self.page_size or used + weight > chunk):
                pages.append(page)
                page, used = [], 0
            page.append(body)
            used += weight
        if page:
            pages.append(page)
        return pages

    def _get_group(self, group_id: str, query: dict[str, str]) -> _Response:
        select = self._select(query, "groups")
        if select is not None and "members" in select:
            select = [s for s in select if s != "members"]
        body = self.tenant.group_for_read(group_id, select)
        if body is None:
            raise _not_found(group_id)
        out = {"@odata.context": self._context("groups", select, "/$entity"), **body}
        return _json_response(_dumps(out))

    def _top(self, query: dict[str, str]) -> int:
        raw = query.get("top")
        if raw is None:
            return _DEFAULT_TOP
        if not raw.isdigit() or not 1 <= int(raw) <= _MAX_TOP:
            raise _GraphError(
                400,
                "Request_BadRequest",
                f"Invalid page size specified: '{raw}'. "
                f"Must be between 1 and {_MAX_TOP} inclusive.",
            )
        return int(raw)

    def _list(
        self, kind: str, link_path: str, context: str, values: list[dict[str, Any]], top: int
    ) -> _Response:
        pages = [values[i : i + top] for i in range(0, len(values), top)] or [[]]
        cursor = self._new_cursor()
        serialized: list[bytes] = []
        for index, page in enumerate(pages):
            body: dict[str, Any] = {"@odata.context": context}
            if index + 1 < len(pages):
                body["@odata.nextLink"] = f"{self.url}/{link_path}?$skiptoken={cursor}~{index + 1}"
            body["value"] = page
            serialized.append(_dumps(body))
        if len(serialized) > 1:
            self._save_cursor(cursor, kind, serialized)
        return _json_response(serialized[0])

    def _list_user_members(self, group_id: str, query: dict[str, str]) -> _Response:
        kind = f"members:{group_id}"
        if "skiptoken" in query:
            return _json_response(self._load_page(kind, query["skiptoken"]))
        select = self._select(query, "users")
        top = self._top(query)
        members = self.tenant.user_members(group_id, select)
        if members is None:
            raise _not_found(group_id)
        return self._list(
            kind,
            f"groups/{quote(group_id)}/members/microsoft.graph.user",
            self._context("users", select),
            members,
            top,
        )

    def _list_users(self, query: dict[str, str]) -> _Response:
        """``GET /users?$filter=id in ('a','b')`` (or ``id eq 'a'``): users by id."""
        raw = (query.get("filter") or "").strip()
        match = _ID_IN.fullmatch(raw)
        ids = _QUOTED.findall(match.group(1)) if match else None
        single = _ID_EQ.fullmatch(raw)
        if single is not None:
            ids = [single.group(1)]
        if not ids:
            raise _GraphError(
                400, "Request_UnsupportedQuery", "Only $filter=id in (...) is served on users."
            )
        if len(ids) > _MAX_IN_VALUES:
            raise _GraphError(
                400,
                "Request_UnsupportedQuery",
                f"Too many values in the 'in' clause: at most {_MAX_IN_VALUES}.",
            )
        select = self._select(query, "users")
        values = self.tenant.users_by_id(ids, select)
        return _json_response(
            _dumps({"@odata.context": self._context("users", select), "value": values})
        )

    def _list_deleted_groups(self, query: dict[str, str]) -> _Response:
        kind = "deletedItems"
        if "skiptoken" in query:
            return _json_response(self._load_page(kind, query["skiptoken"]))
        select = self._select(query, "groups")
        top = self._top(query)
        values: list[dict[str, Any]] = []
        for group_id in self.tenant.soft_deleted_group_ids():
            values.append({"@odata.type": GROUP_TYPE, "id": group_id})
        return self._list(
            kind,
            "directory/deletedItems/microsoft.graph.group",
            self._context("directory/deletedItems/microsoft.graph.group", select),
            values,
            top,
        )

    # ----------------------------------------------------------------- subscriptions

    def handle_request(self, method: str, target: str, body: bytes = b"") -> _Response:
        """Answer one request: the subscription endpoints here, the reads in :meth:`handle`."""
        path = unquote(urlsplit(target).path)
        prefix = f"/{API_VERSION}/"
        segments = [s for s in path[len(prefix) :].split("/") if s]
        if not path.startswith(prefix) or not segments or segments[0] != "subscriptions":
            return self.handle(method, target)
        return self._subscriptions_endpoint(method, segments, body)

    def _subscriptions_endpoint(self, method: str, segments: list[str], body: bytes) -> _Response:
        response = _Response(204, b"")
        match method, segments:
            case "GET", ["subscriptions"]:
                response = self._list_subscriptions()
            case "POST", ["subscriptions"]:
                response = self._create_subscription(_json_body(body))
            case "GET", ["subscriptions", subscription_id]:
                response = _json_response(_dumps(self._subscription_json(subscription_id)))
            case "PATCH", ["subscriptions", subscription_id]:
                response = self._renew_subscription(subscription_id, _json_body(body))
            case "DELETE", ["subscriptions", subscription_id]:
                with self._delivery:
                    self._live_subscription(subscription_id)
                    del self._subscriptions[subscription_id]
            case "POST", ["subscriptions", subscription_id, "reauthorize"]:
                with self._delivery:
                    self._live_subscription(subscription_id).needs_reauthorization = False
            case _, ["subscriptions"] | ["subscriptions", _] | ["subscriptions", _, "reauthorize"]:
                raise _GraphError(
                    405, "Request_BadRequest", f"The HTTP method '{method}' is not allowed."
                )
            case _:
                raise _GraphError(
                    400, "BadRequest", f"Resource not found for the segment '{segments[-1]}'."
                )
        return response

    def subscription_ids(self) -> list[str]:
        """Ids of the live (unexpired) subscriptions (test hook)."""
        with self._delivery:
            self._purge_expired()
            return list(self._subscriptions)

    def needs_reauthorization(self, subscription_id: str) -> bool:
        """Whether a ``reauthorizationRequired`` was sent and not yet answered (test hook)."""
        with self._delivery:
            return self._live_subscription(subscription_id).needs_reauthorization

    def _live_subscription(self, subscription_id: str) -> _Subscription:
        self._purge_expired()
        found = self._subscriptions.get(subscription_id)
        if found is None:
            raise _GraphError(
                404,
                "ResourceNotFound",
                f"The object was not found. Subscription '{subscription_id}' does not exist.",
            )
        return found

    def _purge_expired(self) -> None:
        now = self.clock()
        for subscription_id in [k for k, v in self._subscriptions.items() if v.expiration <= now]:
            del self._subscriptions[subscription_id]

    def _subscription_json(
        self, subscription_id: str, *, with_client_state: bool = False
    ) -> dict[str, Any]:
        with self._delivery:
            sub = self._live_subscription(subscription_id)
            return {
                "@odata.context": f"{self.url}/$metadata#subscriptions/$entity",
                **_subscription_body(sub, with_client_state=with_client_state),
            }

    def _list_subscriptions(self) -> _Response:
        with self._delivery:
            self._purge_expired()
            values = [_subscription_body(s) for s in self._subscriptions.values()]
        body = {"@odata.context": f"{self.url}/$metadata#subscriptions", "value": values}
        return _json_response(_dumps(body))

    def _create_subscription(self, body: dict[str, Any]) -> _Response:
        resource = body.get("resource")
        normalized = str(resource or "").strip("/").lower()
        if not (normalized == "groups" or re.fullmatch(r"groups/[^/]+", normalized)):
            raise _GraphError(
                400, "InvalidRequest", f"Subscriptions to resource '{resource}' are not supported."
            )
        change_type = body.get("changeType")
        changes = [c.strip() for c in str(change_type or "").split(",")]
        if not change_type or any(c not in ("created", "updated", "deleted") for c in changes):
            raise _GraphError(400, "InvalidRequest", f"Invalid changeType '{change_type}'.")
        notification_url = _webhook_url(body.get("notificationUrl"), "notificationUrl")
        lifecycle = body.get("lifecycleNotificationUrl")
        lifecycle_url = None if lifecycle is None else _webhook_url(lifecycle, "lifecycle URL")
        client_state = body.get("clientState")
        if client_state is not None and (
            not isinstance(client_state, str) or len(client_state) > _MAX_CLIENT_STATE
        ):
            raise _GraphError(
                400, "InvalidRequest", "clientState must be a string of at most 128 characters."
            )
        expiration = self._expiration(body)
        with self._delivery:
            self._purge_expired()
            if len(self._subscriptions) >= _MAX_SUBSCRIPTIONS:
                raise _GraphError(
                    403, "ExtensionError", "Subscription quota for the application is exhausted."
                )
        # The handshake happens outside every lock: it waits on the webhook.
        for url in (notification_url, lifecycle_url):
            if url is not None:
                self._validate_endpoint(url)
        sub = _Subscription(
            id=str(uuid.uuid4()),
            resource=str(resource),
            change_types=frozenset(changes),
            change_type=",".join(changes),
            notification_url=notification_url,
            lifecycle_url=lifecycle_url,
            expiration=expiration,
            client_state=client_state,
        )
        with self._delivery:
            self._subscriptions[sub.id] = sub
        self._ensure_delivery()
        out = {
            "@odata.context": f"{self.url}/$metadata#subscriptions/$entity",
            **_subscription_body(sub, with_client_state=True),
        }
        return _json_response(_dumps(out), 201)

    def _renew_subscription(self, subscription_id: str, body: dict[str, Any]) -> _Response:
        expiration = self._expiration(body)
        with self._delivery:
            sub = self._live_subscription(subscription_id)
            sub.expiration = expiration
            sub.needs_reauthorization = False
        return _json_response(_dumps(self._subscription_json(subscription_id)))

    def _expiration(self, body: dict[str, Any]) -> datetime:
        raw = body.get("expirationDateTime")
        try:
            when = datetime.fromisoformat(str(raw))
        except ValueError:
            raise _GraphError(
                400, "InvalidRequest", "expirationDateTime is missing or invalid."
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        now = self.clock()
        if when <= now:
            raise _GraphError(
                400, "InvalidRequest", "Subscription expiration must be in the future."
            )
        if when > now + timedelta(minutes=MAX_GROUP_SUBSCRIPTION_MINUTES):
            raise _GraphError(
                400,
                "InvalidRequest",
                f"Subscription expiration can only be {MAX_GROUP_SUBSCRIPTION_MINUTES} "
                "minutes in the future.",
            )
        return when

    def _validate_endpoint(self, url: str) -> None:
        """Graph's handshake: POST ``?validationToken=...``; the answer must be a
        200 ``text/plain`` holding the decoded token, within the timeout."""
        token = (
            "Validation: Testing client application reachability for subscription "
            f"Request-Id: {uuid.uuid4()}"
        )
        separator = "&" if urlsplit(url).query else "?"
        request = urllib.request.Request(  # noqa: S310 - http(s) checked in _webhook_url
            f"{url}{separator}validationToken={quote(token, safe='')}",
            data=b"",
            method="POST",
            headers={"Content-Type": "text/plain; charset=utf-8"},
        )
        ok = False
        try:
            with _OPENER.open(request, timeout=self.validation_timeout) as answer:
                content_type = answer.headers.get("Content-Type") or ""
                text = answer.read(64 * 1024).decode("utf-8", "replace")
                ok = (
                    answer.status == 200
                    and content_type.split(";")[0].strip().lower() == "text/plain"
                    and text == token
                )
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise _GraphError(
                400,
                "ValidationError",
                "Subscription validation request failed. Notification endpoint must respond "
                "with 200 OK to validation request.",
            )

    # ----------------------------------------------------------------- delivery

    def pause_delivery(self) -> None:
        """Hold notification POSTs (they pile up and go out, batched, on resume)."""
        with self._delivery:
            self._paused = True

    def resume_delivery(self) -> None:
        with self._delivery:
            self._paused = False
            self._delivery.notify_all()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every notification is delivered or given up on."""
        with self._delivery:
            return self._delivery.wait_for(
                lambda: not self._fresh and not self._scheduled and not self._in_flight,
                timeout,
            )

    def send_lifecycle(self, subscription_id: str, event: str) -> None:
        """POST a lifecycle notification to the subscription's lifecycle URL.

        ``subscriptionRemoved`` also removes the subscription, as Graph does;
        ``reauthorizationRequired`` marks it until it is reauthorized or renewed."""
        with self._delivery:
            sub = self._subscriptions.get(subscription_id)
            if sub is None:
                raise KeyError(f"no subscription {subscription_id!r}")
            if sub.lifecycle_url is None:
                raise ValueError("the subscription has no lifecycleNotificationUrl")
            item = {
                "subscriptionId": sub.id,
                "subscriptionExpirationDateTime": _graph_time(sub.expiration),
                "tenantId": self.tenant_id,
                "clientState": sub.client_state,
                "lifecycleEvent": event,
            }
            if event == "subscriptionRemoved":
                del self._subscriptions[subscription_id]
            elif event == "reauthorizationRequired":
                sub.needs_reauthorization = True
            self._add_fresh("lifecycle", sub.lifecycle_url, item)
        self._ensure_delivery()

    def redeliver_last(self) -> None:
        """POST the last delivered change notification body again, unchanged."""
        with self._delivery:
            for delivery in reversed(self.deliveries):
                if delivery.kind == "notification" and 200 <= delivery.status < 300:
                    post = _Post("notification", delivery.url, delivery.body, delivery.items)
                    self._schedule(post, time.monotonic())
                    break
            else:
                raise LookupError("no change notification has been delivered yet")
        self._ensure_delivery()

    def _on_tenant_change(self, group_id: str, change_type: str, seq: int) -> None:
        """Tenant listener (under the tenant's lock): queue one item per matching subscription."""
        with self._delivery:
            if not self._subscriptions:
                return
            now = self.clock()
            for sub in self._subscriptions.values():
                if sub.expiration <= now or change_type not in sub.change_types:
                    continue
                resource = sub.resource.strip("/").lower()
                if resource != "groups" and resource != f"groups/{group_id.lower()}":
                    continue
                item = {
                    "subscriptionId": sub.id,
                    "subscriptionExpirationDateTime": _graph_time(sub.expiration),
                    "clientState": sub.client_state,
                    "changeType": change_type,
                    "resource": f"Groups/{group_id}",
                    "tenantId": self.tenant_id,
                    "resourceData": {
                        "@odata.type": "#Microsoft.Graph.Group",
                        "@odata.id": f"Groups/{group_id}",
                        "id": group_id,
                        "organizationId": self.tenant_id,
                        "eventTime": _graph_time(now),
                        "sequenceNumber": seq,
                    },
                }
                self._add_fresh("notification", sub.notification_url, item)

    def _add_fresh(self, kind: str, url: str, item: dict[str, Any]) -> None:
        if not self._fresh:
            self._fresh_since = time.monotonic()
        self._fresh.append((kind, url, item))
        self._delivery.notify_all()

    def _schedule(self, post: _Post, due: float) -> None:
        self._post_counter += 1
        heapq.heappush(self._scheduled, (due, self._post_counter, post))
        self._delivery.notify_all()

    def _ensure_delivery(self) -> None:
        with self._delivery:
            if self._delivery_thread is not None:
                return
            self._delivery_stop = False
            thread = threading.Thread(
                target=self._deliver_forever, name="graph-standin-delivery", daemon=True
            )
            self._delivery_thread = thread
        # Outside the delivery lock: the tenant calls the listener under its own lock.
        self.tenant.add_listener(self._on_tenant_change)
        thread.start()

    def _stop_delivery(self) -> None:
        with self._delivery:
            thread, self._delivery_thread = self._delivery_thread, None
            self._delivery_stop = True
            self._delivery.notify_all()
        if thread is not None:
            self.tenant.remove_listener(self._on_tenant_change)
            thread.join(timeout=self.delivery_timeout + 5)

    def _deliver_forever(self) -> None:
        while True:
            with self._delivery:
                post = self._next_post()
                if post is None:
                    return
                self._in_flight += 1
            status = self._post(post)
            with self._delivery:
                self._in_flight -= 1
                self.deliveries.append(
                    Delivery(post.kind, post.url, status, post.items, post.attempt, post.body)
                )
                if not 200 <= status < 300 and post.attempt < len(self.delivery_retry_delays):
                    retry = _Post(post.kind, post.url, post.body, post.items, post.attempt + 1)
                    self._schedule(
                        retry, time.monotonic() + self.delivery_retry_delays[post.attempt]
                    )
                self._delivery.notify_all()

    def _next_post(self) -> _Post | None:
        """The next due POST (None when stopping); waits, holding the condition."""
        while not self._delivery_stop:
            timeout: float | None = None
            if not self._paused:
                now = time.monotonic()
                if self._fresh:
                    ready_at = self._fresh_since + self.delivery_batch_window
                    if now >= ready_at:
                        self._batch_fresh(now)
                    else:
                        timeout = ready_at - now
                if self._scheduled:
                    due = self._scheduled[0][0]
                    if due <= now:
                        return heapq.heappop(self._scheduled)[2]
                    timeout = due - now if timeout is None else min(timeout, due - now)
            self._delivery.wait(timeout)
        return None

    def _batch_fresh(self, now: float) -> None:
        """Pending items into POSTs: per URL, in order, at most ``delivery_batch_size`` each."""
        by_target: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for kind, url, item in self._fresh:
            by_target.setdefault((kind, url), []).append(item)
        self._fresh.clear()
        size = self.delivery_batch_size
        for (kind, url), items in by_target.items():
            for start in range(0, len(items), size):
                chunk = items[start : start + size]
                self._schedule(_Post(kind, url, _dumps({"value": chunk}), len(chunk)), now)

    def _post(self, post: _Post) -> int:
        request = urllib.request.Request(  # noqa: S310 - http(s) checked in _webhook_url
            post.url,
            data=post.body,
            method="POST",
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
        try:
            with _OPENER.open(request, timeout=self.delivery_timeout) as answer:
                answer.read()
                return int(answer.status)
        except urllib.error.HTTPError as error:
            error.close()
            return int(error.code)
        except (OSError, ValueError):
            return 0


# --------------------------------------------------------------------------- subscriptions

#: Longest subscription lifetime Graph allows for groups and other directory resources.
MAX_GROUP_SUBSCRIPTION_MINUTES = 41_760
_MAX_CLIENT_STATE = 128
_MAX_SUBSCRIPTIONS = 100
#: No proxy: notification URLs in tests are on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Delivery:
    """One notification POST attempt; ``status`` 0 means no answer in time."""

    kind: str  # "notification" or "lifecycle"
    url: str
    status: int
    items: int
    attempt: int
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class _Post:
    kind: str
    url: str
    body: bytes
    items: int
    attempt: int = 0


@dataclass
class _Subscription:
    id: str
    resource: str
    change_types: frozenset[str]
    change_type: str
    notification_url: str
    lifecycle_url: str | None
    expiration: datetime
    client_state: str | None = field(repr=False)
    needs_reauthorization: bool = False


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _graph_time(when: datetime) -> str:
    """Graph's timestamp form: UTC, seven fractional digits, ``Z``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def _subscription_body(sub: _Subscription, *, with_client_state: bool = False) -> dict[str, Any]:
    return {
        "id": sub.id,
        "resource": sub.resource,
        "applicationId": "00000000-0000-0000-0000-00000000a11d",
        "changeType": sub.change_type,
        "clientState": sub.client_state if with_client_state else None,
        "notificationUrl": sub.notification_url,
        "notificationQueryOptions": None,
        "lifecycleNotificationUrl": sub.lifecycle_url,
        "expirationDateTime": _graph_time(sub.expiration),
        "creatorId": "00000000-0000-0000-0000-00000000c0de",
        "includeResourceData": False,
        "latestSupportedTlsVersion": "v1_2",
        "encryptionCertificate": None,
        "encryptionCertificateId": None,
        "notificationUrlAppId": None,
    }


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise _GraphError(400, "BadRequest", "Empty Payload. JSON content expected.")
    return data


def _webhook_url(value: object, what: str) -> str:
    """https, or http on loopback (the stand-in's one relaxation of Graph's rule)."""
    url = urlsplit(str(value or ""))
    loopback = url.hostname in ("127.0.0.1", "localhost", "::1")
    if not url.hostname or not (url.scheme == "https" or (url.scheme == "http" and loopback)):
        raise _GraphError(
            400, "InvalidRequest", f"The {what} must be an https URL (http on loopback here)."
        )
    return str(value)


def _not_found(object_id: str) -> _GraphError:
    return _GraphError(
        404,
        "Request_ResourceNotFound",
        f"Resource '{object_id}' does not exist or one of its queried reference-property "
        "objects are not present.",
    )


def _dumps(body: object) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _json_response(body: bytes, status: int = 200) -> _Response:
    return _Response(status, body)


def _error_body(code: str, message: str, request_id: str) -> bytes:
    return _dumps(
        {
            "error": {
                "code": code,
                "message": message,
                "innerError": {
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
                    "request-id": request_id,
                    "client-request-id": request_id,
                },
            }
        }
    )


# --------------------------------------------------------------------------- HTTP


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256
    standin: GraphStandIn


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "GraphStandIn/1.0"
    timeout = 60
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: requests are in ``GraphStandIn.requests``."""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def _serve(self, method: str) -> None:
        standin = self.server.standin
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        target = unquote(self.path)
        request_id = self.headers.get("client-request-id") or str(uuid.uuid4())
        fault = standin._take_fault(target)
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        if fault is not None and fault.disconnect:
            standin._log(method, target, 0)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.status:
            headers: tuple[tuple[str, str], ...] = ()
            if fault.retry_after is not None:
                headers = (("Retry-After", format(fault.retry_after, "g")),)
            code = _ERROR_CODES.get(fault.status, "UnknownError")
            response = _Response(
                fault.status,
                _error_body(code, f"Injected fault {fault.status}.", request_id),
                headers,
            )
        else:
            try:
                response = standin.handle_request(method, self.path, body)
            except _GraphError as error:
                response = _Response(
                    error.status, _error_body(error.code, error.message, request_id), error.headers
                )
        standin._log(method, target, response.status)
        self.send_response(response.status)
        self.send_header("Content-Type", _JSON_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("request-id", request_id)
        self.send_header("client-request-id", request_id)
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)
