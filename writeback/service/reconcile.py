"""Full sync: converge every group under the target OU to the cloud.

Planning is separate from applying, so ``plan`` shows exactly what ``sync``
would do, and the safety rules (delete threshold, soft deletes, an empty cloud)
are decided on the whole plan before a single write.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
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
from writeback.domain.mapping import (
    MappingOptions,
    OutOfScope,
    Placement,
    desired_group,
    over_member_limit,
)
from writeback.domain.model import (
    Add,
    CloudGroup,
    Delete,
    DirectoryGroup,
    Operation,
    Skip,
    SkipReason,
)
from writeback.domain.nesting import NestedGroups, creation_order, plan_nesting
from writeback.domain.planner import plan_group
from writeback.domain.rules import Excluded, decide
from writeback.errors import DuplicateAnchor, TransientError, WritebackError
from writeback.ports import CloudSnapshot, CloudSource, Directory
from writeback.service.guarding import (
    group_sids_to_check,
    member_sids_to_check,
    read_view,
    with_principals,
)
from writeback.service.heap import fewer_collections
from writeback.service.scope import in_scope

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
    #: The rule that placed each group written (group id -> rule name), for ``plan``.
    rules: dict[str, str] = field(default_factory=dict)

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
    *,
    ahead: Mapping[str, Plan] | None = None,
) -> Plan:
    """The whole plan. ``guard``: what the directory said for the member and nesting
    guards (:func:`guard_view`); without it no member resolves, so none is written.
    ``ahead``: plans already made for single groups from the same reads (see
    :func:`read_and_plan`), taken as they are; not used when nesting is on."""
    ahead = ahead if ahead is not None and not options.nesting else {}
    guard = guard if guard is not None else GuardView(rules=policy.guard)
    plan = Plan()
    by_id, duplicated = _index(current, plan)
    plan.groups_in_directory = len(by_id)
    read = snapshot.groups if policy.enabled else ()
    cloud = [g for g in read if options.wants_all_groups or g.is_unified]
    placed: dict[str, tuple[CloudGroup, Placement]] = {}
    out_of_scope: list[Delete] = []
    for group in sorted(cloud, key=lambda g: g.id):
        if group.id in duplicated:
            continue
        decision = decide(group, options)
        if isinstance(decision, Excluded):
            current_object = by_id.pop(group.id, None)
            plan_excluded(plan, group.id, decision, current_object, options, deletes=out_of_scope)
        else:
            placed[group.id] = (group, decision)
    plan.groups_in_cloud = len(placed)
    nested = _nesting(placed, by_id, options) if options.nesting else None
    for gid, (group, placement) in placed.items():
        current_object = by_id.pop(gid, None)
        made = ahead.get(gid)
        if made is not None:
            plan.operations.extend(made.operations)
            plan.skips.extend(made.skips)
            plan.rules.update(made.rules)
            continue
        plan_cloud_group(
            plan, group, current_object, options, guard, placement=placement, nested=nested
        )
    if nested is not None:
        plan.operations = creation_order(plan.operations)
    deletes = _orphan_deletes(by_id.values(), snapshot.soft_deleted, policy, plan)
    _guard_deletes(deletes + out_of_scope, plan, policy, cloud_empty=not cloud)
    return plan


def plan_cloud_group(
    plan: Plan,
    group: CloudGroup,
    current: DirectoryGroup | None,
    options: MappingOptions,
    guard: GuardView,
    *,
    placement: Placement | None = None,
    nested: NestedGroups | None = None,
) -> None:
    """Add one cloud group to the plan: skipped over the member limit (never truncated),
    else at most one operation, with its skipped members reported (the guards' too)."""
    limit_skip = over_member_limit(group, options.member_limit)
    if limit_skip is not None:
        plan.skips.append(limit_skip)
        return
    desired = guard_desired(desired_group(group, options, placement, nested), current, guard)
    plan.skips.extend(desired.skips)
    if desired.rule is not None:
        plan.rules[group.id] = desired.rule
    operation = plan_group(desired, current, options.target_ou)
    if operation is not None:
        plan.operations.append(operation)


def _nesting(
    placed: dict[str, tuple[CloudGroup, Placement]],
    current: dict[str, DirectoryGroup],
    options: MappingOptions,
) -> NestedGroups:
    """The member groups of this plan: those in scope that have an AD object or get
    one in this run (a group over the member limit without one is not created)."""
    written = {
        gid: entry
        for gid, entry in placed.items()
        if gid in current or over_member_limit(entry[0], options.member_limit) is None
    }
    return plan_nesting(written, current, options.target_ou)


def plan_excluded(
    plan: Plan,
    group_id: str,
    excluded: Excluded,
    current: DirectoryGroup | None,
    options: MappingOptions,
    *,
    deletes: list[Delete],
) -> None:
    """A group the scope leaves out: its AD object, if any, is kept (reported) or,
    with WRITEBACK_OUT_OF_SCOPE=delete, deleted behind the threshold; without an
    object it is reported when a rule or a safety exclusion decided."""
    if excluded.rule is not None:
        plan.rules[group_id] = excluded.rule
    if current is not None and options.out_of_scope is OutOfScope.DELETE:
        deletes.append(Delete(group_id, current.dn))
        return
    if current is None and excluded.rule is None and excluded.reason is SkipReason.OUT_OF_SCOPE:
        return  # never written, and no rule spoke of it: not worth a line
    kept = f"; kept as it is: {current.dn}" if current is not None else ""
    plan.skips.append(Skip(group_id, excluded.reason, excluded.detail + kept))


def guard_view(
    groups: Iterable[CloudGroup],
    current: Iterable[DirectoryGroup],
    directory: Directory,
    options: MappingOptions,
    policy: SyncPolicy,
    *,
    base: GuardView | None = None,
) -> GuardView:
    """The guards' reads for planning ``groups``: the member SIDs the mapping would add,
    resolved in bulk, and the nesting of our groups (one read each; with ``base``,
    the frozen groups are taken from it, not read again)."""
    by_id = {group.group_id: group for group in current}
    sids = member_sids_to_check(groups, by_id, options, policy.guard)
    if base is None:
        return read_view(directory, sids, policy.guard)
    return with_principals(directory, sids, base)


def _frozen_view(directory: Directory, policy: SyncPolicy) -> GuardView:
    """The guards' view with the frozen groups and no principal yet."""
    return read_view(directory, (), policy.guard)


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


def _guard_deletes(
    deletes: list[Delete], plan: Plan, policy: SyncPolicy, *, cloud_empty: bool
) -> None:
    """Hold back every delete when a safety rule says so (accidental-delete protection)."""
    reason = threshold_reason(deletes, policy)
    if reason is None and deletes and policy.enabled and cloud_empty:
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
    """Read both sides at the same time and plan (:func:`read_and_plan`), with the
    optional attributes this forest's schema has."""
    options = replace(options, schema_attributes=directory.schema_attributes())
    return read_and_plan(cloud, directory, options, policy)[1]


def read_and_plan(
    cloud: CloudSource, directory: Directory, options: MappingOptions, policy: SyncPolicy
) -> tuple[CloudSnapshot, Plan]:
    """The Graph snapshot and the plan made from it and AD, both sides read at once.

    The snapshot is read on a thread of its own (the Graph adapter runs its own
    event loop and may be called from any thread) while this thread reads AD, so
    the LDAP connection stays on the thread that owns it. Once the snapshot is
    in, the groups that need no more reads are planned while AD's later pages are
    still on their way (:class:`_PlanAhead`), so planning overlaps the DC's work
    instead of following it. Either read failing fails the plan (an AD failure
    once the Graph read has finished). The collector runs less often meanwhile
    (:func:`~writeback.service.heap.fewer_collections`).
    """
    with fewer_collections():
        return _read_and_plan(cloud, directory, options, policy)


def _read_and_plan(
    cloud: CloudSource, directory: Directory, options: MappingOptions, policy: SyncPolicy
) -> tuple[CloudSnapshot, Plan]:
    ahead = _PlanAhead(options, policy) if policy.enabled and not options.nesting else None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="graph-snapshot") as pool:
        cloud_read = pool.submit(cloud.snapshot)
        if ahead is not None:
            ahead.view = _frozen_view(directory, policy)
        current: list[DirectoryGroup] = []
        for group in directory.iter_groups():
            current.append(group)
            if ahead is not None:
                ahead.pending.append(group)
                if cloud_read.done():
                    ahead.step(cloud_read.result())
        snapshot = cloud_read.result()
    if ahead is None:
        return snapshot, plan_from(snapshot, current, directory, options, policy)
    rest = [group for group in snapshot.groups if group.id not in ahead.plans]
    guard = guard_view(rest, current, directory, options, policy, base=ahead.view)
    plan = build_plan(snapshot, current, options, policy, guard, ahead=ahead.plans)
    check_adds(plan, directory)
    return snapshot, plan


