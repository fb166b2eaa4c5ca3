"""Incremental reconcile: read only what changed in the cloud since the last run.

A full sync reads every group with its members (and every user) each time.
Graph's groups delta gives a link that, on the next run, returns only the
groups that changed since; this module keeps that link between runs:

* no stored link (first run, or the last run could not be trusted) -> a full
  sync (:func:`~writeback.service.reconcile.build_plan` /
  :func:`~writeback.service.reconcile.apply_plan`), returning the snapshot's
  groups delta link;
* a stored link -> :meth:`GraphCloud.group_changes`; every changed,
  soft-deleted or hard-deleted group is read again (Graph and AD, as the worker
  does) and planned once; the delete threshold applies across the run, exactly
  as in a full sync (past it, no delete is applied and the plan says why); a
  run that would delete every group we own becomes a full sync, so an empty
  cloud holds the deletes back here too;
* the link has expired (410 Gone, :class:`DeltaExpired`) -> a full sync and a
  new link, with ``fell_back_reason`` saying so.

What the groups delta does *not* see: a user's ``onPremisesSecurityIdentifier``
or ``onPremisesSyncEnabled`` changing (a member gaining or losing its on-prem
SID changes which members are written, but the group itself did not change),
and drift made by hand in AD. A periodic full sync catches both: pass
``full_every`` (a full sync after that many incremental runs; e.g. 48 runs of a
30-minute timer is once a day) and/or ``full_max_age`` (a full sync when the
last one is older than that). The caller keeps ``runs_since_full`` and
``last_full_at`` with the link (``Server`` keeps them in its state file).

The link is only advanced when the run was clean: when a write failed, a group
could not be read, or deletes were held back by the threshold, the old link is
returned, so the next run reads the same changes (plus newer ones) again and
nothing is lost (converging twice writes nothing). A full sync with failures
returns no link, so the next run is full again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from writeback.config import SoftDeletePolicy
from writeback.domain.guard import GuardView
from writeback.domain.mapping import MappingOptions, Placement
from writeback.domain.model import CloudGroup, Delete, DirectoryGroup, Skip, SkipReason
from writeback.domain.nesting import NestedGroups, creation_order, member_group_ids, plan_nesting
from writeback.domain.rules import Excluded
from writeback.domain.times import iso
from writeback.errors import DeltaExpired, DuplicateAnchor, TransientError, WritebackError
from writeback.ports import CloudSource, Directory, GroupChanges, StateStore
from writeback.service.guarding import member_sids_to_check, read_view
from writeback.service.reconcile import (
    Plan,
    Progress,
    SyncPolicy,
    SyncResult,
    add_deletes,
    apply_plan,
    check_adds,
    plan_cloud_group,
    plan_excluded,
    read_and_plan,
    threshold_reason,
)
from writeback.service.scope import in_scope

log = logging.getLogger(__name__)

Mode = Literal["full", "incremental"]


@dataclass
class IncrementalResult:
    mode: Mode
    result: SyncResult
    #: The link to store for the next run; None means "run a full sync next".
    next_delta_link: str | None
    #: Set when an incremental run was asked for but the link had expired (410).
    fell_back_reason: str | None = None
    #: Why a full sync ran (no link, 410, ``full_every``, ``full_max_age``...).
    full_reason: str | None = None
    #: Groups the delta reported (incremental runs only).
    changed: int = 0
    #: Groups that could not be read or planned: (group id, error).
    errors: list[tuple[str, str]] = field(default_factory=list)


def full_sync_due(
    *,
    delta_link: str | None,
    runs_since_full: int = 0,
    full_every: int | None = None,
    last_full_at: datetime | None = None,
    full_max_age: timedelta | None = None,
    now: datetime | None = None,
) -> str | None:
    """Why the next run must be a full sync, or None when an incremental one will do."""
    if not delta_link:
        return "no stored delta link"
    if full_every is not None and runs_since_full >= full_every:
        return f"{runs_since_full} incremental runs since the last full sync (full_every)"
    if full_max_age is not None:
        if last_full_at is None:
            return "no record of the last full sync (full_max_age)"
        age = (now or datetime.now(UTC)) - last_full_at
        if age >= full_max_age:
            return f"the last full sync is {age} old (full_max_age {full_max_age})"
    return None


def reconcile_incremental(
    cloud: CloudSource,
    directory: Directory,
    options: MappingOptions,
    policy: SyncPolicy,
    *,
    delta_link: str | None,
    full_every: int | None = None,
    runs_since_full: int = 0,
    full_max_age: timedelta | None = None,
    last_full_at: datetime | None = None,
    now: datetime | None = None,
    progress: Progress | None = None,
) -> IncrementalResult:
    """One reconcile run: incremental from ``delta_link`` when possible, else full."""
    options = replace(options, schema_attributes=directory.schema_attributes())
    reason = full_sync_due(
        delta_link=delta_link,
        runs_since_full=runs_since_full,
        full_every=full_every,
        last_full_at=last_full_at,
        full_max_age=full_max_age,
        now=now,
    )
    if reason is None and not policy.enabled:
        reason = "writeback is disabled (a full sync removes what it wrote)"
    if reason is not None or delta_link is None:
        return _full(
            cloud, directory, options, policy, reason=reason, fell_back=None, progress=progress
        )
    try:
        changes = cloud.group_changes(delta_link)
    except DeltaExpired as error:
        fell_back = f"the delta link expired ({error}); read everything again"
        log.warning("reconcile: %s", fell_back)
        return _full(
            cloud,
            directory,
            options,
            policy,
            reason=fell_back,
            fell_back=fell_back,
            progress=progress,
        )
    return _incremental(
        cloud, directory, options, policy, delta_link=delta_link, changes=changes, progress=progress
    )


def _full(
    cloud: CloudSource,
    directory: Directory,
    options: MappingOptions,
    policy: SyncPolicy,
    *,
    reason: str | None,
    fell_back: str | None,
    progress: Progress | None,
) -> IncrementalResult:
    snapshot, plan = read_and_plan(cloud, directory, options, policy)
    result = apply_plan(plan, directory, progress=progress)
    link = snapshot.groups_delta_link if not result.failures else None
    log.info("reconcile: full sync (%s)", reason or "asked for")
    return IncrementalResult(
        "full", result, link, fell_back_reason=fell_back, full_reason=reason or "asked for"
    )


def _incremental(
    cloud: CloudSource,
    directory: Directory,
    options: MappingOptions,
    policy: SyncPolicy,
    *,
    delta_link: str,
    changes: GroupChanges,
    progress: Progress | None,
) -> IncrementalResult:
    plan = Plan()
    errors: list[tuple[str, str]] = []
    soft_deleted = _SoftDeleted(cloud, changes.soft_deleted)
    group_ids = sorted({*changes.changed, *changes.soft_deleted, *changes.hard_deleted})
    deletes: list[Delete] = []
    placed: dict[str, tuple[CloudGroup, Placement, DirectoryGroup | None]] = {}
    for group_id in group_ids:
        try:
            found = _plan_one(
                group_id,
                cloud,
                directory,
                options,
                policy,
                changes=changes,
                soft_deleted=soft_deleted,
                plan=plan,
                deletes=deletes,
            )
        except TransientError:
            raise  # the run fails as a whole; the link is not advanced
        except WritebackError as error:
            log.warning("reconcile: group %s not planned: %s", group_id, error)
            errors.append((group_id, f"{type(error).__name__}: {error}"))
            if isinstance(error, DuplicateAnchor):  # an alert in the plan, as a full sync has
                for gid, dns in (error.duplicates or {group_id: ()}).items():
                    plan.skips.append(Skip(gid, SkipReason.DUPLICATE_ANCHOR, "; ".join(dns)))
            continue
        if found is not None:
            placed[group_id] = found
    nested = _nesting(placed, directory, options) if options.nesting else None
    view = _guard_view(placed, directory, options, policy)
    for group, placement, current in placed.values():
        plan.groups_in_cloud += 1
        plan_cloud_group(plan, group, current, options, view, placement=placement, nested=nested)
    if nested is not None:
        plan.operations = creation_order(plan.operations)
    check_adds(plan, directory)
    add_deletes(deletes, plan, policy, threshold_reason(deletes, policy))
    unguarded = deletes and plan.deletes_blocked is None and not policy.allow_deletes
    if unguarded and _would_empty(deletes, directory):
        reason = (
            f"the changes delete all {len(deletes)} written-back groups; a full read "
            "decides (as a full sync would, an empty cloud deletes nothing)"
        )
        log.warning("reconcile: %s", reason)
        return _full(
            cloud, directory, options, policy, reason=reason, fell_back=None, progress=progress
        )
    result = apply_plan(plan, directory, progress=progress)
    clean = not result.failures and not errors and plan.deletes_blocked is None
    next_link = changes.delta_link if clean and changes.delta_link else delta_link
    log.info(
        "reconcile: incremental, %d groups changed, %d operations%s",
        len(group_ids),
        len(plan.operations),
        "" if clean else "; the delta link is kept so the next run reads them again",
    )
    return IncrementalResult(
        "incremental", result, next_link, changed=len(group_ids), errors=errors
    )


class _SoftDeleted:
    """Which groups are in the recycle bin: the delta's own list, and the tenant's
    (read once, only if a changed group has vanished since the delta round)."""

    def __init__(self, cloud: CloudSource, from_delta: frozenset[str]) -> None:
        self._cloud = cloud
        self._ids = set(from_delta)
        self._read: Callable[[], frozenset[str]] | None = cloud.soft_deleted_group_ids

    def __contains__(self, group_id: object) -> bool:
        if group_id in self._ids:
            return True
        if self._read is not None:
            self._ids |= self._read()
            self._read = None
        return group_id in self._ids


def _plan_one(
    group_id: str,
    cloud: CloudSource,
    directory: Directory,
    options: MappingOptions,
    policy: SyncPolicy,
    *,
    changes: GroupChanges,
    soft_deleted: _SoftDeleted,
    plan: Plan,
    deletes: list[Delete],
) -> tuple[CloudGroup, Placement, DirectoryGroup | None] | None:
    """Read one changed group from both sides: a delete or a skip goes into the plan
    now; a group in scope is returned, to be planned with the others (nesting)."""
    removed = group_id in changes.soft_deleted or group_id in changes.hard_deleted
    group = None if removed else cloud.get_group(group_id)
    current = directory.find_group(group_id)
    if group is None:
        if current is None:
            return None
        hard = group_id in changes.hard_deleted
        if not hard and policy.soft_delete is SoftDeletePolicy.KEEP and group_id in soft_deleted:
            plan.skips.append(
                Skip(
                    group_id, SkipReason.SOFT_DELETED, f"kept until deleted for good: {current.dn}"
                )
            )
            return None
        deletes.append(Delete(group_id, current.dn))
        return None
    decision = in_scope(group, options)
    if decision is None:
        return None
    if isinstance(decision, Excluded):
        plan_excluded(plan, group_id, decision, current, options, deletes=deletes)
        return None
    return group, decision, current


def _nesting(
    placed: dict[str, tuple[CloudGroup, Placement, DirectoryGroup | None]],
    directory: Directory,
    options: MappingOptions,
) -> NestedGroups:
    """The member groups the changed groups may write: the changed groups themselves
    (created in this run by DN) and the AD objects of the others they name."""
    current = {gid: found for gid, (_, _, found) in placed.items() if found is not None}
    named = {cid for group, _, _ in placed.values() for cid in member_group_ids(group)}
    others = sorted(named - set(placed))
    if others:
        current.update(directory.find_groups(others, members=False))
    scope = {gid: (group, placement) for gid, (group, placement, _) in placed.items()}
    scope.update(
        (gid, (CloudGroup(gid, ""), Placement(None, None, options.dn_format, options.group_type)))
        for gid in others
        if gid in current
    )
    return plan_nesting(scope, current, options.target_ou)


def _guard_view(
    placed: dict[str, tuple[CloudGroup, Placement, DirectoryGroup | None]],
    directory: Directory,
    options: MappingOptions,
    policy: SyncPolicy,
) -> GuardView:
    """The guards' reads for the changed groups in scope, once for the run: the
    member SIDs they would add, resolved in one bulk read, and the nesting (no read
    when no changed group is in scope)."""
    if not placed:
        return GuardView(rules=policy.guard)
    groups = [group for group, _, _ in placed.values()]
    current = {gid: found for gid, (_, _, found) in placed.items() if found is not None}
    return read_view(
        directory, member_sids_to_check(groups, current, options, policy.guard), policy.guard
    )


def _would_empty(deletes: list[Delete], directory: Directory) -> bool:
    """Whether ``deletes`` remove every group we own: what a cloud that suddenly
    returns nothing (an outage, a bug) would look like through the delta."""
    doomed = {d.group_id for d in deletes}
    return all(group.group_id in doomed for group in directory.iter_groups())


@dataclass(frozen=True)
class DeltaState:
    """What incremental reconcile keeps between runs (the state file's ``delta`` section)."""

    link: str | None = None
    runs_since_full: int = 0
    last_full_at: datetime | None = None

    @classmethod
    def load(cls, state: StateStore | None) -> DeltaState:
        section = state.read().get("delta") if state is not None else None
        if not isinstance(section, dict):
            return cls()
        link = section.get("groups_link")
        runs = section.get("runs_since_full")
        at = section.get("last_full_at")
        try:
            last_full_at = datetime.fromisoformat(at) if isinstance(at, str) else None
        except ValueError:
            last_full_at = None
        return cls(
            link if isinstance(link, str) and link else None,
            runs if isinstance(runs, int) and runs >= 0 else 0,
            last_full_at,
        )

    def after(self, outcome: IncrementalResult, started: datetime) -> DeltaState:
        if outcome.mode == "full":
            return DeltaState(outcome.next_delta_link, 0, started)
        return DeltaState(outcome.next_delta_link, self.runs_since_full + 1, self.last_full_at)

    def record(self, outcome: IncrementalResult) -> dict[str, Any]:
        return {
            "groups_link": self.link,
            "runs_since_full": self.runs_since_full,
            "last_full_at": iso(self.last_full_at) if self.last_full_at else None,
            "last_mode": outcome.mode,
            "last_changed": outcome.changed,
            "fell_back_reason": outcome.fell_back_reason,
            "full_reason": outcome.full_reason,
        }


def run_incremental(
    cloud: CloudSource,
    directory: Directory,
    options: MappingOptions,
    policy: SyncPolicy,
    delta: DeltaState,
    *,
    full_every: int | None,
    full_max_age: timedelta | None,
    started: datetime,
) -> tuple[IncrementalResult, DeltaState]:
    """One reconcile from the kept delta state, and the state to keep next."""
    outcome = reconcile_incremental(
        cloud,
        directory,
        options,
        policy,
        delta_link=delta.link,
        full_every=full_every,
        runs_since_full=delta.runs_since_full,
        full_max_age=full_max_age,
        last_full_at=delta.last_full_at,
        now=started,
    )
    return outcome, delta.after(outcome, started)
