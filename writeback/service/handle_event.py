"""The worker: the messages of many group sessions in, one LDAP operation per group out.

A message only says *which* group changed. The handler reads the groups from
Graph and their objects from AD now, plans, and applies for each group the
single operation that converges it, so duplicates, stale or reordered events
and replays write nothing, and a burst of events for one group (taken together
from its session) costs one write. Groups of one step are read together: Graph
in batched requests (``get_groups``, ``group_deltas``, ``resolve_users``), AD
in as few searches as the adapter can (``find_groups``); one group's failure is
that group's alone.

Graph is eventually consistent: a read right after a change may not show it,
and a group that exists can answer 404 for a while. So no single read is
trusted with anything that cannot be undone, and every read can be repaired:

* **No delete from one observation.** A group Graph calls gone while its AD
  object exists is not deleted at once: a confirmation message is scheduled
  ``settle`` seconds ahead carrying when it was first seen gone, and the group
  is deleted only when a read at least ``settle`` seconds later still finds it
  gone (behind the event delete budget). A group that comes back (a restore,
  or a replica that caught up) keeps its object, objectSid and objectGUID.
* **Every notification is confirmed.** Each handled notification schedules one
  read of its group ``settle`` seconds later (coalesced: one per group per
  quarter of the settle interval, by message id), which writes nothing when AD
  already matches. A stale member list or name, a group created while Graph
  still answered 404 for it, reaches AD within about ``settle`` seconds, not at
  the next reconcile. A confirmation schedules another only when it wrote.

Member deltas: for a group with many members (``DELTA_MIN_MEMBERS``) and a
trusted per-group delta link (``WorkerContext.links``), an event costs what
changed rather than the group's size: its properties are read now
(state-based), its members only as the changes since the link (plus their
SIDs), and the AD object without ``member``; attributes are planned state-based
and member values from the deltas, in one modify. A link is trusted when it is
a delta round's own next link, or when a confirmation's full read found nothing
the read before it had missed: the link Graph gives "as of now" next to a full
read may be ahead of a lagging replica that served the read, and a delta from
it would never show what lay in between. A link Graph refuses (any 4xx), a
link older than a delta token lives (about 7 days), a removed member Graph no
longer knows, an added member Graph does not show yet (the link is then kept
where it was), or anything the deltas cannot settle alone take the full read.
What is written by hand in AD's ``member`` is not seen by the delta path; the
reconcile repairs it.

Settlement follows the error tree: success completes every message (after the
confirmation is sent, so a crash in between costs a duplicate, never a loss); a
configuration error parks them uncounted; another permanent fault dead-letters
them with the error's type as reason and its message as description; a
transient fault that outlives the in-process retries abandons them with a
growing delay, so they wait in the queue (the delivery count caps how long).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from writeback.config import SoftDeletePolicy
from writeback.domain.events import Change, GroupChanged
from writeback.domain.guard import GuardView, guard_desired
from writeback.domain.mapping import (
    MappingOptions,
    OutOfScope,
    Placement,
    desired_group,
    over_member_limit,
)
from writeback.domain.model import (
    Add,
    Changes,
    CloudGroup,
    CloudMember,
    DirectoryGroup,
    MemberKind,
    Modify,
    Operation,
    Rename,
    Skip,
)
from writeback.domain.nesting import NestedGroups
from writeback.domain.planner import plan_group, sid_ref
from writeback.domain.policy import DeleteBudget
from writeback.domain.rules import Excluded
from writeback.errors import (
    ConfigError,
    DuplicateAnchor,
    PermanentError,
    PoisonEvent,
    TransientError,
    WritebackError,
)
from writeback.ports import (
    CloudSource,
    DeltaLinkStore,
    Directory,
    GroupDelta,
    GroupGone,
    MessageSender,
    OutgoingMessage,
    ReceivedMessage,
    Settlement,
    StoredLink,
)
from writeback.service.guarding import GuardReads, member_sids_to_check
from writeback.service.scope import event_nesting_for, in_scope, kept_skip

log = logging.getLogger("writeback.worker")

#: Longest wait between redeliveries of a group whose write keeps failing.
MAX_REDELIVERY_DELAY = 300.0
#: A configuration error is not the event's fault: it waits this long, uncounted.
CONFIG_RETRY_DELAY = 300.0
#: Seconds between a read and its confirmation (WRITEBACK_SETTLE_SECONDS).
DEFAULT_SETTLE = 60.0
#: Delta tokens of directory objects live about 7 days; a link is not used past 6.
LINK_MAX_AGE = 6 * 86400.0
#: Groups with fewer user members are read in full (a group and one page of members
#: cost no more than a delta round with its SID lookups), so they keep no link.
DELTA_MIN_MEMBERS = 1000
#: More ids than this to resolve (a restored group reported whole, a mass change)
#: and the full read is cheaper than resolving them 15 at a time.
MAX_DELTA_LOOKUPS = 150


class OverMemberLimit(PermanentError):
    """The group has more members than the configured limit; it is not written."""


def _memory_links() -> DeltaLinkStore:
    from writeback.adapters.delta_store import MemoryDeltaLinks

    return MemoryDeltaLinks()


@dataclass(frozen=True)
class WorkerContext:
    cloud: CloudSource
    directory: Directory
    #: Mapping options with the forest's schema attributes already filled in.
    options: MappingOptions
    soft_delete: SoftDeletePolicy = SoftDeletePolicy.KEEP
    #: False when writeback is disabled: events are consumed, nothing is written
    #: (reconcile deletes our groups behind the delete threshold).
    enabled: bool = True
    attempts: int = 3
    max_wait: float = 30.0
    #: Redelivery waits after a transient fault: ``scale * 2**deliveries`` seconds,
    #: at most ``max_redelivery_delay`` (tests shrink both).
    redelivery_scale: float = 1.0
    max_redelivery_delay: float = MAX_REDELIVERY_DELAY
    #: Per-group delta links (in memory unless given); None turns member deltas
    #: off, so every event reads the group in full from both sides.
    links: DeltaLinkStore | None = field(default_factory=_memory_links)
    #: Deletes allowed over a sliding window (see :func:`event_deletes`); None: no cap.
    deletes: DeleteBudget | None = None
    #: Where confirmations are sent (the queue the messages came from); None: the
    #: caller confirms nothing (a one-shot tool), and a gone group is deleted only
    #: when a message already carries a confirmed observation.
    sender: MessageSender | None = None
    #: Seconds between a read and its confirmation (module docstring).
    settle: float = DEFAULT_SETTLE
    clock: Callable[[], float] = time.time
    #: The member and nesting guards' reads (their rules, and answers kept briefly).
    guard: GuardReads = field(default_factory=GuardReads)


#: The window the worker counts its deletes over.
DELETE_WINDOW = 24 * 3600.0


def event_deletes(threshold: int) -> DeleteBudget:
    """The worker's delete cap: WRITEBACK_DELETE_THRESHOLD deletes per 24 hours."""
    return DeleteBudget(threshold, DELETE_WINDOW, setting="WRITEBACK_DELETE_THRESHOLD")


