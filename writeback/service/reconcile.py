"""Full sync: converge every group under the target OU to the cloud.

Planning is separate from applying, so ``plan`` shows exactly what ``sync``
would do, and the safety rules (delete threshold, soft deletes, an empty cloud)
are decided on the whole plan before a single write.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from writeback.config import Settings, SoftDeletePolicy
from writeback.domain.guard import GuardRules, GuardView, guard_desired
from writeback.domain.mapping import MappingOptions, desired_group, over_member_limit
from writeback.domain.model import (
    Add,
    CloudGroup,
    Delete,
    DirectoryGroup,
    Operation,
    Skip,
    SkipReason,
)
from writeback.domain.planner import plan_group
from writeback.errors import DuplicateAnchor, TransientError, WritebackError
from writeback.ports import CloudSnapshot, CloudSource, Directory
from writeback.service.guarding import member_sids_to_check, read_view

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncPolicy:
    enabled: bool = True
    delete_threshold: int = 500
    allow_deletes: bool = False
    soft_delete: SoftDeletePolicy = SoftDeletePolicy.KEEP
    #: The member and nesting guards' settings (domain/guard.py).
    guard: GuardRules = field(default_factory=GuardRules)

    @classmethod
    def from_settings(cls, settings: Settings, *, allow_deletes: bool = False) -> SyncPolicy:
        return cls(
            enabled=settings.enabled,
            delete_threshold=settings.delete_threshold,
            allow_deletes=allow_deletes,
            soft_delete=settings.soft_delete,
            guard=settings.guard_rules,
        )


@dataclass
class Plan:
    """Operations in apply order (creates and updates before deletes)."""

    operations: list[Operation] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    #: Set when deletes were held back by a safety rule; the reason says which.
    deletes_blocked: str | None = None
    groups_in_cloud: int = 0
    groups_in_directory: int = 0

    @property
    def deletes(self) -> list[Delete]:
        return [op for op in self.operations if isinstance(op, Delete)]

    @property
    def alerts(self) -> list[Skip]:
        """What a person must look at: duplicated anchors, frozen groups."""
        return [skip for skip in self.skips if skip.alert]


def build_plan(
    snapshot: CloudSnapshot,
    current: Iterable[DirectoryGroup],
    options: MappingOptions,
    policy: SyncPolicy,
    guard: GuardView | None = None,
) -> Plan:
    """The whole plan. ``guard``: what the directory said for the member and nesting
    guards (:func:`guard_view`); without it no member resolves, so none is written."""
    guard = guard if guard is not None else GuardView(rules=policy.guard)
    plan = Plan()
    by_id, duplicated = _index(current, plan)
    plan.groups_in_directory = len(by_id)
    cloud = [group for group in snapshot.groups if group.is_unified] if policy.enabled else []
    plan.groups_in_cloud = len(cloud)
    for group in sorted(cloud, key=lambda g: g.id):
        if group.id in duplicated:
            continue
        plan_cloud_group(plan, group, by_id.pop(group.id, None), options, guard)
    deletes = _orphan_deletes(by_id.values(), snapshot.soft_deleted, policy, plan)
    _guard_deletes(deletes, plan, policy)
    return plan


def plan_cloud_group(
    plan: Plan,
    group: CloudGroup,
    current: DirectoryGroup | None,
    options: MappingOptions,
    guard: GuardView,
) -> None:
    """Add one cloud group to the plan: skipped over the member limit (never truncated),
    else at most one operation, with its skipped members reported (the guards' too)."""
    limit_skip = over_member_limit(group, options.member_limit)
    if limit_skip is not None:
        plan.skips.append(limit_skip)
        return
    desired = guard_desired(desired_group(group, options), current, guard)
    plan.skips.extend(desired.skips)
    operation = plan_group(desired, current, options.target_ou)
    if operation is not None:
        plan.operations.append(operation)


def guard_view(
    groups: Iterable[CloudGroup],
    current: Iterable[DirectoryGroup],
    directory: Directory,
    options: MappingOptions,
    policy: SyncPolicy,
) -> GuardView:
    """The guards' reads for planning ``groups``: the member SIDs the mapping would add,
    resolved in bulk, and the nesting of our groups (one read each)."""
    by_id = {group.group_id: group for group in current}
    sids = member_sids_to_check(groups, by_id, options, policy.guard)
    return read_view(directory, sids, policy.guard)


def plan_from(
    snapshot: CloudSnapshot,
    current: Iterable[DirectoryGroup],
    directory: Directory,
    options: MappingOptions,
    policy: SyncPolicy,
) -> Plan:
    """:func:`build_plan` with the guards' reads, and the adds checked (:func:`check_adds`)."""
    current = list(current)
    guard = guard_view(snapshot.groups, current, directory, options, policy)
    plan = build_plan(snapshot, current, options, policy, guard)
    check_adds(plan, directory)
    return plan


def check_adds(plan: Plan, directory: Directory) -> None:
    """Look once more, in one read, for an object carrying each planned add's anchor:
    one an admin made since, or one whose anchor differs from ours only in case (not
    ours, so the full read did not list it). Either way adding would make a twin:
    the add is dropped, and a claim that is not ours becomes a duplicate-anchor alert."""
    adds = [op.group_id for op in plan.operations if isinstance(op, Add)]
    if not adds:
        return
    try:
        there = set(directory.find_groups(adds, members=False))
        claimed: dict[str, tuple[str, ...]] = {}
    except DuplicateAnchor as duplicate:
        there, claimed = set(duplicate.found), duplicate.duplicates
    if not there and not claimed:
        return
    for group_id in sorted(there):
        log.info("group %s: an object carrying its anchor appeared; not added", group_id)
    plan.operations = [
        op
        for op in plan.operations
        if not (isinstance(op, Add) and (op.group_id in there or op.group_id in claimed))
    ]
    plan.skips.extend(
        Skip(gid, SkipReason.DUPLICATE_ANCHOR, "; ".join(dns)) for gid, dns in claimed.items()
    )


def _index(
    current: Iterable[DirectoryGroup], plan: Plan
) -> tuple[dict[str, DirectoryGroup], set[str]]:
    """Directory groups by cloud id; a duplicated anchor is reported, never touched."""
    by_id: dict[str, DirectoryGroup] = {}
    duplicated: set[str] = set()
    for group in current:
        if group.group_id in by_id:
            duplicated.add(group.group_id)
            plan.skips.append(
                Skip(
                    group.group_id,
                    SkipReason.DUPLICATE_ANCHOR,
                    f"{by_id[group.group_id].dn}; {group.dn}",
                )
            )
        by_id[group.group_id] = group
    for group_id in duplicated:
        del by_id[group_id]
    return by_id, duplicated


def _orphan_deletes(
    orphans: Iterable[DirectoryGroup],
    soft_deleted: frozenset[str],
    policy: SyncPolicy,
    plan: Plan,
) -> list[Delete]:
    deletes = []
    for orphan in sorted(orphans, key=lambda g: g.group_id):
        keep = policy.soft_delete is SoftDeletePolicy.KEEP and orphan.group_id in soft_deleted
        if keep and policy.enabled:
            plan.skips.append(
                Skip(
                    orphan.group_id,
                    SkipReason.SOFT_DELETED,
                    f"kept until deleted for good: {orphan.dn}",
                )
            )
        else:
            deletes.append(Delete(orphan.group_id, orphan.dn))
    return deletes


def _guard_deletes(deletes: list[Delete], plan: Plan, policy: SyncPolicy) -> None:
    """Hold back every delete when a safety rule says so (accidental-delete protection)."""
    reason = threshold_reason(deletes, policy)
    if reason is None and deletes and policy.enabled and plan.groups_in_cloud == 0:
        reason = (
            f"the cloud returned no groups but {len(deletes)} written-back groups exist; "
            "nothing was deleted (use --allow-deletes if that is really so)"
        )
    add_deletes(deletes, plan, policy, reason)


def threshold_reason(deletes: list[Delete], policy: SyncPolicy) -> str | None:
    """Why ``deletes`` may not all be made in one run, if they are too many."""
    if len(deletes) <= policy.delete_threshold:
        return None
    return (
        f"{len(deletes)} deletes exceed the threshold of {policy.delete_threshold}; "
        "nothing was deleted (use --allow-deletes to go ahead)"
    )


def add_deletes(deletes: list[Delete], plan: Plan, policy: SyncPolicy, reason: str | None) -> None:
    """Plan ``deletes``, or, with a ``reason`` and no --allow-deletes, hold them all back."""
    if reason is None or policy.allow_deletes:
        plan.operations.extend(deletes)
        return
    plan.deletes_blocked = reason
    plan.skips.extend(Skip(d.group_id, SkipReason.DELETE_THRESHOLD, d.dn) for d in deletes)


@dataclass
class SyncResult:
    plan: Plan
    applied: dict[str, int] = field(default_factory=dict)
    ldap_requests: int = 0
    failures: list[tuple[Operation, str]] = field(default_factory=list)
    seconds: float = 0.0


Progress = Callable[[int, int], None]


def apply_plan(
    plan: Plan,
    directory: Directory,
    *,
    progress: Progress | None = None,
    attempts: int = 3,
) -> SyncResult:
    """Apply each operation; a failure is recorded and the run goes on."""
    result = SyncResult(plan)
    started = time.monotonic()
    total = len(plan.operations)
    for done, operation in enumerate(plan.operations, start=1):
        try:
            result.ldap_requests += _apply_with_retry(directory, operation, attempts)
            result.applied[operation.kind] = result.applied.get(operation.kind, 0) + 1
        except WritebackError as error:
            log.warning("%s %s failed: %s", operation.kind, operation.group_id, error)
            result.failures.append((operation, str(error)))
        if progress is not None:
            progress(done, total)
    result.seconds = time.monotonic() - started
    return result


def _apply_with_retry(directory: Directory, operation: Operation, attempts: int) -> int:
    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential_jitter(multiplier=0.5, max=10),
        retry=retry_if_exception_type(TransientError),
        reraise=True,
    )
    return retrying(directory.apply, operation)


def sync(
    cloud: CloudSource,
    directory: Directory,
    options: MappingOptions,
    policy: SyncPolicy,
    *,
    progress: Progress | None = None,
) -> SyncResult:
    """Read both sides, plan, apply: the reconcile timer and ``sync`` verb."""
    plan = plan_sync(cloud, directory, options, policy)
    return apply_plan(plan, directory, progress=progress)


def plan_sync(
    cloud: CloudSource, directory: Directory, options: MappingOptions, policy: SyncPolicy
) -> Plan:
    """Read both sides at the same time, then plan.

    The Graph snapshot is read on a thread of its own (the Graph adapter runs its
    own event loop and may be called from any thread) while this thread reads AD,
    so the LDAP connection stays on the thread that owns it. Either read failing
    fails the plan (an AD failure once the Graph read has finished).
    """
    options = replace(options, schema_attributes=directory.schema_attributes())
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="graph-snapshot") as pool:
        cloud_read = pool.submit(cloud.snapshot)
        current = list(directory.iter_groups())
        snapshot = cloud_read.result()
    return plan_from(snapshot, current, directory, options, policy)
