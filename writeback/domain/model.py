"""The nouns of writeback: what the cloud says, what AD holds, what to do.

Pure data, no I/O. Cloud and directory state are frozen so a planner given the
same inputs always returns the same operation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

ANCHOR_PREFIX = "Group_"
OBJECT_ID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")

#: Attribute values as AD stores them: every attribute a tuple of strings.
#: An empty tuple in a replace means "clear the attribute".
Attributes = Mapping[str, tuple[str, ...]]


class MemberKind(StrEnum):
    USER = "user"
    GROUP = "group"
    DEVICE = "device"
    CONTACT = "contact"
    OTHER = "other"


@dataclass(frozen=True)
class CloudMember:
    """One member of a cloud group, as far as Graph tells us about it."""

    id: str
    kind: MemberKind = MemberKind.USER
    sid: str | None = None
    synced: bool = False


class GroupKind(StrEnum):
    """What a cloud group is, as the scoping rules name it.

    Exchange Online distribution lists (mail-enabled, not security, not Unified)
    are ``distribution``: no Microsoft product writes them back, nor does this one.
    """

    MICROSOFT_365 = "microsoft365"
    SECURITY = "security"
    MAIL_ENABLED_SECURITY = "mail-enabled-security"
    DISTRIBUTION = "distribution"
    OTHER = "other"


#: The group types Graph's (beta) ``writebackConfiguration.onPremisesGroupType`` takes.
ON_PREMISES_GROUP_TYPES = (
    "universalDistributionGroup",
    "universalSecurityGroup",
    "universalMailEnabledSecurityGroup",
)


@dataclass(frozen=True)
class WritebackConfiguration:
    """Graph's beta ``writebackConfiguration`` of a group, as Entra Connect V2 read it;
    None values are Graph's nulls (V2's defaults apply, see :mod:`writeback.domain.rules`)."""

    is_enabled: bool | None = None
    on_premises_group_type: str | None = None


@dataclass(frozen=True)
class CloudGroup:
    """A cloud group (Microsoft 365 or security) as Graph reports it now.

    ``security_enabled`` and ``mail_enabled`` are None when not read (a Unified
    group is a Microsoft 365 group whatever they say). ``members_hidden``: the
    group's membership is hidden (``visibility=HiddenMembership``) and the app
    cannot read hidden memberships (no ``Member.Read.Hidden``), so Graph may have
    left members out: never remove a member on the word of this list.
    ``hide_from_address_lists`` and ``writeback`` are None when not read (they
    cost requests of their own). ``member_of`` lists the groups this one is a
    direct member of, read only by the event path when nesting is on.
    """

    id: str
    display_name: str
    description: str | None = None
    mail: str | None = None
    mail_nickname: str | None = None
    proxy_addresses: tuple[str, ...] = ()
    group_types: tuple[str, ...] = ("Unified",)
    visibility: str | None = None
    members: tuple[CloudMember, ...] = ()
    security_enabled: bool | None = None
    mail_enabled: bool | None = None
    on_premises_sync_enabled: bool = False
    is_assignable_to_role: bool = False
    members_hidden: bool = False
    hide_from_address_lists: bool | None = None
    writeback: WritebackConfiguration | None = None
    member_of: tuple[str, ...] = ()

    # The cached properties below are computed once per group object: planning asks
    # them several times of every group of a full sync (20,000 at a time), and the
    # object is frozen, so the answer cannot change (``replace`` makes a new one).

    @cached_property
    def is_unified(self) -> bool:
        return any(t.lower() == "unified" for t in self.group_types)

    @cached_property
    def kind(self) -> GroupKind:
        if self.is_unified:
            return GroupKind.MICROSOFT_365
        if self.security_enabled:
            return GroupKind.MAIL_ENABLED_SECURITY if self.mail_enabled else GroupKind.SECURITY
        return GroupKind.DISTRIBUTION if self.mail_enabled else GroupKind.OTHER

    @property
    def anchor(self) -> str:
        return anchor_for(self.id)

    @cached_property
    def member_split(self) -> MemberSplit:
        """The members sorted by what writing them back takes (see :class:`MemberSplit`)."""
        sids: set[str] = set()
        groups: list[str] = []
        not_users = not_on_prem = 0
        for member in self.members:
            kind = member.kind
            if kind is MemberKind.USER:
                if member.synced and member.sid:
                    sids.add(member.sid)
                else:
                    not_on_prem += 1
            elif kind is MemberKind.GROUP:
                groups.append(member.id)
            else:
                not_users += 1
        return MemberSplit(frozenset(sids), tuple(groups), not_users, not_on_prem)


@dataclass(frozen=True)
class MemberSplit:
    """A cloud group's members as the mapping sees them: the SIDs of users synced
    from AD (each has an object there), the ids of member groups (written only
    with nesting on), and counts of the members that cannot be written: devices,
    contacts and other non-users, and users with no AD object (cloud-only, guests)."""

    user_sids: frozenset[str]
    groups: tuple[str, ...]
    not_users: int
    not_on_prem: int


@dataclass(frozen=True)
class DirectoryGroup:
    """An anchored group object as AD holds it now.

    ``member_sids`` are the members AD resolved to a SID; ``other_members``
    are DNs of members without one (contacts added by hand, for example), which
    drift repair removes.
    """

    dn: str
    group_id: str
    attributes: Attributes
    member_sids: frozenset[str] = frozenset()
    other_members: frozenset[str] = frozenset()
    object_sid: str | None = None


def anchor_for(group_id: str) -> str:
    """The adminDescription value that marks an object as ours (Connect's too)."""
    return f"{ANCHOR_PREFIX}{group_id}"


def is_object_id(text: str) -> bool:
    """An Entra object id: a GUID in its usual 8-4-4-4-12 hex form."""
    return OBJECT_ID.fullmatch(text) is not None


def is_canonical_id(text: str) -> bool:
    """An object id in the one form writeback uses at every boundary (queue bodies,
    anchors, relay requests): a GUID in lower case, nothing around it. Graph writes
    ids this way; AD compares adminDescription without case, Python with it, so an
    id in another spelling would be one group to AD and another to the planner."""
    return is_object_id(text) and text == text.lower()


def group_id_from_anchor(anchor: str) -> str | None:
    """The group id an anchor names, or None when it is not ``Group_<objectId>``.

    An admin's own ``adminDescription=Group_Finance`` in the OU is not ours: only a
    GUID after the prefix makes an object writeback's (or Entra Connect's), and only
    in lower case: ``Group_<GUID in capitals>`` is not ours either, so it is never
    modified, deleted or taken for the group (see :func:`anchor_claims`).
    """
    if anchor.startswith(ANCHOR_PREFIX) and is_canonical_id(anchor[len(ANCHOR_PREFIX) :]):
        return anchor[len(ANCHOR_PREFIX) :]
    return None


def anchor_claims(anchor: str) -> str | None:
    """The group id an anchor names in any case, lower-cased: what AD's case-blind
    match on adminDescription takes it for. An object whose anchor claims a group
    without being its canonical anchor stands in that group's way (a decoy): it is
    reported, never written."""
    rest = anchor[len(ANCHOR_PREFIX) :] if anchor[: len(ANCHOR_PREFIX)].lower() == "group_" else ""
    return rest.lower() if is_object_id(rest) else None


@dataclass(frozen=True)
class Changes:
    """What a modify does: attribute replaces and member deltas.

    Member values are ``<SID=...>`` references for adds; removals are
    ``<SID=...>`` for principals and plain DNs for members without a SID.
    """

    replace: Attributes = field(default_factory=dict)
    add_members: tuple[str, ...] = ()
    remove_members: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.replace or self.add_members or self.remove_members)


