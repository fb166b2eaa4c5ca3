"""The Graph stand-in over raw HTTP: shapes, paging, delta rounds, faults."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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


# --------------------------------------------------------------------------- latency


def batch(http: httpx.Client, standin: GraphStandIn, *urls: str) -> dict[str, dict[str, Any]]:
    """POST one ``$batch`` of GETs (ids "1", "2", ...); its responses by id."""
    steps = [{"id": str(n), "method": "GET", "url": url} for n, url in enumerate(urls, 1)]
    response = http.post(standin.url + "/$batch", json={"requests": steps})
    assert response.status_code == 200, response.text
    answers: list[dict[str, Any]] = response.json()["responses"]
    assert sorted(a["id"] for a in answers) == sorted(s["id"] for s in steps)
    return {a["id"]: a for a in answers}


def test_latency_is_per_round_trip_and_overlaps_across_connections() -> None:
    tenant = Tenant()
    for n in range(20):
        tenant.add_group(f"g{n}", display_name=f"G{n}")
    latency = 0.2
    with GraphStandIn(tenant, latency=latency) as standin:
        with httpx.Client(timeout=10) as http:
            started = time.monotonic()
            assert http.get(standin.url + "/groups/g0").status_code == 200
            assert time.monotonic() - started >= latency
            started = time.monotonic()
            answers = batch(http, standin, *(f"/groups/g{n}?$select=id" for n in range(20)))
            assert latency <= time.monotonic() - started < 2 * latency  # one round trip
            assert {a["status"] for a in answers.values()} == {200}

        # 50 requests on 50 connections at once: the server's threads overlap their latency.
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
        with httpx.Client(timeout=10, limits=limits) as shared, ThreadPoolExecutor(50) as pool:

            def one(n: int) -> int:
                return shared.get(f"{standin.url}/groups/g{n % 20}").status_code

            started = time.monotonic()
            statuses = list(pool.map(one, range(50)))
            elapsed = time.monotonic() - started
        assert statuses == [200] * 50
        assert elapsed < 4 * latency, f"50 concurrent requests took {elapsed:.2f} s"
        assert standin.round_trips() == 1 + 1 + 50
        standin.latency = 0.0  # settable while serving
        with httpx.Client(timeout=10) as http:
            started = time.monotonic()
            http.get(standin.url + "/groups/g0")
            assert time.monotonic() - started < latency


# --------------------------------------------------------------------------- $batch


def test_batch_answers_each_step_with_its_own_status_headers_and_body(
    http: httpx.Client,
) -> None:
    tenant = Tenant()
    u = users(tenant, 3)
    tenant.add_group("live", display_name="Live", mail="live@contoso.com", members=u)
    tenant.add_group("binned", display_name="Binned")
    tenant.soft_delete_group("binned")
    with GraphStandIn(tenant, seed=1) as standin:
        answers = batch(
            http,
            standin,
            "/groups/live?$select=id,displayName,mail",
            "/groups/binned?$select=id",
            "groups/live" + MEMBERS + "&$top=2",  # a url without the leading slash
            f"/users?$filter=id in ('{u[0]}','nobody')&$select=id",
            "/directory/deletedItems/binned?$select=id",
            "/directory/deletedItems/live",
        )
        assert answers["1"]["status"] == 200
        assert answers["1"]["headers"]["Content-Type"].startswith("application/json")
        body = answers["1"]["body"]
        assert (body["id"], body["displayName"], body["mail"]) == (
            "live",
            "Live",
            "live@contoso.com",
        )
        assert answers["2"]["status"] == 404
        assert answers["2"]["body"]["error"]["code"] == "Request_ResourceNotFound"
        members = answers["3"]["body"]
        assert [m["id"] for m in members["value"]] == u[:2]
        assert members["@odata.nextLink"].startswith(standin.url + "/groups/live/members/")
        assert [x["id"] for x in answers["4"]["body"]["value"]] == [u[0]]
        deleted = answers["5"]["body"]
        assert (deleted["@odata.type"], deleted["id"]) == ("#microsoft.graph.group", "binned")
        assert answers["6"]["status"] == 404
        # Each step is a request of its own; the batch is one round trip.
        assert standin.count() == 6 and standin.count(batched=True) == 6
        assert standin.round_trips() == 1 and standin.round_trips("/$batch") == 1
        assert standin.count("/groups/live") == 2
        log = standin.log
        assert [r.envelope for r in log] == [False] * 6 + [True]
        assert len({r.batch for r in log}) == 1
        assert standin.requests[-1] == ("POST", "/v1.0/$batch", 200)
        # Responses come back in another order than the requests, as Graph allows.
        response = http.post(
            standin.url + "/$batch",
            json={
                "requests": [
                    {"id": str(n), "method": "GET", "url": "/groups/live?$select=id"}
                    for n in range(20)
                ]
            },
        )
        assert [a["id"] for a in response.json()["responses"]] != [str(n) for n in range(20)]


def test_batch_limits_and_malformed_batches(http: httpx.Client) -> None:
    tenant = Tenant()
    tenant.add_group("g", display_name="G")
    with GraphStandIn(tenant) as standin:
        url = standin.url + "/$batch"
        too_many = [{"id": str(n), "method": "GET", "url": "/groups/g"} for n in range(21)]
        response = http.post(url, json={"requests": too_many})
        assert response.status_code == 400
        assert "maximum of 20" in response.json()["error"]["message"]
        malformed: tuple[dict[str, Any], ...] = (
            {"requests": []},
            {"requests": [{"id": "1", "method": "GET"}]},
            {
                "requests": [
                    {"id": "a", "method": "GET", "url": "/groups/g"},
                    {"id": "A", "method": "GET", "url": "/groups/g"},  # ids are not case-sensitive
                ]
            },
            {"requests": [{"id": "1", "method": "GET", "url": "/groups/g", "dependsOn": ["9"]}]},
        )
        for bad in malformed:
            response = http.post(url, json=bad)
            assert response.status_code == 400, bad
            assert response.json()["error"]["code"] == "BadRequest"
        assert http.post(url, content=b"not json").status_code == 400
        assert standin.count() == 0 and standin.round_trips("/$batch") == 6
        answers = batch(http, standin, standin.url + "/groups/g", "/$batch", "/groups/g")
        assert answers["1"]["status"] == 400  # an absolute url
        assert answers["2"]["status"] == 400  # no batch inside a batch
        assert answers["3"]["status"] == 200
        response = http.post(
            url,
            json={
                "requests": [
                    {"id": "1", "method": "GET", "url": "/groups/missing"},
                    {"id": "2", "method": "GET", "url": "/groups/g", "dependsOn": ["1"]},
                ]
            },
        )
        answers = {a["id"]: a for a in response.json()["responses"]}
        assert (answers["1"]["status"], answers["2"]["status"]) == (404, 424)


def test_throttling_inside_a_batch_and_of_the_batch(http: httpx.Client) -> None:
    tenant = Tenant()
    for n in range(3):
        tenant.add_group(f"g{n}", display_name=f"G{n}")
    with GraphStandIn(tenant) as standin:
        standin.inject(429, retry_after=0.5, path_contains="/groups/g1?")
        answers = batch(http, standin, *(f"/groups/g{n}?$select=id" for n in range(3)))
        assert [answers[k]["status"] for k in "123"] == [200, 429, 200]
        throttled = answers["2"]
        assert throttled["headers"]["Retry-After"] == "0.5"
        assert throttled["body"]["error"]["code"] == "TooManyRequests"
        # The whole batch throttled: no step is served, nor logged.
        standin.reset_log()
        standin.inject(429, retry_after=2, path_contains="/$batch")
        response = http.post(
            standin.url + "/$batch",
            json={"requests": [{"id": "1", "method": "GET", "url": "/groups/g0"}]},
        )
        assert response.status_code == 429
        assert response.headers["retry-after"] == "2"
        assert standin.count() == 0 and standin.round_trips("/$batch") == 1
        # An injected rate hits the steps one by one.
        standin.inject(503, rate=0.5, seed=4, path_contains="/groups/")
        answers = batch(http, standin, *(f"/groups/g{n % 3}?$select=id" for n in range(20)))
        statuses = [a["status"] for a in answers.values()]
        assert 0 < statuses.count(503) < 20 and statuses.count(200) == 20 - statuses.count(503)


# --------------------------------------------------------------------------- replica lag


def test_a_lagging_replica_serves_the_past(http: httpx.Client) -> None:
    tenant = Tenant()
    u = users(tenant, 3)
    tenant.add_group("old", display_name="Old", members=u[:2])
    lag = 1.0
    with GraphStandIn(tenant, lag=lag) as standin:
        time.sleep(lag + 0.1)  # the replica has caught up with the set-up
        tenant.add_group("new", display_name="New", members=u[:1])
        tenant.update_group("old", display_name="Old renamed")
        tenant.add_members("old", [u[2]])
        tenant.add_user("u-new", sid="S-1-5-21-7-7-7-9", synced=True)
        started = time.monotonic()
        status, body = get(http, standin.url + "/groups/new?$select=id,displayName")
        assert status == 404
        assert body["error"]["code"] == "Request_ResourceNotFound"
        assert "'new' does not exist" in body["error"]["message"]
        assert get(http, standin.url + "/groups/new" + MEMBERS)[0] == 404
        status, body = get(http, standin.url + "/groups/old?$select=id,displayName")
        assert (status, body["displayName"]) == (200, "Old")
        _, members = get(http, standin.url + "/groups/old" + MEMBERS)
        assert [m["id"] for m in members["value"]] == u[:2]
        _, found = get(http, standin.url + f"/users?$filter=id in ('{u[0]}','u-new')")
        assert [x["id"] for x in found["value"]] == [u[0]]
        pages, _ = read_round(http, standin.url + GROUP_DELTA)
        items = by_id(pages)
        assert set(items) == {"old"} and items["old"][0]["displayName"] == "Old"
        assert time.monotonic() - started < lag, "too slow to observe the lag"
        time.sleep(lag + 0.1 - (time.monotonic() - started))
        status, body = get(http, standin.url + "/groups/new?$select=id,displayName")
        assert (status, body["displayName"]) == (200, "New")
        assert get(http, standin.url + "/groups/old?$select=displayName")[1]["displayName"] == (
            "Old renamed"
        )
        _, members = get(http, standin.url + "/groups/old" + MEMBERS)
        assert [m["id"] for m in members["value"]] == u
        standin.lag = 0.0
        tenant.add_group("now", display_name="Now")
        assert get(http, standin.url + "/groups/now")[0] == 200


def test_a_frozen_replica_and_a_fresher_recycle_bin(http: httpx.Client) -> None:
    tenant = Tenant()
    u = users(tenant, 2)
    tenant.add_group("restored", display_name="Restored", members=u)
    tenant.add_group("purged", display_name="Purged", members=u)
    tenant.soft_delete_group("restored")
    bin_url = standin_bin = "/directory/deletedItems/microsoft.graph.group?$select=id"
    with GraphStandIn(tenant) as standin:
        with standin.frozen_replica() as seq:
            assert seq == tenant.sequence
            tenant.restore_group("restored")
            tenant.hard_delete_group("purged")
            tenant.remove_members("restored", [u[0]])
            # The inconvenient combination: 404 on the group, absent from the bin.
            assert get(http, standin.url + "/groups/restored")[0] == 404
            assert get(http, standin.url + "/directory/deletedItems/restored")[0] == 404
            assert get(http, standin.url + bin_url)[1]["value"] == []
            # A group deleted for good still answers, members and all.
            assert get(http, standin.url + "/groups/purged?$select=id")[0] == 200
            _, members = get(http, standin.url + "/groups/purged" + MEMBERS)
            assert [m["id"] for m in members["value"]] == u
            assert standin.replica_sequence() == seq
            assert standin.deleted_items_sequence() is None
        assert get(http, standin.url + "/groups/restored")[0] == 200
        _, members = get(http, standin.url + "/groups/restored" + MEMBERS)
        assert [m["id"] for m in members["value"]] == [u[1]]
        assert get(http, standin.url + "/groups/purged")[0] == 404
        # The bin can lag too, on its own.
        tenant.soft_delete_group("restored")
        standin.freeze_replica(deleted_items=True)
        tenant.restore_group("restored")
        assert get(http, standin.url + "/directory/deletedItems/restored")[0] == 200
        assert [x["id"] for x in get(http, standin.url + standin_bin)[1]["value"]] == ["restored"]
        standin.release_replica()
        assert get(http, standin.url + "/directory/deletedItems/restored")[0] == 404


def test_delta_from_a_lagging_replica(http: httpx.Client) -> None:
    tenant = Tenant()
    u = users(tenant, 4)
    tenant.add_group("g", display_name="G", members=u[:1])
    with GraphStandIn(tenant) as standin:
        _, link = read_round(http, standin.url + GROUP_DELTA)
        standin.freeze_replica()
        tenant.add_members("g", [u[1]])
        pages, same = read_round(http, link)
        assert pages == [[]]  # not seen yet, and the link did not move past it
        # ``latest`` is issued where the primary is: a change before it is never reported.
        _, body = get(http, standin.url + GROUP_DELTA + "&$deltatoken=latest")
        latest = body["@odata.deltaLink"]
        standin.release_replica()
        pages, _ = read_round(http, same)
        assert [m["id"] for m in by_id(pages)["g"][0]["members@delta"]] == [u[1]]
        tenant.add_members("g", [u[2]])
        pages, _ = read_round(http, latest)
        assert [m["id"] for m in by_id(pages)["g"][0]["members@delta"]] == [u[2]]


# --------------------------------------------------------------------------- one-shot faults


def test_a_one_shot_404_for_a_live_group(http: httpx.Client) -> None:
    tenant = Tenant()
    tenant.add_group("g", display_name="G")
    tenant.add_group("g2", display_name="G2")
    with GraphStandIn(tenant) as standin:
        standin.inject_not_found("g")
        assert get(http, standin.url + "/groups/g2")[0] == 200  # another group: untouched
        status, body = get(http, standin.url + "/groups/g?$select=id")
        assert status == 404
        assert body["error"]["code"] == "Request_ResourceNotFound"
        assert "'g' does not exist" in body["error"]["message"]
        assert get(http, standin.url + "/groups/g?$select=id")[0] == 200
        standin.inject_not_found("g", times=2)
        answers = batch(http, standin, "/groups/g?$select=id", "/groups/g" + MEMBERS, "/groups/g")
        assert sorted(a["status"] for a in answers.values()) == [200, 404, 404]


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "Directory_ExpiredPageToken"),
        (410, "syncStateNotFound"),
        (410, "resyncRequired"),
        (403, "Authorization_RequestDenied"),
        (404, "Request_ResourceNotFound"),
    ],
)
def test_refused_delta_links(http: httpx.Client, status: int, code: str) -> None:
    tenant = Tenant()
    tenant.add_group("g1", display_name="G1")
    tenant.add_group("g2", display_name="G2")
    with GraphStandIn(tenant) as standin:
        links = {}
        for gid in ("g1", "g2"):
            _, body = get(
                http, standin.url + GROUP_DELTA + f"&$filter=id eq '{gid}'&$deltatoken=latest"
            )
            links[gid] = body["@odata.deltaLink"]
        standin.refuse_delta_link(status, code, group_id="g2")
        assert get(http, links["g1"])[0] == 200  # another group's link
        response = http.get(links["g2"])
        assert response.status_code == status
        assert response.json()["error"]["code"] == code
        assert response.json()["error"]["message"]
        if status == 410:
            assert response.headers["location"].endswith("/groups/delta")
        assert get(http, links["g2"])[0] == 200  # one shot
        standin.refuse_delta_link(status, code)
        relative = links["g1"][len(standin.url) :]
        answers = batch(http, standin, relative, "/groups/g1")
        assert (answers["1"]["status"], answers["2"]["status"]) == (status, 200)
        assert answers["1"]["body"]["error"]["code"] == code
