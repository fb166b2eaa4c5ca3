"""Groups as members of groups: which member groups can be written, and in what order.

A cloud security group may hold other groups. On-premises such a member is
written only when it is one of *our* groups there: an object we anchor under
the target OU (by its objectSid), or one the same run creates (by its DN, since
it has no SID yet; the creation is ordered before the write that names it).
Anything else is skipped and reported: a member group not written back (out of
scope, synced from AD, not yet created), one whose AD object is not universal
(AD refuses a universal group holding a global or domain-local one), or one
that would close a cycle (a group that, through its members, contains itself).

Pure: the callers read AD and Graph; this module decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from writeback.domain.mapping import UNIVERSAL_SCOPE, Placement
from writeback.domain.model import (
    Add,
    CloudGroup,
    DirectoryGroup,
    MemberKind,
    Operation,
    SkipReason,
)
from writeback.domain.naming import cn_for, dn_for, dn_key
from writeback.domain.planner import sid_ref


@dataclass(frozen=True)
class MemberGroup:
    """One of our groups as a possible member: its objectSid when its AD object
    exists, else the DN it is created at in this run."""

    group_id: str
    sid: str | None = None
    dn: str | None = None
    universal: bool = True


@dataclass(frozen=True)
class NestedGroups:
    """The member groups a plan may write, and the memberships it must not.

    ``groups``: our groups by id (those in scope); ``cycles``: (parent, child)
    memberships inside a nesting cycle, all skipped so what AD holds stays acyclic.
    """

    groups: Mapping[str, MemberGroup] = field(default_factory=dict)
    cycles: frozenset[tuple[str, str]] = frozenset()

    def reference(self, parent_id: str, child_id: str) -> tuple[str | None, SkipReason | None]:
        """The member value for ``child_id`` in ``parent_id`` (``<SID=...>`` or a DN),
        or None with the reason it is skipped."""
        if (parent_id, child_id) in self.cycles:
            return None, SkipReason.MEMBER_GROUP_CYCLE
        child = self.groups.get(child_id)
        if child is None:
            return None, SkipReason.MEMBER_GROUP_NOT_WRITTEN
        if not child.universal:
            return None, SkipReason.MEMBER_GROUP_NOT_UNIVERSAL
        if child.sid:
            return sid_ref(child.sid), None
        if child.dn:
            return child.dn, None
        return None, SkipReason.MEMBER_GROUP_NOT_WRITTEN


def member_group(group: DirectoryGroup) -> MemberGroup:
    """What an existing AD object of ours offers as a member: its SID and scope."""
    return MemberGroup(group.group_id, sid=group.object_sid, universal=is_universal(group))


def is_universal(group: DirectoryGroup) -> bool:
    """Whether the object's groupType has the universal-scope bit (true when unread)."""
    values = next((v for k, v in group.attributes.items() if k.lower() == "grouptype"), ())
    if not values:
        return True
    try:
        return bool(int(values[0]) & UNIVERSAL_SCOPE)
    except ValueError:
        return False


def cycle_edges(edges: Mapping[str, Iterable[str]]) -> frozenset[tuple[str, str]]:
    """Every (parent, child) membership that lies on a cycle: the edges inside a
    strongly connected component of more than one group, and self-memberships."""
    graph = {node: sorted(set(children)) for node, children in edges.items()}
    component = _components(graph)
    sizes: dict[int, int] = {}
    for number in component.values():
        sizes[number] = sizes.get(number, 0) + 1
    return frozenset(
        (parent, child)
        for parent, children in graph.items()
        for child in children
        if child == parent
        or (component.get(child) == component[parent] and sizes[component[parent]] > 1)
    )


def _components(graph: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Tarjan's strongly connected components, iterative (nesting can be deep): the
    component number of every node of ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    component: dict[str, int] = {}
    count = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, position = work.pop()
            if position == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            children = graph.get(node, ())
            child = next((c for c in children[position:] if c not in index), None)
            for seen in children[position:]:
                if seen in on_stack:
                    low[node] = min(low[node], index[seen])
                if seen == child:
                    break
            if child is not None:
                work.append((node, children.index(child) + 1))
                work.append((child, 0))
                continue
            if low[node] == index[node]:
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component[member] = count
                    if member == node:
                        break
                count += 1
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return component


def creation_order(operations: Sequence[Operation]) -> list[Operation]:
    """``operations`` with every Add moved before the operations that name its DN as
    a member, keeping the given order otherwise (a stable topological sort; the
    references are acyclic once :func:`cycle_edges` are skipped)."""
    adds = {dn_key(op.dn): i for i, op in enumerate(operations) if isinstance(op, Add)}
    needs: dict[int, list[int]] = {}
    for i, op in enumerate(operations):
        for value in _added_members(op):
            if value.startswith("<"):
                continue
            j = adds.get(dn_key(value))
            if j is not None and j != i:
                needs.setdefault(i, []).append(j)
    if not needs:
        return list(operations)
    done: set[int] = set()
    visiting: set[int] = set()
    ordered: list[Operation] = []
    for start in range(len(operations)):
        work = [(start, False)]
        while work:
            i, expanded = work.pop()
            if i in done:
                continue
            if expanded:
                visiting.discard(i)
                done.add(i)
                ordered.append(operations[i])
                continue
            if i in visiting:
                continue  # a reference cycle (never planned): keep the given order
            visiting.add(i)
            work.append((i, True))
            for j in reversed(needs.get(i, [])):
                if j not in done and j not in visiting:
                    work.append((j, False))
    return ordered


def _added_members(operation: Operation) -> tuple[str, ...]:
    if isinstance(operation, Add):
        return operation.members
    changes = getattr(operation, "changes", None)
    return tuple(changes.add_members) if changes is not None else ()


def plan_nesting(
    placed: Mapping[str, tuple[CloudGroup, Placement]],
    current: Mapping[str, DirectoryGroup],
    target_ou: str,
) -> NestedGroups:
    """The member groups a full plan may write: every group in scope (``placed``,
    by id), by its AD object's SID when it has one, else by the DN its creation in
    this run gives it; and the memberships among them that close a cycle."""
    groups: dict[str, MemberGroup] = {}
    for gid, (group, placement) in placed.items():
        existing = current.get(gid)
        if existing is not None:
            groups[gid] = member_group(existing)
        else:
            cn = cn_for(gid, group.display_name, placement.dn_format)
            groups[gid] = MemberGroup(gid, dn=dn_for(cn, placement.parent_dn or target_ou))
    edges = {
        gid: [m.id for m in group.members if m.kind is MemberKind.GROUP and m.id in groups]
        for gid, (group, _) in placed.items()
    }
    return NestedGroups(groups, cycle_edges(edges))


def event_nesting(
    parent: CloudGroup,
    parent_current: DirectoryGroup | None,
    children: Mapping[str, DirectoryGroup],
) -> NestedGroups:
    """The member groups one event may write for ``parent``: its member groups that
    have an anchored AD object of ours now (a child not created yet is skipped; its
    creation confirms the parent). A child whose AD object already holds the
    parent is a cycle and skipped (deeper cycles are left to the full sync,
    which sees the whole graph)."""
    groups = {gid: member_group(child) for gid, child in children.items()}
    parent_sid = parent_current.object_sid if parent_current is not None else None
    cycles = {
        (parent.id, gid)
        for gid, child in children.items()
        if gid == parent.id or (parent_sid is not None and parent_sid in child.member_sids)
    }
    return NestedGroups(groups, frozenset(cycles))


def member_group_ids(group: CloudGroup) -> list[str]:
    return [m.id for m in group.members if m.kind is MemberKind.GROUP]