@dataclass
class EventOutcome:
    group_id: str
    messages: int
    settlement: str  # "completed" | "dead-lettered" | "abandoned" | "parked"
    operation: Operation | None = None
    ldap_requests: int = 0
    skips: list[Skip] = field(default_factory=list)
    error: str | None = None
    #: Seconds from the oldest notification in the batch to the write's end.
    latency: float | None = None
    #: Messages of the batch that were notifications (not confirmations).
    notifications: int = 0
    #: A confirmation was scheduled; ``pending_delete``: it carries a gone observation.
    confirmation: bool = False
    pending_delete: bool = False

    @property
    def reason(self) -> str | None:
        """Why it was settled so, in one word: the dead-letter reason, the transient
        error's type, why parked (``error`` without its detail); None when completed."""
        return self.error.split(":", 1)[0].strip() if self.error else None


# =========================================================================== converging


@dataclass(frozen=True)
class Work:
    """One group to converge in a step."""

    group_id: str
    #: Read in full (the step found the member delta unusable).
    full: bool = False
    #: The earliest observation of the group gone that is still unconfirmed.
    gone_since: float | None = None
    #: Only confirmations in the batch: confirm again only if this wrote.
    confirming: bool = False


@dataclass
class Converged:
    operation: Operation | None = None
    requests: int = 0
    skips: list[Skip] = field(default_factory=list)
    #: Schedule a confirmation read of the group.
    confirm: bool = False
    #: Set when the group is gone but not yet confirmed gone: carried by the confirmation.
    gone_since: float | None = None
    #: Groups to confirm too: the parents of a group just created (nesting), whose
    #: membership of it can be written now that it exists.
    parents: tuple[str, ...] = ()
    #: The confirmation was sent.
    scheduled: bool = False


Result = Converged | WritebackError


@dataclass
class _Planned:
    """A group's one operation, planned, not yet written: every group of a step is
    written in one ``apply_all`` (pipelined on the LDAP connection), then each
    planned write is finished with what its own write came to."""

    operation: Operation | None
    #: Called with the LDAP requests the write took, once it succeeded.
    finish: Callable[[int], Converged]
    #: A delete taken from the event budget: given back if the write fails.
    budgeted: bool = False


