"""What the cloud side and the on-premises agent say to each other over the relay.

Pure: JSON codecs for directory groups and planned operations, the request and
response signatures, and how errors travel as HTTP statuses. Both ends import
this one module, so the wire format cannot drift between them.

Every request is a ``POST /v1/<call>`` with a JSON body, signed with the caller
key both sides share: HMAC-SHA256 over the hybrid connection it is meant for
(namespace and name, so a request cannot be moved to another connection), method,
target, time, a nonce and the body's hash. Every answer is signed too, over the
request's nonce, the status and the body's hash, so whoever holds a Listen key
cannot answer in the agent's name ("done", or a schema of its choosing), nor pass
the agent's refusal of a forged copy off as the answer to the genuine request. The
relay's Send and Listen keys only prove someone may talk to the relay; the
signatures prove who is speaking and that a request is fresh.

Freshness: a request is valid from ``CLOCK_SKEW`` seconds before its stamp (the
sender's clock may be ahead) to ``REQUEST_WINDOW`` seconds after it, and its nonce
is kept at least until then, so no stamp outlives its nonce. ``REQUEST_WINDOW``
covers the relay's own 60 s response deadline and the skew; a request older than
that has been given up by its sender anyway.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from writeback.domain.guard import Ancestry, ParentGroup, Principal, PrincipalKind
from writeback.domain.model import (
    Add,
    Changes,
    Delete,
    DirectoryGroup,
    Modify,
    Operation,
    Rename,
)
from writeback.errors import (
    DirectoryRefused,
    DuplicateAnchor,
    LdapUnavailable,
    PermanentError,
    PolicyRefused,
    RelayRefused,
    RelayUnavailable,
    TransientError,
    WritebackError,
)

API_PREFIX = "/v1/"
#: Member SIDs per response page: about 1 MB of JSON, so a 250,000-member group
#: is 13 round trips and no single response needs much memory on either side.
MEMBER_PAGE = 20_000
#: SIDs per ``resolve_sids`` request (some 250 KB of JSON).
SID_PAGE = 5_000
#: How far ahead of the agent's clock a request's stamp may be.
CLOCK_SKEW = 30.0
#: How long after its stamp a request is accepted (the relay answers a sender
#: within 60 s or gives up; the rest is for clock skew).
REQUEST_WINDOW = 90.0

DATE_HEADER = "X-Writeback-Date"
NONCE_HEADER = "X-Writeback-Nonce"
SIGNATURE_HEADER = "X-Writeback-Signature"
#: The agent's signature over its answer.
REPLY_SIGNATURE_HEADER = "X-Writeback-Reply-Signature"


class ProtocolError(PermanentError):
    """A request or response that does not follow this module's format."""


class DirectoryChanged(TransientError):
    """The group changed under the request (between two pages of a read, or since
    the read a write was planned from): read and plan again."""


class ForgedReply(RelayUnavailable):
    """An answer that does not carry the agent's signature over our request.

    Someone other than our agent answered (a listener with a leaked Listen key,
    or a broken proxy), so the outcome is unknown: transient, the event is tried
    again and reaches a genuine agent."""


# -- signing ----------------------------------------------------------------------


def audience(namespace: str, path: str) -> str:
    """The hybrid connection a signature is bound to, in one spelling on both sides:
    lower case, without a scheme, a default port or surrounding slashes."""
    host = namespace.strip().lower()
    for prefix in ("sb://", "https://", "wss://"):
        host = host.removeprefix(prefix)
    host = host.rstrip("/").removesuffix(":443")
    return f"{host}/{path.strip().strip('/').lower()}"


