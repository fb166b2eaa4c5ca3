"""The agent's own rules and the wire format between the cloud side and the agent."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from writeback.adapters.agent_state import AgentStateStore
from writeback.agent_protocol import (
    DATE_HEADER,
    NONCE_HEADER,
    REQUEST_WINDOW,
    SIGNATURE_HEADER,
    DirectoryChanged,
    ForgedReply,
    ProtocolError,
    SignatureCheck,
    audience,
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
    sign_reply,
    status_for,
    verify_reply,
)
from writeback.domain.mapping import GroupType
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
from writeback.domain.naming import DnFormat
from writeback.domain.policy import AgentPolicy, DeleteBudget, check_operation, removals_by_dn
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
POLICY = AgentPolicy(target_ou=OU, mail_domains=frozenset({"contoso.com"}))
KEY = "k" * 40
HC = audience("contoso.servicebus.windows.net", "writeback-agent")
SECURITY = str(0x8 - 0x80000000)


def _add(dn: str = DN, **attributes: tuple[str, ...]) -> Add:
    base = {
        "objectClass": ("top", "group"),
        "adminDescription": (anchor_for(GID),),
        "groupType": ("8",),
        "sAMAccountName": ("Group_3a5c3221c46548",),
        "mail": ("sales@contoso.com",),
        "proxyAddresses": ("SMTP:sales@contoso.com", "smtp:sales@CONTOSO.com"),
    }
    return Add(group_id=GID, dn=dn, attributes={**base, **attributes}, members=(SID,))


def test_a_planned_operation_of_each_kind_passes() -> None:
    for operation in (
        _add(displayName=("Sales",)),
        Modify(GID, DN, Changes(replace={"displayName": ("x",)}, add_members=(SID,))),
        Modify(GID, DN, Changes(replace={"groupType": ("8",), "mail": ()})),
        Rename(GID, f"CN=Old name,{OU}", f"CN=Group_{GID}"),
        Delete(GID, DN),
    ):
        check_operation(operation, POLICY)
    by_name = AgentPolicy(
        target_ou=OU, dn_format=DnFormat.DISPLAY_NAME, group_type=GroupType.SECURITY
    )
    check_operation(Rename(GID, DN, r"CN=Sales\, EMEA_e9305786a271"), by_name)
    check_operation(
        _add(f"CN=Sales_e9305786a271,{OU}", groupType=(SECURITY,), mail=(), proxyAddresses=()),
        by_name,
    )


@pytest.mark.parametrize(
    ("operation", "reason"),
    [
        (Delete(GID, "CN=Domain Admins,CN=Users,DC=corp,DC=example"), "not below"),
        (Delete(GID, OU), "not below"),
        (Modify(GID, f"CN=x,OU=Other,{OU[3:]}", Changes()), "not below"),
        (Delete("not-a-guid", DN), "not an Entra object id"),
        (Delete(GID.upper(), DN), "lower-case GUID"),
        (Delete(f" {GID}", DN), "not an Entra object id"),
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
        # issue 12, finding 5: what a group may become inside the OU
        (_add(groupType=(SECURITY,)), "not this agent's group type"),
        (Modify(GID, DN, Changes(replace={"groupType": (SECURITY,)})), "group type"),
        (Modify(GID, DN, Changes(replace={"groupType": ()})), "group type"),
        (_add(f"CN=linux-admins,{OU}"), "not the CN writeback derives"),
        (_add(f"CN=Group_{GID},OU=Child,{OU}"), "directly in the target OU"),
        (Rename(GID, DN, "CN=linux-admins"), "not the CN writeback derives"),
        (_add(sAMAccountName=("linux-admins",)), "sAMAccountName=Group_3a5c3221c46548"),
        (_add(sAMAccountName=()), "sAMAccountName"),
        (Add(GID, DN, {"objectClass": ("group",), "adminDescription": (anchor_for(GID),)}), "sAM"),
        (_add(mail=("ceo@fabrikam.com",)), "not in an accepted mail domain"),
        (_add(proxyAddresses=("SMTP:ceo@fabrikam.com",)), "accepted mail domain"),
        (_add(proxyAddresses=("X500:/o=Contoso/cn=ceo",)), "not an SMTP address"),
        (_add(proxyAddresses=("smtp:@contoso.com",)), "accepted mail domain"),
        (
            Modify(GID, DN, Changes(replace={"proxyAddresses": ("SMTP:ceo@contoso.com.evil",)})),
            "accepted mail domain",
        ),
    ],
)
def test_operations_that_reach_beyond_our_groups_are_refused(
    operation: Operation, reason: str
) -> None:
    with pytest.raises(PolicyRefused, match=reason.replace("(", r"\(").replace(".", r"\.")):
        check_operation(operation, POLICY)


def test_display_name_cns_must_end_in_the_objects_own_suffix() -> None:
    by_name = AgentPolicy(target_ou=OU, dn_format=DnFormat.DISPLAY_NAME)
    for rdn in ("CN=Sales_000000000000", "CN=_e9305786a271", "CN=Group_" + GID, "CN=" + "x" * 70):
        with pytest.raises(PolicyRefused, match="not the CN"):
            check_operation(Rename(GID, DN, rdn), by_name)


def test_no_mail_domain_configured_refuses_every_address() -> None:
    bare = AgentPolicy(target_ou=OU)
    with pytest.raises(PolicyRefused, match="none set"):
        check_operation(_add(), bare)
    check_operation(_add(mail=(), proxyAddresses=()), bare)


def test_members_are_added_by_sid_only_and_through_the_member_guard() -> None:
    asked: list[list[str]] = []

    def guard(sids: object) -> None:
        asked.append(list(sids))  # type: ignore[call-overload]
        if "S-1-5-21-1-2-3-512" in asked[-1]:
            raise PolicyRefused("S-1-5-21-1-2-3-512 is Domain Admins")

    guarded = AgentPolicy(target_ou=OU, mail_domains=POLICY.mail_domains, member_guard=guard)
    check_operation(Modify(GID, DN, Changes(add_members=(SID,))), guarded)
    with pytest.raises(PolicyRefused, match="Domain Admins"):
        check_operation(
            Modify(GID, DN, Changes(add_members=(SID, "<SID=S-1-5-21-1-2-3-512>"))), guarded
        )
    check_operation(Modify(GID, DN, Changes(remove_members=(SID,))), guarded)  # no guard
    assert asked == [["S-1-5-21-1-2-3-1105"], ["S-1-5-21-1-2-3-1105", "S-1-5-21-1-2-3-512"]]


def test_members_removed_by_dn_are_named_for_the_agents_own_check() -> None:
    contact = "CN=A contact,OU=Contacts,DC=corp,DC=example"
    modify = Modify(GID, DN, Changes(remove_members=(SID, contact)))
    check_operation(modify, POLICY)
    assert removals_by_dn(modify) == (contact,)
    assert removals_by_dn(Modify(GID, DN, Changes(remove_members=(SID,)))) == ()
    assert removals_by_dn(Delete(GID, DN)) == ()


def test_the_delete_budget_counts_over_a_sliding_window() -> None:
    now = [0.0]
    budget = DeleteBudget(2, 60.0, clock=lambda: now[0])
    budget.take()
    budget.take()
    with pytest.raises(PolicyRefused, match="delete limit"):
        budget.take()
    now[0] = 61.0
    budget.take()


def test_the_agents_delete_budget_outlives_the_process(tmp_path: Path) -> None:
    """Issue 12, finding 6: the agent's delete limit was per process."""
    now = [1000.0]
    first = AgentStateStore(tmp_path / "state.sqlite3")
    DeleteBudget(2, 60.0, clock=lambda: now[0], ledger=first).take()
    first.close()
    again = AgentStateStore(tmp_path / "state.sqlite3")  # the agent restarted
    budget = DeleteBudget(2, 60.0, clock=lambda: now[0], ledger=again)
    budget.take()
    with pytest.raises(PolicyRefused, match="delete limit"):
        budget.take()
    other = DeleteBudget(2, 60.0, clock=lambda: now[0], ledger=AgentStateStore(again.path))
    with pytest.raises(PolicyRefused, match="delete limit"):
        other.take()  # a second agent on the host shares the count
    now[0] = 1061.0
    budget.take()
    assert (tmp_path / "state.sqlite3").stat().st_mode & 0o777 == 0o600