Plan = _Planned | Result


def converge(group_id: str, ctx: WorkerContext) -> tuple[Operation | None, int, list[Skip]]:
    """One group, read from both sides, planned and applied (errors raised)."""
    result = converge_groups([Work(group_id)], ctx)[group_id]
    if isinstance(result, WritebackError):
        raise result
    return result.operation, result.requests, result.skips


def converge_groups(works: Sequence[Work], ctx: WorkerContext) -> dict[str, Result]:
    """Converge every group of ``works``; transient failures are retried in process
    (``attempts`` in all, waits honouring Retry-After), then left as the group's error."""
    results: dict[str, Result] = {}
    pending = list({w.group_id: w for w in works}.values())
    for attempt in range(1, max(ctx.attempts, 1) + 1):
        step = _step(pending, ctx)
        results.update(step)
        failed = [w for w in pending if isinstance(step[w.group_id], TransientError)]
        if not failed or attempt >= ctx.attempts:
            break
        retry_after = max(
            (getattr(step[w.group_id], "retry_after", None) or 0.0 for w in failed), default=0.0
        )
        time.sleep(_backoff(attempt, retry_after, ctx.max_wait))
        pending = failed
    return results


def _backoff(attempt: int, retry_after: float, cap: float) -> float:
    """Exponential backoff with jitter, but never shorter than a Retry-After."""
    backoff = min(cap, 0.2 * 2 ** (attempt - 1)) * (0.5 + random.random())
    return float(min(cap, max(backoff, retry_after)))


def _step(works: Sequence[Work], ctx: WorkerContext) -> dict[str, Result]:
    """One attempt for all of ``works``: deltas first, then full reads, then AD."""
    if not ctx.enabled:
        return {w.group_id: Converged() for w in works}
    results: dict[str, Result] = {}
    plans: dict[str, Plan] = {}
    deltas, full = _read_deltas(works, ctx, results)
    by_id = {w.group_id: w for w in works}
    if deltas:
        current, errors = _find(list(deltas), ctx, members=False)
        results.update(errors)
        deltas = {gid: read for gid, read in deltas.items() if gid not in errors}
        for group_id in [gid for gid in deltas if gid not in current]:
            full.append(replace(by_id[group_id], full=True))  # AD object missing
            del deltas[group_id]
        adds = [replace(read.group, members=read.added) for read in deltas.values()]
        guard = _guard(adds, current, ctx)
        for group_id, read in deltas.items():
            plans[group_id] = (
                guard
                if isinstance(guard, WritebackError)
                else _plan_deltas(
                    group_id, read, current[group_id], by_id[group_id], ctx, guard=guard
                )
            )
    if full:
        plans.update(_plan_in_full(full, ctx))
    results.update(_write(plans, ctx))
    return results


def _find(
    ids: list[str], ctx: WorkerContext, *, members: bool
) -> tuple[dict[str, DirectoryGroup], dict[str, WritebackError]]:
    """The AD objects of ``ids``, and the errors of those that could not be had. A
    group whose anchor is duplicated gets its own error (a person must look), and
    the others go on; any other failure is every group's."""
    try:
        return ctx.directory.find_groups(ids, members=members), {}
    except DuplicateAnchor as duplicate:
        errors: dict[str, WritebackError] = {}
        for group_id, dns in duplicate.duplicates.items():
            errors[group_id] = DuplicateAnchor({group_id: dns})
            log.warning(
                "group %s: %s; not written",
                group_id,
                errors[group_id],
                extra={"group_id": group_id, "outcome": "duplicate-anchor"},
            )
        return {gid: g for gid, g in duplicate.found.items() if gid in ids}, errors
    except WritebackError as error:
        return {}, dict.fromkeys(ids, error)


def _guard(
    groups: Sequence[CloudGroup], current: Mapping[str, DirectoryGroup], ctx: WorkerContext
) -> GuardView | WritebackError:
    """The guards' reads for the member SIDs ``groups`` would add (one bulk read,
    cached briefly), or the error that stopped them (every such group's)."""
    sids = member_sids_to_check(groups, current, ctx.options, ctx.guard.rules)
    try:
        return ctx.guard.view(ctx.directory, sids)
    except WritebackError as error:
        return error


