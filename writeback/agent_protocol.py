"""What the cloud side and the on-premises agent say to each other over the relay.

Pure: JSON codecs for directory groups and planned operations, the request
signature, and how errors travel as HTTP statuses. Both ends import this one
module, so the wire format cannot drift between them.

Every request is a ``POST /v1/<call>`` with a JSON body, signed with the caller
key both sides share (HMAC-SHA256 over method, target, time, nonce and the body's
hash). The relay's Send key only proves someone may talk to the relay; the
signature proves the request comes from our cloud side and was not replayed, so
a leaked Send key alone cannot drive the agent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
#: How far apart the two clocks may be, and so how long a nonce is remembered.
MAX_CLOCK_SKEW = 300.0

DATE_HEADER = "X-Writeback-Date"
NONCE_HEADER = "X-Writeback-Nonce"
SIGNATURE_HEADER = "X-Writeback-Signature"


class ProtocolError(PermanentError):
    """A request or response that does not follow this module's format."""


class DirectoryChanged(TransientError):
    """The group changed under the request (between two pages of a read, or since
    the read a write was planned from): read and plan again."""


# -- signing ----------------------------------------------------------------------


def sign(
    key: str, method: str, target: str, body: bytes, *, now: float | None = None
) -> dict[str, str]:
    """Headers that authenticate one request to the agent."""
    stamp = str(int(time.time() if now is None else now))
    nonce = secrets.token_urlsafe(16)
    return {
        DATE_HEADER: stamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: _mac(key, method, target, body, stamp=stamp, nonce=nonce),
    }


def _mac(key: str, method: str, target: str, body: bytes, *, stamp: str, nonce: str) -> str:
    digest = hashlib.sha256(body).hexdigest()
    message = "\n".join((method.upper(), target, stamp, nonce, digest)).encode()
    raw = hmac.new(key.encode(), message, hashlib.sha256).digest()
    return base64.b64encode(raw).decode()


class SignatureCheck:
    """Verifies signatures and refuses a nonce seen within the skew window (replays)."""

    def __init__(self, key: str, *, skew: float = MAX_CLOCK_SKEW) -> None:
        self._key = key
        self._skew = skew
        self._seen: dict[str, float] = {}

    def verify(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        now: float | None = None,
    ) -> None:
        """Raises RelayRefused naming what is wrong (never the key or the signature)."""
        now = time.time() if now is None else now
        lower = {k.lower(): v for k, v in headers.items()}
        stamp = lower.get(DATE_HEADER.lower(), "")
        nonce = lower.get(NONCE_HEADER.lower(), "")
        given = lower.get(SIGNATURE_HEADER.lower(), "")
        if not (stamp.isdigit() and nonce and given):
            raise RelayRefused("request is not signed")
        if abs(now - int(stamp)) > self._skew:
            raise RelayRefused("request signature has expired (check both clocks)")
        expected = _mac(self._key, method, target, body, stamp=stamp, nonce=nonce)
        if not hmac.compare_digest(expected.encode(), given.encode()):
            raise RelayRefused("request signature does not match the caller key")
        self._forget_before(now - self._skew)
        if nonce in self._seen:
            raise RelayRefused("request was replayed")
        self._seen[nonce] = now

    def _forget_before(self, cutoff: float) -> None:
        for nonce in [n for n, at in self._seen.items() if at < cutoff]:
            del self._seen[nonce]


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
    return json.dumps({"error": type(error).__name__, "message": str(error)}).encode()


def error_from(status: int, body: bytes) -> WritebackError:
    """The error the agent reported, as the cloud side raises it.

    Statuses the agent never sends (a relay gateway error, for example) and a
    500 from the agent are transient: the event is retried, not lost.
    """
    message = _message(body) or f"agent answered HTTP {status}"
    for kind, known in _STATUS_OF:
        if known == status:
            return kind(message)
    return RelayUnavailable(f"agent answered HTTP {status}: {message}")


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
