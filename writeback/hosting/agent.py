"""The on-premises relay agent: AD's only door for the cloud side.

It runs next to the domain controllers, holds the AD credential and the target
OU in its own settings, and listens on the Azure Relay Hybrid Connection
(outbound 443 only, no inbound port). The cloud side sends it signed requests
(:mod:`writeback.agent_protocol`); the agent serves a narrow directory API:

* ``schema``: which optional attributes the group class has here;
* ``find_group``: one group by anchor, its members paged by ``MEMBER_PAGE``;
* ``list_groups``: the anchored groups of the OU, page by page, for reconcile;
* ``resolve_sids`` and ``group_ancestry``: what the cloud side's member and
  nesting guards need to know (:mod:`writeback.domain.guard`);
* ``apply``: one planned operation.

Before any LDAP call a request must carry a valid signature for this hybrid
connection (the caller key), fresh and never seen before (nonces are kept in the
state file, so neither a restart nor a second agent on the host takes a replay),
and an operation must pass the agent's own policy (:mod:`writeback.domain.policy`:
below the target OU, our anchor, managed attributes only, the agent's group type,
derived names, accepted mail domains, members by SID, the delete limit, which is
counted in the state file too). Every member SID an operation adds goes through
the agent's own member guard (its own deny list, its own reading of AD: no
privileged principal, no ``adminCount=1`` user, nothing that is not a user but
our own groups), and no member is added to a group the agent finds nested in a
protected group (its own reading, kept ``GUARD_TTL`` seconds). Then the agent
checks the DN against its own reading of the object that carries the group's
anchor, and refuses a Modify, Rename or Delete of anything else, so whatever the
cloud side sends, only objects carrying our anchor in the OU are touched. Every
answer is signed over the request's nonce, so nobody else can answer for the
agent.

Requests are served by shards, one LDAP connection each (used by one request at
a time), chosen by group id: the read the cloud side plans a write from and the
write itself meet on the same connection, so the agent's reading of that group,
made moments before, is what it checks the write against (a write with no such
reading, at most ``READING_TTL`` old, reads the group first). The LDAP adapter proves the anchor
once more inside the write itself (the anchor is deleted and re-added in every
modify, so the DC refuses the whole request if the object no longer carries it).

Every request leaves one audit line (``writeback.audit`` logger): call, group,
operation, DN, outcome, LDAP requests, how the target was checked, time.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar

from writeback.agent_protocol import (
    API_PREFIX,
    MEMBER_PAGE,
    SID_PAGE,
    DirectoryChanged,
    NonceStore,
    ProtocolError,
    SignatureCheck,
    ancestry_to_json,
    decode,
    encode,
    error_body,
    group_page,
    member_digest,
    parse_operation,
    principal_to_json,
    sign_reply,
    status_for,
    text_field,
    whole_field,
)
from writeback.domain.guard import (
    GuardRules,
    frozen_groups,
    is_sid,
    member_refusals,
    needs_lookup,
)
from writeback.domain.mapping import GroupType
from writeback.domain.model import Add, Delete, DirectoryGroup, Modify, Operation, Rename
from writeback.domain.naming import DnFormat, dn_key
from writeback.domain.policy import (
    AgentPolicy,
    DeleteBudget,
    DeleteLedger,
    check_group_id,
    check_operation,
    removals_by_dn,
)
from writeback.errors import ConfigError, PolicyRefused, WritebackError
from writeback.hosting.collector import tune_collector
from writeback.ports import Directory

if TYPE_CHECKING:
    from writeback.adapters.hybrid_connection import RelayRequest, RelayResponse
    from writeback.config import AgentSettings, Settings

log = logging.getLogger(__name__)
audit = logging.getLogger("writeback.audit")

#: The digest of a group read without its members.
NO_MEMBERS = member_digest([])
#: How long a reading stays usable: for the next page of the same read, and as
#: the check of a write planned from it.
READING_TTL = 60.0
_MAX_READINGS = 16
_MAX_LISTINGS = 2
#: Groups whose last reading each shard remembers for the writes that follow.
_MAX_SEEN = 4096
#: Seconds the agent trusts its reading of the nesting of our groups.
GUARD_TTL = 30.0

Reply = tuple[int, dict[str, str], bytes]
_JSON = {"Content-Type": "application/json"}
_T = TypeVar("_T")


#: What the agent needs of AD: the LDAP adapter (one per shard).
AgentDirectory: TypeAlias = Directory


class AgentState(NonceStore, DeleteLedger, Protocol):
    """What outlives the agent: nonces and deletes (``adapters.agent_state``)."""


@dataclass
class _Reading:
    """One read of a group, kept briefly so its next pages come from the same state."""

    group: DirectoryGroup
    sids: list[str]
    digest: str
    at: float
    page_size: int = MEMBER_PAGE

    @classmethod
    def of(cls, group: DirectoryGroup, now: float, page_size: int) -> _Reading:
        sids = sorted(group.member_sids)
        return cls(group, sids, member_digest(sids), now, page_size)

    def page(self, offset: int) -> dict[str, Any]:
        return group_page(self.group, self.sids, self.digest, offset, self.page_size)

    @property
    def values(self) -> int:
        return min(len(self.sids), self.page_size)


@dataclass(frozen=True)
class _Seen:
    """Where a shard last read a group's anchored object (None: not there)."""

    dn: str | None
    at: float
    #: Members without a SID, when the reading included members.
    other_members: frozenset[str] | None


