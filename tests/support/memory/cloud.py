"""An in-memory tenant behind the Cloud port (what GraphCloud reads and the subscription calls).

Seeded with the same calls as the Graph stand-in's
:class:`writeback_sandbox.graph_standin.Tenant` (``add_user``, ``add_group``,
``add_members``, ``soft_delete_group``, ``hard_delete_group``,
``expire_delta_tokens``...), so one test body can drive either. It answers
the reads as :class:`writeback.adapters.graph.GraphCloud` returns them from
Graph:

* :meth:`MemoryCloud.snapshot` lists the live Unified groups with every
  member kind (users with their SID and sync state, nested groups, devices,
  contacts) and the recycle bin; :meth:`MemoryCloud.get_group` reads one group
  with its *user* members only (GraphCloud reads the users cast) and returns
  non-Unified groups too; a soft-deleted or deleted group is None;
* every change is numbered; a groups delta link, or a per-group delta link
  from :meth:`MemoryCloud.group_delta_link`, stands for "changes after this
  number": :meth:`MemoryCloud.group_changes` reports the groups changed,
  soft-deleted and deleted since, and :meth:`MemoryCloud.group_delta` the
  members added and removed since (kinds only, no SIDs, as Graph's delta
  gives them); a restored group is reported whole again; a user's SID or
  sync state changing is not a group change (it is not one in Graph either);
  :meth:`MemoryCloud.expire_delta_tokens` makes every link issued so far
  unknown (``DeltaExpired``, or None from ``group_delta``);
* subscriptions are created, listed (expired ones are gone, on ``clock``),
  renewed, reauthorized and deleted with Graph's limits on the expiry (at most
  41,760 minutes ahead) and the clientState (128 characters).

Kinder than Graph: no latency, no paging, no throttling, and every read sees
every change before it unless a test says otherwise: :meth:`MemoryCloud.lag`
makes the next reads of a group answer from a replica that has not seen what
happened after the call (Graph is eventually consistent). No validation
handshake is made against the notification URLs. Faults are scheduled per
method name on :attr:`MemoryCloud.faults`; :attr:`MemoryCloud.calls` counts
the port calls by method name (one call is one or more Graph requests).
"""

from __future__ import annotations

import re
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.support.memory.faults import Faults
from writeback.domain.model import CloudGroup, CloudMember, MemberKind
from writeback.errors import DeltaExpired, GraphNotFound, GraphRefused, WritebackError
from writeback.ports import (
    CloudSnapshot,
    GroupChanges,
    GroupDelta,
    GroupGone,
    GroupRead,
    Subscription,
)

#: Graph's limit on a groups subscription's lifetime, and on clientState.
MAX_SUBSCRIPTION_LIFETIME = timedelta(minutes=41_760)
MAX_CLIENT_STATE = 128

_TOKEN = re.compile(r"\$deltatoken=([0-9a-f]+)\.(\d+)")
_GROUP_FILTER = re.compile(r"\$filter=id eq '([^']*)'")

_GROUP_FIELDS = (
    "display_name",
    "description",
    "mail",
    "mail_nickname",
    "proxy_addresses",
    "group_types",
    "visibility",
)


@dataclass
class _Member:
    kind: MemberKind
    present: bool
    seq: int


@dataclass
class _Group:
    id: str
    fields: dict[str, Any]
    members: dict[str, _Member] = field(default_factory=dict)
    seq: int = 0
    soft_deleted_seq: int | None = None


@dataclass
class _User:
    sid: str | None
    synced: bool
    display_name: str


@dataclass
class _Lag:
    answer: CloudGroup | None
    reads: int