def _write(plans: dict[str, Plan], ctx: WorkerContext) -> dict[str, Result]:
    """Write every planned operation of the step in one ``apply_all`` and finish each
    with its own outcome; a failed delete gives its budget back (the in-process
    retry must not count it twice)."""
    results: dict[str, Result] = {}
    writes = [(gid, plan) for gid, plan in plans.items() if isinstance(plan, _Planned)]
    operations = [plan.operation for _, plan in writes if plan.operation is not None]
    outcomes = iter(ctx.directory.apply_all(operations) if operations else [])
    for gid, plan in plans.items():
        if not isinstance(plan, _Planned):
            results[gid] = plan
            continue
        outcome = next(outcomes) if plan.operation is not None else 0
        if isinstance(outcome, WritebackError):
            if plan.budgeted and ctx.deletes is not None:
                ctx.deletes.give_back()
            results[gid] = outcome
            continue
        try:
            results[gid] = plan.finish(outcome)
        except WritebackError as error:
            results[gid] = error
    return results


# --------------------------------------------------------------------------- full reads


def _plan_in_full(works: Sequence[Work], ctx: WorkerContext) -> dict[str, Plan]:
    """Read the groups whole from both sides, AD first. A group that may be large
    gets a fresh delta link, taken before the Graph reads (a change racing them
    shows up again in the next delta, where writing it once more is harmless; a
    link taken after could miss it); a small one is remembered as small and read
    in full next time too."""
    ids = [w.group_id for w in works]
    results: dict[str, Plan] = {}
    current, errors = _find(ids, ctx, members=True)
    results.update(errors)
    if len(results) == len(ids):
        return results
    wanted = [gid for gid in ids if gid not in errors]
    wants_link = _wanting_links(wanted, current, ctx.links) if ctx.links is not None else []
    try:
        answers = ctx.cloud.group_delta_links(wants_link) if wants_link else {}
        groups = ctx.cloud.get_groups(wanted)
    except WritebackError as error:
        return {**results, **{gid: error for gid in wanted}}
    cloud_groups = [g for g in groups.values() if isinstance(g, CloudGroup)]
    guard = _guard(cloud_groups, current, ctx)
    # A group whose link could not be had is read all the same; it gets one next time.
    links = {gid: link for gid, link in answers.items() if isinstance(link, str)}
    try:
        nested = event_nesting_for(groups, current, ctx.directory, ctx.options)
    except WritebackError as error:
        return {gid: error for gid in ids}
    for work in works:
        gid = work.group_id
        read = groups.get(gid)
        if gid in results:
            continue
        if read is None:
            results[gid] = TransientError(f"group {gid}: Graph gave no answer for it")
        elif isinstance(read, WritebackError):
            results[gid] = read
        elif isinstance(guard, WritebackError):
            results[gid] = guard
        else:
            found = current.get(gid)
            results[gid] = _settle_one(
                work, read, found, links.get(gid), ctx, guard=guard, nested=nested.get(gid)
            )
    return results


def _wanting_links(
    ids: Sequence[str], current: Mapping[str, DirectoryGroup], links: DeltaLinkStore
) -> list[str]:
    """The groups whose full read should come with a delta link: those stored as
    large, and those not stored at all unless AD shows them small. A link costs a
    Graph request and a round trip before the read, and a small group throws it
    away. AD holds only the on-premises members, so half the size counts as large;
    a large group AD shows smaller still (mostly cloud-only members) gets its link
    at its next event, after this read stored its size."""
    wanted = []
    for gid in ids:
        stored = links.get(gid)
        if stored is not None:
            large = stored.member_count >= DELTA_MIN_MEMBERS
        else:
            found = current.get(gid)
            large = found is None or _ad_members(found) >= DELTA_MIN_MEMBERS // 2
        if large:
            wanted.append(gid)
    return wanted


def _ad_members(group: DirectoryGroup) -> int:
    return len(group.member_sids) + len(group.other_members)


def _settle_one(
    work: Work,
    read: CloudGroup | GroupGone,
    current: DirectoryGroup | None,
    link: str | None,
    ctx: WorkerContext,
    *,
    guard: GuardView,
    nested: NestedGroups | None = None,
) -> Plan:
    try:
        if isinstance(read, GroupGone):
            return _gone(work, read, current, ctx)
        decision = in_scope(read, ctx.options)
        if not isinstance(decision, Placement):
            return _excluded(work, decision, current, ctx)
        desired = guard_desired(
            desired_group(_within_limit(read, ctx), ctx.options, decision, nested), current, guard
        )
    except WritebackError as error:
        return error
    operation = plan_group(desired, current, ctx.options.target_ou)
    users = _user_count(read)

    def finish(requests: int) -> Converged:
        if ctx.links is not None:  # only once the write is made
            _keep_link(
                work, ctx.links, link=link, users=users, operation=operation, now=ctx.clock()
            )
        return Converged(
            operation,
            requests,
            list(desired.skips),
            confirm=not work.confirming or operation is not None,
            parents=read.member_of if isinstance(operation, Add) else (),
        )

    return _Planned(operation, finish)