def _signed(now: float, *, key: str = KEY, hc: str = HC, body: bytes = b"{}") -> dict[str, str]:
    return sign(key, "POST", "/v1/apply", body, audience=hc, now=now)


def test_signatures_verify_once_and_refuse_tampering_replay_and_old_requests() -> None:
    check = SignatureCheck(KEY, HC)
    headers = _signed(1000.0)
    assert check.verify("POST", "/v1/apply", headers, b"{}", now=1001.0) == headers[NONCE_HEADER]
    with pytest.raises(RelayRefused, match="replayed"):
        check.verify("POST", "/v1/apply", headers, b"{}", now=1002.0)
    fresh = _signed(1000.0)
    with pytest.raises(RelayRefused, match="does not match"):
        check.verify("POST", "/v1/apply", fresh, b'{"x":1}', now=1001.0)
    with pytest.raises(RelayRefused, match="does not match"):
        check.verify("POST", "/v1/schema", fresh, b"{}", now=1001.0)
    with pytest.raises(RelayRefused, match="expired"):
        check.verify("POST", "/v1/apply", fresh, b"{}", now=1000.0 + REQUEST_WINDOW + 1)
    with pytest.raises(RelayRefused, match="does not match"):
        check.verify("POST", "/v1/apply", _signed(1000.0, key="o" * 40), b"{}", now=1001.0)
    with pytest.raises(RelayRefused, match="not signed"):
        check.verify("POST", "/v1/apply", {DATE_HEADER: "1000"}, b"{}", now=1001.0)
    assert KEY not in str(fresh[SIGNATURE_HEADER])