class MemoryCloud:
    """A tenant in memory behind the Cloud port (see the module docstring). Thread-safe."""

    def __init__(self, *, clock: Callable[[], datetime] | None = None) -> None:
        self.clock = clock or (lambda: datetime.now(UTC))
        self.faults = Faults()
        self.calls: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._seq = 0
        self._epoch = secrets.token_hex(4)
        self._users: dict[str, _User] = {}
        self._others: dict[str, MemberKind] = {}
        self._groups: dict[str, _Group] = {}
        self._hard_deleted: dict[str, int] = {}
        self._subscriptions: dict[str, Subscription] = {}
        self._reauthorized: Counter[str] = Counter()
        self._lags: dict[str, _Lag] = {}
        self._closed = False

    # ================================================================= the tenant (test side)

    def add_user(
        self, user_id: str, *, sid: str | None, synced: bool, display_name: str = ""
    ) -> None:
        with self._lock:
            self._claim(user_id)
            self._users[user_id] = _User(sid, bool(synced), display_name or user_id)

    def update_user(self, user_id: str, **fields: Any) -> None:
        """Change ``display_name``, ``sid`` or ``synced`` (no group change is recorded)."""
        with self._lock:
            user = self._users[user_id]
            for name, value in fields.items():
                if name not in ("display_name", "sid", "synced"):
                    raise TypeError(f"unknown user field {name!r}")
                setattr(user, name, bool(value) if name == "synced" else value)

    def delete_user(self, user_id: str) -> None:
        """Delete a user for good: it leaves every group (a change of each)."""
        with self._lock:
            if user_id not in self._users:
                raise KeyError(f"no user {user_id!r}")
            self._drop_everywhere(user_id, self._next())
            del self._users[user_id]

    def add_device(self, device_id: str) -> None:
        with self._lock:
            self._claim(device_id)
            self._others[device_id] = MemberKind.DEVICE

    def add_contact(self, contact_id: str) -> None:
        with self._lock:
            self._claim(contact_id)
            self._others[contact_id] = MemberKind.CONTACT

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
            kinds = [self._kind_of(m) for m in member_ids]
            self._claim(group_id)
            seq = self._next()
            group = _Group(
                group_id,
                {
                    "display_name": display_name,
                    "description": description,
                    "mail": mail,
                    "mail_nickname": mail_nickname,
                    "proxy_addresses": tuple(proxy_addresses),
                    "group_types": tuple(group_types),
                    "visibility": visibility,
                },
                seq=seq,
            )
            for member_id, kind in zip(member_ids, kinds, strict=True):
                group.members[member_id] = _Member(kind, True, seq)
            self._groups[group_id] = group

    def update_group(self, group_id: str, **fields: Any) -> None:
        """Change properties (names as in :meth:`add_group`)."""
        with self._lock:
            group = self._live(group_id)
            unknown = set(fields) - set(_GROUP_FIELDS)
            if unknown:
                raise TypeError(f"unknown group fields {sorted(unknown)}")
            changed = {
                name: tuple(value or ()) if name in ("proxy_addresses", "group_types") else value
                for name, value in fields.items()
            }
            if any(group.fields[name] != value for name, value in changed.items()):
                group.fields.update(changed)
                group.seq = self._next()

    def add_members(self, group_id: str, member_ids: Iterable[str]) -> None:
        with self._lock:
            group = self._live(group_id)
            ids = list(member_ids)
            kinds = [self._kind_of(m) for m in ids]
            seq = self._next()
            for member_id, kind in zip(ids, kinds, strict=True):
                current = group.members.get(member_id)
                if current is None or not current.present:
                    group.members[member_id] = _Member(kind, True, seq)
                    group.seq = seq

    def remove_members(self, group_id: str, member_ids: Iterable[str]) -> None:
        with self._lock:
            group = self._live(group_id)
            seq = self._next()
            for member_id in member_ids:
                current = group.members.get(member_id)
                if current is not None and current.present:
                    current.present, current.seq = False, seq
                    group.seq = seq

    def soft_delete_group(self, group_id: str) -> None:
        """Move a group to the recycle bin (members kept for a restore)."""
        with self._lock:
            group = self._live(group_id)
            group.soft_deleted_seq = group.seq = self._next()

    def restore_group(self, group_id: str) -> None:
        """Bring a group back from the recycle bin; deltas report it whole again."""
        with self._lock:
            group = self._groups.get(group_id)
            if group is None or group.soft_deleted_seq is None:
                raise KeyError(f"group {group_id!r} is not in the recycle bin")
            seq = self._next()
            group.soft_deleted_seq = None
            group.seq = seq
            for member in group.members.values():
                if member.present:
                    member.seq = seq

    def hard_delete_group(self, group_id: str) -> None:
        """Delete a group for good (live or from the recycle bin)."""
        with self._lock:
            if group_id not in self._groups:
                raise KeyError(f"no group {group_id!r}")
            seq = self._next()
            self._drop_everywhere(group_id, seq)
            del self._groups[group_id]
            self._hard_deleted[group_id] = seq

    def expire_delta_tokens(self) -> None:
        """Make every delta link issued so far unknown."""
        with self._lock:
            self._epoch = secrets.token_hex(4)

    def lag(self, group_id: str, *, reads: int = 1) -> None:
        """The next ``reads`` reads of this group (get_group, get_groups) answer as
        it is now, whatever happens to it after this call: a lagging replica."""
        with self._lock:
            self._lags[group_id] = _Lag(self._view(group_id), reads)

    # --------------------------------------------------------------------- reads (test side)

    def group_ids(self, *, include_soft_deleted: bool = False) -> list[str]:
        with self._lock:
            return [
                g.id
                for g in self._groups.values()
                if include_soft_deleted or g.soft_deleted_seq is None
            ]

    def member_ids(self, group_id: str) -> list[str]:
        with self._lock:
            return [m for m, state in self._groups[group_id].members.items() if state.present]

    def subscriptions(self) -> list[Subscription]:
        """Every subscription Graph holds now, clientState included."""
        with self._lock:
            self._purge_expired()
            return list(self._subscriptions.values())

    def reauthorizations(self, subscription_id: str) -> int:
        """How often this subscription was reauthorized."""
        with self._lock:
            return self._reauthorized[subscription_id]

    def remove_subscription(self, subscription_id: str) -> None:
        """Graph drops a subscription (what precedes a ``subscriptionRemoved``)."""
        with self._lock:
            del self._subscriptions[subscription_id]

    # ================================================================= CloudSource

    def snapshot(self) -> CloudSnapshot:
        with self._lock:
            self._enter("snapshot")
            groups = tuple(
                self._group_of(g, every_kind=True)
                for g in self._groups.values()
                if g.soft_deleted_seq is None and _unified(g)
            )
            return CloudSnapshot(
                groups=groups,
                soft_deleted=self._soft_deleted(),
                groups_delta_link=self._link("groups"),
                users_delta_link=self._link("users"),
            )

    def group_changes(self, delta_link: str) -> GroupChanges:
        with self._lock:
            self._enter("group_changes")
            since = self._since(delta_link)
            if since is None:
                raise DeltaExpired("Graph groups delta answered 410: the delta link is unknown")
            changed = sorted(
                (g for g in self._groups.values() if g.seq > since and g.soft_deleted_seq is None),
                key=lambda g: g.seq,
            )
            return GroupChanges(
                changed=tuple(g.id for g in changed),
                soft_deleted=frozenset(
                    g.id
                    for g in self._groups.values()
                    if g.soft_deleted_seq is not None and g.soft_deleted_seq > since
                ),
                hard_deleted=frozenset(g for g, seq in self._hard_deleted.items() if seq > since),
                delta_link=self._link("groups"),
            )

    def get_group(self, group_id: str) -> CloudGroup | None:
        with self._lock:
            self._enter("get_group")
            if not group_id:
                return None
            lag = self._lags.get(group_id)
            if lag is not None:
                lag.reads -= 1
                if lag.reads <= 0:
                    del self._lags[group_id]
                return lag.answer
            return self._view(group_id)

    def get_groups(self, group_ids: Sequence[str]) -> dict[str, GroupRead]:
        """Each group as :meth:`get_group` reads it (and counts it); a fault of
        ``get_group`` is that group's entry, not the call's."""
        with self._lock:
            self._enter("get_groups")
            found: dict[str, GroupRead] = {}
            for group_id in dict.fromkeys(group_ids):
                try:
                    group = self.get_group(group_id)
                except WritebackError as error:
                    found[group_id] = error
                    continue
                found[group_id] = (
                    group
                    if group is not None
                    else GroupGone(soft_deleted=group_id in self._soft_deleted())
                )
            return found

    def soft_deleted_group_ids(self) -> frozenset[str]:
        with self._lock:
            self._enter("soft_deleted_group_ids")
            return self._soft_deleted()

    def group_delta_link(self, group_id: str) -> str | None:
        with self._lock:
            self._enter("group_delta_link")
            return self._link("groups", group_id)

    def group_delta_links(self, group_ids: Sequence[str]) -> dict[str, str | WritebackError]:
        with self._lock:
            self._enter("group_delta_links")
            return {group_id: self._link("groups", group_id) for group_id in group_ids}

    def group_delta(self, group_id: str, delta_link: str) -> GroupDelta | None:
        with self._lock:
            self._enter("group_delta")
            filtered = _GROUP_FILTER.search(delta_link)
            since = self._since(delta_link)
            if since is None or filtered is None or filtered.group(1) != group_id:
                return None
            group = self._groups.get(group_id)
            live = group is not None and group.soft_deleted_seq is None
            added: list[CloudMember] = []
            removed: list[CloudMember] = []
            if group is not None and live:
                for member_id, member in group.members.items():
                    if member.seq > since:
                        target = added if member.present else removed
                        target.append(CloudMember(member_id, member.kind))
            return GroupDelta(
                group=self._group_of(group, members=()) if group is not None and live else None,
                added=tuple(added),
                removed=tuple(sorted(removed, key=lambda m: m.id)),
                delta_link=self._link("groups", group_id),
            )

    def group_deltas(
        self, links: Mapping[str, str]
    ) -> dict[str, GroupDelta | WritebackError | None]:
        with self._lock:
            self._enter("group_deltas")
            found: dict[str, GroupDelta | WritebackError | None] = {}
            for group_id, link in links.items():
                try:
                    found[group_id] = self.group_delta(group_id, link)
                except WritebackError as error:
                    found[group_id] = error
            return found

    def resolve_users(self, user_ids: Iterable[str]) -> dict[str, CloudMember]:
        with self._lock:
            self._enter("resolve_users")
            return {
                user_id: self._user_member(user_id)
                for user_id in dict.fromkeys(user_ids)
                if user_id in self._users
            }

    # ================================================================= SubscriptionClient

    def create_subscription(
        self,
        notification_url: str,
        lifecycle_url: str | None,
        client_state: str,
        expiration: datetime,
        *,
        resource: str = "groups",
        change_type: str = "updated,deleted",
    ) -> Subscription:
        with self._lock:
            self._enter("create_subscription")
            self._check_expiration(expiration, "create subscription")
            if len(client_state) > MAX_CLIENT_STATE:
                raise GraphRefused(
                    "Graph create subscription answered 400: clientState is over 128 characters"
                )
            subscription = Subscription(
                id=_new_id(),
                resource=resource,
                change_type=change_type,
                notification_url=notification_url,
                lifecycle_url=lifecycle_url,
                expiration=_utc(expiration),
                client_state=client_state,
            )
            self._subscriptions[subscription.id] = subscription
            return subscription

    def list_subscriptions(self) -> list[Subscription]:
        """Every live subscription; clientState is not echoed here (only on creation)."""
        with self._lock:
            self._enter("list_subscriptions")
            self._purge_expired()
            return [_without_state(s) for s in self._subscriptions.values()]

    def renew_subscription(self, subscription_id: str, expiration: datetime) -> Subscription:
        with self._lock:
            self._enter("renew_subscription")
            current = self._live_subscription(subscription_id, "renew subscription")
            self._check_expiration(expiration, "renew subscription")
            renewed = Subscription(
                id=current.id,
                resource=current.resource,
                change_type=current.change_type,
                notification_url=current.notification_url,
                lifecycle_url=current.lifecycle_url,
                expiration=_utc(expiration),
                client_state=current.client_state,
            )
            self._subscriptions[subscription_id] = renewed
            return _without_state(renewed)

    def reauthorize_subscription(self, subscription_id: str) -> None:
        with self._lock:
            self._enter("reauthorize_subscription")
            self._live_subscription(subscription_id, "reauthorize subscription")
            self._reauthorized[subscription_id] += 1

    def delete_subscription(self, subscription_id: str) -> None:
        with self._lock:
            self._enter("delete_subscription")
            self._live_subscription(subscription_id, "delete subscription")
            del self._subscriptions[subscription_id]

    def close(self) -> None:
        self._closed = True

    # ================================================================= helpers

    def _enter(self, method: str) -> None:
        if self._closed:
            raise RuntimeError("MemoryCloud is closed")
        self.calls[method] += 1
        self.faults.before(method)

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _claim(self, object_id: str) -> None:
        if not object_id:
            raise ValueError("an object needs an id")
        if object_id in self._users or object_id in self._others or object_id in self._groups:
            raise ValueError(f"object id {object_id!r} is taken")

    def _kind_of(self, object_id: str) -> MemberKind:
        if object_id in self._users:
            return MemberKind.USER
        if object_id in self._groups:
            return MemberKind.GROUP
        if object_id in self._others:
            return self._others[object_id]
        raise KeyError(f"no directory object {object_id!r}")

    def _live(self, group_id: str) -> _Group:
        group = self._groups.get(group_id)
        if group is None or group.soft_deleted_seq is not None:
            raise KeyError(f"no live group {group_id!r}")
        return group

    def _drop_everywhere(self, member_id: str, seq: int) -> None:
        for group in self._groups.values():
            member = group.members.get(member_id)
            if member is not None and member.present:
                member.present, member.seq = False, seq
                group.seq = seq

    def _soft_deleted(self) -> frozenset[str]:
        return frozenset(g.id for g in self._groups.values() if g.soft_deleted_seq is not None)

    def _view(self, group_id: str) -> CloudGroup | None:
        """The group as get_group answers it now: user members only, or None."""
        group = self._groups.get(group_id)
        if group is None or group.soft_deleted_seq is not None:
            return None
        return self._group_of(group)

    def _group_of(
        self,
        group: _Group,
        *,
        every_kind: bool = False,
        members: tuple[CloudMember, ...] | None = None,
    ) -> CloudGroup:
        if members is None:
            present = [(m, state) for m, state in group.members.items() if state.present]
            members = tuple(
                self._user_member(m)
                if state.kind is MemberKind.USER
                else CloudMember(m, state.kind)
                for m, state in present
                if every_kind or state.kind is MemberKind.USER
            )
        f = group.fields
        return CloudGroup(
            id=group.id,
            display_name=str(f["display_name"] or ""),
            description=f["description"],
            mail=f["mail"],
            mail_nickname=f["mail_nickname"],
            proxy_addresses=tuple(f["proxy_addresses"]),
            group_types=tuple(f["group_types"]),
            visibility=f["visibility"],
            members=members,
        )

    def _user_member(self, user_id: str) -> CloudMember:
        user = self._users[user_id]
        return CloudMember(user_id, MemberKind.USER, sid=user.sid, synced=user.synced)

    def _link(self, resource: str, group_id: str | None = None) -> str:
        query = f"$filter=id eq '{group_id}'&" if group_id is not None else ""
        return f"memory://{resource}/delta?{query}$deltatoken={self._epoch}.{self._seq}"

    def _since(self, delta_link: str) -> int | None:
        """The change number a link stands for; None when it is unknown or expired."""
        found = _TOKEN.search(delta_link)
        if found is None or found.group(1) != self._epoch:
            return None
        return int(found.group(2))

    def _check_expiration(self, expiration: datetime, what: str) -> None:
        now = self.clock()
        if not now < _utc(expiration) <= now + MAX_SUBSCRIPTION_LIFETIME:
            raise GraphRefused(
                f"Graph {what} answered 400 InvalidRequest: expirationDateTime must be in the "
                "future and at most 41760 minutes ahead"
            )

    def _live_subscription(self, subscription_id: str, what: str) -> Subscription:
        self._purge_expired()
        subscription = self._subscriptions.get(subscription_id)
        if subscription is None:
            raise GraphNotFound(f"Graph {what} answered 404 ResourceNotFound")
        return subscription

    def _purge_expired(self) -> None:
        now = self.clock()
        for subscription_id in [s.id for s in self._subscriptions.values() if s.expiration <= now]:
            del self._subscriptions[subscription_id]


def _unified(group: _Group) -> bool:
    return any(str(t).lower() == "unified" for t in group.fields["group_types"])


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _without_state(subscription: Subscription) -> Subscription:
    return Subscription(
        id=subscription.id,
        resource=subscription.resource,
        change_type=subscription.change_type,
        notification_url=subscription.notification_url,
        lifecycle_url=subscription.lifecycle_url,
        expiration=subscription.expiration,
    )


def _new_id() -> str:
    raw = secrets.token_hex(16)
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"