def _excluded(
    work: Work, excluded: Excluded | None, current: DirectoryGroup | None, ctx: WorkerContext
) -> Plan:
    """A group out of scope (None: not a kind this deployment reads at all, as V1
    ignores security groups). Its object is kept, or with WRITEBACK_OUT_OF_SCOPE=
    delete deleted once two reads ``settle`` seconds apart agree (behind the
    event delete budget), as for a group gone."""
    if excluded is None or current is None:
        return Converged()
    if ctx.options.out_of_scope is OutOfScope.DELETE:
        return _confirmed_delete(work, current, ctx)
    return Converged(skips=[kept_skip(excluded, current)])


def _keep_link(
    work: Work,
    links: DeltaLinkStore,
    *,
    link: str | None,
    users: int,
    operation: Operation | None,
    now: float,
) -> None:
    """What a full read leaves for the member-delta path. A small group keeps no link.
    A large one keeps the link taken before the read, untrusted: the read may have
    come from a replica behind it, and a delta from it would never show what lay
    in between. A confirmation's full read that found nothing to write proves the
    untrusted link it read after: that link becomes trusted (the delta path's)."""
    stored = links.get(work.group_id)
    if users < DELTA_MIN_MEMBERS:
        links.put(work.group_id, StoredLink("", users, now))
    elif (
        work.confirming
        and operation is None
        and stored is not None
        and stored.delta_link
        and not stored.trusted
    ):
        links.put(work.group_id, replace(stored, member_count=users, trusted=True))
    else:
        links.put(work.group_id, StoredLink(link or "", users, now))


def _gone(work: Work, read: GroupGone, current: DirectoryGroup | None, ctx: WorkerContext) -> Plan:
    """Graph answered 404. Keep a soft-deleted group's object (policy), and delete an
    object only once the group was seen gone at least ``settle`` seconds apart."""
    if ctx.links is not None:
        ctx.links.forget(work.group_id)
    if current is None:
        # Nothing of ours; but a group created moments ago can 404 too: look again.
        return Converged(confirm=not work.confirming)
    if read.soft_deleted and ctx.soft_delete is SoftDeletePolicy.KEEP:
        return Converged()
    return _confirmed_delete(work, current, ctx)


def _confirmed_delete(work: Work, current: DirectoryGroup, ctx: WorkerContext) -> Plan:
    """Delete ``current`` once it was observed to go at least ``settle`` seconds apart."""
    now = ctx.clock()
    first = work.gone_since
    if first is None or now - first < ctx.settle:
        return Converged(confirm=True, gone_since=first if first is not None else now)
    operation = plan_group(None, current, ctx.options.target_ou)
    budgeted = operation is not None and ctx.deletes is not None
    if budgeted and ctx.deletes is not None:
        ctx.deletes.take()  # past the cap: PolicyRefused, dead-lettered with the reason
    return _Planned(operation, lambda requests: Converged(operation, requests), budgeted)


# --------------------------------------------------------------------------- member deltas


@dataclass(frozen=True)
class _Deltas:
    """What the deltas since a stored link say, with the SIDs they need."""

    group: CloudGroup
    added: tuple[CloudMember, ...]
    removed_sids: frozenset[str]
    #: The link to store next: the new one, or the old one when an added member
    #: was not visible yet (its change must come round again).
    delta_link: str
    member_count: int


def _read_deltas(
    works: Sequence[Work], ctx: WorkerContext, results: dict[str, Result]
) -> tuple[dict[str, _Deltas], list[Work]]:
    """The usable member deltas of the groups that have a fresh link, and the works
    that need a full read instead. A group whose read failed gets its error."""
    links, full = _fresh_links(works, ctx)
    if not links:
        return {}, full
    try:
        answers = ctx.cloud.group_deltas({gid: s.delta_link for gid, s in links.items()})
        lookups = [
            member.id
            for answer in answers.values()
            if isinstance(answer, GroupDelta) and answer.group is not None
            for member in (*answer.added, *answer.removed)
            if member.kind is MemberKind.USER
        ]
        users = ctx.cloud.resolve_users(lookups) if lookups else {}
    except WritebackError as error:
        for gid in links:
            results[gid] = error
        return {}, full
    deltas: dict[str, _Deltas] = {}
    by_id = {w.group_id: w for w in works}
    for gid, stored in links.items():
        answer = answers.get(gid)
        if isinstance(answer, WritebackError):
            results[gid] = answer
            continue
        read = _usable(answer, stored, users, ctx) if isinstance(answer, GroupDelta) else None
        if read is not None:
            deltas[gid] = read
            continue
        if answer is None:
            log.info("group %s: Graph refused its delta link; a full read follows", gid)
        if ctx.links is not None:
            ctx.links.forget(gid)
        full.append(replace(by_id[gid], full=True))
    return deltas, full


