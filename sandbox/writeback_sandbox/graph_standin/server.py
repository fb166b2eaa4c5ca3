"""The stand-in's HTTP side: routing, reads, JSON batching, latency, replica lag, faults.

See the package docstring for what each behaviour models and where it differs
from Microsoft Graph.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import random
import re
import secrets
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from writeback_sandbox.graph_standin.subscriptions import Notifications
from writeback_sandbox.graph_standin.tenant import (
    BETA_PROPERTIES,
    GROUP_PROPERTIES,
    GROUP_TYPE,
    MEMBER_READ_HIDDEN,
    SINGLE_GET_PROPERTIES,
    USER_PROPERTIES,
    Tenant,
)
from writeback_sandbox.graph_standin.wire import (
    API_VERSION,
    ERROR_CODES,
    JSON_CONTENT_TYPE,
    GraphError,
    Response,
    dumps,
    error_body,
    graph_time,
    json_body,
    json_response,
    not_found,
)

_MAX_TOP = 999
#: Graph's limits: ids in one groups-delta ``$filter``, values in one ``in`` clause,
#: requests in one JSON batch.
_MAX_DELTA_FILTER_IDS = 50
_MAX_IN_VALUES = 15
MAX_BATCH_REQUESTS = 20
_ID_EQ = re.compile(r"id\s+eq\s+'([^']+)'", re.IGNORECASE)
_ID_IN = re.compile(r"id\s+in\s*\(([^)]*)\)", re.IGNORECASE)
_QUOTED = re.compile(r"'([^']+)'")
_DEFAULT_TOP = 100
_MAX_CURSORS = 16
_BATCH_PATH = f"/{API_VERSION}/$batch"
_BETA = "beta"
#: What the app is granted when a request carries no token: what writeback's docs
#: ask for (tests take Member.Read.Hidden away, or send tokens with other roles).
DEFAULT_APP_ROLES = frozenset({"Group.Read.All", "User.Read.All", MEMBER_READ_HIDDEN})

#: What Graph says with each code a refused delta link comes back with.
_DELTA_REFUSALS = {
    "Directory_ExpiredPageToken": (
        "The specified page token value has expired and can no longer be included in your request."
    ),
    "syncStateNotFound": "The delta token is not valid or has expired.",
    "resyncRequired": (
        "Resync required. Replace any local cached data with the data returned by the "
        "server and then use the new delta token."
    ),
}


@dataclass
class _Fault:
    status: int
    remaining: int | None
    retry_after: float | None
    matches: Callable[[str], bool]
    rate: float | None
    rng: random.Random
    delay: float = 0.0
    disconnect: bool = False
    code: str | None = None
    message: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the stand-in answered it.

    ``target`` is the URL-decoded path and query (for a request inside a batch,
    the version prefix plus its relative ``url``). ``batch`` is the number of the
    ``$batch`` round trip that carried it (None: sent on its own); the envelope
    itself is logged with ``envelope=True`` and its own number."""

    method: str
    target: str
    status: int
    batch: int | None = None
    envelope: bool = False


