"""GraphCloud (real msgraph-sdk) against the Graph stand-in: reads, paging, faults."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from writeback.adapters.graph import GraphCloud
from writeback.domain.model import CloudGroup, MemberKind
from writeback.errors import DeltaExpired, GraphRefused, GraphThrottled, GraphUnavailable
from writeback_sandbox.graph_standin import GraphStandIn, Tenant
from writeback_sandbox.sample_tenant import (
    SECURITY_GROUP_NAME,
    build_sample_tenant,
    cloud_only_user_name,
    object_id,
    user_id_for,
)


def add_users(tenant: Tenant, count: int, *, prefix: str = "user") -> list[str]:
    ids = [f"{prefix}-{i:05d}" for i in range(count)]
    for i, user_id in enumerate(ids):
        tenant.add_user(user_id, sid=f"S-1-5-21-9-9-9-{1000 + i}", synced=True)
    return ids


@pytest.fixture
def standin() -> Iterator[GraphStandIn]:
    with GraphStandIn(Tenant(), page_size=5, member_page_size=1000) as server:
        yield server


def cloud_for(server: GraphStandIn, **options: float) -> GraphCloud:
    settings: dict[str, float] = {"max_wait": 0.05, "backoff": 0.01, "timeout": 5.0}
    settings.update(options)
    return GraphCloud(
        base_url=server.url,
        timeout=settings["timeout"],
        max_attempts=int(settings.get("max_attempts", 3)),
        max_wait=settings["max_wait"],
        backoff=settings["backoff"],
    )


@pytest.fixture
def cloud(standin: GraphStandIn) -> Iterator[GraphCloud]:
    client = cloud_for(standin)
    yield client
    client.close()


def by_id(groups: tuple[CloudGroup, ...]) -> dict[str, CloudGroup]:
    return {g.id: g for g in groups}


def test_snapshot_merges_a_group_split_over_pages(standin: GraphStandIn, cloud: GraphCloud) -> None:
    tenant = standin.tenant
    users = add_users(tenant, 2600)
    tenant.add_group(
        "big",
        display_name="Big group",
        description="d",
        mail="big@contoso.com",
        mail_nickname="big",
        proxy_addresses=["SMTP:big@contoso.com", "smtp:big@contoso.onmicrosoft.com"],
        visibility="Public",
        members=users[:2500],
    )
    for n in range(12):
        tenant.add_group(f"g{n:02d}", display_name=f"Group {n}", members=users[n : n + 4])
    tenant.add_group("security", display_name="Not M365", group_types=(), members=users[:3])

    snapshot = cloud.snapshot()

    groups = by_id(snapshot.groups)
    assert set(groups) == {"big", *(f"g{n:02d}" for n in range(12))}  # no security group
    big = groups["big"]
    assert big.display_name == "Big group"  # not clobbered by the continuations
    assert big.description == "d"
    assert big.mail == "big@contoso.com"
    assert big.mail_nickname == "big"
    assert big.proxy_addresses == ("SMTP:big@contoso.com", "smtp:big@contoso.onmicrosoft.com")
    assert big.group_types == ("Unified",)
    assert big.visibility == "Public"
    assert [m.id for m in big.members] == users[:2500]
    assert all(m.kind is MemberKind.USER and m.synced for m in big.members)
    assert big.members[7].sid == "S-1-5-21-9-9-9-1007"
    assert groups["g03"].members[0].id == users[3]
    assert snapshot.soft_deleted == frozenset()
    assert snapshot.groups_delta_link and "$deltatoken=" in snapshot.groups_delta_link
    assert snapshot.users_delta_link and "$deltatoken=" in snapshot.users_delta_link
    assert standin.count("/groups/delta") >= 4  # paged, big group on three pages
    assert standin.count("/users/delta") == 2600 // 5  # five users a page


def test_snapshot_keeps_member_kinds_and_cloud_only_users() -> None:
    sids = {f"user{i:02d}": f"S-1-5-21-1-2-3-{1100 + i}" for i in range(20)}
    tenant = build_sample_tenant(sids)
    extra = object_id("group", "0:Finance, Planning & Analysis")
    tenant.add_device("device-1")
    tenant.add_contact("contact-1")
    tenant.add_members(extra, ["device-1", "contact-1"])
    with GraphStandIn(tenant, page_size=4) as server, cloud_for(server) as client:
        snapshot = client.snapshot()
    groups = by_id(snapshot.groups)
    assert len(groups) == 12
    assert object_id("group", SECURITY_GROUP_NAME) not in groups
    names = {g.display_name for g in groups.values()}
    assert "  Padded Name  " in names and "#general" in names
    members = {m.id: m for m in groups[extra].members}
    security = members[object_id("group", SECURITY_GROUP_NAME)]
    assert (security.kind, security.sid, security.synced) == (MemberKind.GROUP, None, False)
    assert members["device-1"].kind is MemberKind.DEVICE
    assert members["contact-1"].kind is MemberKind.CONTACT
    all_members = [m for g in groups.values() for m in g.members]
    cloud_only = {user_id_for(cloud_only_user_name(i)) for i in range(5)}
    seen_cloud = [m for m in all_members if m.id in cloud_only]
    assert seen_cloud and all(
        (m.kind, m.sid, m.synced) == (MemberKind.USER, None, False) for m in seen_cloud
    )
    synced = [m for m in all_members if m.id == user_id_for("user05")]
    assert synced and all(m.sid == sids["user05"] and m.synced for m in synced)


def test_snapshot_lists_soft_deleted_groups(standin: GraphStandIn, cloud: GraphCloud) -> None:
    for n in range(4):
        standin.tenant.add_group(f"g{n}", display_name=f"G{n}")
    standin.tenant.soft_delete_group("g1")
    standin.tenant.soft_delete_group("g2")
    standin.tenant.hard_delete_group("g2")
    snapshot = cloud.snapshot()
    assert set(by_id(snapshot.groups)) == {"g0", "g3"}
    assert snapshot.soft_deleted == frozenset({"g1"})
    assert cloud.soft_deleted_group_ids() == frozenset({"g1"})


def test_get_group_pages_over_999_members(standin: GraphStandIn, cloud: GraphCloud) -> None:
    tenant = standin.tenant
    users = add_users(tenant, 2100)
    tenant.add_user("cloud-only", sid=None, synced=False)
    tenant.add_device("dev")
    tenant.add_group(
        "g", display_name="G", mail="g@contoso.com", members=[*users, "cloud-only", "dev"]
    )
    standin.reset_log()
    group = cloud.get_group("g")
    assert group is not None
    assert group.display_name == "G" and group.mail == "g@contoso.com" and group.is_unified
    assert [m.id for m in group.members] == [*users, "cloud-only"]  # users only
    assert group.members[-1].sid is None and not group.members[-1].synced
    assert group.members[0].sid == "S-1-5-21-9-9-9-1000" and group.members[0].synced
    assert standin.count("/members/") == 3
    assert "$top=999" in standin.requests[1][1]


def test_get_group_none_when_missing_or_binned(standin: GraphStandIn, cloud: GraphCloud) -> None:
    standin.tenant.add_group("binned", display_name="B")
    standin.tenant.soft_delete_group("binned")
    standin.tenant.add_group("sec", display_name="Security", group_types=())
    assert cloud.get_group("missing") is None
    assert cloud.get_group("binned") is None
    security = cloud.get_group("sec")
    assert security is not None and not security.is_unified


def test_429_with_retry_after_is_honoured(standin: GraphStandIn) -> None:
    standin.tenant.add_group("g", display_name="G")
    standin.inject(429, times=1, retry_after=0.3, path_contains="/groups/g")
    with cloud_for(standin, max_wait=2.0) as client:
        started = time.monotonic()
        group = client.get_group("g")
        elapsed = time.monotonic() - started
    assert group is not None
    assert elapsed >= 0.3
    assert [s for _, t, s in standin.requests if t.startswith("/v1.0/groups/g?")] == [429, 200]


def test_sdk_retry_handler_is_not_in_the_pipeline(standin: GraphStandIn) -> None:
    standin.tenant.add_group("g", display_name="G")
    with cloud_for(standin, max_attempts=1) as client:
        standin.inject(503, times=1, retry_after=0.01)
        with pytest.raises(GraphThrottled):
            client.get_group("g")
        assert standin.count("/groups/g") == 1  # the SDK did not retry on its own
    standin.reset_log()
    with cloud_for(standin, max_attempts=2) as client:
        standin.inject(503, times=1, retry_after=0.01, path_contains="/groups/g?")
        assert client.get_group("g") is not None
        assert [s for _, _, s in standin.requests] == [503, 200, 200]


def test_persistent_503_gives_up_after_max_attempts(standin: GraphStandIn) -> None:
    standin.tenant.add_group("g", display_name="G")
    standin.inject(503, times=100, retry_after=0.02)
    with cloud_for(standin, max_attempts=4) as client, pytest.raises(GraphThrottled) as info:
        client.get_group("g")
    assert info.value.retry_after == pytest.approx(0.02)
    assert standin.count("/groups/g") == 4
    assert [s for _, _, s in standin.requests] == [503] * 4


def test_snapshot_fails_when_one_read_keeps_failing(standin: GraphStandIn) -> None:
    standin.tenant.add_group("g", display_name="G")
    standin.inject(503, times=100, path_contains="/users/delta")
    with cloud_for(standin, max_attempts=3) as client, pytest.raises(GraphThrottled) as info:
        client.snapshot()
    assert info.value.retry_after is None
    assert standin.count("/users/delta") == 3


def test_persistent_500_is_unavailable_not_throttled(standin: GraphStandIn) -> None:
    standin.tenant.add_group("g", display_name="G")
    standin.inject(500, times=100)
    with cloud_for(standin, max_attempts=3) as client, pytest.raises(GraphUnavailable) as info:
        client.get_group("g")
    assert not isinstance(info.value, GraphThrottled)
    assert standin.count("/groups/g") == 3
    assert "500" in str(info.value)


def test_retry_after_beyond_max_wait_is_raised_at_once(standin: GraphStandIn) -> None:
    standin.tenant.add_group("g", display_name="G")
    standin.inject(429, times=5, retry_after=30)
    with cloud_for(standin, max_attempts=5, max_wait=1.0) as client:
        started = time.monotonic()
        with pytest.raises(GraphThrottled) as info:
            client.get_group("g")
        assert time.monotonic() - started < 1.0
    assert info.value.retry_after == 30
    assert standin.count("/groups/g") == 1


def test_other_4xx_is_refused_without_retry(standin: GraphStandIn, cloud: GraphCloud) -> None:
    standin.tenant.add_group("g", display_name="G")
    standin.inject(403, times=5)
    with pytest.raises(GraphRefused) as info:
        cloud.get_group("g")
    assert "403" in str(info.value)
    assert standin.count("/groups/g") == 1


def test_paging_fault_mid_round_retries_only_that_page(
    standin: GraphStandIn, cloud: GraphCloud
) -> None:
    for n in range(12):
        standin.tenant.add_group(f"g{n}", display_name=f"G{n}")
    standin.inject(503, times=2, retry_after=0.01, path_contains="groups/delta?$skiptoken")
    snapshot = cloud.snapshot()
    assert len(snapshot.groups) == 12
    assert standin.count("/groups/delta") == 3 + 2
    assert standin.count("groups/delta?$skiptoken") == 2 + 2


def test_timeouts_and_dropped_connections_are_unavailable(standin: GraphStandIn) -> None:
    standin.tenant.add_group("g", display_name="G")
    with cloud_for(standin, max_attempts=1, timeout=0.2) as client:
        standin.inject_delay(0.6, path_contains="/groups/g")
        with pytest.raises(GraphUnavailable) as info:
            client.get_group("g")
        assert "timed out" in str(info.value)
        standin.inject_disconnect(path_contains="/groups/g")
        with pytest.raises(GraphUnavailable):
            client.get_group("g")
    with cloud_for(standin, max_attempts=2) as client:
        standin.inject_disconnect(path_contains="/groups/g")
        assert client.get_group("g") is not None


def test_unreachable_graph_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = GraphCloud(
        base_url=f"http://127.0.0.1:{port}/v1.0", max_attempts=2, max_wait=0.01, backoff=0.01
    )
    with client, pytest.raises(GraphUnavailable):
        client.soft_deleted_group_ids()


def test_group_changes_and_expired_delta_token(standin: GraphStandIn, cloud: GraphCloud) -> None:
    tenant = standin.tenant
    users = add_users(tenant, 3)
    for n in range(4):
        tenant.add_group(f"g{n}", display_name=f"G{n}", members=users[:2])
    link = cloud.snapshot().groups_delta_link
    assert link is not None
    tenant.add_members("g0", [users[2]])
    tenant.update_group("g1", display_name="renamed")
    tenant.soft_delete_group("g2")
    tenant.hard_delete_group("g3")
    changes = cloud.group_changes(link)
    assert changes.changed == ("g0", "g1")
    assert changes.soft_deleted == frozenset({"g2"})
    assert changes.hard_deleted == frozenset({"g3"})
    assert changes.delta_link and changes.delta_link != link
    assert cloud.group_changes(changes.delta_link).changed == ()

    tenant.expire_delta_tokens()
    with pytest.raises(DeltaExpired) as info:
        cloud.group_changes(changes.delta_link)
    token = changes.delta_link.split("$deltatoken=")[1]
    assert token not in str(info.value)
    assert "410" in str(info.value)
    assert standin.count("$deltatoken=") == 3  # 410 is not retried


def test_close_is_idempotent_and_final(standin: GraphStandIn) -> None:
    client = cloud_for(standin)
    client.close()
    client.close()
    with pytest.raises(RuntimeError):
        client.snapshot()


def test_importing_the_adapter_does_not_import_the_sdk() -> None:
    code = (
        "import sys, writeback.adapters.graph\n"
        "assert not any(m.split('.')[0] in ('msgraph', 'kiota_http', 'httpx') "
        "for m in sys.modules), sorted(m for m in sys.modules if 'msgraph' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