def _fresh_links(
    works: Sequence[Work], ctx: WorkerContext
) -> tuple[dict[str, StoredLink], list[Work]]:
    """The stored links worth a delta round (a large group, a trusted link younger
    than a delta token lives), and the works to read in full."""
    links: dict[str, StoredLink] = {}
    full: list[Work] = []
    now = ctx.clock()
    for work in works:
        stored = ctx.links.get(work.group_id) if ctx.links is not None else None
        if (
            stored is not None
            and stored.delta_link
            and stored.trusted
            and not work.full
            and stored.member_count >= DELTA_MIN_MEMBERS
            and now - stored.stored_at < LINK_MAX_AGE
        ):
            links[work.group_id] = stored
        else:
            full.append(work)
    return links, full


def _usable(
    delta: GroupDelta, stored: StoredLink, users: dict[str, CloudMember], ctx: WorkerContext
) -> _Deltas | None:
    """The deltas with SIDs resolved; None when only a full read can settle it (the
    group gone or out of scope, a removed member Graph no longer knows, too many
    ids, a count that may pass the limit)."""
    if delta.group is None or delta.delta_link is None:
        return None
    if not isinstance(in_scope(delta.group, ctx.options), Placement):
        return None  # out of scope now: the full read decides what happens to it
    if ctx.options.nesting and any(
        m.kind is MemberKind.GROUP for m in (*delta.added, *delta.removed)
    ):
        return None  # member groups need their AD objects: the full read resolves them
    added_users = [m.id for m in delta.added if m.kind is MemberKind.USER]
    removed_users = [m.id for m in delta.removed if m.kind is MemberKind.USER]
    count = stored.member_count + len(added_users)
    if count > ctx.options.member_limit or len(added_users) + len(removed_users) > (
        MAX_DELTA_LOOKUPS
    ):
        return None
    if any(member_id not in users for member_id in removed_users):
        return None  # gone from Graph: the SID to remove is unknown here
    unseen = any(member_id not in users for member_id in added_users)
    return _Deltas(
        group=delta.group,
        added=tuple(users.get(m.id, m) for m in delta.added),
        removed_sids=frozenset(sid for member_id in removed_users if (sid := users[member_id].sid)),
        delta_link=stored.delta_link if unseen else delta.delta_link,
        member_count=max(0, count - len(removed_users)),
    )


def _plan_deltas(
    gid: str,
    read: _Deltas,
    current: DirectoryGroup,
    work: Work,
    ctx: WorkerContext,
    *,
    guard: GuardView,
) -> Plan:
    try:
        decision = in_scope(read.group, ctx.options)
        placement = decision if isinstance(decision, Placement) else None
        added = desired_group(replace(read.group, members=read.added), ctx.options, placement)
        desired = guard_desired(added, current, guard)  # current without members: adds only
    except WritebackError as error:
        return error
    planned = plan_group(replace(desired, member_sids=frozenset()), current, ctx.options.target_ou)
    add = tuple(sid_ref(sid) for sid in sorted(desired.member_sids))
    removed = frozenset() if desired.keep_members else read.removed_sids
    remove = tuple(sid_ref(sid) for sid in sorted(removed - desired.member_sids))
    operation: Operation | None
    if isinstance(planned, Rename):
        changes = replace(planned.changes, add_members=add, remove_members=remove)
        operation = replace(planned, changes=changes)
    elif isinstance(planned, Modify) or add or remove:
        base = planned.changes if isinstance(planned, Modify) else Changes()
        changes = replace(base, add_members=add, remove_members=remove)
        operation = Modify(gid, current.dn, changes) if changes else None
    else:
        operation = planned

    def finish(requests: int) -> Converged:
        if ctx.links is not None:  # a delta round's own next link: trusted
            ctx.links.put(
                gid, StoredLink(read.delta_link, read.member_count, ctx.clock(), trusted=True)
            )
        return Converged(operation, requests, list(desired.skips), confirm=not work.confirming)

    return _Planned(operation, finish)


def _user_count(group: CloudGroup) -> int:
    return sum(1 for m in group.members if m.kind is MemberKind.USER)


