"""The service layer's side of scoping and nesting: which groups a run reads and
writes, and the AD objects of the member groups it names.

The decisions are pure (:mod:`writeback.domain.rules`,
:mod:`writeback.domain.nesting`); what is here reads AD for them, so the
worker, the reconcile and the incremental reconcile share one way of doing it.
"""

from __future__ import annotations

from collections.abc import Mapping

from writeback.domain.mapping import MappingOptions, Placement
from writeback.domain.model import CloudGroup, DirectoryGroup, Skip
from writeback.domain.nesting import NestedGroups, event_nesting, member_group_ids
from writeback.domain.rules import Excluded, decide
from writeback.ports import Directory, GroupRead


def in_scope(group: CloudGroup, options: MappingOptions) -> Placement | Excluded | None:
    """How ``group`` is written, or why not; None for a kind this deployment does not
    handle at all (without rules or security groups: anything but Microsoft 365
    groups, which V1 never looks at, so their objects are neither kept nor
    deleted on their account)."""
    if not (options.wants_all_groups or group.is_unified):
        return None
    return decide(group, options)


def kept_skip(excluded: Excluded, current: DirectoryGroup) -> Skip:
    """What is reported for an object kept although its group is out of scope."""
    return Skip(
        current.group_id, excluded.reason, f"{excluded.detail}; kept as it is: {current.dn}"
    )


def event_nesting_for(
    reads: Mapping[str, GroupRead],
    current: Mapping[str, DirectoryGroup],
    directory: Directory,
    options: MappingOptions,
) -> dict[str, NestedGroups]:
    """For each group read, the member groups it may write: their AD objects of ours,
    read in one search for all the groups of the step (members too, to spot a
    child that already holds its parent). Empty when nesting is off."""
    if not options.nesting:
        return {}
    wanted: dict[str, list[str]] = {}
    for gid, read in reads.items():
        if isinstance(read, CloudGroup):
            wanted[gid] = member_group_ids(read)
    ids = sorted({cid for cids in wanted.values() for cid in cids} - set(current))
    found = dict(current)
    if ids:
        found.update(directory.find_groups(ids, members=True))
    result: dict[str, NestedGroups] = {}
    for gid, cids in wanted.items():
        read = reads[gid]
        assert isinstance(read, CloudGroup)
        children = {cid: found[cid] for cid in cids if cid in found}
        result[gid] = event_nesting(read, current.get(gid), children)
    return result
