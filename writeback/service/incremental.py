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
from writeback.domain.mapping import MappingOptions
from writeback.domain.model import Delete, Skip, SkipReason
from writeback.domain.times import iso
from writeback.errors import DeltaExpired, DuplicateAnchor, TransientError, WritebackError
from writeback.ports import CloudSource, Directory, GroupChanges, StateStore
from writeback.service.guarding import GuardReads, member_sids_to_check
from writeback.service.reconcile import (
    Plan,
    Progress,
    SyncPolicy,
    SyncResult,
    add_deletes,
    apply_plan,
    check_adds,
    plan_cloud_group,
    plan_from,
    threshold_reason,
)

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
    snapshot = cloud.snapshot()
    plan = plan_from(snapshot, list(directory.iter_groups()), directory, options, policy)
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
    guard = GuardReads(policy.guard, ttl=float("inf"))  # read once for the run
    for group_id in group_ids:
        try:
            _plan_one(
                group_id,
                cloud,
                directory,
                options,
                policy,
                changes=changes,
                soft_deleted=soft_deleted,
                plan=plan,
                deletes=deletes,
                guard=guard,
            )
        except TransientError:
            raise  # the run fails as a whole; the link is not advanced
        except WritebackError as error:
            log.warning("reconcile: group %s not planned: %s", group_id, error)
            errors.append((group_id, f"{type(error).__name__}: {error}"))
            if isinstance(error, DuplicateAnchor):  # an alert in the plan, as a full sync has
                for gid, dns in (error.duplicates or {group_id: ()}).items():
                    plan.skips.append(Skip(gid, SkipReason.DUPLICATE_ANCHOR, "; ".join(dns)))
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
    guard: GuardReads,
) -> None:
    removed = group_id in changes.soft_deleted or group_id in changes.hard_deleted
    group = None if removed else cloud.get_group(group_id)
    current = directory.find_group(group_id)
    if group is None:
        if current is None:
            return
        hard = group_id in changes.hard_deleted
        if not hard and policy.soft_delete is SoftDeletePolicy.KEEP and group_id in soft_deleted:
            plan.skips.append(
                Skip(
                    group_id, SkipReason.SOFT_DELETED, f"kept until deleted for good: {current.dn}"
                )
            )
            return
        deletes.append(Delete(group_id, current.dn))
        return
    if not group.is_unified:
        return
    plan.groups_in_cloud += 1
    found = {group_id: current} if current is not None else {}
    view = guard.view(directory, member_sids_to_check([group], found, options, policy.guard))
    plan_cloud_group(plan, group, current, options, view)


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
