"""The whole-plan safety rules, on plain data (build_plan does no I/O)."""

from writeback.config import SoftDeletePolicy
from writeback.domain.mapping import MappingOptions
from writeback.domain.model import Add, CloudGroup, Delete, DirectoryGroup, SkipReason
from writeback.ports import CloudSnapshot
from writeback.service.reconcile import SyncPolicy, build_plan

OU = "OU=W,DC=corp,DC=example"
OPTIONS = MappingOptions(target_ou=OU)


def gid(n: int) -> str:
    return f"00000000-0000-0000-0000-{n:012d}"


def cloud(*ids: int, soft: tuple[int, ...] = ()) -> CloudSnapshot:
    groups = tuple(CloudGroup(gid(n), f"G{n}") for n in ids)
    return CloudSnapshot(groups, frozenset(gid(n) for n in soft))


def ad(*ids: int) -> list[DirectoryGroup]:
    return [DirectoryGroup(f"CN=Group_{gid(n)},{OU}", gid(n), {}) for n in ids]


def test_orphans_are_deleted_and_new_groups_added() -> None:
    plan = build_plan(cloud(1), ad(2), OPTIONS, SyncPolicy())
    assert [type(op) for op in plan.operations] == [Add, Delete]
    assert plan.deletes[0].group_id == gid(2)
    assert plan.deletes_blocked is None


def test_over_threshold_holds_back_every_delete() -> None:
    plan = build_plan(cloud(1), ad(2, 3, 4), OPTIONS, SyncPolicy(delete_threshold=2))
    assert plan.deletes == []
    assert plan.deletes_blocked is not None
    assert "3 deletes exceed the threshold of 2" in plan.deletes_blocked
    assert {s.group_id for s in plan.skips if s.reason is SkipReason.DELETE_THRESHOLD} == {
        gid(2),
        gid(3),
        gid(4),
    }
    allowed = build_plan(
        cloud(1), ad(2, 3, 4), OPTIONS, SyncPolicy(delete_threshold=2, allow_deletes=True)
    )
    assert len(allowed.deletes) == 3


def test_an_empty_cloud_never_deletes_without_allow_deletes() -> None:
    plan = build_plan(cloud(), ad(1, 2), OPTIONS, SyncPolicy())
    assert plan.deletes == []
    assert plan.deletes_blocked is not None
    assert "no groups" in plan.deletes_blocked


def test_soft_deleted_groups_are_kept_unless_policy_says_delete() -> None:
    kept = build_plan(cloud(1, soft=(2,)), ad(1, 2), OPTIONS, SyncPolicy())
    assert kept.deletes == []
    assert [s.reason for s in kept.skips] == [SkipReason.SOFT_DELETED]
    deleted = build_plan(
        cloud(1, soft=(2,)), ad(1, 2), OPTIONS, SyncPolicy(soft_delete=SoftDeletePolicy.DELETE)
    )
    assert [d.group_id for d in deleted.deletes] == [gid(2)]


def test_disabled_writeback_plans_deleting_everything_we_own_behind_threshold() -> None:
    plan = build_plan(cloud(1, 2, soft=(3,)), ad(1, 2, 3), OPTIONS, SyncPolicy(enabled=False))
    assert sorted(d.group_id for d in plan.deletes) == [gid(1), gid(2), gid(3)]
    assert not any(isinstance(op, Add) for op in plan.operations)
    capped = build_plan(
        cloud(1, 2), ad(1, 2, 3), OPTIONS, SyncPolicy(enabled=False, delete_threshold=1)
    )
    assert capped.deletes == []
    assert capped.deletes_blocked is not None


def test_non_unified_groups_are_out_of_scope() -> None:
    snapshot = CloudSnapshot((CloudGroup(gid(1), "Sec", group_types=()),), frozenset())
    plan = build_plan(snapshot, [], OPTIONS, SyncPolicy())
    assert plan.operations == []
    assert plan.groups_in_cloud == 0


def test_two_objects_with_one_anchor_are_reported_and_left_alone() -> None:
    twins = [*ad(1), DirectoryGroup(f"CN=Copy,{OU}", gid(1), {})]
    plan = build_plan(cloud(1), twins, OPTIONS, SyncPolicy())
    assert plan.operations == []
    assert [s.reason for s in plan.skips] == [SkipReason.DUPLICATE_ANCHOR]