class GraphStandIn(Notifications):
    """Graph v1.0 on ``http://127.0.0.1:<port>/v1.0`` backed by a :class:`Tenant`."""

    def __init__(
        self,
        tenant: Tenant | None = None,
        *,
        page_size: int = 100,
        member_page_size: int = 1000,
        latency: float = 0.0,
        lag: float = 0.0,
        deleted_items_lag: float = 0.0,
        seed: int = 0,
        delivery_retry_delays: Sequence[float] = (1.0, 5.0, 30.0),
        delivery_timeout: float = 3.0,
        delivery_batch_size: int = 1,
        delivery_batch_window: float = 0.0,
        validation_timeout: float = 10.0,
        tenant_id: str = "7d5b3a4e-1c2f-4e8a-9b6d-0a1b2c3d4e5f",
        app_roles: frozenset[str] = DEFAULT_APP_ROLES,
    ) -> None:
        """``latency`` seconds are added to every answer (one per round trip: a
        ``$batch`` costs one). ``lag`` is how many seconds old the replica is that
        serves reads of groups, members, users and delta rounds;
        ``deleted_items_lag`` the same for ``/directory/deletedItems`` (a replica
        that may be fresher). All three may be changed while serving. ``seed``
        orders the responses inside a batch (they come back shuffled).

        ``delivery_*`` shape change-notification delivery: the waits between
        attempts after a failed POST (no answer, non-2xx, or slower than
        ``delivery_timeout``), the most items per POST, and how long to gather
        items before a POST. ``validation_timeout`` bounds the subscription
        handshake (10 s at Graph)."""
        if page_size < 1 or member_page_size < 1:
            raise ValueError("page sizes must be positive")
        if delivery_batch_size < 1 or delivery_timeout <= 0 or validation_timeout <= 0:
            raise ValueError("batch size and timeouts must be positive")
        if latency < 0 or lag < 0 or deleted_items_lag < 0:
            raise ValueError("latency and lags must not be negative")
        self.tenant = tenant if tenant is not None else Tenant()
        #: the application permissions of a request without a bearer token (settable)
        self.app_roles = frozenset(app_roles)
        self._request = threading.local()
        self.page_size = page_size
        self.member_page_size = member_page_size
        #: seconds added to every answer (settable while serving)
        self.latency = float(latency)
        #: age in seconds of the replica serving reads (settable while serving)
        self.lag = float(lag)
        #: age in seconds of the replica serving the recycle bin (settable while serving)
        self.deleted_items_lag = float(deleted_items_lag)
        self._pinned: int | None = None
        self._pinned_deleted: int | None = None
        self._rng = random.Random(seed)
        self._log_entries: list[LoggedRequest] = []
        self._batches = 0
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._cursors: OrderedDict[str, tuple[str, list[bytes]]] = OrderedDict()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None
        self._init_notifications(
            tenant_id=tenant_id,
            delivery_retry_delays=tuple(float(d) for d in delivery_retry_delays),
            delivery_timeout=delivery_timeout,
            delivery_batch_size=delivery_batch_size,
            delivery_batch_window=delivery_batch_window,
            validation_timeout=validation_timeout,
        )

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

    # ----------------------------------------------------------------- replicas

    def replica_sequence(self) -> int | None:
        """The tenant sequence number reads are served at now (None: the latest)."""
        return self._replica(self._pinned, self.lag)

    def deleted_items_sequence(self) -> int | None:
        """The same for ``/directory/deletedItems``."""
        return self._replica(self._pinned_deleted, self.deleted_items_lag)

    def _replica(self, pinned: int | None, lag: float) -> int | None:
        if pinned is not None:
            return pinned
        if lag <= 0:
            return None
        return self.tenant.sequence_at(time.monotonic() - lag)

    def freeze_replica(self, *, deleted_items: bool = False) -> int:
        """Serve reads as the tenant is now until :meth:`release_replica`, whatever
        changes meanwhile (``lag`` is ignored while frozen); with ``deleted_items``
        the recycle bin freezes too, else it keeps its own lag. Returns the
        sequence number frozen at."""
        seq = self.tenant.sequence
        with self._lock:
            self._pinned = seq
            if deleted_items:
                self._pinned_deleted = seq
        return seq

    def release_replica(self) -> None:
        """Let reads catch up again (back to ``lag`` and ``deleted_items_lag``)."""
        with self._lock:
            self._pinned = self._pinned_deleted = None

    @contextlib.contextmanager
    def frozen_replica(self, *, deleted_items: bool = False) -> Iterator[int]:
        """:meth:`freeze_replica` for the ``with`` block."""
        seq = self.freeze_replica(deleted_items=deleted_items)
        try:
            yield seq
        finally:
            self.release_replica()

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
        code: str | None = None,
        message: str | None = None,
    ) -> None:
        """Fail the next ``times`` matching requests (or a random share ``rate`` of
        them, forever) with ``status`` and Graph's error body (``code`` and
        ``message`` when given); ``Retry-After`` is sent when ``retry_after`` is
        given (fractions allowed, for fast tests). ``path_contains`` matches the
        URL-decoded path and query. Requests inside a ``$batch`` are matched one
        by one (the failure is that item's answer); the envelope is matched as
        ``/v1.0/$batch``, so ``path_contains="/$batch"`` throttles whole batches."""
        self._add_fault(
            status,
            times,
            rate,
            seed,
            lambda target: path_contains in target,
            retry_after=retry_after,
            code=code,
            message=message,
        )

    def inject_not_found(self, object_id: str, *, times: int = 1) -> None:
        """Answer the next ``times`` reads of this group (the group, its members or
        its recycle-bin entry) with Graph's 404 ``Request_ResourceNotFound``, as a
        replica that has not seen it yet would, although it exists."""
        prefixes = (f"/groups/{object_id}", f"/directory/deletedItems/{object_id}")

        def matches(target: str) -> bool:
            path = target.split("?", 1)[0]
            return any(path.endswith(prefix) or f"{prefix}/" in path for prefix in prefixes)

        error = not_found(object_id)
        self._add_fault(404, times, None, 0, matches, code=error.code, message=error.message)

    def refuse_delta_link(
        self,
        status: int = 400,
        code: str = "Directory_ExpiredPageToken",
        *,
        group_id: str | None = None,
        times: int = 1,
        message: str | None = None,
    ) -> None:
        """Refuse the next ``times`` uses of a delta link (a ``$deltatoken`` other
        than ``latest``; only links narrowed to ``group_id`` when given) with
        ``status`` and ``code``: 400 ``Directory_ExpiredPageToken``, 410
        ``syncStateNotFound``/``resyncRequired`` (with Graph's ``Location``
        header), or any other 4xx."""

        def matches(target: str) -> bool:
            query = dict(parse_qsl(urlsplit(target).query, keep_blank_values=True))
            token = query.get("$deltatoken") or query.get("$deltaToken")
            if not token or token.lower() == "latest":
                return False
            return group_id is None or group_id in (_token_ids(token) or ())

        headers: tuple[tuple[str, str], ...] = ()
        if status == 410:
            headers = (("Location", f"{self.url}/groups/delta"),)
        self._add_fault(
            status,
            times,
            None,
            0,
            matches,
            code=code,
            message=message or _DELTA_REFUSALS.get(code, "The delta link was refused."),
            headers=headers,
        )

    def inject_delay(self, seconds: float, *, times: int = 1, path_contains: str = "") -> None:
        """Answer the next ``times`` matching requests normally, but ``seconds`` late
        (inside a batch, the whole batch is that much later)."""
        with self._lock:
            self._faults.append(
                _Fault(
                    0,
                    times,
                    None,
                    lambda target: path_contains in target,
                    None,
                    random.Random(0),
                    delay=seconds,
                )
            )

    def inject_disconnect(self, *, times: int = 1, path_contains: str = "") -> None:
        """Close the connection of the next ``times`` matching requests unanswered
        (round trips only: a request inside a batch cannot lose its connection)."""
        with self._lock:
            self._faults.append(
                _Fault(
                    0,
                    times,
                    None,
                    lambda target: path_contains in target,
                    None,
                    random.Random(0),
                    disconnect=True,
                )
            )

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _add_fault(
        self,
        status: int,
        times: int,
        rate: float | None,
        seed: int,
        matches: Callable[[str], bool],
        *,
        retry_after: float | None = None,
        code: str | None = None,
        message: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be within 0..1")
        if rate is None and times < 1:
            raise ValueError("times must be at least 1")
        if not 400 <= status <= 599:
            raise ValueError("an injected status is a 4xx or 5xx")
        fault = _Fault(
            status,
            None if rate is not None else times,
            retry_after,
            matches,
            rate,
            random.Random(seed),
            code=code,
            message=message,
            headers=headers,
        )
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, target: str, *, in_batch: bool = False) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if (in_batch and fault.disconnect) or not fault.matches(target):
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

    @staticmethod
    def _fault_response(fault: _Fault, request_id: str) -> Response:
        headers = fault.headers
        if fault.retry_after is not None:
            headers = (*headers, ("Retry-After", format(fault.retry_after, "g")))
        code = fault.code or ERROR_CODES.get(fault.status, "UnknownError")
        message = fault.message or f"Injected fault {fault.status}."
        return Response(fault.status, error_body(code, message, request_id), headers)

    # ----------------------------------------------------------------- log

    def _log(
        self,
        method: str,
        target: str,
        status: int,
        *,
        batch: int | None = None,
        envelope: bool = False,
    ) -> None:
        with self._lock:
            self._log_entries.append(LoggedRequest(method, target, status, batch, envelope))

    @property
    def log(self) -> list[LoggedRequest]:
        """Every request answered so far, in order (a copy); batch envelopes
        after the requests they carried."""
        with self._lock:
            return list(self._log_entries)

    @property
    def requests(self) -> list[tuple[str, str, int]]:
        """``(method, target, status)`` of every logged request (envelopes included)."""
        with self._lock:
            return [(r.method, r.target, r.status) for r in self._log_entries]

    def count(self, path_contains: str = "", *, batched: bool | None = None) -> int:
        """Graph requests whose target contains ``path_contains``, each request
        inside a batch counted on its own and the ``$batch`` envelopes not at all;
        ``batched`` True or False counts only those sent inside batches or alone."""
        with self._lock:
            return sum(
                1
                for r in self._log_entries
                if not r.envelope
                and path_contains in r.target
                and (batched is None or (r.batch is not None) == batched)
            )

    def round_trips(self, path_contains: str = "") -> int:
        """HTTP exchanges: requests sent alone whose target contains
        ``path_contains`` plus ``$batch`` envelopes that carried such a request
        (or, with ``path_contains="/$batch"``, every envelope)."""
        with self._lock:
            alone = sum(
                1
                for r in self._log_entries
                if r.batch is None and not r.envelope and path_contains in r.target
            )
            carried = {
                r.batch
                for r in self._log_entries
                if r.batch is not None and (path_contains in r.target)
            }
        return alone + len(carried)

    def reset_log(self) -> None:
        with self._lock:
            self._log_entries.clear()

    # ----------------------------------------------------------------- answering

    def answer(
        self,
        method: str,
        raw_target: str,
        body: bytes = b"",
        request_id: str = "",
        authorization: str | None = None,
    ) -> Response | None:
        """One HTTP exchange as the server makes it: the latency, the faults, the
        request (or the ``$batch`` it carries) and the log; None when the
        connection is to be dropped unanswered. ``authorization`` is the request's
        header: a bearer token's ``roles`` claim says what the app may read (the
        steps of a batch are read with the envelope's), none means ``app_roles``."""
        request_id = request_id or str(uuid.uuid4())
        try:
            self._request.roles = _token_roles(authorization)
        except GraphError as error:
            return Response(error.status, error_body(error.code, error.message, request_id))
        if self.latency > 0:
            time.sleep(self.latency)
        target = unquote(raw_target)
        if method == "POST" and urlsplit(target).path == _BATCH_PATH:
            with self._lock:
                self._batches += 1
                number = self._batches
            fault = self._take_fault(target)
            if fault is not None and fault.delay:
                time.sleep(fault.delay)
            if fault is not None and fault.disconnect:
                self._log(method, target, 0, batch=number, envelope=True)
                return None
            if fault is not None and fault.status:
                response = self._fault_response(fault, request_id)
            else:
                try:
                    response = self._batch(body, number)
                except GraphError as error:
                    response = Response(
                        error.status,
                        error_body(error.code, error.message, request_id),
                        error.headers,
                    )
            self._log(method, target, response.status, batch=number, envelope=True)
            return response
        return self._answer_one(method, raw_target, body, request_id, batch=None)

    def _answer_one(
        self, method: str, raw_target: str, body: bytes, request_id: str, *, batch: int | None
    ) -> Response | None:
        target = unquote(raw_target)
        fault = self._take_fault(target, in_batch=batch is not None)
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        if fault is not None and fault.disconnect:
            self._log(method, target, 0, batch=batch)
            return None
        if fault is not None and fault.status:
            response = self._fault_response(fault, request_id)
        else:
            try:
                response = self.handle_request(method, raw_target, body)
            except GraphError as error:
                response = Response(
                    error.status, error_body(error.code, error.message, request_id), error.headers
                )
        self._log(method, target, response.status, batch=batch)
        return response

    def handle_request(self, method: str, target: str, body: bytes = b"") -> Response:
        """Answer one request (no latency, faults or log): the subscription
        endpoints in the mixin, the reads in :meth:`handle`."""
        path = unquote(urlsplit(target).path)
        prefix = f"/{API_VERSION}/"
        segments = [s for s in path[len(prefix) :].split("/") if s]
        if path.startswith(prefix) and segments and segments[0] == "subscriptions":
            return self._subscriptions_endpoint(method, segments, body)
        return self.handle(method, target)

    # ----------------------------------------------------------------- $batch

    def _batch(self, body: bytes, number: int) -> Response:
        """``POST /$batch``: each request answered on its own, through the same
        faults, replica and log as a request sent alone; responses shuffled."""
        steps = _batch_steps(json_body(body))
        answers: dict[str, tuple[str, int, dict[str, str], bytes]] = {}
        for step in steps:
            step_id = str(step["id"])
            failed = [
                d for d in step.get("dependsOn") or () if not 200 <= answers[d.lower()][1] < 300
            ]
            if failed:
                error = error_body(
                    "FailedDependency",
                    f"The request depends on request(s) {', '.join(failed)} that failed.",
                    str(uuid.uuid4()),
                )
                answers[step_id.lower()] = (
                    step_id,
                    424,
                    {"Content-Type": "application/json"},
                    error,
                )
                continue
            answers[step_id.lower()] = (step_id, *self._batch_step(step, number))
        order = list(answers.values())
        self._rng.shuffle(order)
        parts = []
        for step_id, status, headers, content in order:
            head = dumps({"id": step_id, "status": status, "headers": headers})
            parts.append(head[:-1] + b',"body":' + content + b"}" if content else head)
        return json_response(b'{"responses":[' + b",".join(parts) + b"]}")

    def _batch_step(self, step: dict[str, Any], number: int) -> tuple[int, dict[str, str], bytes]:
        method = str(step["method"]).upper()
        url = str(step["url"])
        request_id = str(uuid.uuid4())
        relative = url if url.startswith("/") else "/" + url
        split = urlsplit(url)
        if split.scheme or split.netloc or url.startswith("//"):
            error = GraphError(
                400, "BadRequest", "Invalid request URL: a batch step's url is relative."
            )
        elif urlsplit(relative).path.rstrip("/") == "/$batch":
            error = GraphError(400, "BadRequest", "A batch request cannot contain a batch.")
        else:
            content = step.get("body")
            if isinstance(content, str):
                raw = content.encode("utf-8")
            else:
                raw = b"" if content is None else dumps(content)
            response = self._answer_one(
                method, f"/{API_VERSION}{relative}", raw, request_id, batch=number
            )
            if response is None:  # pragma: no cover - disconnects are skipped in batches
                response = Response(503, b"")
            headers = dict(response.headers)
            if response.body:
                headers = {"Content-Type": JSON_CONTENT_TYPE, **headers}
            return response.status, headers, response.body
        self._log(method, unquote(f"/{API_VERSION}{relative}"), error.status, batch=number)
        return (
            error.status,
            {"Content-Type": "application/json"},
            error_body(error.code, error.message, request_id),
        )

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
            raise GraphError(
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

    @property
    def hidden_members_visible(self) -> bool:
        """Whether the request being answered may see hidden memberships."""
        roles = getattr(self._request, "roles", None)
        return MEMBER_READ_HIDDEN in (self.app_roles if roles is None else roles)

    def handle(self, method: str, target: str) -> Response:
        """Answer one request; ``target`` is the raw request target."""
        if method != "GET":
            raise GraphError(
                405, "Request_BadRequest", f"The HTTP method '{method}' is not allowed."
            )
        parts = urlsplit(target)
        path = unquote(parts.path)
        query: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            query[key.lower().lstrip("$")] = value
        if path.startswith(f"/{_BETA}/"):
            return self._beta(path, query)
        prefix = f"/{API_VERSION}/"
        if not path.startswith(prefix):
            raise GraphError(404, "BadRequest", "Invalid version.")
        segments = [s for s in path[len(prefix) :].split("/") if s]
        return self._route(segments, query)

    def _route(self, segments: list[str], query: dict[str, str]) -> Response:
        """The v1.0 reads, by path segment."""
        match segments:
            case ["groups", "delta" | "delta()"]:
                response = self._delta("groups", query)
            case ["users", "delta" | "delta()"]:
                response = self._delta("users", query)
            case ["users"]:
                response = self._list_users(query)
            case ["groups", group_id]:
                response = self._get_group(group_id, query)
            case ["groups", group_id, "members", "microsoft.graph.user" | "graph.user"]:
                response = self._list_user_members(group_id, query)
            case ["groups", group_id, "members", "microsoft.graph.group" | "graph.group"]:
                response = self._list_group_members(group_id, query)
            case ["groups", group_id, "memberOf", "microsoft.graph.group" | "graph.group"]:
                response = self._list_member_of(group_id, query)
            case ["directory", "deletedItems", "microsoft.graph.group" | "graph.group"]:
                response = self._list_deleted_groups(query)
            case ["directory", "deletedItems", object_id]:
                response = self._get_deleted_item(object_id, query)
            case _:
                last = segments[-1] if segments else ""
                raise GraphError(400, "BadRequest", f"Resource not found for the segment '{last}'.")
        return response

    # ----------------------------------------------------------------- endpoints

    def _select(
        self, query: dict[str, str], kind: str, extra: Sequence[str] = ()
    ) -> list[str] | None:
        """The ``$select`` names, refused (400, as Graph) when one is not a property
        of the type here; ``extra`` adds what only this call knows (the single-GET
        and beta-only properties)."""
        raw = query.get("select")
        if raw is None:
            return None
        names = [n.strip() for n in raw.split(",") if n.strip()]
        if kind == "groups":
            allowed = {"id", "members", *GROUP_PROPERTIES, *extra}
        elif kind == "deletedItems":
            allowed = {"id", "displayName", "deletedDateTime"}
        else:
            allowed = {"id", *USER_PROPERTIES}
        type_name = "user" if kind == "users" else "group"
        for name in names:
            if name not in allowed:
                raise GraphError(
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
        raise GraphError(
            410,
            "syncStateNotFound",
            "The delta token is not valid or has expired; restart with a full synchronization.",
            self._location_header(kind),
        )

    def _delta(self, kind: str, query: dict[str, str]) -> Response:
        for option in ("top", "orderby", "expand"):
            if option in query:
                raise GraphError(
                    400,
                    "Request_UnsupportedQuery",
                    f"Unsupported query option '${option}' for delta on {kind}.",
                )
        if "skiptoken" in query:
            return json_response(self._load_page(kind, query["skiptoken"]))
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
            return json_response(dumps(body))
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
                raise GraphError(
                    400,
                    "Request_UnsupportedQuery",
                    f"Unsupported or invalid query filter clause specified for delta on {kind}.",
                )
            ids.append(match.group(1))
        if len(ids) > _MAX_DELTA_FILTER_IDS:
            raise GraphError(
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
    ) -> Response:
        pages: list[list[dict[str, Any]]]
        if kind == "groups":
            upto, group_items = self.tenant.groups_round(
                since,
                select,
                ids,
                as_of=self.replica_sequence(),
                hidden_ok=self.hidden_members_visible,
            )
            pages = self._paginate_groups(group_items)
        else:
            upto, user_items = self.tenant.users_round(since, select, as_of=self.replica_sequence())
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
            serialized.append(dumps(body))
        if len(serialized) > 1:
            self._save_cursor(cursor, kind, serialized)
        return json_response(serialized[0])

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

    def _get_group(self, group_id: str, query: dict[str, str]) -> Response:
        select = self._select(query, "groups", SINGLE_GET_PROPERTIES)
        if select is not None and "members" in select:
            select = [s for s in select if s != "members"]
        body = self.tenant.group_for_read(group_id, select, as_of=self.replica_sequence())
        if body is None:
            raise not_found(group_id)
        out = {"@odata.context": self._context("groups", select, "/$entity"), **body}
        return json_response(dumps(out))

    def _top(self, query: dict[str, str]) -> int:
        raw = query.get("top")
        if raw is None:
            return _DEFAULT_TOP
        if not raw.isdigit() or not 1 <= int(raw) <= _MAX_TOP:
            raise GraphError(
                400,
                "Request_BadRequest",
                f"Invalid page size specified: '{raw}'. "
                f"Must be between 1 and {_MAX_TOP} inclusive.",
            )
        return int(raw)

    def _list(
        self, kind: str, link_path: str, context: str, values: list[dict[str, Any]], top: int
    ) -> Response:
        pages = [values[i : i + top] for i in range(0, len(values), top)] or [[]]
        cursor = self._new_cursor()
        serialized: list[bytes] = []
        for index, page in enumerate(pages):
            body: dict[str, Any] = {"@odata.context": context}
            if index + 1 < len(pages):
                body["@odata.nextLink"] = f"{self.url}/{link_path}?$skiptoken={cursor}~{index + 1}"
            body["value"] = page
            serialized.append(dumps(body))
        if len(serialized) > 1:
            self._save_cursor(cursor, kind, serialized)
        return json_response(serialized[0])

    def _list_user_members(self, group_id: str, query: dict[str, str]) -> Response:
        kind = f"members:{group_id}"
        if "skiptoken" in query:
            return json_response(self._load_page(kind, query["skiptoken"]))
        select = self._select(query, "users")
        top = self._top(query)
        members = self.tenant.user_members(
            group_id, select, as_of=self.replica_sequence(), hidden_ok=self.hidden_members_visible
        )
        if members is None:
            raise not_found(group_id)
        return self._list(
            kind,
            f"groups/{quote(group_id)}/members/microsoft.graph.user",
            self._context("users", select),
            members,
            top,
        )

    def _list_group_members(self, group_id: str, query: dict[str, str]) -> Response:
        """``GET /groups/{id}/members/microsoft.graph.group``: the member groups."""
        return self._list_related(
            group_id, query, "member-groups", "members", self.tenant.group_members
        )

    def _list_member_of(self, group_id: str, query: dict[str, str]) -> Response:
        """``GET /groups/{id}/memberOf/microsoft.graph.group``: the groups it is in
        (without Member.Read.Hidden, HiddenMembership groups are left out)."""
        read = self.tenant.member_of
        return self._list_related(group_id, query, "member-of", "memberOf", read)

    def _list_related(
        self,
        group_id: str,
        query: dict[str, str],
        kind: str,
        relation: str,
        read: Callable[..., list[Any] | None],
    ) -> Response:
        """One group's related groups (``read`` from the tenant), paged as Graph pages."""
        kind = f"{kind}:{group_id}"
        if "skiptoken" in query:
            return json_response(self._load_page(kind, query["skiptoken"]))
        select = self._select(query, "groups")
        found = read(group_id, as_of=self.replica_sequence(), hidden_ok=self.hidden_members_visible)
        if found is None:
            raise not_found(group_id)
        return self._list(
            kind,
            f"groups/{quote(group_id)}/{relation}/microsoft.graph.group",
            self._context("groups", select),
            found,
            self._top(query),
        )

    def _beta(self, path: str, query: dict[str, str]) -> Response:
        """The beta endpoint, as far as writeback reads it: ``GET /beta/groups``
        (``$select``, ``$filter=id in (...)``, ``$top``, paging) and ``GET
        /beta/groups/{id}``, where ``writebackConfiguration`` exists."""
        segments = [s for s in path[len(_BETA) + 2 :].split("/") if s]
        select = self._select(query, "groups", (*SINGLE_GET_PROPERTIES, *BETA_PROPERTIES))
        base = self.url.rsplit("/", 1)[0] + f"/{_BETA}"
        match segments:
            case ["groups"]:
                kind = "beta-groups"
                if "skiptoken" in query:
                    return json_response(self._load_page(kind, query["skiptoken"]))
                ids = self._in_filter(query) if "filter" in query else None
                values = self.tenant.groups_list(
                    select, ids, as_of=self.replica_sequence(), beta=True
                )
                top = self._top(query)
                pages = [values[i : i + top] for i in range(0, len(values), top)] or [[]]
                cursor = self._new_cursor()
                serialized = []
                for index, page in enumerate(pages):
                    body: dict[str, Any] = {"@odata.context": f"{base}/$metadata#groups"}
                    if index + 1 < len(pages):
                        body["@odata.nextLink"] = f"{base}/groups?$skiptoken={cursor}~{index + 1}"
                    body["value"] = page
                    serialized.append(dumps(body))
                if len(serialized) > 1:
                    self._save_cursor(cursor, kind, serialized)
                return json_response(serialized[0])
            case ["groups", group_id]:
                found = self.tenant.group_for_read(
                    group_id, select, as_of=self.replica_sequence(), beta=True
                )
                if found is None:
                    raise not_found(group_id)
                context = f"{base}/$metadata#groups/$entity"
                return json_response(dumps({"@odata.context": context, **found}))
            case _:
                last = segments[-1] if segments else ""
                raise GraphError(400, "BadRequest", f"Resource not found for the segment '{last}'.")

    @staticmethod
    def _in_filter(query: dict[str, str]) -> list[str]:
        raw = (query.get("filter") or "").strip()
        match = _ID_IN.fullmatch(raw)
        ids = _QUOTED.findall(match.group(1)) if match else []
        single = _ID_EQ.fullmatch(raw)
        if single is not None:
            ids = [single.group(1)]
        if not ids:
            raise GraphError(400, "Request_UnsupportedQuery", "Only $filter=id in (...) is served.")
        if len(ids) > _MAX_IN_VALUES:
            raise GraphError(
                400,
                "Request_UnsupportedQuery",
                f"Too many values in the 'in' clause: at most {_MAX_IN_VALUES}.",
            )
        return ids

    def _list_users(self, query: dict[str, str]) -> Response:
        """``GET /users?$filter=id in ('a','b')`` (or ``id eq 'a'``): users by id."""
        raw = (query.get("filter") or "").strip()
        match = _ID_IN.fullmatch(raw)
        ids = _QUOTED.findall(match.group(1)) if match else None
        single = _ID_EQ.fullmatch(raw)
        if single is not None:
            ids = [single.group(1)]
        if not ids:
            raise GraphError(
                400, "Request_UnsupportedQuery", "Only $filter=id in (...) is served on users."
            )
        if len(ids) > _MAX_IN_VALUES:
            raise GraphError(
                400,
                "Request_UnsupportedQuery",
                f"Too many values in the 'in' clause: at most {_MAX_IN_VALUES}.",
            )
        select = self._select(query, "users")
        values = self.tenant.users_by_id(ids, select, as_of=self.replica_sequence())
        return json_response(
            dumps({"@odata.context": self._context("users", select), "value": values})
        )

    def _get_deleted_item(self, object_id: str, query: dict[str, str]) -> Response:
        """``GET /directory/deletedItems/{id}``: the group if it is in the recycle bin."""
        select = self._select(query, "deletedItems")
        found = self.tenant.deleted_group(object_id, as_of=self.deleted_items_sequence())
        if found is None:
            raise not_found(object_id)
        deleted_at = self.tenant.changed_at(int(found.pop("deletedSeq")))
        found["deletedDateTime"] = graph_time(_wall_clock(deleted_at))
        if select is not None:
            found = {k: v for k, v in found.items() if k in ("@odata.type", "id", *select)}
        context = self._context("directory/deletedItems", select, "/$entity")
        return json_response(dumps({"@odata.context": context, **found}))

    def _list_deleted_groups(self, query: dict[str, str]) -> Response:
        kind = "deletedItems"
        if "skiptoken" in query:
            return json_response(self._load_page(kind, query["skiptoken"]))
        select = self._select(query, "groups")
        top = self._top(query)
        values: list[dict[str, Any]] = []
        for group_id in self.tenant.soft_deleted_group_ids(as_of=self.deleted_items_sequence()):
            values.append({"@odata.type": GROUP_TYPE, "id": group_id})
        return self._list(
            kind,
            "directory/deletedItems/microsoft.graph.group",
            self._context("directory/deletedItems/microsoft.graph.group", select),
            values,
            top,
        )


# --------------------------------------------------------------------------- helpers


def _batch_steps(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The steps of a batch payload, checked as Graph checks them (400 otherwise),
    in an order that runs every step after those it depends on."""
    steps = payload.get("requests")
    if not isinstance(steps, list) or not steps:
        raise GraphError(400, "BadRequest", "Invalid batch payload format.")
    if len(steps) > MAX_BATCH_REQUESTS:
        raise GraphError(
            400,
            "BadRequest",
            f"Number of batch request steps exceeds the maximum of {MAX_BATCH_REQUESTS}.",
        )
    seen: set[str] = set()
    for step in steps:
        if not isinstance(step, dict) or not all(
            isinstance(step.get(k), str) and step[k] for k in ("id", "method", "url")
        ):
            raise GraphError(
                400, "BadRequest", "Every batch step needs a string id, method and url."
            )
        key = step["id"].lower()
        if key in seen:
            raise GraphError(400, "BadRequest", f"Batch step id '{step['id']}' is not unique.")
        depends = step.get("dependsOn")
        if depends is not None and (
            not isinstance(depends, list)
            or not all(isinstance(d, str) and d.lower() in seen for d in depends)
        ):
            # Graph runs a step after the ones it names; here they must come first.
            raise GraphError(400, "BadRequest", "dependsOn must name steps listed before this one.")
        seen.add(key)
    return steps


def _token_ids(token: str) -> list[str] | None:
    """The group ids a delta token is narrowed to (None: not narrowed or not ours)."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    ids = data.get("f") if isinstance(data, dict) else None
    return [str(i) for i in ids] if isinstance(ids, list) else None


def _token_roles(authorization: str | None) -> frozenset[str] | None:
    """The roles of a bearer token (an unsigned JWT from :class:`StandInCredential`,
    or any JWT whose payload names ``roles``); None without a token (the
    configured roles apply); 401 for a token that is not a JWT, as Graph says."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    parts = token.split(".")
    try:
        if scheme.lower() != "bearer" or len(parts) != 3:
            raise ValueError("not a bearer JWT")
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        roles = payload.get("roles", []) if isinstance(payload, dict) else None
        if not isinstance(roles, list):
            raise ValueError("roles is not a list")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise GraphError(
            401, "InvalidAuthenticationToken", "Access token validation failure."
        ) from None
    return frozenset(str(r) for r in roles)


def _wall_clock(monotonic: float | None) -> datetime:
    """The wall-clock time of a ``time.monotonic()`` reading (now when None)."""
    now = time.time()
    if monotonic is not None:
        now -= time.monotonic() - monotonic
    return datetime.fromtimestamp(now, UTC)


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
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request_id = self.headers.get("client-request-id") or str(uuid.uuid4())
        response = self.server.standin.answer(
            method, self.path, body, request_id, self.headers.get("Authorization")
        )
        if response is None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(response.status)
        self.send_header("Content-Type", JSON_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("request-id", request_id)
        self.send_header("client-request-id", request_id)
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)
