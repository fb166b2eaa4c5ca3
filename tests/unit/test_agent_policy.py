"""The agent's own rules and the wire format between the cloud side and the agent."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from writeback.agent_protocol import (
    DATE_HEADER,
    SIGNATURE_HEADER,
    DirectoryChanged,
    ProtocolError,
    SignatureCheck,
    decode,
    encode,
    error_body,
    error_from,
    group_page,
    member_digest,
    operation_to_json,
    parse_group_page,
    parse_operation,
    sign,
    status_for,
)
from writeback.domain.model import (
    Add,
    Changes,
    Delete,
    DirectoryGroup,
    Modify,
    Operation,
    Rename,
    anchor_for,
)
from writeback.domain.policy import AgentPolicy, DeleteBudget, check_operation
from writeback.errors import (
    DirectoryRefused,
    LdapUnavailable,
    PolicyRefused,
    RelayRefused,
    RelayUnavailable,
    WritebackError,
)

OU = "OU=Writeback,DC=corp,DC=example"
GID = "3a5c3221-c465-48c0-95b8-e9305786a271"
DN = f"CN=Group_{GID},{OU}"
SID = "<SID=S-1-5-21-1-2-3-1105>"
POLICY = AgentPolicy(target_ou=OU)
KEY = "k" * 40


def _add(**attributes: tuple[str, ...]) -> Add:
    base = {"objectClass": ("group",), "adminDescription": (anchor_for(GID),), "groupType": ("8",)}
    return Add(group_id=GID, dn=DN, attributes={**base, **attributes}, members=(SID,))


def test_a_planned_operation_of_each_kind_passes() -> None:
    for operation in (
        _add(displayName=("Sales",)),
        Modify(GID, DN, Changes(replace={"displayName": ("x",)}, add_members=(SID,))),
        Rename(GID, DN, "CN=Sales_9305786a271"),
        Delete(GID, DN),
    ):
        check_operation(operation, POLICY)


@pytest.mark.parametrize(
    ("operation", "reason"),
    [
        (Delete(GID, "CN=Domain Admins,CN=Users,DC=corp,DC=example"), "not below"),
        (Delete(GID, OU), "not below"),
        (Modify(GID, f"CN=x,OU=Other,{OU[3:]}", Changes()), "not below"),
        (Delete("not-a-guid", DN), "not an Entra object id"),
        (_add(adminDescription=("Group_someone-else",)), "adminDescription"),
        (_add(objectClass=("user",)), "objectClass=group"),
        (_add(userAccountControl=("512",)), "not managed"),
        (Modify(GID, DN, Changes(replace={"adminDescription": ()})), "not managed"),
        (Modify(GID, DN, Changes(replace={"member": ("CN=x",)})), "not managed"),
        (
            Modify(GID, DN, Changes(add_members=("CN=Domain Admins,CN=Users,DC=corp",))),
            "<SID=...>",
        ),
        (Rename(GID, DN, "CN=a,OU=Elsewhere"), "single CN"),
        (Rename(GID, DN, "OU=Sneaky"), "single CN"),
    ],
)
def test_operations_that_reach_beyond_our_groups_are_refused(
    operation: Operation, reason: str
) -> None:
    with pytest.raises(PolicyRefused, match=reason.replace("(", r"\(")):
        check_operation(operation, POLICY)


def test_the_delete_budget_counts_over_a_sliding_window() -> None:
    now = [0.0]
    budget = DeleteBudget(2, 60.0, clock=lambda: now[0])
    budget.take()
    budget.take()
    with pytest.raises(PolicyRefused, match="delete limit"):
        budget.take()
    now[0] = 61.0
    budget.take()


def test_signatures_verify_once_and_refuse_tampering_replay_and_old_requests() -> None:
    check = SignatureCheck(KEY)
    headers = sign(KEY, "POST", "/v1/apply", b"{}", now=1000.0)
    check.verify("POST", "/v1/apply", headers, b"{}", now=1001.0)
    with pytest.raises(RelayRefused, match="replayed"):
        check.verify("POST", "/v1/apply", headers, b"{}", now=1002.0)
    fresh = sign(KEY, "POST", "/v1/apply", b"{}", now=1000.0)
    with pytest.raises(RelayRefused, match="does not match"):
        check.verify("POST", "/v1/apply", fresh, b'{"x":1}', now=1001.0)
    with pytest.raises(RelayRefused, match="does not match"):
        check.verify("POST", "/v1/schema", fresh, b"{}", now=1001.0)
    with pytest.raises(RelayRefused, match="expired"):
        check.verify("POST", "/v1/apply", fresh, b"{}", now=2000.0)
    other = sign("o" * 40, "POST", "/v1/apply", b"{}", now=1000.0)
    with pytest.raises(RelayRefused, match="does not match"):
        check.verify("POST", "/v1/apply", other, b"{}", now=1001.0)
    with pytest.raises(RelayRefused, match="not signed"):
        check.verify("POST", "/v1/apply", {DATE_HEADER: "1000"}, b"{}", now=1001.0)
    assert KEY not in str(fresh[SIGNATURE_HEADER])


@pytest.mark.parametrize(
    "error",
    [
        PolicyRefused("outside"),
        DirectoryRefused("constraint"),
        LdapUnavailable("dc down"),
        RelayRefused("bad signature"),
        DirectoryChanged("changed"),
    ],
)
def test_errors_travel_as_statuses_and_come_back_as_the_same_kind(error: WritebackError) -> None:
    back = error_from(status_for(error), error_body(error))
    assert type(back) is type(error)
    assert str(back) == str(error)


def test_unknown_statuses_are_transient_so_events_are_retried() -> None:
    assert isinstance(error_from(500, b"oops"), RelayUnavailable)
    assert isinstance(error_from(502, b""), RelayUnavailable)


_values = st.lists(st.text(min_size=1, max_size=20), max_size=3).map(tuple)


@given(
    st.dictionaries(st.sampled_from(["displayName", "mail", "proxyAddresses"]), _values),
    st.lists(st.from_regex(r"<SID=S-1-5-21-\d{1,5}>", fullmatch=True), max_size=4).map(tuple),
    st.text(min_size=1, max_size=30),
)
def test_operations_round_trip_through_json(
    replace: dict[str, tuple[str, ...]], members: tuple[str, ...], rdn: str
) -> None:
    changes = Changes(replace=replace, add_members=members, remove_members=members[:1])
    for operation in (
        Add(GID, DN, {"objectClass": ("group",), **replace}, members),
        Modify(GID, DN, changes),
        Rename(GID, DN, f"CN={rdn}", changes),
        Delete(GID, DN),
    ):
        assert parse_operation(decode(encode(operation_to_json(operation)))) == operation


def test_group_pages_carry_a_slice_and_the_digest_of_the_whole() -> None:
    sids = sorted(f"S-1-5-21-1-2-3-{n}" for n in range(5))
    group = DirectoryGroup(DN, GID, {"displayName": ("x",)}, frozenset(sids), frozenset(), "S-1")
    page = parse_group_page(decode(encode(group_page(group, sids, member_digest(sids), 2))))
    assert page.members_total == 5
    assert page.offset == 2
    assert page.group.member_sids == frozenset(sids[2:])
    assert not page.complete
    whole = parse_group_page(group_page(group, sids, member_digest(sids), 0))
    assert whole.complete
    assert whole.group == group


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"kind": "drop-table", "group_id": "g", "dn": "d"}',
        b'{"kind": "add", "group_id": "g", "dn": "d", "attributes": {"a": [1]}}',
        b'{"kind": "modify", "group_id": "", "dn": "d", "changes": {}}',
    ],
)
def test_malformed_operations_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_operation(decode(body))
