"""The on-premises relay agent: AD's only door for the cloud side.

It runs next to the domain controllers, holds the AD credential and the target
OU in its own settings, and listens on the Azure Relay Hybrid Connection
(outbound 443 only, no inbound port). The cloud side sends it signed requests
(:mod:`writeback.agent_protocol`); the agent serves a narrow directory API:

* ``schema``: which optional attributes the group class has here;
* ``find_group``: one group by anchor, its members paged by ``MEMBER_PAGE``;
* ``list_groups``: the anchored groups of the OU, page by page, for reconcile;
* ``apply``: one planned operation.

Before any LDAP call a request must carry a valid signature (the caller key),
and an operation must pass the agent's own policy (:mod:`writeback.domain.policy`:
below the target OU, our anchor, managed attributes only, members by SID, the
delete limit). Then the agent reads the group's anchored object itself and
refuses a Modify, Rename or Delete whose DN is not that object, so whatever the
cloud side sends, only objects carrying our anchor in the OU are touched. The
LDAP adapter checks the same again at the moment of the write.

Every request leaves one audit line (``writeback.audit`` logger): call, group,
operation, DN, outcome, LDAP requests, time.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from writeback.agent_protocol import (
    API_PREFIX,
    MEMBER_PAGE,
    DirectoryChanged,
    ProtocolError,
    SignatureCheck,
    decode,
    encode,
    error_body,
    group_page,
    member_digest,
    parse_operation,
    status_for,
    text_field,
    whole_field,
)
from writeback.domain.model import Add, Delete, DirectoryGroup, Operation
from writeback.domain.naming import dn_key
from writeback.domain.policy import AgentPolicy, DeleteBudget, check_group_id, check_operation
from writeback.errors import ConfigError, PolicyRefused, WritebackError
from writeback.ports import Directory

if TYPE_CHECKING:
    from writeback.adapters.hybrid_connection import RelayRequest, RelayResponse
    from writeback.adapters.thread_local import ThreadLocalDirectory
    from writeback.config import AgentSettings

log = logging.getLogger(__name__)
audit = logging.getLogger("writeback.audit")

#: The digest of a group read without its members.
NO_MEMBERS = member_digest([])
#: How long a reading stays usable for the next page of the same read.
READING_TTL = 60.0
_MAX_READINGS = 16
_MAX_LISTINGS = 2

Reply = tuple[int, dict[str, str], bytes]
_JSON = {"Content-Type": "application/json"}


#: What the agent needs of AD: the LDAP adapter (one per thread).
AgentDirectory: TypeAlias = Directory


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


@dataclass
class _Audit:
    call: str
    fields: dict[str, Any] = field(default_factory=dict)


class AgentService:
    """Serves the directory API for requests that arrived over the relay.

    Thread-safe, given a thread-safe directory (the LDAP adapter wrapped in
    ``ThreadLocalDirectory``): the relay listener calls :meth:`handle` from
    several threads at once.
    """

    def __init__(
        self,
        directory: AgentDirectory,
        policy: AgentPolicy,
        caller_key: str,
        *,
        clock: Callable[[], float] = time.time,
        member_page: int = MEMBER_PAGE,
    ) -> None:
        """``member_page``: member SIDs per response (smaller in tests, to page)."""
        if not caller_key:
            raise ConfigError("the agent needs a caller key (WRITEBACK_RELAY_CALLER_KEY)")
        self._directory = directory
        self._policy = policy
        self._signatures = SignatureCheck(caller_key)
        self._clock = clock
        self._member_page = member_page
        self._deletes = DeleteBudget(policy.delete_limit, policy.delete_window)
        self._lock = threading.Lock()
        self._readings: OrderedDict[str, _Reading] = OrderedDict()
        self._listings: OrderedDict[str, tuple[list[_Reading], float]] = OrderedDict()
        self._routes: dict[str, Callable[[dict[str, Any], _Audit], dict[str, Any]]] = {
            "schema": self._schema,
            "find_group": self._find_group,
            "list_groups": self._list_groups,
            "apply": self._apply,
        }

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Reply:
        """One request in, one reply out; never raises."""
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
        self._audit(record, reply[0], time.perf_counter() - started)
        return reply

    def _serve(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes, record: _Audit
    ) -> dict[str, Any]:
        self._signatures.verify(method, target, headers, body)
        route = self._routes.get(record.call)
        if method.upper() != "POST" or route is None:
            raise ProtocolError(f"no such call: {method} {target}")
        return route(decode(body), record)

    # -- calls --------------------------------------------------------------------

    def _schema(self, _payload: dict[str, Any], _record: _Audit) -> dict[str, Any]:
        return {"attributes": sorted(self._directory.schema_attributes())}

    def _find_group(self, payload: dict[str, Any], record: _Audit) -> dict[str, Any]:
        group_id = text_field(payload, "group_id")
        check_group_id(group_id)
        record.fields["group_id"] = group_id
        if not payload.get("members", True):
            found = self._directory.find_groups([group_id], members=False).get(group_id)
            return {"group": None if found is None else group_page(found, [], NO_MEMBERS, 0)}
        offset = whole_field(payload, "offset", default=0)
        reading = self._reading(group_id, str(payload.get("digest") or ""), offset)
        return {"group": None if reading is None else reading.page(offset)}

    def _reading(self, group_id: str, digest: str, offset: int) -> _Reading | None:
        """The group as read for page 0, or as it was read when later pages are asked."""
        if offset:
            kept = self._kept(group_id)
            if kept is not None and kept.digest == digest:
                return kept
        found = self._directory.find_group(group_id)
        reading = (
            None
            if found is None
            else self._keep(_Reading.of(found, self._clock(), self._member_page))
        )
        if offset and (reading is None or reading.digest != digest):
            raise DirectoryChanged(f"group {group_id} changed between two pages of a read")
        return reading

    def _list_groups(self, payload: dict[str, Any], record: _Audit) -> dict[str, Any]:
        token = str(payload.get("listing") or "")
        after = payload.get("after")
        listing = self._listing(token) if token else None
        if listing is None:
            token, listing = self._new_listing()
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

    def _apply(self, payload: dict[str, Any], record: _Audit) -> dict[str, Any]:
        operation = parse_operation(payload.get("operation"))
        record.fields.update(group_id=operation.group_id, operation=operation.kind, dn=operation.dn)
        check_operation(operation, self._policy)
        current = self._directory.find_groups([operation.group_id], members=False).get(
            operation.group_id
        )
        if not self._still_to_do(operation, current):
            return {"requests": 0}
        requests = self._directory.apply(operation)
        self._forget(operation.group_id)
        record.fields["requests"] = requests
        return {"requests": requests}

    def _still_to_do(self, operation: Operation, current: DirectoryGroup | None) -> bool:
        """Checks the operation against the object carrying the group's anchor now."""
        if isinstance(operation, Add):
            if current is not None:
                raise DirectoryChanged(
                    f"group {operation.group_id} already exists at {current.dn}; it is "
                    "never created twice"
                )
            return True
        if isinstance(operation, Delete) and current is None:
            return False  # already gone: done
        if current is None or dn_key(current.dn) != dn_key(operation.dn):
            raise PolicyRefused(
                f"{operation.dn} is not the object that carries the anchor of group "
                f"{operation.group_id} in the target OU"
            )
        if isinstance(operation, Delete):
            self._deletes.take()
        return True

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

    def _new_listing(self) -> tuple[str, list[_Reading]]:
        now = self._clock()
        readings = [
            _Reading.of(group, now, self._member_page) for group in self._directory.iter_groups()
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


def build_agent(settings: AgentSettings) -> tuple[AgentService, ThreadLocalDirectory]:
    """The agent's service over one LDAP connection per listener thread."""
    from writeback.adapters.thread_local import ThreadLocalDirectory
    from writeback.bootstrap import build_ldap_directory

    directory = ThreadLocalDirectory(lambda: build_ldap_directory(settings.directory))
    policy = AgentPolicy(target_ou=settings.directory.target_ou, delete_limit=settings.delete_limit)
    return AgentService(directory, policy, settings.relay.caller_key), directory


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
    from writeback.adapters.hybrid_connection import HybridConnectionListener
    from writeback.bootstrap import relay_endpoint

    service, directory = build_agent(settings)
    listener = HybridConnectionListener(
        relay_endpoint(settings.relay),
        settings.relay.key_name,
        settings.relay.key,
        relay_handler(service),
        max_concurrency=settings.concurrency,
    )
    log.info(
        "agent: listening on %s/%s for %s",
        settings.relay.namespace,
        settings.relay.path,
        settings.directory.target_ou,
    )
    try:
        listener.run(stop)
    finally:
        directory.close()