def sign(
    key: str,
    method: str,
    target: str,
    body: bytes,
    *,
    audience: str,
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Headers that authenticate one request to the agent of ``audience``."""
    stamp = str(int(time.time() if now is None else now))
    nonce = nonce or secrets.token_urlsafe(16)
    return {
        DATE_HEADER: stamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: _mac(
            key, "request", (audience, method.upper(), target, stamp, nonce), body
        ),
    }


def sign_reply(
    key: str, audience: str, request: Mapping[str, str], status: int, body: bytes
) -> dict[str, str]:
    """The header that authenticates the agent's answer to ``request`` (its headers):
    bound to the request's nonce and signature, so an answer made for one request
    (a refusal of a forged copy, say) cannot pass for the answer to another."""
    return {
        REPLY_SIGNATURE_HEADER: _mac(key, "reply", _reply_parts(audience, request, status), body)
    }


def verify_reply(
    key: str,
    audience: str,
    request: Mapping[str, str],
    reply: tuple[int, Mapping[str, str], bytes],
) -> None:
    """Raises ForgedReply unless ``reply`` (status, headers, body) is our agent's
    answer to ``request`` (the headers we signed it with).

    An agent with another caller key signs its refusal with that key, so a key
    mismatch shows up here too: the message says what the answer claimed.
    """
    status, headers, body = reply
    given = _header(headers, REPLY_SIGNATURE_HEADER)
    expected = _mac(key, "reply", _reply_parts(audience, request, status), body)
    if given and hmac.compare_digest(expected.encode(), given.encode()):
        return
    claimed = _message(body)
    raise ForgedReply(
        f"an answer (HTTP {status}{': ' + claimed[:200] if claimed else ''}) "
        f"{'without a signature' if not given else 'not signed with our caller key'}: "
        "the caller keys differ, or something other than our agent answered"
    )


def _reply_parts(audience: str, request: Mapping[str, str], status: int) -> tuple[str, ...]:
    nonce, signature = _header(request, NONCE_HEADER), _header(request, SIGNATURE_HEADER)
    return (audience, nonce, signature, str(status))


def _mac(key: str, kind: str, parts: tuple[str, ...], body: bytes) -> str:
    """HMAC-SHA256 over the kind ("request" or "reply"), the parts and the body's hash,
    one per line (no part can hold a newline: they are headers, paths and host names)."""
    digest = hashlib.sha256(body).hexdigest()
    message = "\n".join((kind, *parts, digest)).encode()
    raw = hmac.new(key.encode(), message, hashlib.sha256).digest()
    return base64.b64encode(raw).decode()


def _header(headers: Mapping[str, str], name: str) -> str:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return ""


class NonceStore(Protocol):
    """Where seen nonces are kept until their request expires."""

    def claim(self, nonce: str, until: float, now: float) -> bool:
        """Record ``nonce`` until ``until``; False when it is already recorded."""
        ...


class MemoryNonces:
    """Nonces in this process only (tests, and a store's front cache)."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def claim(self, nonce: str, until: float, now: float) -> bool:
        with self._lock:
            if now >= self._next_sweep:
                self._seen = {n: t for n, t in self._seen.items() if t >= now}
                self._next_sweep = now + 10.0
            kept = self._seen.get(nonce)
            if kept is not None and kept >= now:
                return False
            self._seen[nonce] = until
            return True


class SignatureCheck:
    """Verifies requests for one hybrid connection and refuses replays.

    A nonce is claimed in ``nonces`` until its request's stamp + window: with a
    store on disk shared by the agents of a host, a replay is refused after a
    restart and by the host's other agents too.
    """

    def __init__(
        self,
        key: str,
        audience: str,
        *,
        nonces: NonceStore | None = None,
        window: float = REQUEST_WINDOW,
        skew: float = CLOCK_SKEW,
    ) -> None:
        self._key = key
        self._audience = audience
        self._nonces: NonceStore = nonces if nonces is not None else MemoryNonces()
        self._window = window
        self._skew = skew

    def verify(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        now: float | None = None,
    ) -> str:
        """The request's nonce; raises RelayRefused naming what is wrong (never the
        key or the signature)."""
        now = time.time() if now is None else now
        stamp = _header(headers, DATE_HEADER)
        nonce = _header(headers, NONCE_HEADER)
        given = _header(headers, SIGNATURE_HEADER)
        if not (stamp.isdigit() and nonce and given):
            raise RelayRefused("request is not signed")
        stamped = int(stamp)
        if stamped > now + self._skew:
            raise RelayRefused("request is stamped in the future (check both clocks)")
        if now - stamped > self._window:
            raise RelayRefused("request signature has expired (check both clocks)")
        parts = (self._audience, method.upper(), target, stamp, nonce)
        expected = _mac(self._key, "request", parts, body)
        if not hmac.compare_digest(expected.encode(), given.encode()):
            raise RelayRefused("request signature does not match the caller key")
        if not self._nonces.claim(nonce, stamped + self._window, now):
            raise RelayRefused("request was replayed")
        return nonce


# -- errors as statuses -------------------------------------------------------------

#: Status the agent answers for each error it raises; the cloud side maps back.
_STATUS_OF: tuple[tuple[type[WritebackError], int], ...] = (
    (RelayRefused, 401),
    (PolicyRefused, 403),
    (DirectoryChanged, 409),
    (ProtocolError, 400),
    (DirectoryRefused, 422),
    (LdapUnavailable, 503),
)


def status_for(error: WritebackError) -> int:
    for kind, status in _STATUS_OF:
        if isinstance(error, kind):
            return status
    return 500


def error_body(error: WritebackError) -> bytes:
    body: dict[str, Any] = {"error": type(error).__name__, "message": str(error)}
    if isinstance(error, DuplicateAnchor):
        body["duplicates"] = {gid: list(dns) for gid, dns in error.duplicates.items()}
    return json.dumps(body).encode()


def error_from(status: int, body: bytes) -> WritebackError:
    """The error the agent reported, as the cloud side raises it.

    Statuses the agent never sends (a relay gateway error, for example) and a
    500 from the agent are transient: the event is retried, not lost.
    """
    message = _message(body) or f"agent answered HTTP {status}"
    duplicates = _duplicates(body) if status == status_for(DirectoryRefused("")) else None
    if duplicates is not None:
        return DuplicateAnchor(duplicates, message=message)
    for kind, known in _STATUS_OF:
        if known == status:
            return kind(message)
    return RelayUnavailable(f"agent answered HTTP {status}: {message}")


def _duplicates(body: bytes) -> dict[str, tuple[str, ...]] | None:
    """The duplicates a DuplicateAnchor refusal names, or None for any other error."""
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    if not isinstance(decoded, dict) or decoded.get("error") != DuplicateAnchor.__name__:
        return None
    found = decoded.get("duplicates")
    if not isinstance(found, dict):
        return {}
    return {str(gid): _texts(dns, "duplicates") for gid, dns in found.items()}


def _message(body: bytes) -> str:
    try:
        decoded = json.loads(body)
    except ValueError:
        return ""
    return str(decoded.get("message", "")) if isinstance(decoded, dict) else ""


# -- groups -------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupPage:
    """A group as sent: its attributes and one page of its member SIDs.

    ``members_total`` tells the reader whether more pages follow; ``digest`` ties
    the pages to one reading of the group, so pages of two different states are
    never merged.
    """

    group: DirectoryGroup
    members_total: int
    offset: int
    digest: str

    @property
    def complete(self) -> bool:
        return self.offset == 0 and len(self.group.member_sids) == self.members_total


def member_digest(sids: list[str]) -> str:
    return hashlib.sha256("\n".join(sids).encode()).hexdigest()[:32]


def group_page(
    group: DirectoryGroup,
    sorted_sids: list[str],
    digest: str,
    offset: int,
    page_size: int = MEMBER_PAGE,
) -> dict[str, Any]:
    """One page of ``group`` as JSON; ``sorted_sids`` is its member SIDs in order."""
    return {
        "dn": group.dn,
        "group_id": group.group_id,
        "attributes": {name: list(values) for name, values in group.attributes.items()},
        "object_sid": group.object_sid,
        "other_members": sorted(group.other_members),
        "member_sids": sorted_sids[offset : offset + page_size],
        "members_total": len(sorted_sids),
        "offset": offset,
        "digest": digest,
    }


def parse_group_page(data: object) -> GroupPage:
    item = _object(data, "group")
    attributes = _object(item.get("attributes"), "attributes")
    group = DirectoryGroup(
        dn=text_field(item, "dn"),
        group_id=text_field(item, "group_id"),
        attributes={name: _texts(values, name) for name, values in attributes.items()},
        member_sids=frozenset(_texts(item.get("member_sids"), "member_sids")),
        other_members=frozenset(_texts(item.get("other_members"), "other_members")),
        object_sid=_optional_text(item, "object_sid"),
    )
    return GroupPage(
        group=group,
        members_total=whole_field(item, "members_total"),
        offset=whole_field(item, "offset"),
        digest=text_field(item, "digest"),
    )


# -- the guards' reads ------------------------------------------------------------------


def principal_to_json(principal: Principal) -> dict[str, Any]:
    return {
        "sid": principal.sid,
        "dn": principal.dn,
        "kind": principal.kind.value,
        "admin_count": principal.admin_count,
        "group_id": principal.group_id,
    }


def parse_principal(data: object) -> Principal:
    item = _object(data, "principal")
    try:
        kind = PrincipalKind(text_field(item, "kind"))
    except ValueError:
        raise ProtocolError(f"unknown principal kind {item.get('kind')!r}") from None
    return Principal(
        sid=text_field(item, "sid"),
        dn=text_field(item, "dn"),
        kind=kind,
        admin_count=item.get("admin_count") is True,
        group_id=_optional_text(item, "group_id"),
    )


def ancestry_to_json(ancestry: Ancestry) -> dict[str, Any]:
    return {
        "parents": {gid: list(dns) for gid, dns in ancestry.parents.items()},
        "groups": [
            {
                "dn": g.dn,
                "sid": g.sid,
                "admin_count": g.admin_count,
                "builtin": g.builtin,
                "name": g.name,
                "parents": list(g.parents),
                "readable": g.readable,
            }
            for g in ancestry.groups.values()
        ],
    }


def parse_ancestry(data: object) -> Ancestry:
    """The ancestry the agent read. What cannot be parsed fails the call (the guard
    never runs on half an answer)."""
    item = _object(data, "ancestry")
    parents = _object(item.get("parents", {}), "parents")
    groups_data = item.get("groups", [])
    if not isinstance(groups_data, list):
        raise ProtocolError("groups must be a list")
    groups = {}
    for raw in groups_data:
        g = _object(raw, "group")
        group = ParentGroup(
            dn=text_field(g, "dn"),
            sid=_optional_text(g, "sid"),
            admin_count=g.get("admin_count") is True,
            builtin=g.get("builtin") is True,
            name=_optional_text(g, "name") or "",
            parents=_texts(g.get("parents", []), "parents"),
            readable=g.get("readable") is not False,
        )
        groups[group.dn] = group
    return Ancestry(
        parents={str(gid): _texts(dns, "parents") for gid, dns in parents.items()},
        groups=groups,
    )


# -- operations ---------------------------------------------------------------------


def operation_to_json(operation: Operation) -> dict[str, Any]:
    data: dict[str, Any] = {
        "kind": operation.kind,
        "group_id": operation.group_id,
        "dn": operation.dn,
    }
    if isinstance(operation, Add):
        data["attributes"] = {n: list(v) for n, v in operation.attributes.items()}
        data["members"] = list(operation.members)
    elif isinstance(operation, Modify):
        data["changes"] = _changes_to_json(operation.changes)
    elif isinstance(operation, Rename):
        data["new_rdn"] = operation.new_rdn
        data["changes"] = _changes_to_json(operation.changes)
    return data


def _changes_to_json(changes: Changes) -> dict[str, Any]:
    return {
        "replace": {n: list(v) for n, v in changes.replace.items()},
        "add_members": list(changes.add_members),
        "remove_members": list(changes.remove_members),
    }


def parse_operation(data: object) -> Operation:
    """An operation from untrusted JSON; ProtocolError for anything malformed."""
    item = _object(data, "operation")
    kind, group_id, dn = (
        text_field(item, "kind"),
        text_field(item, "group_id"),
        text_field(item, "dn"),
    )
    if kind == "add":
        attributes = _object(item.get("attributes"), "attributes")
        return Add(
            group_id=group_id,
            dn=dn,
            attributes={n: _texts(v, n) for n, v in attributes.items()},
            members=_texts(item.get("members"), "members"),
        )
    if kind == "modify":
        return Modify(group_id=group_id, dn=dn, changes=_parse_changes(item.get("changes")))
    if kind == "rename":
        return Rename(
            group_id=group_id,
            dn=dn,
            new_rdn=text_field(item, "new_rdn"),
            changes=_parse_changes(item.get("changes")),
        )
    if kind == "delete":
        return Delete(group_id=group_id, dn=dn)
    raise ProtocolError(f"unknown operation kind {kind!r}")


def _parse_changes(data: object) -> Changes:
    item = _object(data, "changes")
    replace = _object(item.get("replace", {}), "replace")
    return Changes(
        replace={n: _texts(v, n) for n, v in replace.items()},
        add_members=_texts(item.get("add_members", []), "add_members"),
        remove_members=_texts(item.get("remove_members", []), "remove_members"),
    )


# -- bodies -------------------------------------------------------------------------


def encode(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def decode(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise ProtocolError(f"body is not JSON: {error}") from None
    return _object(data, "body")


def _object(data: object, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return data


def text_field(item: Mapping[str, Any], name: str) -> str:
    """A non-empty string field of a request or response, else ProtocolError."""
    value = item.get(name)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{name} must be a non-empty string")
    return value


def _optional_text(item: Mapping[str, Any], name: str) -> str | None:
    value = item.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{name} must be a string")
    return value


def _texts(values: object, name: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ProtocolError(f"{name} must be a list of strings")
    return tuple(values)


def whole_field(item: Mapping[str, Any], name: str, default: int | None = None) -> int:
    """A non-negative int field; ``default`` when it is absent (None: required)."""
    value = item.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{name} must be a whole number")
    return value
