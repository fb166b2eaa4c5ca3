"""The Directory port through the relay: AD as the on-premises agent serves it.

Python function apps run on Linux, where App Service Hybrid Connections are not
available, so the cloud side reaches AD through an Azure Relay Hybrid Connection
to our agent (:mod:`writeback.hosting.agent`). This adapter turns each port call
into signed requests (:mod:`writeback.agent_protocol`): one relay round trip per
LDAP operation, member lists paged, so neither side holds a 250,000-member
group in one message.

Every request is signed for the transport's hybrid connection, and every
answer must carry the agent's signature over that request: an answer without it
(someone else holding a Listen key, a broken proxy) is never believed, whatever
it says; it is a ForgedReply, transient, so the event waits for a genuine agent.

Only a paged read that saw its group change between pages is read again here;
otherwise reads and writes raise our transient errors (relay or agent
unavailable, AD unavailable) and the worker's own retry re-reads and re-plans,
which is what makes a retried write safe. A refusal by the agent's policy is a
PolicyRefused, as it would be from the LDAP adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from writeback.agent_protocol import (
    API_PREFIX,
    SID_PAGE,
    DirectoryChanged,
    ForgedReply,
    GroupPage,
    encode,
    error_from,
    operation_to_json,
    parse_ancestry,
    parse_group_page,
    parse_principal,
    sign,
    verify_reply,
)
from writeback.agent_protocol import decode as decode_body
from writeback.domain.guard import Ancestry, Principal
from writeback.domain.model import DirectoryGroup, Operation
from writeback.errors import DuplicateAnchor, WritebackError
from writeback.ports import apply_each

log = logging.getLogger(__name__)

#: Reads of one group that saw it change between pages before giving up (transient).
_READ_ATTEMPTS = 3


class RelayReply(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def body(self) -> bytes: ...


class RelayTransport(Protocol):
    """The sender side of the hybrid connection (or anything that speaks like it)."""

    @property
    def audience(self) -> str:
        """The hybrid connection requests are signed for (``agent_protocol.audience``)."""
        ...

    def request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> RelayReply: ...

    def close(self) -> None: ...


class RelayDirectory:
    """AD under the agent's target OU, reached over the relay."""

    def __init__(self, transport: RelayTransport, caller_key: str, *, target_ou: str) -> None:
        self._transport = transport
        self._caller_key = caller_key
        self._target_ou = target_ou
        self._schema: frozenset[str] | None = None
        #: Relay round trips so far, for tests and benchmarks.
        self.round_trips = 0

    @property
    def target_ou(self) -> str:
        return self._target_ou

    def __repr__(self) -> str:
        return f"RelayDirectory(target_ou={self._target_ou!r})"

    def close(self) -> None:
        self._transport.close()

    def schema_attributes(self) -> frozenset[str]:
        if self._schema is None:
            names = self._call("schema", {}).get("attributes", [])
            self._schema = frozenset(str(name) for name in names)
        return self._schema

    def find_group(self, group_id: str) -> DirectoryGroup | None:
        for _ in range(_READ_ATTEMPTS):
            try:
                return self._read_group(group_id)
            except DirectoryChanged:
                log.info("group %s changed while its members were read; reading again", group_id)
        raise DirectoryChanged(f"group {group_id} kept changing while it was read")

    def find_groups(
        self, group_ids: Sequence[str], *, members: bool = True
    ) -> dict[str, DirectoryGroup]:
        """One agent call per group (the agent has no batched read yet). A group whose
        anchor is duplicated does not fail the others: DuplicateAnchor names it,
        with what was found for the rest."""
        read = self.find_group if members else self.find_group_attributes
        found: dict[str, DirectoryGroup] = {}
        duplicates: dict[str, tuple[str, ...]] = {}
        for group_id in dict.fromkeys(group_ids):
            try:
                group = read(group_id)
            except DuplicateAnchor as duplicate:
                duplicates.update(duplicate.duplicates or {group_id: ()})
                continue
            if group is not None:
                found[group_id] = group
        if duplicates:
            raise DuplicateAnchor(duplicates, found)
        return found

    def find_group_attributes(self, group_id: str) -> DirectoryGroup | None:
        reply = self._call("find_group", {"group_id": group_id, "members": False})
        return None if reply.get("group") is None else parse_group_page(reply["group"]).group

    def iter_groups(self) -> Iterator[DirectoryGroup]:
        listing: str | None = None
        after: list[str] | None = None
        while True:
            reply = self._call("list_groups", {"listing": listing, "after": after})
            listing = str(reply.get("listing") or "")
            for data in reply.get("groups", []):
                page = parse_group_page(data)
                yield page.group if page.complete else self._rest_of(page)
            after = reply.get("next")
            if not after:
                return

    def resolve_sids(self, sids: Sequence[str]) -> dict[str, Principal]:
        """The agent resolves them, ``SID_PAGE`` per call."""
        wanted = list(dict.fromkeys(sids))
        found: dict[str, Principal] = {}
        for start in range(0, len(wanted), SID_PAGE):
            reply = self._call("resolve_sids", {"sids": wanted[start : start + SID_PAGE]})
            for item in reply.get("principals", []):
                principal = parse_principal(item)
                found[principal.sid] = principal
        return found

    def group_ancestry(self) -> Ancestry:
        return parse_ancestry(self._call("group_ancestry", {}).get("ancestry"))

    def apply(self, operation: Operation) -> int:
        reply = self._call("apply", {"operation": operation_to_json(operation)})
        requests = reply.get("requests", 0)
        return requests if isinstance(requests, int) else 0

    def apply_all(self, operations: Sequence[Operation]) -> list[int | WritebackError]:
        """One relay round trip per operation (the agent checks each on its own)."""
        return apply_each(self.apply, operations)

    # ------------------------------------------------------------------ internals

    def _read_group(self, group_id: str) -> DirectoryGroup | None:
        reply = self._call("find_group", {"group_id": group_id, "offset": 0})
        if reply.get("group") is None:
            return None
        page = parse_group_page(reply["group"])
        return page.group if page.complete else self._rest_of(page)

    def _rest_of(self, first: GroupPage) -> DirectoryGroup:
        """Completes a group whose members span several pages of the same reading."""
        sids = set(first.group.member_sids)
        while len(sids) < first.members_total:
            reply = self._call(
                "find_group",
                {"group_id": first.group.group_id, "offset": len(sids), "digest": first.digest},
            )
            if reply.get("group") is None:
                raise DirectoryChanged(f"group {first.group.group_id} vanished while read")
            page = parse_group_page(reply["group"])
            if page.digest != first.digest or not page.group.member_sids:
                raise DirectoryChanged(f"group {first.group.group_id} changed while read")
            sids.update(page.group.member_sids)
        return DirectoryGroup(
            dn=first.group.dn,
            group_id=first.group.group_id,
            attributes=first.group.attributes,
            member_sids=frozenset(sids),
            other_members=first.group.other_members,
            object_sid=first.group.object_sid,
        )

    def _call(self, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        target = API_PREFIX + name
        body = encode(payload)
        headers = {"Content-Type": "application/json"}
        audience = self._transport.audience
        headers.update(sign(self._caller_key, "POST", target, body, audience=audience))
        self.round_trips += 1
        reply = self._transport.request("POST", target, body, headers)
        try:
            verify_reply(
                self._caller_key, audience, headers, (reply.status, reply.headers, reply.body)
            )
        except ForgedReply as forged:
            log.warning("relay call %s: %s; not believed", name, forged)
            raise
        if reply.status != 200:
            raise error_from(reply.status, reply.body)
        return decode_body(reply.body)