#: The plan of a group already converged, shared (build_plan only reads it): a
#: no-op re-sync plans every group ahead, 20,000 empty plans otherwise.
_NOTHING = Plan()


class _PlanAhead:
    """Plans made while the AD read goes on, one group at a time, for the groups
    whose plan needs nothing more from the directory: in scope, with an AD object,
    and no member to add that the guard must look up (a no-op re-sync is all such
    groups). The rest, and every group when nesting is on (its member groups are
    known only once every object is read), wait for :func:`build_plan`, which also
    sets aside any plan made for a group whose anchor turns out to be duplicated.

    ``STEP`` groups are planned per AD group read, so the backlog of the pages read
    before the snapshot came in is worked off while the DC builds the next pages,
    without holding up the request for them."""

    STEP = 3

    def __init__(self, options: MappingOptions, policy: SyncPolicy) -> None:
        self.options = options
        self.rules = policy.guard
        #: The guards' view without any principal: the frozen groups (read first).
        self.view = GuardView(rules=policy.guard)
        self.pending: deque[DirectoryGroup] = deque()
        #: group id -> the plan of that group alone
        self.plans: dict[str, Plan] = {}
        self._cloud: dict[str, CloudGroup] | None = None

    def step(self, snapshot: CloudSnapshot) -> None:
        if self._cloud is None:
            self._cloud = {group.id: group for group in snapshot.groups}
        for _ in range(min(self.STEP, len(self.pending))):
            self._plan(self._cloud, self.pending.popleft())

    def _plan(self, cloud: Mapping[str, CloudGroup], current: DirectoryGroup) -> None:
        group = cloud.get(current.group_id)
        if group is None:
            return
        placement = in_scope(group, self.options)
        if not isinstance(placement, Placement):
            return
        if group_sids_to_check(group, current.member_sids, self.options, self.rules):
            return
        plan = Plan()
        plan_cloud_group(plan, group, current, self.options, self.view, placement=placement)
        converged = not (plan.operations or plan.skips or plan.rules)
        self.plans[group.id] = _NOTHING if converged else plan