class _Shard:
    """One LDAP connection, used by one request at a time; what it read, by group.

    The caller's thread does the work under the shard's lock (no thread hop: a
    handoff to a worker thread cost half a millisecond per call).
    """

    def __init__(self, factory: Callable[[], AgentDirectory]) -> None:
        self._factory = factory
        self._directory: AgentDirectory | None = None
        self._lock = threading.Lock()
        self.seen: OrderedDict[str, _Seen] = OrderedDict()

    @property
    def directory(self) -> AgentDirectory:
        """This shard's adapter (only used under the shard's lock)."""
        if self._directory is None:
            self._directory = self._factory()
        return self._directory

    def run(self, work: Callable[[_Shard], _T]) -> _T:
        with self._lock:
            return work(self)

    def saw(
        self, group_id: str, found: DirectoryGroup | None, now: float, *, members: bool
    ) -> None:
        others = None if found is None or not members else found.other_members
        self.seen[group_id] = _Seen(None if found is None else found.dn, now, others)
        self.seen.move_to_end(group_id)
        while len(self.seen) > _MAX_SEEN:
            self.seen.popitem(last=False)

    def close(self) -> None:
        with self._lock:
            close = getattr(self._directory, "close", None)
            self._directory = None
            if callable(close):
                with contextlib.suppress(Exception):
                    close()


@dataclass
class _Audit:
    call: str
    fields: dict[str, Any] = field(default_factory=dict)


