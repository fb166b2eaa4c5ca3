"""The directory reads the guards need (domain/guard.py), kept briefly.

Both places that plan desired state, the worker and the reconcile, ask the
directory the same two questions: what each member SID is (one bulk
``resolve_sids`` for all the SIDs of a step or a run, never a search per
member) and which of our groups are nested into protected ones (one
``group_ancestry`` read over the OU). The worker keeps both answers for ``ttl``
seconds (shared by its threads), so a burst of events costs one read of each;
the reconcile reads afresh every run. A change made in AD (a user given
``adminCount=1``, a group nested into Domain Admins) is therefore seen by the
events within ``ttl`` and by every reconcile at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from writeback.domain.guard import (
    GuardRules,
    GuardView,
    Principal,
    frozen_groups,
    needs_lookup,
    sids_to_resolve,
)
from writeback.domain.mapping import (
    MappingOptions,
    Placement,
    over_member_limit,
    writable_members,
)
from writeback.domain.model import CloudGroup, DirectoryGroup
from writeback.ports import Directory
from writeback.service.scope import in_scope

log = logging.getLogger("writeback.guard")

#: Seconds the worker trusts what it read for the guards.
GUARD_TTL = 30.0


class GuardReads:
    """The guards' reads for the event path, cached ``ttl`` seconds (thread-safe).

    ``ttl=0`` reads every time (what the reconcile uses)."""

    def __init__(
        self,
        rules: GuardRules | None = None,
        *,
        ttl: float = GUARD_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules = rules or GuardRules()
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        #: canonical SID -> (read at, what it resolved to; None: nothing)
        self._principals: dict[str, tuple[float, Principal | None]] = {}
        self._frozen: tuple[float, dict[str, tuple[str, ...]]] | None = None
        #: Frozen groups already logged (a group is logged when it becomes frozen).
        self._announced: set[str] = set()

    def view(self, directory: Directory, sids: Iterable[str]) -> GuardView:
        """What the guards know about ``sids`` and the nesting, reading only what
        is not cached (errors are the directory's, raised)."""
        now = self._clock()
        wanted = needs_lookup(sids, self.rules)
        with self._lock:
            missing = [s for s in wanted if not self._fresh(self._principals.get(s), now)]
            frozen = self._frozen if self._fresh(self._frozen, now) else None
        resolved = directory.resolve_sids(missing) if missing else {}
        if frozen is None:
            frozen = (now, frozen_groups(directory.group_ancestry(), self.rules))
            self._announce(frozen[1])
        with self._lock:
            for sid in missing:
                self._principals[sid] = (now, resolved.get(sid))
            if len(self._principals) > 200_000:
                self._principals = {
                    s: e for s, e in self._principals.items() if self._fresh(e, now)
                }
            self._frozen = frozen
            principals = {
                sid: p for sid in wanted if (p := self._principals.get(sid, (0.0, None))[1])
            }
        return GuardView(rules=self.rules, principals=principals, frozen=frozen[1])

    def _announce(self, frozen: dict[str, tuple[str, ...]]) -> None:
        with self._lock:
            new = sorted(set(frozen) - self._announced)
            thawed = sorted(self._announced - set(frozen))
            self._announced = set(frozen)
        for group_id in new:
            log.warning(
                "group %s is nested in a protected group, so it is frozen (no member is "
                "added to it): %s",
                group_id,
                "; ".join(frozen[group_id]),
                extra={"group_id": group_id, "outcome": "frozen"},
            )
        for group_id in thawed:
            log.info("group %s is no longer nested in a protected group", group_id)

    def _fresh(self, entry: tuple[float, object] | None, now: float) -> bool:
        return entry is not None and self._ttl > 0 and now - entry[0] < self._ttl


def read_view(directory: Directory, sids: Iterable[str], rules: GuardRules) -> GuardView:
    """The guards' view read afresh (the reconcile's, once per run)."""
    return GuardReads(rules, ttl=0).view(directory, sids)


def with_principals(directory: Directory, sids: Iterable[str], view: GuardView) -> GuardView:
    """``view`` with what the directory holds for ``sids`` (one bulk read, afresh)."""
    wanted = needs_lookup(sids, view.rules)
    resolved = directory.resolve_sids(wanted) if wanted else {}
    principals = {sid: p for sid in wanted if (p := resolved.get(sid)) is not None}
    return replace(view, principals=principals)


def member_sids_to_check(
    groups: Iterable[CloudGroup],
    current: Mapping[str, DirectoryGroup],
    options: MappingOptions,
    rules: GuardRules,
) -> set[str]:
    """The member SIDs the mapping would add to ``groups`` (in scope, within the
    member limit) that AD does not hold yet: what the directory is asked about.
    Member groups are not among them: nesting names only groups of ours, read
    from their anchored objects (``DesiredGroup.nested_sids``)."""
    sids: set[str] = set()
    for group in groups:
        if not isinstance(in_scope(group, options), Placement):
            continue
        found = current.get(group.id)
        held = found.member_sids if found is not None else frozenset()
        sids.update(group_sids_to_check(group, held, options, rules))
    return sids


def group_sids_to_check(
    group: CloudGroup, held: frozenset[str], options: MappingOptions, rules: GuardRules
) -> list[str]:
    """Of :func:`member_sids_to_check`, one group in scope whose AD object holds
    ``held``: none over the member limit (such a group is not written)."""
    if over_member_limit(group, options.member_limit) is not None:
        return []
    wanted, *_ = writable_members(group)  # desired_group's member SIDs, nothing else built
    return sids_to_resolve(wanted, held, rules)
