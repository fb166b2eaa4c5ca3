"""From a cloud group to the AD entry it should be.

The mapping decides every value writeback owns on the AD object. What it does
not list (sAMAccountName after creation, ACLs, anything an admin added that we
do not manage) is left alone, so adopting a group Entra Connect wrote keeps its
identity and its SID.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from writeback.domain.model import (
    CloudGroup,
    GroupKind,
    Skip,
    SkipReason,
    anchor_for,
)
from writeback.domain.naming import DnFormat, cn_for, sam_account_name_for

if TYPE_CHECKING:
    from writeback.domain.nesting import NestedGroups
    from writeback.domain.rules import RuleSet


class GroupType(StrEnum):
    DISTRIBUTION = "distribution"
    SECURITY = "security"
    #: A universal security group that is also a recipient (mail attributes written).
    MAIL_ENABLED_SECURITY = "mail-enabled-security"


#: groupType flags: universal scope (0x8), plus the security bit (0x80000000).
GROUP_TYPE_VALUES = {
    GroupType.DISTRIBUTION: "8",
    GroupType.SECURITY: str(0x8 - 0x80000000),
    GroupType.MAIL_ENABLED_SECURITY: str(0x8 - 0x80000000),
}
#: The universal-scope bit of groupType: only universal groups may nest ours.
UNIVERSAL_SCOPE = 0x8

#: What Exchange shows a written-back Microsoft 365 group as on-premises.
REMOTE_GROUP_MAILBOX = str(2**43)  # msExchRecipientTypeDetails: RemoteGroupMailbox
DISPLAY_TYPE_DISTRIBUTION_GROUP = "1"  # msExchRecipientDisplayType
#: Exchange's RecipientTypeDetails for the other mail-enabled groups written back.
MAIL_UNIVERSAL_DISTRIBUTION_GROUP = "256"
MAIL_UNIVERSAL_SECURITY_GROUP = "1024"
DISPLAY_TYPE_SECURITY_DISTRIBUTION_GROUP = "1073741833"  # 0x40000009

#: Attributes writeback owns on every object it manages; drift in them is repaired.
BASE_ATTRIBUTES = (
    "adminDescription",
    "groupType",
    "displayName",
    "description",
    "info",
    "mail",
    "proxyAddresses",
)
#: Written only where the forest's schema has them (an Exchange-prepared forest).
EXCHANGE_ATTRIBUTES = (
    "mailNickname",
    "msExchRecipientTypeDetails",
    "msExchRecipientDisplayType",
    "msExchHideFromAddressLists",
)
MANAGED_ATTRIBUTES = BASE_ATTRIBUTES + EXCHANGE_ATTRIBUTES
#: Set when the object is created, never overwritten (admins and Exchange may rely on it).
CREATE_ONLY_ATTRIBUTES = ("objectClass", "sAMAccountName")

# rangeUpper values of the AD schema: longer values are refused by the DC.
_LIMITS = {"displayName": 256, "description": 1024, "info": 1024, "mail": 256, "mailNickname": 64}
_INFO = "{kind} {id}, written back from Microsoft Entra ID. Edits here are overwritten."
_KIND_NAMES = {
    GroupKind.MICROSOFT_365: "Microsoft 365 group",
    GroupKind.SECURITY: "Security group",
    GroupKind.MAIL_ENABLED_SECURITY: "Mail-enabled security group",
}

DEFAULT_MEMBER_LIMIT = 50_000
MAX_MEMBER_LIMIT = 250_000


class OutOfScope(StrEnum):
    """What happens to the AD object of a group that falls out of scope."""

    #: Kept as it is, no longer written (Entra Connect V2's behaviour).
    KEEP = "keep"
    #: Deleted, behind the delete threshold.
    DELETE = "delete"


@dataclass(frozen=True)
class MappingOptions:
    target_ou: str
    dn_format: DnFormat = DnFormat.OBJECT_ID
    group_type: GroupType = GroupType.DISTRIBUTION
    #: Lower-case names of the optional (Exchange) attributes this forest has.
    schema_attributes: frozenset[str] = frozenset()
    member_limit: int = DEFAULT_MEMBER_LIMIT
    #: Scoping and placement rules (WRITEBACK_RULES); None: group writeback V1's
    #: scope (every Microsoft 365 group, in the target OU, one DN format and type).
    rules: RuleSet | None = field(default=None, compare=False)
    #: Without rules: write cloud security and mail-enabled security groups too.
    security_groups: bool = False
    out_of_scope: OutOfScope = OutOfScope.KEEP
    #: Write msExchHideFromAddressLists from Graph's hideFromAddressLists.
    hide_from_address_lists: bool = False

    @property
    def nesting(self) -> bool:
        """Groups may be members of groups only where security groups can be in
        scope (Microsoft 365 groups cannot have group members); V1 skips them."""
        return self.rules is not None or self.security_groups

    @property
    def wants_all_groups(self) -> bool:
        """Whether the scope can hold more than Microsoft 365 groups, so the cloud
        side must read security groups too."""
        return self.nesting


@dataclass(frozen=True)
class Placement:
    """Where and as what a group in scope is written: the rule that decided
    (None: the settings, as V1), the OU (None: wherever the object is now, new
    objects in the target OU), the DN format and the AD group type."""

    rule: str | None
    parent_dn: str | None
    dn_format: DnFormat
    group_type: GroupType


@dataclass(frozen=True)
class DesiredGroup:
    """The AD entry a cloud group should be, before comparing with AD.

    ``member_dns`` are members named by DN: groups of ours created in the same
    run, which have no objectSid yet. ``keep_members``: Graph may have hidden
    members of this group, so no current member is removed. ``parent_dn``: the OU
    a rule places the group in (None: where it is)."""

    group_id: str
    cn: str
    attributes: dict[str, tuple[str, ...]]
    create_only: dict[str, tuple[str, ...]]
    member_sids: frozenset[str]
    skips: tuple[Skip, ...] = ()
    member_dns: frozenset[str] = frozenset()
    #: The SIDs of ``member_sids`` that are groups of ours (nesting), read from their
    #: anchored AD objects below the target OU.
    nested_sids: frozenset[str] = frozenset()
    keep_members: bool = False
    #: Members AD holds that the member guard refuses: removed even when
    #: ``keep_members`` (a hidden list keeps unknown members, never refused ones).
    refused_sids: frozenset[str] = frozenset()
    parent_dn: str | None = None
    rule: str | None = None


def default_placement(group: CloudGroup, options: MappingOptions) -> Placement:
    """V1's placement: the settings' format; the settings' type for a Microsoft 365
    group, security or mail-enabled security for the security kinds."""
    kind = group.kind
    if kind is GroupKind.SECURITY:
        group_type = GroupType.SECURITY
    elif kind is GroupKind.MAIL_ENABLED_SECURITY:
        group_type = GroupType.MAIL_ENABLED_SECURITY
    else:
        group_type = options.group_type
    return Placement(None, None, options.dn_format, group_type)


def desired_group(
    group: CloudGroup,
    options: MappingOptions,
    placement: Placement | None = None,
    nested: NestedGroups | None = None,
) -> DesiredGroup:
    """The AD entry for ``group`` placed by ``placement`` (default: V1's); member
    groups are written when ``nested`` knows them (see :mod:`writeback.domain.nesting`)."""
    placement = placement or default_placement(group, options)
    sids, dns, groups, skips = writable_members(group, nested if options.nesting else None)
    if group.members_hidden:
        skips = (
            *skips,
            Skip(
                group.id,
                SkipReason.HIDDEN_MEMBERSHIP,
                "HiddenMembership group and no Member.Read.Hidden: members are added, "
                "never removed",
            ),
        )
    return DesiredGroup(
        group_id=group.id,
        cn=cn_for(group.id, group.display_name, placement.dn_format),
        attributes=managed_attributes(group, options, placement.group_type),
        create_only={
            "objectClass": ("top", "group"),
            "sAMAccountName": (sam_account_name_for(group.id),),
        },
        member_sids=sids,
        skips=skips,
        member_dns=dns,
        nested_sids=groups,
        keep_members=group.members_hidden,
        parent_dn=placement.parent_dn,
        rule=placement.rule,
    )


def managed_attributes(
    group: CloudGroup, options: MappingOptions, group_type: GroupType | None = None
) -> dict[str, tuple[str, ...]]:
    """Every managed attribute with its desired values; () means "must be absent".

    A Microsoft 365 group keeps V1's attributes whatever its AD type; another
    group is a recipient (mail, proxyAddresses, Exchange attributes) only when
    written as distribution or mail-enabled security, and a plain security group
    holds none of them."""
    group_type = group_type or default_placement(group, options).group_type
    kind = group.kind
    recipient = kind is GroupKind.MICROSOFT_365 or group_type is not GroupType.SECURITY
    values: dict[str, tuple[str, ...]] = {
        "adminDescription": (anchor_for(group.id),),
        "groupType": (GROUP_TYPE_VALUES[group_type],),
        "displayName": _text("displayName", group.display_name),
        "description": _text("description", group.description),
        "info": (_INFO.format(kind=_KIND_NAMES.get(kind, "Group"), id=group.id),),
        "mail": _text("mail", group.mail) if recipient else (),
        "proxyAddresses": smtp_proxy_addresses(group) if recipient else (),
    }
    if kind is GroupKind.MICROSOFT_365:
        details, display = REMOTE_GROUP_MAILBOX, DISPLAY_TYPE_DISTRIBUTION_GROUP
    elif group_type is GroupType.MAIL_ENABLED_SECURITY:
        details, display = MAIL_UNIVERSAL_SECURITY_GROUP, DISPLAY_TYPE_SECURITY_DISTRIBUTION_GROUP
    else:
        details, display = MAIL_UNIVERSAL_DISTRIBUTION_GROUP, DISPLAY_TYPE_DISTRIBUTION_GROUP
    exchange: dict[str, tuple[str, ...]] = {
        "mailNickname": _text("mailNickname", group.mail_nickname) if recipient else (),
        "msExchRecipientTypeDetails": (details,) if recipient else (),
        "msExchRecipientDisplayType": (display,) if recipient else (),
    }
    if options.hide_from_address_lists and group.hide_from_address_lists is not None:
        exchange["msExchHideFromAddressLists"] = (
            ("TRUE",) if recipient and group.hide_from_address_lists else ()
        )
    for name, value in exchange.items():
        if name.lower() in options.schema_attributes:
            values[name] = value
    return values


def _text(attribute: str, value: str | None) -> tuple[str, ...]:
    """One cleaned value: NUL removed, cut to the schema's limit, empty means absent."""
    if value is None:
        return ()
    cleaned = value.replace("\x00", "")[: _LIMITS[attribute]]
    return (cleaned,) if cleaned.strip() else ()


def smtp_proxy_addresses(group: CloudGroup) -> tuple[str, ...]:
    """All SMTP addresses, the primary (``SMTP:``) first, secondaries sorted.

    Only SMTP: X500 and other address types belong to Exchange Online.
    Duplicates that differ only in case are written once.
    """
    primary: str | None = None
    secondary: dict[str, str] = {}
    for proxy in group.proxy_addresses:
        prefix, sep, address = proxy.partition(":")
        if not sep or prefix.lower() != "smtp" or not address.strip():
            continue
        if prefix == "SMTP" and primary is None:
            primary = address.strip()
        else:
            secondary.setdefault(address.strip().lower(), address.strip())
    if primary is None and group.mail:
        primary = group.mail.strip()
    if primary is None:
        return tuple(f"smtp:{a}" for _, a in sorted(secondary.items()))
    secondary.pop(primary.lower(), None)
    return (f"SMTP:{primary}", *tuple(f"smtp:{a}" for _, a in sorted(secondary.items())))


def writable_members(
    group: CloudGroup, nested: NestedGroups | None = None
) -> tuple[frozenset[str], frozenset[str], frozenset[str], tuple[Skip, ...]]:
    """SIDs (and DNs) of the members that exist on-premises, which of those SIDs are
    member groups of ours, and a count of the rest.

    Users synced from AD have an object there; cloud-only users, guests, devices
    and contacts are skipped and reported per group. A member group is written
    only with ``nested`` (nesting on) and only when it is one of ours there: by
    its objectSid, or by DN when it is created in the same run; else it is
    skipped with the reason (not written back, not universal, closing a cycle).
    """
    split = group.member_split
    skipped: Counter[SkipReason] = Counter()
    if split.not_on_prem:
        skipped[SkipReason.MEMBER_NOT_ON_PREM] = split.not_on_prem
    sids = split.user_sids
    dns: set[str] = set()
    groups: set[str] = set()
    not_users = split.not_users
    if nested is None:
        not_users += len(split.groups)  # a member group is not a user
    else:
        for member_id in split.groups:
            ref, reason = nested.reference(group.id, member_id)
            if ref is None:
                skipped[reason or SkipReason.MEMBER_GROUP_NOT_WRITTEN] += 1
            elif ref.startswith("<SID="):
                groups.add(ref[5:-1])
            else:
                dns.add(ref)
        if groups:
            sids = sids | groups
    if not_users:
        skipped[SkipReason.MEMBER_NOT_A_USER] = not_users
    skips = tuple(
        Skip(group.id, reason, _SKIP_DETAIL[reason], count)
        for reason, count in sorted(skipped.items(), key=lambda item: item[0].value)
    )
    return sids, frozenset(dns), frozenset(groups), skips


_SKIP_DETAIL: Mapping[SkipReason, str] = {
    SkipReason.MEMBER_NOT_ON_PREM: "members without an on-premises account (cloud-only or guest)",
    SkipReason.MEMBER_NOT_A_USER: "members that are not users (nested groups, devices, contacts)",
    SkipReason.MEMBER_GROUP_NOT_WRITTEN: "member groups that are not written back (out of "
    "scope, not yet created, or synced from on-premises)",
    SkipReason.MEMBER_GROUP_NOT_UNIVERSAL: "member groups whose AD object is not universal",
    SkipReason.MEMBER_GROUP_CYCLE: "member groups that would close a nesting cycle",
}


def over_member_limit(group: CloudGroup, limit: int) -> Skip | None:
    """V1's member limit: a larger group is not written at all, never truncated."""
    if len(group.members) <= limit:
        return None
    return Skip(
        group.id,
        SkipReason.OVER_MEMBER_LIMIT,
        f"{len(group.members)} members, limit {limit}",
        len(group.members),
    )