class AgentService:
    """Serves the directory API for requests that arrived over the relay.

    Thread-safe: the relay listener calls :meth:`handle` from several threads at
    once; LDAP work runs on ``shards`` connections made by ``directories``.
    """

    def __init__(
        self,
        directories: Callable[[], AgentDirectory],
        policy: AgentPolicy,
        caller_key: str,
        *,
        audience: str,
        state: AgentState | None = None,
        shards: int = 4,
        clock: Callable[[], float] = time.time,
        member_page: int = MEMBER_PAGE,
        guard: GuardRules | None = None,
    ) -> None:
        """``audience``: the hybrid connection requests must be signed for
        (:func:`~writeback.agent_protocol.audience`); ``state``: where nonces and
        deletes are kept (None: in this process only, for tests); ``member_page``:
        member SIDs per response (smaller in tests, to page); ``guard``: the
        agent's own member and nesting guard settings (the guards always run; a
        ``policy.member_guard`` given is used instead of the agent's own)."""
        if not caller_key:
            raise ConfigError("the agent needs a caller key (WRITEBACK_RELAY_CALLER_KEY)")
        if shards < 1:
            raise ConfigError("the agent needs at least one shard")
        self._key = caller_key
        self._audience = audience
        self._guard_rules = guard or GuardRules()
        if policy.member_guard is None:
            policy = replace(policy, member_guard=self._guard_members)
        self._policy = policy
        self._frozen: tuple[float, dict[str, tuple[str, ...]]] | None = None
        self._signatures = SignatureCheck(caller_key, audience, nonces=state)
        self._clock = clock
        self._member_page = member_page
        self._deletes = DeleteBudget(policy.delete_limit, policy.delete_window, ledger=state)
        self._shards = [_Shard(directories) for _ in range(shards)]
        self._spread = itertools.count()
        self._lock = threading.Lock()
        self._readings: OrderedDict[str, _Reading] = OrderedDict()
        self._listings: OrderedDict[str, tuple[list[_Reading], float]] = OrderedDict()
        self._routes: dict[str, Callable[[dict[str, Any], _Audit], dict[str, Any]]] = {
            "schema": self._schema,
            "find_group": self._find_group,
            "list_groups": self._list_groups,
            "resolve_sids": self._resolve_sids,
            "group_ancestry": self._group_ancestry,
            "apply": self._apply,
        }

    def close(self) -> None:
        """Close every shard's LDAP connection."""
        for shard in self._shards:
            shard.close()

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Reply:
        """One request in, one signed reply out; never raises."""
        started = time.perf_counter()
        record = _Audit(call=target.removeprefix(API_PREFIX).partition("?")[0] or "?")
        try:
            result = self._serve(method, target, headers, body, record)
            reply: Reply = (200, dict(_JSON), encode(result))
        except WritebackError as error:
            reply = (status_for(error), dict(_JSON), error_body(error))
            record.fields["error"] = f"{type(error).__name__}: {error}"
        except Exception as error:  # a bug must not take the listener down
            log.exception("agent request %s failed", record.call)
            reply = (500, dict(_JSON), error_body(WritebackError(type(error).__name__)))
            record.fields["error"] = type(error).__name__
        status, reply_headers, reply_body = reply
        reply_headers.update(sign_reply(self._key, self._audience, headers, status, reply_body))
        self._audit(record, status, time.perf_counter() - started)
        return status, reply_headers, reply_body

    def _serve(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes, record: _Audit
    ) -> dict[str, Any]:
        self._signatures.verify(method, target, headers, body)
        route = self._routes.get(record.call)
        if method.upper() != "POST" or route is None:
            raise ProtocolError(f"no such call: {method} {target}")
        return route(decode(body), record)

    def _shard_of(self, group_id: str | None) -> _Shard:
        if group_id is None:
            return self._shards[next(self._spread) % len(self._shards)]
        return self._shards[zlib.crc32(group_id.encode()) % len(self._shards)]

    # -- calls --------------------------------------------------------------------

    def _schema(self, _payload: dict[str, Any], _record: _Audit) -> dict[str, Any]:
        names = self._shard_of(None).run(lambda shard: shard.directory.schema_attributes())
        return {"attributes": sorted(names)}

    def _find_group(self, payload: dict[str, Any], record: _Audit) -> dict[str, Any]:
        group_id = text_field(payload, "group_id")
        check_group_id(group_id)
        record.fields["group_id"] = group_id
        members = bool(payload.get("members", True))
        offset = whole_field(payload, "offset", default=0)
        digest = str(payload.get("digest") or "")

        def read(shard: _Shard) -> dict[str, Any]:
            if not members:
                found = shard.directory.find_groups([group_id], members=False).get(group_id)
                shard.saw(group_id, found, self._clock(), members=False)
                return {"group": None if found is None else group_page(found, [], NO_MEMBERS, 0)}
            reading = self._reading(shard, group_id, digest, offset)
            return {"group": None if reading is None else reading.page(offset)}

        return self._shard_of(group_id).run(read)

    def _reading(self, shard: _Shard, group_id: str, digest: str, offset: int) -> _Reading | None:
        """The group as read for page 0, or as it was read when later pages are asked."""
        if offset:
            kept = self._kept(group_id)
            if kept is not None and kept.digest == digest:
                return kept
        found = shard.directory.find_group(group_id)
        now = self._clock()
        shard.saw(group_id, found, now, members=True)
        reading = None if found is None else self._keep(_Reading.of(found, now, self._member_page))
        if offset and (reading is None or reading.digest != digest):
            raise DirectoryChanged(f"group {group_id} changed between two pages of a read")
        return reading

    def _list_groups(self, payload: dict[str, Any], record: _Audit) -> dict[str, Any]:
        token = str(payload.get("listing") or "")
        after = payload.get("after")
        kept = self._listing(token) if token else None
        if kept is None:
            token, listing = self._shard_of(None).run(self._new_listing)
        else:
            listing = kept
        start = 0 if after is None else _position_after(listing, _cursor(after))
        page: list[_Reading] = []
        values = 0
        for reading in listing[start:]:
            if page and values + reading.values > self._member_page:
                break
            page.append(reading)
            values += reading.values
        done = start + len(page) >= len(listing)
        record.fields["groups"] = len(page)
        last = page[-1].group if page else None
        return {
            "listing": token,
            "groups": [reading.page(0) for reading in page],
            "next": None if done or last is None else [last.group_id, last.dn],
        }

    def _resolve_sids(self, payload: dict[str, Any], record: _Audit) -> dict[str, Any]:
        sids = payload.get("sids")
        if (
            not isinstance(sids, list)
            or len(sids) > SID_PAGE
            or not all(isinstance(s, str) and is_sid(s.upper()) for s in sids)
        ):
            raise ProtocolError(f"sids must be a list of at most {SID_PAGE} SIDs")
        record.fields["sids"] = len(sids)
        found = self._shard_of(None).run(lambda shard: shard.directory.resolve_sids(sids))
        return {"principals": [principal_to_json(p) for p in found.values()]}

    def _group_ancestry(self, _payload: dict[str, Any], record: _Audit) -> dict[str, Any]:
        ancestry = self._shard_of(None).run(lambda shard: shard.directory.group_ancestry())
        record.fields["nested"] = len(ancestry.parents)
        return {"ancestry": ancestry_to_json(ancestry)}

    # -- the agent's own guards ---------------------------------------------------

    def _guard_members(self, sids: Sequence[str]) -> None:
        """The member guard on the agent's own reading of AD: PolicyRefused naming
        every SID it refuses, and why (nothing of the write is sent)."""
        lookups = needs_lookup(sids, self._guard_rules)
        principals = (
            self._shard_of(None).run(lambda shard: shard.directory.resolve_sids(lookups))
            if lookups
            else {}
        )
        refused = member_refusals(sids, principals, self._guard_rules)
        if refused:
            reasons = "; ".join(f"{reason.value}: {why}" for reason, why in refused.values())
            raise PolicyRefused(
                f"the agent's member guard refuses {len(refused)} members: {reasons}"
            )

    def _check_not_frozen(self, shard: _Shard, operation: Operation) -> None:
        """No member is added to a group nested in a protected group (the agent's own
        reading of the nesting, at most ``GUARD_TTL`` seconds old)."""
        changes = operation.changes if isinstance(operation, Modify | Rename) else None
        if changes is None or not changes.add_members:
            return
        now = self._clock()
        with self._lock:
            frozen = self._frozen
        if frozen is None or now - frozen[0] >= GUARD_TTL:
            frozen = (now, frozen_groups(shard.directory.group_ancestry(), self._guard_rules))
            with self._lock:
                self._frozen = frozen
        nested_in = frozen[1].get(operation.group_id)
        if nested_in is not None:
            raise PolicyRefused(
                f"group {operation.group_id} is nested in a protected group, so no member is "
                f"added to it: {'; '.join(nested_in)}"
            )

    def _apply(self, payload: dict[str, Any], record: _Audit) -> dict[str, Any]:
        operation = parse_operation(payload.get("operation"))
        record.fields.update(group_id=operation.group_id, operation=operation.kind, dn=operation.dn)
        check_operation(operation, self._policy)

        def write(shard: _Shard) -> dict[str, Any]:
            if not self._still_to_do(shard, operation, record):
                return {"requests": 0}
            self._check_not_frozen(shard, operation)
            try:
                requests = shard.directory.apply(operation)
            finally:
                shard.seen.pop(operation.group_id, None)
                self._forget(operation.group_id)
            record.fields["requests"] = requests
            return {"requests": requests}

        return self._shard_of(operation.group_id).run(write)

    def _still_to_do(self, shard: _Shard, operation: Operation, record: _Audit) -> bool:
        """Checks the operation against the object that carries the group's anchor."""
        gid = operation.group_id
        if isinstance(operation, Add):
            current = shard.directory.find_groups([gid], members=False).get(gid)
            shard.saw(gid, current, self._clock(), members=False)
            record.fields["checked"] = "read"
            if current is not None:
                raise DirectoryChanged(
                    f"group {gid} already exists at {current.dn}; it is never created twice"
                )
            return True
        by_dn = removals_by_dn(operation)
        seen = self._fresh(shard, gid, members=bool(by_dn))
        if seen is None or seen.dn is None or dn_key(seen.dn) != dn_key(operation.dn):
            seen = self._read(shard, gid, members=bool(by_dn))  # maybe moved or renamed since
            record.fields["checked"] = "read"
        else:
            record.fields["checked"] = "reading"
        if isinstance(operation, Delete) and seen.dn is None:
            return False  # already gone: done
        if seen.dn is None or dn_key(seen.dn) != dn_key(operation.dn):
            raise PolicyRefused(
                f"{operation.dn} is not the object that carries the anchor of group "
                f"{gid} in the target OU"
            )
        held = {dn_key(dn) for dn in seen.other_members or ()}
        strays = [dn for dn in by_dn if dn_key(dn) not in held]
        if strays:
            raise PolicyRefused(
                f"members to remove by DN must be members of group {gid} without a SID: "
                f"{'; '.join(strays)}"
            )
        if isinstance(operation, Delete):
            self._deletes.take()
        return True

    def _fresh(self, shard: _Shard, group_id: str, *, members: bool) -> _Seen | None:
        seen = shard.seen.get(group_id)
        if seen is None or self._clock() - seen.at > READING_TTL:
            return None
        if members and seen.other_members is None:
            return None
        return seen

    def _read(self, shard: _Shard, group_id: str, *, members: bool) -> _Seen:
        found = shard.directory.find_groups([group_id], members=members).get(group_id)
        shard.saw(group_id, found, self._clock(), members=members)
        return shard.seen[group_id]

    # -- readings kept between pages ------------------------------------------------

    def _kept(self, group_id: str) -> _Reading | None:
        with self._lock:
            reading = self._readings.get(group_id)
            if reading is None or self._clock() - reading.at > READING_TTL:
                return None
            return reading

    def _keep(self, reading: _Reading) -> _Reading:
        if len(reading.sids) > reading.page_size:
            with self._lock:
                self._readings[reading.group.group_id] = reading
                self._readings.move_to_end(reading.group.group_id)
                while len(self._readings) > _MAX_READINGS:
                    self._readings.popitem(last=False)
        return reading

    def _forget(self, group_id: str) -> None:
        with self._lock:
            self._readings.pop(group_id, None)

    def _listing(self, token: str) -> list[_Reading] | None:
        with self._lock:
            kept = self._listings.get(token)
            if kept is None or self._clock() - kept[1] > READING_TTL:
                return None
            return kept[0]

    def _new_listing(self, shard: _Shard) -> tuple[str, list[_Reading]]:
        now = self._clock()
        readings = [
            _Reading.of(group, now, self._member_page) for group in shard.directory.iter_groups()
        ]
        readings.sort(key=lambda r: _sort_key(r.group.group_id, r.group.dn))
        for reading in readings:
            self._keep(reading)
        token = secrets.token_urlsafe(12)
        with self._lock:
            self._listings[token] = (readings, now)
            while len(self._listings) > _MAX_LISTINGS:
                self._listings.popitem(last=False)
        return token, readings

    def _audit(self, record: _Audit, status: int, seconds: float) -> None:
        outcome = "ok" if status == 200 else "refused" if status in (401, 403) else "failed"
        fields = {"call": record.call, "status": status, "outcome": outcome, **record.fields}
        audit.info(
            "agent %s %s: %s",
            record.call,
            " ".join(f"{k}={v}" for k, v in record.fields.items() if k != "error") or "-",
            outcome if "error" not in record.fields else f"{outcome} ({record.fields['error']})",
            extra={**fields, "ms": round(seconds * 1000, 1)},
        )


