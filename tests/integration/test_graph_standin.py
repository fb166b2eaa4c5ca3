"""The Graph stand-in over raw HTTP: shapes, paging, delta rounds, faults."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from writeback_sandbox.graph_standin import GraphStandIn, Tenant
from writeback_sandbox.sample_tenant import (
    SECURITY_GROUP_NAME,
    build_sample_tenant,
    object_id,
    user_id_for,
)

GROUP_DELTA = (
    "/groups/delta?$select=id,displayName,description,mail,mailNickname,proxyAddresses,"
    "groupTypes,visibility,members"
)
USER_DELTA = "/users/delta?$select=id,onPremisesSecurityIdentifier,onPremisesSyncEnabled"
MEMBERS = (
    "/members/microsoft.graph.user?$select=id,onPremisesSecurityIdentifier,onPremisesSyncEnabled"
)


def users(tenant: Tenant, count: int, *, prefix: str = "u") -> list[str]:
    ids = [f"{prefix}{i:05d}" for i in range(count)]
    for i, user_id in enumerate(ids):
        tenant.add_user(user_id, sid=f"S-1-5-21-7-7-7-{1000 + i}", synced=True)
    return ids


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def get(http: httpx.Client, url: str) -> tuple[int, dict[str, Any]]:
    response = http.get(url)
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    return response.status_code, body


def read_round(http: httpx.Client, url: str) -> tuple[list[list[dict[str, Any]]], str]:
    """Every page's ``value`` of one delta round, and its deltaLink."""
    pages: list[list[dict[str, Any]]] = []
    while True:
        status, body = get(http, url)
        assert status == 200, body
        pages.append(body["value"])
        if "@odata.nextLink" in body:
            assert "@odata.deltaLink" not in body
            url = body["@odata.nextLink"]
            continue
        link: str = body["@odata.deltaLink"]
        return pages, link