@dataclass(frozen=True)
class Add:
    group_id: str
    dn: str
    attributes: Attributes
    members: tuple[str, ...] = ()
    kind: str = "add"


@dataclass(frozen=True)
class Modify:
    group_id: str
    dn: str
    changes: Changes
    kind: str = "modify"


@dataclass(frozen=True)
class Rename:
    """A modify-DN to ``new_rdn``, in the same parent or, with ``new_parent``, moved
    under that OU (a placement rule sent the group there; the object, its
    objectSid and objectGUID stay the same), after ``changes`` if any."""

    group_id: str
    dn: str
    new_rdn: str
    changes: Changes = field(default_factory=Changes)
    kind: str = "rename"
    new_parent: str | None = None


@dataclass(frozen=True)
class Delete:
    group_id: str
    dn: str
    kind: str = "delete"


Operation = Add | Modify | Rename | Delete


class SkipReason(StrEnum):
    OVER_MEMBER_LIMIT = "over-member-limit"
    NOT_UNIFIED = "not-unified"
    SOFT_DELETED = "soft-deleted"
    DELETE_THRESHOLD = "delete-threshold"
    DUPLICATE_ANCHOR = "duplicate-anchor"
    MEMBER_NOT_ON_PREM = "member-not-on-prem"
    MEMBER_NOT_A_USER = "member-not-a-user"
    #: A scoping rule (or the default scope) leaves the group out; kept or deleted.
    OUT_OF_SCOPE = "out-of-scope"
    #: Groups synced from on-premises AD are never written back (it would loop).
    SYNCED_FROM_ON_PREMISES = "synced-from-on-premises"
    #: Role-assignable groups are written only when a rule names their id.
    ROLE_ASSIGNABLE = "role-assignable"
    #: Member.Read.Hidden is missing: members of a HiddenMembership group are not removed.
    HIDDEN_MEMBERSHIP = "hidden-membership"
    MEMBER_GROUP_NOT_WRITTEN = "member-group-not-written-back"
    MEMBER_GROUP_NOT_UNIVERSAL = "member-group-not-universal"
    MEMBER_GROUP_CYCLE = "member-group-cycle"
    # The member guard (domain/guard.py): one skip per member, naming it.
    MEMBER_DENIED = "member-denied"
    MEMBER_PRIVILEGED = "member-privileged"
    MEMBER_PROTECTED = "member-protected"
    MEMBER_UNRESOLVED = "member-unresolved"
    MEMBER_NOT_A_USER_OBJECT = "member-not-a-user-object"
    # The nesting guard: a group of ours inside a protected group gets no member added.
    GROUP_FROZEN = "group-frozen"


#: Skips a person must look at (``plan`` and ``status`` show them as alerts): two
#: objects claiming one anchor, and a group nested into a protected group.
ALERT_REASONS = frozenset({SkipReason.DUPLICATE_ANCHOR, SkipReason.GROUP_FROZEN})


@dataclass(frozen=True)
class Skip:
    """Something deliberately not written, so it is reported and never silent."""

    group_id: str
    reason: SkipReason
    detail: str = ""
    count: int = 1
    #: The member's SID, for a skip of one member (the member guard's).
    member: str = ""

    @property
    def alert(self) -> bool:
        return self.reason in ALERT_REASONS