def _sort_key(group_id: str, dn: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (group_id.lower(), dn_key(dn))


def _cursor(after: object) -> tuple[str, tuple[tuple[str, str], ...]]:
    if (
        not isinstance(after, list)
        or len(after) != 2  # [group id, dn]
        or not all(isinstance(part, str) for part in after)
    ):
        raise ProtocolError("after must be [group_id, dn]")
    return _sort_key(after[0], after[1])


def _position_after(listing: list[_Reading], cursor: tuple[str, Any]) -> int:
    for index, reading in enumerate(listing):
        if _sort_key(reading.group.group_id, reading.group.dn) > cursor:
            return index
    return len(listing)


# -- the agent process ----------------------------------------------------------------


def placement_limits(settings: Settings) -> dict[str, Any]:
    """What the agent's own rules file and settings allow beyond one type, format and
    OU: the rules' OUs, group types and DN formats (security groups bring their
    own types)."""
    types: set[GroupType] = set()
    if settings.security_groups or settings.rules is not None:
        types |= {GroupType.SECURITY, GroupType.MAIL_ENABLED_SECURITY}
    ous: frozenset[str] = frozenset()
    formats: frozenset[DnFormat] = frozenset()
    if settings.rules is not None:
        types |= settings.rules.group_types()
        ous = settings.rules.ous()
        formats = settings.rules.dn_formats()
    return {"ous": ous, "group_types": frozenset(types), "dn_formats": formats}


def build_agent(settings: AgentSettings, state: AgentState | None = None) -> AgentService:
    """The agent's service: its policy from its own settings, one LDAP connection
    per shard (``WRITEBACK_AGENT_CONCURRENCY`` of them)."""
    from writeback.adapters.directory import ObjectGuids
    from writeback.agent_protocol import audience
    from writeback.bootstrap import build_ldap_directory

    directory = settings.directory
    policy = AgentPolicy(
        target_ou=directory.target_ou,
        delete_limit=settings.delete_limit,
        group_type=directory.group_type,
        dn_format=directory.dn_format,
        mail_domains=settings.mail_domains,
        **placement_limits(directory),
    )
    guids = ObjectGuids()  # the shards' adapters share what their reads learnt
    return AgentService(
        lambda: build_ldap_directory(directory, guids),
        policy,
        settings.relay.caller_key,
        audience=audience(settings.relay.namespace, settings.relay.path),
        state=state,
        shards=settings.concurrency,
        guard=directory.guard_rules,
    )


def relay_handler(service: AgentService) -> Callable[[RelayRequest], RelayResponse]:
    """The listener's handler: one relayed HTTP request, one call of ``service``."""
    from writeback.adapters.hybrid_connection import RelayResponse

    def handler(request: RelayRequest) -> RelayResponse:
        status, headers, body = service.handle(
            request.method, request.target, request.headers, request.body
        )
        return RelayResponse(status, headers, body)

    return handler


def run_agent(settings: AgentSettings, stop: threading.Event) -> None:
    """Listen on the hybrid connection until ``stop`` is set; reconnects on its own."""
    from writeback.adapters.agent_state import AgentStateStore
    from writeback.adapters.hybrid_connection import HybridConnectionListener
    from writeback.bootstrap import relay_endpoint

    state = AgentStateStore(settings.state_path)
    service = build_agent(settings, state)
    tune_collector()
    listener = HybridConnectionListener(
        relay_endpoint(settings.relay),
        settings.relay.key_name,
        settings.relay.key,
        relay_handler(service),
        max_concurrency=settings.concurrency,
    )
    log.info(
        "agent: listening on %s/%s for %s (state in %s)",
        settings.relay.namespace,
        settings.relay.path,
        settings.directory.target_ou,
        state.path,
    )
    try:
        listener.run(stop)
    finally:
        service.close()
        state.close()