def _within_limit(group: CloudGroup, ctx: WorkerContext) -> CloudGroup:
    skip = over_member_limit(group, ctx.options.member_limit)
    if skip is not None:
        raise OverMemberLimit(f"group {group.id}: {skip.detail}")
    return group


# =========================================================================== sessions


def process_session(
    queue: Settlement, messages: list[ReceivedMessage], ctx: WorkerContext
) -> EventOutcome:
    """Handle one session's batch (one group) and settle every message in it."""
    [outcome] = process_sessions(queue, [messages], ctx)
    return outcome


def process_sessions(
    queue: Settlement, sessions: Sequence[list[ReceivedMessage]], ctx: WorkerContext
) -> list[EventOutcome]:
    """Handle the batches of several group sessions in one step, and settle them."""
    parsed = [_parse(queue, batch) for batch in sessions]
    works: list[Work] = []
    for events, _ in parsed:
        if events:
            works.append(_work_for(events))
    results = converge_groups(works, ctx) if works else {}
    _schedule_confirmations(parsed, results, ctx)
    outcomes = []
    completed: list[ReceivedMessage] = []
    for batch, (events, valid) in zip(sessions, parsed, strict=True):
        session = batch[0].session_id
        if not events:
            outcomes.append(EventOutcome(session, len(batch), "dead-lettered", error="PoisonEvent"))
            continue
        outcome = _settle(queue, valid, events, results[session], ctx)
        if outcome.settlement == "completed":
            completed.extend(valid)
        outcomes.append(outcome)
    if completed:
        queue.complete_all(completed)  # one step, one settle call (one commit locally)
    for outcome in outcomes:
        _log(outcome)
    return outcomes


def _schedule_confirmations(
    parsed: Sequence[tuple[list[GroupChanged], list[ReceivedMessage]]],
    results: dict[str, Result],
    ctx: WorkerContext,
) -> None:
    """Send every confirmation the step's results ask for in one call, before any of
    their messages is completed (a crash in between costs a duplicate, never a
    loss); if that send fails, those groups take the send's error, so they are all
    tried again."""
    if ctx.sender is None:
        return
    wanted = [
        (session, result)
        for events, _ in parsed
        if events
        and isinstance(result := results[(session := events[0].group_id)], Converged)
        and (result.confirm or result.parents)
    ]
    if not wanted:
        return
    now = ctx.clock()
    messages = [
        confirmation(parent, now, ctx.settle) for _, result in wanted for parent in result.parents
    ]
    messages += [
        confirmation(gid, now, ctx.settle, result.gone_since)
        for gid, result in wanted
        if result.confirm
    ]
    try:
        ctx.sender.send(messages)
    except WritebackError as error:
        for gid, _ in wanted:
            results[gid] = error
        return
    for _, result in wanted:
        result.scheduled = result.confirm


def _work_for(events: Sequence[GroupChanged]) -> Work:
    confirmations = [e for e in events if e.change is Change.CONFIRM]
    gone = [e.gone_since for e in confirmations if e.gone_since is not None]
    return Work(
        events[0].group_id,
        gone_since=min(gone) if gone else None,
        confirming=len(confirmations) == len(events),
    )


def _settle(
    queue: Settlement,
    valid: list[ReceivedMessage],
    events: list[GroupChanged],
    result: Result,
    ctx: WorkerContext,
) -> EventOutcome:
    session = valid[0].session_id
    notifications = [e for e in events if e.change is not Change.CONFIRM]
    outcome = EventOutcome(session, len(valid), "completed", notifications=len(notifications))
    if isinstance(result, Converged) and result.scheduled:
        outcome.confirmation = True
        outcome.pending_delete = result.gone_since is not None
    if isinstance(result, ConfigError):
        for message in valid:
            queue.park(message, delay=CONFIG_RETRY_DELAY)
        outcome.settlement, outcome.error = "parked", f"ConfigError: {result}"
    elif isinstance(result, PermanentError):
        reason = dead_letter_reason(result)
        for message in valid:
            queue.dead_letter(message, reason, str(result))
        outcome.settlement, outcome.error = "dead-lettered", f"{reason}: {result}"
    elif isinstance(result, WritebackError):
        delay = redelivery_delay(
            max(m.delivery_count for m in valid),
            getattr(result, "retry_after", None),
            scale=ctx.redelivery_scale,
            cap=ctx.max_redelivery_delay,
        )
        for message in valid:
            queue.abandon(message, delay=delay)
        outcome.settlement, outcome.error = "abandoned", f"{type(result).__name__}: {result}"
    else:  # completed by the caller, with the step's other completions
        outcome.operation, outcome.ldap_requests = result.operation, result.requests
        if notifications or result.operation is not None:
            outcome.skips = result.skips  # a confirmation that wrote nothing skipped nothing new
        if notifications:
            outcome.latency = ctx.clock() - min(e.received_at for e in notifications)
    return outcome


