"""The Graph stand-in's groups beyond V1's, over raw HTTP: the security and sync
properties, hideFromAddressLists only on a single GET that selects it,
writebackConfiguration on beta only, the member-group and memberOf casts, and
what an app without Member.Read.Hidden is shown (nothing of a hidden membership,
with 200, as Graph does)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from writeback.adapters.graph import token_roles
from writeback_sandbox.graph_standin import (
    DEFAULT_APP_ROLES,
    MEMBER_READ_HIDDEN,
    GraphStandIn,
    StandInCredential,
    Tenant,
    app_token,
)

WITHOUT_HIDDEN = DEFAULT_APP_ROLES - {MEMBER_READ_HIDDEN}


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def get(
    http: httpx.Client, url: str, *, roles: frozenset[str] | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {} if roles is None else {"Authorization": f"Bearer {app_token(roles)}"}
    response = http.get(url, headers=headers)
    body: dict[str, Any] = response.json()
    return response.status_code, body


def tenant() -> Tenant:
    t = Tenant()
    t.add_user("u1", sid="S-1-5-21-7-7-7-1001", synced=True)
    t.add_user("u2", sid="S-1-5-21-7-7-7-1002", synced=True)
    t.add_group("child", display_name="Child", group_types=(), members=["u2"])
    t.add_group(
        "sec",
        display_name="Security",
        group_types=(),
        members=["u1", "child"],
        is_assignable_to_role=True,
    )
    t.add_group(
        "mesg",
        display_name="Ops",
        group_types=(),
        mail="ops@contoso.com",
        writeback_configuration={
            "isEnabled": True,
            "onPremisesGroupType": "universalSecurityGroup",
        },
    )
    t.add_group("synced", display_name="From AD", group_types=(), on_premises_sync_enabled=True)
    t.add_group(
        "hidden",
        display_name="Board",
        visibility="HiddenMembership",
        members=["u1", "u2", "child"],
        hide_from_address_lists=True,
    )
    return t


def test_groups_carry_their_kind_and_sync_state(http: httpx.Client) -> None:
    with GraphStandIn(tenant()) as standin:
        select = (
            "id,groupTypes,securityEnabled,mailEnabled,onPremisesSyncEnabled,isAssignableToRole"
        )
        status, body = get(http, f"{standin.url}/groups/delta?$select={select}")
    assert status == 200
    items = {item["id"]: item for item in body["value"]}
    assert items["sec"] == {
        "id": "sec",
        "groupTypes": [],
        "securityEnabled": True,
        "mailEnabled": False,
        "onPremisesSyncEnabled": None,
        "isAssignableToRole": True,
    }
    assert items["mesg"]["securityEnabled"] and items["mesg"]["mailEnabled"]
    assert items["synced"]["onPremisesSyncEnabled"] is True
    assert items["hidden"]["securityEnabled"] is False and items["hidden"]["mailEnabled"]


def test_hide_from_address_lists_only_on_a_single_get_that_selects_it(http: httpx.Client) -> None:
    with GraphStandIn(tenant()) as standin:
        status, one = get(http, f"{standin.url}/groups/hidden?$select=id,hideFromAddressLists")
        assert (status, one["hideFromAddressLists"]) == (200, True)
        status, default = get(http, f"{standin.url}/groups/hidden")
        assert status == 200 and "hideFromAddressLists" not in default
        status, refused = get(http, f"{standin.url}/groups/delta?$select=id,hideFromAddressLists")
        assert status == 400 and refused["error"]["code"] == "Request_BadRequest"


def test_writeback_configuration_on_beta_only(http: httpx.Client) -> None:
    with GraphStandIn(tenant()) as standin:
        beta = standin.url.rsplit("/", 1)[0] + "/beta"
        status, body = get(http, f"{standin.url}/groups/mesg?$select=id,writebackConfiguration")
        assert status == 400
        assert "writebackConfiguration" in body["error"]["message"]
        status, one = get(http, f"{beta}/groups/mesg?$select=id,writebackConfiguration")
        assert status == 200
        assert one["writebackConfiguration"] == {
            "isEnabled": True,
            "onPremisesGroupType": "universalSecurityGroup",
        }
        status, listed = get(
            http, f"{beta}/groups?$filter=id in ('sec','mesg')&$select=id,writebackConfiguration"
        )
        assert status == 200
        assert {g["id"]: g["writebackConfiguration"] for g in listed["value"]} == {
            "sec": {"isEnabled": None, "onPremisesGroupType": None},
            "mesg": {"isEnabled": True, "onPremisesGroupType": "universalSecurityGroup"},
        }
        status, paged = get(http, f"{beta}/groups?$select=id,writebackConfiguration&$top=2")
        assert status == 200 and len(paged["value"]) == 2 and "@odata.nextLink" in paged


def test_member_groups_and_member_of(http: httpx.Client) -> None:
    with GraphStandIn(tenant()) as standin:
        status, body = get(
            http, f"{standin.url}/groups/sec/members/microsoft.graph.group?$select=id"
        )
        assert status == 200
        assert body["value"] == [{"@odata.type": "#microsoft.graph.group", "id": "child"}]
        status, body = get(http, f"{standin.url}/groups/child/memberOf/graph.group?$select=id")
        assert status == 200
        assert sorted(g["id"] for g in body["value"]) == ["hidden", "sec"]
        status, _ = get(http, f"{standin.url}/groups/nope/memberOf/graph.group")
        assert status == 404


def test_without_member_read_hidden_a_hidden_membership_shows_no_member(
    http: httpx.Client,
) -> None:
    with GraphStandIn(tenant()) as standin:
        users = "/groups/hidden/members/microsoft.graph.user?$select=id"
        status, granted = get(http, standin.url + users, roles=DEFAULT_APP_ROLES)
        assert status == 200 and {u["id"] for u in granted["value"]} == {"u1", "u2"}
        status, hidden = get(http, standin.url + users, roles=WITHOUT_HIDDEN)
        assert (status, hidden["value"]) == (200, [])
        status, groups = get(
            http, standin.url + "/groups/hidden/members/graph.group", roles=WITHOUT_HIDDEN
        )
        assert (status, groups["value"]) == (200, [])
        status, member_of = get(
            http, standin.url + "/groups/child/memberOf/graph.group", roles=WITHOUT_HIDDEN
        )
        assert [g["id"] for g in member_of["value"]] == ["sec"]
        status, delta = get(
            http, standin.url + "/groups/delta?$select=id,members", roles=WITHOUT_HIDDEN
        )
        items = {item["id"]: item for item in delta["value"]}
        assert "members@delta" not in items["hidden"]
        assert items["sec"]["members@delta"]
        standin.app_roles = WITHOUT_HIDDEN  # the app's grant, for requests without a token
        status, hidden = get(http, standin.url + users)
        assert (status, hidden["value"]) == (200, [])
        response = http.get(standin.url + users, headers={"Authorization": "Bearer opaque"})
        assert response.status_code == 401


def test_the_credential_mints_tokens_whose_roles_writeback_reads() -> None:
    credential = StandInCredential({"Group.Read.All", MEMBER_READ_HIDDEN})
    token = credential.get_token("https://graph.microsoft.com/.default")
    assert token_roles(token.token) == frozenset({"Group.Read.All", MEMBER_READ_HIDDEN})
    assert token_roles("opaque") is None
    assert credential.calls == 1
