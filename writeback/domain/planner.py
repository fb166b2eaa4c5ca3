"""Desired state vs current state → at most one operation.

Pure: the same inputs give the same operation, with no I/O, clock or
randomness, so the worker, reconcile and ``plan`` all agree on what a group
needs, and a second run over converged state plans nothing.
"""

from __future__ import annotations

from writeback.domain.mapping import DesiredGroup
from writeback.domain.model import (
    Add,
    Attributes,
    Changes,
    Delete,
    DirectoryGroup,
    Modify,
    Operation,
    Rename,
)
from writeback.domain.naming import (
    dn_for,
    dn_key,
    first_rdn,
    parent_of,
    rdn_for,
    unescape_dn_value,
)

#: Values compared as sets: AD does not keep the order of multi-valued attributes.
_UNORDERED = frozenset({"proxyaddresses"})


def sid_ref(sid: str) -> str:
    """The member value that names a principal by SID, so no lookup is needed."""
    return f"<SID={sid}>"


def plan_group(
    desired: DesiredGroup | None, current: DirectoryGroup | None, target_ou: str
) -> Operation | None:
    """The one operation that converges ``current`` to ``desired``, or None."""
    if desired is None:
        return Delete(current.group_id, current.dn) if current is not None else None
    if current is None:
        return _add(desired, target_ou)
    changes = diff(desired, current)
    if moves(desired, current):
        return Rename(
            desired.group_id,
            current.dn,
            rdn_for(desired.cn),
            changes,
            new_parent=desired.parent_dn,
        )
    if current_cn(current.dn) != desired.cn:
        return Rename(desired.group_id, current.dn, rdn_for(desired.cn), changes)
    return Modify(desired.group_id, current.dn, changes) if changes else None


def moves(desired: DesiredGroup, current: DirectoryGroup) -> bool:
    """A rule places the group in another OU than the one its object is in."""
    return desired.parent_dn is not None and dn_key(parent_of(current.dn)) != dn_key(
        desired.parent_dn
    )


def _add(desired: DesiredGroup, target_ou: str) -> Add:
    attributes = {name: values for name, values in desired.attributes.items() if values}
    attributes.update(desired.create_only)
    return Add(
        desired.group_id,
        dn_for(desired.cn, desired.parent_dn or target_ou),
        attributes,
        tuple(sid_ref(sid) for sid in sorted(desired.member_sids))
        + tuple(sorted(desired.member_dns)),
    )


def diff(desired: DesiredGroup, current: DirectoryGroup) -> Changes:
    """Attribute replaces and member deltas; empty when already converged. A group
    whose members Graph may have hidden (``keep_members``) loses none but those the
    member guard refuses (``refused_sids``)."""
    replace = {
        name: values
        for name, values in desired.attributes.items()
        if not _same(name, values, _current_values(current.attributes, name))
    }
    add = sorted(desired.member_sids - current.member_sids)
    if desired.keep_members:
        remove = sorted(current.member_sids & desired.refused_sids)
    else:
        remove = sorted(current.member_sids - desired.member_sids)
    others = () if desired.keep_members else tuple(sorted(current.other_members))
    return Changes(
        replace=replace,
        add_members=tuple(sid_ref(sid) for sid in add) + tuple(sorted(desired.member_dns)),
        remove_members=tuple(sid_ref(sid) for sid in remove) + others,
    )


def _current_values(attributes: Attributes, name: str) -> tuple[str, ...]:
    if name in attributes:
        return attributes[name]
    lowered = name.lower()
    for key, values in attributes.items():
        if key.lower() == lowered:
            return values
    return ()


def _same(name: str, desired: tuple[str, ...], current: tuple[str, ...]) -> bool:
    if name.lower() in _UNORDERED:
        return set(desired) == set(current)
    return desired == current


def current_cn(dn: str) -> str:
    """The unescaped CN value of an entry's DN."""
    _, _, value = first_rdn(dn).partition("=")
    return unescape_dn_value(value)