def confirmation(
    group_id: str, now: float, settle: float, gone_since: float | None = None
) -> OutgoingMessage:
    """The confirmation read of a group, due ``settle`` seconds after ``now``.

    Its message id names the quarter-settle slot it falls due in, so confirmations
    of one group asked for in the same slot are one message (the queue's duplicate
    detection drops the rest), and each is due at least ``settle`` after its ask."""
    slot = max(settle / 4.0, 0.05)
    index = math.ceil((now + settle) / slot)
    due = index * slot
    kind = "cg" if gone_since is not None else "cf"
    event = GroupChanged(group_id, Change.CONFIRM, due, f"{kind}-{index}", gone_since=gone_since)
    return OutgoingMessage(
        body=event.to_json(),
        message_id=f"{kind}-{group_id}-{index}",
        session_id=group_id,
        not_before=due,
    )


def dead_letter_reason(error: PermanentError) -> str:
    """The reason a dead letter carries: the error's type, but an adapter's own
    refinement (LdapDirectory's ``LdapRefused``) as the type it refines, so one fault
    has one documented reason whichever adapter reported it (``replay --reason``)."""
    for kind in type(error).__mro__:
        if not kind.__module__.startswith("writeback.adapters."):
            return kind.__name__
    return type(error).__name__  # pragma: no cover - PermanentError is not an adapter's


def _parse(
    queue: Settlement, messages: list[ReceivedMessage]
) -> tuple[list[GroupChanged], list[ReceivedMessage]]:
    """Valid events of the batch; poison messages go to the dead-letter queue at once."""
    events, valid = [], []
    for message in messages:
        try:
            event = GroupChanged.from_json(message.body)
            if event.group_id != message.session_id:
                raise PoisonEvent(
                    f"group_id {event.group_id} does not match session {message.session_id}"
                )
        except PoisonEvent as error:
            queue.dead_letter(message, "PoisonEvent", str(error))
            log.warning("dead-lettered poison message %s: %s", message.message_id, error)
            continue
        events.append(event)
        valid.append(message)
    return events, valid


def redelivery_delay(
    delivery_count: int,
    retry_after: float | None = None,
    *,
    scale: float = 1.0,
    cap: float = MAX_REDELIVERY_DELAY,
) -> float:
    """How long a failing group waits in the queue before the next try."""
    backoff = min(cap, scale * 2.0 ** min(delivery_count, 16))
    return max(backoff, retry_after or 0.0)


def _log(outcome: EventOutcome) -> None:
    op = outcome.operation.kind if outcome.operation is not None else "none"
    log.info(
        "group %s: %s after %d messages, op=%s, ldap=%d%s%s",
        outcome.group_id,
        outcome.settlement,
        outcome.messages,
        op,
        outcome.ldap_requests,
        ", delete pending confirmation" if outcome.pending_delete else "",
        f", error={outcome.error}" if outcome.error else "",
        extra={
            "group_id": outcome.group_id,
            "operation": op,
            "outcome": outcome.settlement,
            "reason": outcome.reason,
            "messages": outcome.messages,
            "notifications": outcome.notifications,
            "latency_ms": None if outcome.latency is None else round(outcome.latency * 1000, 1),
            "skipped": skip_summary(outcome.skips),
        },
    )
    for skip in outcome.skips:
        if skip.member or skip.alert:  # the guards' decisions, one line each
            log.warning(
                "group %s: %s%s: %s",
                outcome.group_id,
                skip.reason.value,
                f" x{skip.count}" if skip.count != 1 else "",
                skip.detail,
                extra={
                    "group_id": outcome.group_id,
                    "skip_reason": skip.reason.value,
                    "member": skip.member or None,
                },
            )


def skip_summary(skips: Iterable[Skip]) -> str | None:
    """``reason=count`` pairs of what a write left out (``member-not-on-prem=3``), one
    text field (Application Insights keeps custom dimensions as strings); None for none."""
    counted: dict[str, int] = {}
    for skip in skips:
        counted[str(skip.reason)] = counted.get(str(skip.reason), 0) + skip.count
    return ",".join(f"{reason}={n}" for reason, n in sorted(counted.items())) or None


def group_ids(outcomes: Iterable[EventOutcome]) -> list[str]:
    return [o.group_id for o in outcomes]