def by_id(pages: list[list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for page in pages:
        for item in page:
            out.setdefault(item["id"], []).append(item)
    return out


def test_full_groups_delta_has_graph_shapes(http: httpx.Client) -> None:
    tenant = Tenant()
    u = users(tenant, 2)
    tenant.add_device("dev1")
    tenant.add_contact("contact1")
    tenant.add_group("sec", display_name="Security", group_types=(), members=[u[0]])
    tenant.add_group(
        "g1",
        display_name="One",
        description=None,
        mail="one@contoso.com",
        mail_nickname="one",
        proxy_addresses=["SMTP:one@contoso.com", "smtp:one@contoso.onmicrosoft.com"],
        members=[u[0], u[1], "sec", "dev1", "contact1"],
    )
    with GraphStandIn(tenant) as standin:
        status, body = get(http, standin.url + GROUP_DELTA)
    assert status == 200
    assert body["@odata.context"].startswith(standin.url + "/$metadata#groups(")
    assert "$deltatoken=" in body["@odata.deltaLink"]
    assert body["@odata.deltaLink"].startswith(standin.url + "/groups/delta?")
    items = {item["id"]: item for item in body["value"]}
    assert set(items) == {"sec", "g1"}  # delta does not filter on Unified
    one = items["g1"]
    assert one == {
        "id": "g1",
        "displayName": "One",
        "description": None,
        "mail": "one@contoso.com",
        "mailNickname": "one",
        "proxyAddresses": ["SMTP:one@contoso.com", "smtp:one@contoso.onmicrosoft.com"],
        "groupTypes": ["Unified"],
        "visibility": "Private",
        "members@delta": [
            {"@odata.type": "#microsoft.graph.user", "id": u[0]},
            {"@odata.type": "#microsoft.graph.user", "id": u[1]},
            {"@odata.type": "#microsoft.graph.group", "id": "sec"},
            {"@odata.type": "#microsoft.graph.device", "id": "dev1"},
            {"@odata.type": "#microsoft.graph.orgContact", "id": "contact1"},
        ],
    }
    assert items["sec"]["groupTypes"] == []


def test_delta_without_members_in_select_has_no_members(http: httpx.Client) -> None:
    tenant = Tenant()
    u = users(tenant, 1)
    tenant.add_group("g1", display_name="One", members=u)
    with GraphStandIn(tenant) as standin:
        status, body = get(http, standin.url + "/groups/delta()?$select=id,displayName")
    assert status == 200
    assert body["value"] == [{"id": "g1", "displayName": "One"}]


def test_paging_follows_next_links_to_a_delta_link(http: httpx.Client) -> None:
    tenant = Tenant()
    for n in range(7):
        tenant.add_group(f"g{n}", display_name=f"G{n}")
    with GraphStandIn(tenant, page_size=3) as standin:
        pages, link = read_round(http, standin.url + GROUP_DELTA)
        assert [len(p) for p in pages] == [3, 3, 1]
        assert sorted(by_id(pages)) == [f"g{n}" for n in range(7)]
        assert standin.count("$skiptoken=") == 2
        assert all("$select" not in target for _, target, _ in standin.requests[1:])
        # The next round from the delta link sees nothing new.
        pages, _ = read_round(http, link)
        assert pages == [[]]


def test_a_large_groups_members_are_split_across_pages(http: httpx.Client) -> None:
    tenant = Tenant()
    u = users(tenant, 2500)
    tenant.add_group("big", display_name="Big", members=u)
    for n in range(4):
        tenant.add_group(f"small{n}", display_name=f"Small {n}", members=u[n : n + 3])
    with GraphStandIn(tenant, page_size=100, member_page_size=1000) as standin:
        pages, _ = read_round(http, standin.url + GROUP_DELTA)
    assert len(pages) >= 3
    appearances = by_id(pages)
    big = appearances["big"]
    assert len(big) == 3
    pages_with_big = [i for i, page in enumerate(pages) if any(x["id"] == "big" for x in page)]
    assert len(set(pages_with_big)) == 3  # on three different pages
    assert big[0]["displayName"] == "Big"
    assert set(big[1]) == set(big[2]) == {"id", "members@delta"}  # continuations
    members = [m["id"] for part in big for m in part["members@delta"]]
    assert members == u
    # other groups come between the first appearance and the continuations
    order = [item["id"] for page in pages for item in page]
    assert order.index("big") < order.index("small3") < len(order) - 2
    assert order[-2:] == ["big", "big"]
    assert all(len(appearances[f"small{n}"]) == 1 for n in range(4))


def test_incremental_round_returns_only_changes(http: httpx.Client) -> None:
    tenant = Tenant()
    u = users(tenant, 6)
    for n in range(5):
        tenant.add_group(f"g{n}", display_name=f"G{n}", members=u[:3])
    with GraphStandIn(tenant, page_size=2) as standin:
        _, link = read_round(http, standin.url + GROUP_DELTA)
        tenant.update_group("g0", display_name="G0 renamed", proxy_addresses=["SMTP:a@b.c"])
        tenant.add_members("g1", [u[4]])
        tenant.remove_members("g1", [u[0]])
        tenant.soft_delete_group("g2")
        tenant.hard_delete_group("g3")
        tenant.add_group("g9", display_name="New", members=[u[5]])
        pages, link2 = read_round(http, link)
        items = by_id(pages)
        assert set(items) == {"g0", "g1", "g2", "g3", "g9"}  # g4 unchanged
        assert items["g0"] == [
            {"id": "g0", "displayName": "G0 renamed", "proxyAddresses": ["SMTP:a@b.c"]}
        ]
        assert items["g1"] == [
            {
                "id": "g1",
                "members@delta": [
                    {
                        "@odata.type": "#microsoft.graph.user",
                        "id": u[0],
                        "@removed": {"reason": "deleted"},
                    },
                    {"@odata.type": "#microsoft.graph.user", "id": u[4]},
                ],
            }
        ]
        assert items["g2"] == [{"id": "g2", "@removed": {"reason": "changed"}}]
        assert items["g3"] == [{"id": "g3", "@removed": {"reason": "deleted"}}]
        assert items["g9"][0]["displayName"] == "New"
        assert items["g9"][0]["members@delta"] == [
            {"@odata.type": "#microsoft.graph.user", "id": u[5]}
        ]
        # A restore brings the whole group back; a user deleted for good leaves groups.
        tenant.restore_group("g2")
        tenant.delete_user(u[1])
        pages, _ = read_round(http, link2)
        items = by_id(pages)
        assert items["g2"][0]["displayName"] == "G2"
        assert [m["id"] for m in items["g2"][0]["members@delta"]] == [u[0], u[2]]
        assert items["g4"] == [
            {
                "id": "g4",
                "members@delta": [
                    {
                        "@odata.type": "#microsoft.graph.user",
                        "id": u[1],
                        "@removed": {"reason": "deleted"},
                    }
                ],
            }
        ]


def test_deltatoken_latest_syncs_from_now(http: httpx.Client) -> None:
    tenant = Tenant()
    u = users(tenant, 1)
    tenant.add_group("old", display_name="Old", members=u)
    with GraphStandIn(tenant) as standin:
        status, body = get(http, standin.url + GROUP_DELTA + "&$deltaToken=latest")
        assert status == 200
        assert body["value"] == []
        tenant.add_group("new", display_name="New", members=u)
        pages, _ = read_round(http, body["@odata.deltaLink"])
    assert [item["id"] for item in pages[0]] == ["new"]
    assert "members@delta" in pages[0][0]  # the $select travelled in the token


def test_unknown_or_expired_tokens_answer_410(http: httpx.Client) -> None:
    tenant = Tenant()
    for n in range(3):
        tenant.add_group(f"g{n}", display_name=f"G{n}")
    with GraphStandIn(tenant, page_size=1) as standin:
        status, body = get(http, standin.url + "/groups/delta?$deltatoken=bogus")
        assert status == 410
        assert body["error"]["code"] == "syncStateNotFound"
        assert body["error"]["message"]
        _, first = get(http, standin.url + GROUP_DELTA)
        _, link = read_round(http, standin.url + GROUP_DELTA)
        # a users token is no groups token
        users_link = read_round(http, standin.url + USER_DELTA)[1]
        status, _ = get(http, users_link.replace("/users/delta", "/groups/delta"))
        assert status == 410
        tenant.expire_delta_tokens()
        response = http.get(link)
        assert response.status_code == 410
        assert response.headers["location"].endswith("/groups/delta")
        status, body = get(http, first["@odata.nextLink"])
        assert status == 410


def test_users_delta_shapes_paging_and_changes(http: httpx.Client) -> None:
    tenant = Tenant()
    tenant.add_user("s1", sid="S-1-5-21-1", synced=True, display_name="Synced")
    tenant.add_user("c1", sid=None, synced=False, display_name="Cloud")
    users(tenant, 5)
    with GraphStandIn(tenant, page_size=3) as standin:
        pages, link = read_round(http, standin.url + USER_DELTA)
        assert [len(p) for p in pages] == [3, 3, 1]
        items = {i["id"]: i for page in pages for i in page}
        assert items["s1"] == {
            "id": "s1",
            "onPremisesSecurityIdentifier": "S-1-5-21-1",
            "onPremisesSyncEnabled": True,
        }
        assert items["c1"] == {
            "id": "c1",
            "onPremisesSecurityIdentifier": None,
            "onPremisesSyncEnabled": None,
        }
        tenant.update_user("c1", sid="S-1-5-21-2", synced=True)
        tenant.delete_user("s1")
        pages, _ = read_round(http, link)
        assert by_id(pages) == {
            "c1": [
                {
                    "id": "c1",
                    "onPremisesSecurityIdentifier": "S-1-5-21-2",
                    "onPremisesSyncEnabled": True,
                }
            ],
            "s1": [{"id": "s1", "@removed": {"reason": "deleted"}}],
        }


def test_get_group_selects_and_404s(http: httpx.Client) -> None:
    tenant = Tenant()
    tenant.add_group("g1", display_name="One", mail="one@contoso.com")
    tenant.add_group("g2", display_name="Two")
    tenant.soft_delete_group("g2")
    with GraphStandIn(tenant) as standin:
        status, body = get(http, standin.url + "/groups/g1?$select=id,displayName,mail")
        assert status == 200
        assert body["@odata.context"].endswith("$metadata#groups(id,displayName,mail)/$entity")
        assert {k: v for k, v in body.items() if k != "@odata.context"} == {
            "id": "g1",
            "displayName": "One",
            "mail": "one@contoso.com",
        }
        for missing in ("g2", "nope"):
            status, body = get(http, standin.url + f"/groups/{missing}?$select=id")
            assert status == 404
            assert body["error"]["code"] == "Request_ResourceNotFound"


def test_user_members_cast_pages_by_top(http: httpx.Client) -> None:
    tenant = Tenant()
    u = users(tenant, 2100)
    tenant.add_device("dev")
    tenant.add_group("nested", display_name="Nested", group_types=())
    tenant.add_group("g", display_name="G", members=[*u, "dev", "nested"])
    with GraphStandIn(tenant) as standin:
        url = standin.url + "/groups/g" + MEMBERS + "&$top=999"
        seen: list[dict[str, Any]] = []
        sizes = []
        while url:
            status, body = get(http, url)
            assert status == 200
            sizes.append(len(body["value"]))
            seen.extend(body["value"])
            url = body.get("@odata.nextLink", "")
        assert sizes == [999, 999, 102]
        assert [m["id"] for m in seen] == u
        assert seen[0] == {
            "@odata.type": "#microsoft.graph.user",
            "id": u[0],
            "onPremisesSecurityIdentifier": "S-1-5-21-7-7-7-1000",
            "onPremisesSyncEnabled": True,
        }
        _, body = get(http, standin.url + "/groups/g/members/graph.user?$select=id")
        assert len(body["value"]) == 100  # default page size
        status, body = get(http, standin.url + "/groups/g" + MEMBERS + "&$top=1000")
        assert status == 400
        assert "between 1 and 999" in body["error"]["message"]
        status, body = get(http, standin.url + "/groups/none" + MEMBERS)
        assert status == 404


def test_deleted_items_lists_soft_deleted_groups(http: httpx.Client) -> None:
    tenant = Tenant()
    for n in range(5):
        tenant.add_group(f"g{n}", display_name=f"G{n}")
    for n in (3, 1, 4):
        tenant.soft_delete_group(f"g{n}")
    tenant.hard_delete_group("g4")
    with GraphStandIn(tenant) as standin:
        url = standin.url + "/directory/deletedItems/microsoft.graph.group?$select=id&$top=1"
        ids: list[str] = []
        while url:
            status, body = get(http, url)
            assert status == 200
            ids.extend(item["id"] for item in body["value"])
            url = body.get("@odata.nextLink", "")
    assert ids == ["g3", "g1"]


def test_unknown_paths_methods_and_properties_get_graph_errors(http: httpx.Client) -> None:
    with GraphStandIn() as standin:
        status, body = get(http, standin.url + "/me/messages")
        assert status == 400
        assert set(body["error"]) >= {"code", "message"}
        status, body = get(http, standin.url + "/groups/delta?$select=id,bogus")
        assert status == 400
        assert "bogus" in body["error"]["message"]
        status, body = get(http, standin.url + "/groups/delta?$top=5")
        assert status == 400
        response = http.post(standin.url + "/groups", json={})
        assert response.status_code == 405
        assert "error" in response.json()
        status, _ = get(http, standin.url.replace("/v1.0", "/beta") + "/groups/x")
        assert status == 404


def test_injected_faults_hit_matching_requests_with_retry_after(http: httpx.Client) -> None:
    tenant = Tenant()
    tenant.add_group("g", display_name="G")
    with GraphStandIn(tenant) as standin:
        standin.inject(429, times=2, retry_after=0.05, path_contains="/groups/delta")
        assert get(http, standin.url + USER_DELTA)[0] == 200
        first = http.get(standin.url + GROUP_DELTA)
        assert first.status_code == 429
        assert first.headers["retry-after"] == "0.05"
        assert first.json()["error"]["code"] == "TooManyRequests"
        assert http.get(standin.url + GROUP_DELTA).status_code == 429
        assert http.get(standin.url + GROUP_DELTA).status_code == 200
        standin.inject(503)
        response = http.get(standin.url + "/groups/g")
        assert response.status_code == 503
        assert "retry-after" not in response.headers
        assert [status for _, _, status in standin.requests] == [200, 429, 429, 200, 503]
        assert standin.count("/groups/delta") == 3
        assert standin.count("$select=id,onPremises") == 1
        standin.reset_log()
        assert standin.requests == []


def test_injected_rate_is_seeded(http: httpx.Client) -> None:
    tenant = Tenant()
    tenant.add_group("g", display_name="G")

    def pattern() -> list[int]:
        with GraphStandIn(tenant) as standin:
            standin.inject(500, rate=0.5, seed=3)
            out = [http.get(standin.url + "/groups/g").status_code for _ in range(30)]
            standin.clear_faults()
            assert http.get(standin.url + "/groups/g").status_code == 200
            return out

    first = pattern()
    assert first == pattern()
    assert 5 < first.count(500) < 25
    assert set(first) == {200, 500}


def test_injected_delay_and_disconnect(http: httpx.Client) -> None:
    tenant = Tenant()
    tenant.add_group("g", display_name="G")
    with GraphStandIn(tenant) as standin:
        standin.inject_delay(0.3)
        started = time.monotonic()
        assert http.get(standin.url + "/groups/g").status_code == 200
        assert time.monotonic() - started >= 0.3
        standin.inject_disconnect()
        with pytest.raises(httpx.RemoteProtocolError):
            http.get(standin.url + "/groups/g")
        assert http.get(standin.url + "/groups/g").status_code == 200
        assert [status for _, _, status in standin.requests] == [200, 0, 200]


def test_sample_tenant_is_realistic_and_deterministic() -> None:
    sids = {f"user{i:02d}": f"S-1-5-21-1-2-3-{1100 + i}" for i in range(20)}
    tenant = build_sample_tenant(sids)
    again = build_sample_tenant(sids)
    assert tenant.group_ids() == again.group_ids()
    assert [tenant.member_ids(g) for g in tenant.group_ids()] == [
        again.member_ids(g) for g in again.group_ids()
    ]
    other = build_sample_tenant(sids, seed=8)
    assert [tenant.member_ids(g) for g in tenant.group_ids()] != [
        other.member_ids(g) for g in other.group_ids()
    ]

    unified = tenant.unified_group_ids()
    assert len(unified) == 12
    security = object_id("group", SECURITY_GROUP_NAME)
    assert security in tenant.group_ids() and security not in unified
    names = [tenant.group_properties(g)["displayName"] for g in unified]
    joined = "".join(names)
    for char in ',+"\\<>;=':
        assert char in joined
    assert any(n.startswith("#") for n in names)
    assert any(n != n.strip() for n in names)
    assert any(len(n) == 70 for n in names)
    assert any(not n.isascii() for n in names)
    for group_id in unified:
        props = tenant.group_properties(group_id)
        assert props["mail"] and props["mailNickname"]
        assert props["proxyAddresses"][0] == "SMTP:" + props["mail"]
        assert all(p.startswith("smtp:") for p in props["proxyAddresses"][1:])
        assert len(props["proxyAddresses"]) >= 2
    members = [m for g in unified for m in tenant.member_ids(g)]
    synced = {user_id_for(name) for name in sids}
    assert sum(m in synced for m in members) > len(members) * 0.8
    assert any(tenant.kind(m) == "user" and m not in synced for m in members)  # cloud-only
    assert security in members  # the nested group
    assert len(tenant.user_ids()) == 25
