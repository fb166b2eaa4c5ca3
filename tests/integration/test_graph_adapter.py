"""GraphCloud (real msgraph-sdk) against the Graph stand-in: reads, paging, faults."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from writeback.adapters.graph import GraphCloud
from writeback.domain.model import CloudGroup, MemberKind
from writeback.errors import DeltaExpired, GraphRefused, GraphThrottled, GraphUnavailable
from writeback.ports import GroupDelta, GroupGone
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
    # a user in several groups is one (immutable) object: a full read of 400,000
    # memberships over a few thousand users builds a few thousand members
    assert groups["g03"].members[0] is big.members[3]
    assert groups["g03"].members[1] is groups["g04"].members[0]
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


# --------------------------------------------------------------------------- batched reads


def small_tenant(groups: int, *, members: int = 3) -> Tenant:
    tenant = Tenant()
    users = add_users(tenant, members)
    for n in range(groups):
        tenant.add_group(
            f"g{n:02d}", display_name=f"Group {n}", mail=f"g{n}@contoso.com", members=users
        )
    return tenant


@pytest.mark.parametrize(("groups", "round_trips"), [(1, 1), (20, 2), (45, 5)])
def test_batched_reads_cost_a_round_trip_per_20_requests(groups: int, round_trips: int) -> None:
    tenant = small_tenant(groups)
    ids = [f"g{n:02d}" for n in range(groups)]
    with GraphStandIn(tenant) as server, cloud_for(server) as client:
        one_by_one = {gid: client.get_group(gid) for gid in ids}
        server.reset_log()
        read = client.get_groups(ids)
        assert read == one_by_one
        assert list(read) == ids
        # Two requests a group (properties, first member page), 20 to a batch.
        assert server.count() == 2 * groups
        assert server.count(batched=True) == 2 * groups
        assert server.round_trips() == round_trips == server.round_trips("/$batch")
        group = read["g00"]
        assert isinstance(group, CloudGroup) and group.mail == "g0@contoso.com"
        assert [m.sid for m in group.members] == [f"S-1-5-21-9-9-9-{1000 + i}" for i in range(3)]


def test_calls_from_different_threads_never_share_a_batch() -> None:
    # Shared batches would finish together and tie the workers into one rhythm
    # (all reading Graph, then all writing to AD at once).
    tenant = small_tenant(8)
    halves = [[f"g{n:02d}" for n in range(4)], [f"g{n:02d}" for n in range(4, 8)]]
    with GraphStandIn(tenant, latency=0.02) as server, cloud_for(server) as client:
        barrier = threading.Barrier(2)
        reads: list[dict[str, object]] = []

        def read(ids: list[str]) -> None:
            for _ in range(10):
                barrier.wait()
                reads.append(dict(client.get_groups(ids)))

        threads = [threading.Thread(target=read, args=(ids,)) for ids in halves]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        log = server.log
    assert len(reads) == 20 and all(isinstance(g, CloudGroup) for r in reads for g in r.values())
    carried: dict[int, set[int]] = {}
    for entry in log:
        if entry.batch is not None and not entry.envelope:
            gid = entry.target.split("/groups/")[1][:3]
            carried.setdefault(entry.batch, set()).add(0 if gid in halves[0] else 1)
    assert len(carried) == 20  # one batch of 8 requests per call
    assert all(len(sides) == 1 for sides in carried.values())


def test_get_groups_tells_live_binned_purged_and_lagging_groups_apart() -> None:
    tenant = small_tenant(3)
    for gid in ("binned", "purged", "restored"):
        tenant.add_group(gid, display_name=gid)
    tenant.soft_delete_group("binned")
    tenant.soft_delete_group("restored")
    tenant.soft_delete_group("purged")
    tenant.hard_delete_group("purged")
    ids = ["g00", "g01", "g02", "binned", "purged", "restored", "created", "missing"]
    with GraphStandIn(tenant) as server, cloud_for(server) as client:
        server.freeze_replica()  # the recycle bin keeps answering from a fresher replica
        tenant.restore_group("restored")
        tenant.add_group("created", display_name="Created")
        server.inject_not_found("g02")  # one lagging answer for a live group
        read = client.get_groups(ids)
    assert isinstance(read["g00"], CloudGroup) and isinstance(read["g01"], CloudGroup)
    assert read["binned"] == GroupGone(soft_deleted=True)
    assert read["purged"] == GroupGone(soft_deleted=False)
    # 404 on the group and absent from the bin: an observation, never an error.
    assert read["restored"] == GroupGone(soft_deleted=False)
    assert read["created"] == GroupGone(soft_deleted=False)
    assert read["g02"] == GroupGone(soft_deleted=False)
    assert read["missing"] == GroupGone(soft_deleted=False)
    # First round: 16 requests in one batch; then the bin, for the six 404s only.
    assert server.count("/directory/deletedItems/") == 6
    assert server.round_trips() == 2


def test_a_429_inside_a_batch_waits_its_retry_after_and_spares_the_others() -> None:
    tenant = small_tenant(10)
    ids = [f"g{n:02d}" for n in range(10)]
    with GraphStandIn(tenant) as server, cloud_for(server, max_wait=2.0) as client:
        server.inject(429, retry_after=0.3, path_contains="/groups/g05?")
        started = time.monotonic()
        read = client.get_groups(ids)
        elapsed = time.monotonic() - started
        log = server.log
    assert all(isinstance(read[gid], CloudGroup) for gid in ids)
    assert elapsed >= 0.3
    g05 = [r for r in log if r.target.startswith("/v1.0/groups/g05?")]
    assert [r.status for r in g05] == [429, 200]
    assert g05[0].batch != g05[1].batch  # retried in a later round trip
    others = [r for r in log if not r.envelope and not r.target.startswith("/v1.0/groups/g05?")]
    assert len(others) == 2 * 10 - 1 and {r.status for r in others} == {200}


def test_a_step_that_stays_throttled_ends_as_its_own_graph_throttled() -> None:
    tenant = small_tenant(4)
    ids = [f"g{n:02d}" for n in range(4)]
    with GraphStandIn(tenant) as server, cloud_for(server, max_attempts=3) as client:
        server.inject(429, times=100, retry_after=0.01, path_contains="/groups/g02?")
        read = client.get_groups(ids)
        assert server.count("/groups/g02?") == 3  # max_attempts, then it gives up
        error = read["g02"]
        assert isinstance(error, GraphThrottled) and error.retry_after == pytest.approx(0.01)
        assert "http" not in str(error) and "g02" not in str(error)
        assert all(isinstance(read[gid], CloudGroup) for gid in ids if gid != "g02")
        # A Retry-After beyond max_wait is not waited out: raised at once, for that id.
        server.clear_faults()
        server.reset_log()
        server.inject(429, times=100, retry_after=30, path_contains="/groups/g01/")
        read = client.get_groups(ids)
        assert isinstance(read["g01"], GraphThrottled) and read["g01"].retry_after == 30
        assert server.count("/groups/g01/") == 1
        # Another refusal is final at once (no retry) and also stays with its group.
        server.clear_faults()
        server.inject(403, times=100, path_contains="/groups/g03?")
        read = client.get_groups(ids)
        assert isinstance(read["g03"], GraphRefused) and "403" in str(read["g03"])
        assert isinstance(read["g00"], CloudGroup)


def test_a_throttled_or_dropped_batch_is_retried_whole() -> None:
    tenant = small_tenant(5)
    ids = [f"g{n:02d}" for n in range(5)]
    with GraphStandIn(tenant) as server, cloud_for(server, max_wait=1.0) as client:
        expected = {gid: client.get_group(gid) for gid in ids}
        server.reset_log()
        server.inject(429, retry_after=0.05, path_contains="/$batch")
        server.inject_disconnect(path_contains="/$batch")
        assert client.get_groups(ids) == expected
        assert [r.status for r in server.log if r.envelope] == [429, 0, 200]
        assert server.count() == 2 * 5  # steps of the refused batches never ran
        server.reset_log()
        server.inject(503, times=100, path_contains="/$batch")
        read = client.get_groups(ids)
        assert all(isinstance(read[gid], GraphThrottled) for gid in ids)
        assert server.round_trips("/$batch") == 3


def test_members_are_paged_across_batches() -> None:
    tenant = Tenant()
    users = add_users(tenant, 2600)
    tenant.add_group("big1", display_name="Big 1", members=users[:2500])
    tenant.add_group("big2", display_name="Big 2", members=users[100:2600])
    tenant.add_group("small", display_name="Small", members=users[:2])
    with GraphStandIn(tenant) as server, cloud_for(server) as client:
        read = client.get_groups(["big1", "big2", "small"])
        big1, big2 = read["big1"], read["big2"]
        assert isinstance(big1, CloudGroup) and isinstance(big2, CloudGroup)
        assert [m.id for m in big1.members] == users[:2500]
        assert [m.id for m in big2.members] == users[100:2600]
        assert big1.members[1234].sid == "S-1-5-21-9-9-9-2234"
        # 999 a page: the first pages with the properties, then pages 2 and 3 of
        # both big groups, each pair in one batch.
        assert server.count("/members/") == 3 + 2 + 2
        assert server.round_trips() == 3
        batches = [r.batch for r in server.log if "$skiptoken" in r.target]
        assert len(batches) == 4 and len(set(batches)) == 2


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "Directory_ExpiredPageToken"),
        (410, "syncStateNotFound"),
        (410, "resyncRequired"),
        (400, "Request_BadRequest"),
        (403, "Authorization_RequestDenied"),
        (404, "Request_ResourceNotFound"),
    ],
)
def test_a_refused_delta_link_is_none_whatever_the_4xx(status: int, code: str) -> None:
    tenant = small_tenant(3)
    ids = ["g00", "g01", "g02"]
    with GraphStandIn(tenant) as server, cloud_for(server) as client:
        links = {gid: client.group_delta_link(gid) or "" for gid in ids}
        tenant.update_group("g02", display_name="Renamed")
        server.refuse_delta_link(status, code, group_id="g01")
        server.reset_log()
        deltas = client.group_deltas(links)
        assert deltas["g01"] is None
        renamed = deltas["g02"]
        assert isinstance(renamed, GroupDelta) and renamed.group is not None
        assert renamed.group.display_name == "Renamed"
        assert isinstance(deltas["g00"], GroupDelta)
        assert server.round_trips() == 1 and server.count() == 6
        # The one-group call refuses the same way.
        server.refuse_delta_link(status, code, group_id="g02")
        assert client.group_delta("g02", links["g02"]) is None


def test_group_deltas_in_batches_with_errors_per_group() -> None:
    tenant = small_tenant(25)
    extra = add_users(tenant, 5, prefix="new")
    ids = [f"g{n:02d}" for n in range(25)]
    with GraphStandIn(tenant) as server, cloud_for(server, max_attempts=2) as client:
        links = {gid: client.group_delta_link(gid) or "" for gid in ids}
        tenant.add_members("g03", extra[:2])
        tenant.remove_members("g04", ["user-00000"])
        tenant.hard_delete_group("g05")
        server.inject(503, times=100, path_contains="/groups/g06?")
        server.reset_log()
        deltas = client.group_deltas(links)
        assert server.round_trips() == 3 + 1  # 50 requests, then g06's retry
        g03, g04, g05 = deltas["g03"], deltas["g04"], deltas["g05"]
        assert isinstance(g03, GroupDelta) and [m.id for m in g03.added] == extra[:2]
        assert isinstance(g04, GroupDelta) and [m.id for m in g04.removed] == ["user-00000"]
        assert isinstance(g05, GroupDelta) and g05.group is None  # gone: read in full
        assert isinstance(deltas["g06"], GraphThrottled)
        assert sum(isinstance(d, GroupDelta) for d in deltas.values()) == 24
        assert isinstance(g03.delta_link, str) and g03.delta_link != links["g03"]


def test_resolve_users_in_batches_and_a_user_not_yet_replicated() -> None:
    tenant = Tenant()
    users = add_users(tenant, 60)
    with GraphStandIn(tenant) as server, cloud_for(server) as client:
        server.freeze_replica()
        tenant.add_user("late", sid="S-1-5-21-9-9-9-99", synced=True)
        server.reset_log()
        found = client.resolve_users([*users, "late", "nobody"])
        assert set(found) == set(users)  # "late" is not visible yet
        assert found[users[7]].sid == "S-1-5-21-9-9-9-1007" and found[users[7]].synced
        assert server.count("/users?") == 5  # 15 ids a request
        assert server.round_trips() == 1
        server.release_replica()
        server.reset_log()
        assert set(client.resolve_users(["late"])) == {"late"}
        assert server.round_trips("/$batch") == 0  # a lone request is sent on its own