def test_a_signature_names_its_hybrid_connection() -> None:
    """Issue 12, finding 6: the MAC did not bind the namespace or connection name."""
    check = SignatureCheck(KEY, HC)
    for elsewhere in (
        audience("fabrikam.servicebus.windows.net", "writeback-agent"),
        audience("contoso.servicebus.windows.net", "other-agent"),
    ):
        with pytest.raises(RelayRefused, match="does not match"):
            check.verify("POST", "/v1/apply", _signed(1000.0, hc=elsewhere), b"{}", now=1001.0)
    # One spelling on both sides, whatever the settings look like.
    assert audience("https://Contoso.servicebus.windows.net:443/", "/Writeback-Agent/") == HC
    check.verify("POST", "/v1/apply", _signed(1000.0), b"{}", now=1001.0)


def test_future_stamps_are_refused_and_nonces_outlive_their_stamps() -> None:
    """Issue 12, finding 6: a request stamped 290 s ahead was accepted again 301 s later."""
    check = SignatureCheck(KEY, HC)
    with pytest.raises(RelayRefused, match="in the future"):
        check.verify("POST", "/v1/apply", _signed(1290.0), b"{}", now=1000.0)
    ahead = _signed(1020.0)  # within the skew
    check.verify("POST", "/v1/apply", ahead, b"{}", now=1000.0)
    for later in (1001.0, 1020.0 + REQUEST_WINDOW - 1, 1020.0 + REQUEST_WINDOW):
        with pytest.raises(RelayRefused, match="replayed"):
            check.verify("POST", "/v1/apply", ahead, b"{}", now=later)
    with pytest.raises(RelayRefused, match="expired"):
        check.verify("POST", "/v1/apply", ahead, b"{}", now=1020.0 + REQUEST_WINDOW + 1)


def test_a_replay_after_a_restart_or_to_another_agent_on_the_host_is_refused(
    tmp_path: Path,
) -> None:
    """Issue 12, finding 6: nonces lived in one process."""
    headers = _signed(1000.0)
    first = AgentStateStore(tmp_path / "state.sqlite3")
    SignatureCheck(KEY, HC, nonces=first).verify("POST", "/v1/apply", headers, b"{}", now=1001.0)
    first.close()
    restarted = SignatureCheck(KEY, HC, nonces=AgentStateStore(tmp_path / "state.sqlite3"))
    with pytest.raises(RelayRefused, match="replayed"):
        restarted.verify("POST", "/v1/apply", headers, b"{}", now=1030.0)
    neighbour = SignatureCheck(KEY, HC, nonces=AgentStateStore(tmp_path / "state.sqlite3"))
    with pytest.raises(RelayRefused, match="replayed"):
        neighbour.verify("POST", "/v1/apply", headers, b"{}", now=1031.0)


def test_replies_are_believed_only_with_the_agents_signature_over_our_request() -> None:
    """Issue 12, finding 6: anyone with a Listen key could answer "done"."""
    body = b'{"requests":1}'
    ours = _signed(1000.0)
    good = (200, sign_reply(KEY, HC, ours, 200, body), body)
    verify_reply(KEY, HC, ours, good)
    copy = dict(ours, **{SIGNATURE_HEADER: _signed(1000.0, body=b"{}")[SIGNATURE_HEADER]})
    forged = [
        (200, {}, body),  # unsigned
        (200, sign_reply("o" * 40, HC, ours, 200, body), body),  # another key
        (200, sign_reply(KEY, HC, _signed(1000.0), 200, body), body),  # another request's
        (200, sign_reply(KEY, HC, copy, 200, body), body),  # same nonce, forged copy
        (200, sign_reply(KEY, HC, ours, 403, body), body),  # another status
        (200, good[1], b'{"requests":0}'),  # another body
        (200, sign_reply(KEY, audience("x.example", "agent"), ours, 200, body), body),
    ]
    for reply in forged:
        with pytest.raises(ForgedReply) as raised:
            verify_reply(KEY, HC, ours, reply)
        assert isinstance(raised.value, RelayUnavailable)  # transient: the event waits
    refusal = error_body(RelayRefused("request signature does not match the caller key"))
    with pytest.raises(ForgedReply, match="HTTP 401: request signature does not match"):
        verify_reply(KEY, HC, ours, (401, sign_reply("o" * 40, HC, ours, 401, refusal), refusal))


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
