"""From a cloud group to the AD entry it should be.

The mapping decides every value writeback owns on the AD object. What it does
not list (sAMAccountName after creation, ACLs, anything an admin added that we
do not manage) is left alone, so adopting a group Entra Connect wrote keeps its
identity and its SID.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

from writeback.domain.model import (
    CloudGroup,
    CloudMember,
    MemberKind,
    Skip,
    SkipReason,
    anchor_for,
)
from writeback.domain.naming import DnFormat, cn_for, sam_account_name_for


class GroupType(StrEnum):
    DISTRIBUTION = "distribution"
    SECURITY = "security"


#: groupType flags: universal scope (0x8), plus the security bit (0x80000000).
GROUP_TYPE_VALUES = {
    GroupType.DISTRIBUTION: "8",
    GroupType.SECURITY: str(0x8 - 0x80000000),
}

#: What Exchange shows a written-back Microsoft 365 group as on-premises.
REMOTE_GROUP_MAILBOX = str(2**43)  # msExchRecipientTypeDetails: RemoteGroupMailbox
DISPLAY_TYPE_DISTRIBUTION_GROUP = "1"  # msExchRecipientDisplayType

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
EXCHANGE_ATTRIBUTES = ("mailNickname", "msExchRecipientTypeDetails", "msExchRecipientDisplayType")
MANAGED_ATTRIBUTES = BASE_ATTRIBUTES + EXCHANGE_ATTRIBUTES
#: Set when the object is created, never overwritten (admins and Exchange may rely on it).
CREATE_ONLY_ATTRIBUTES = ("objectClass", "sAMAccountName")

# rangeUpper values of the AD schema: longer values are refused by the DC.
_LIMITS = {"displayName": 256, "description": 1024, "info": 1024, "mail": 256, "mailNickname": 64}
_INFO = (
    "Microsoft 365 group {id}, written back from Microsoft Entra ID. Edits here are overwritten."
)

DEFAULT_MEMBER_LIMIT = 50_000
MAX_MEMBER_LIMIT = 250_000


@dataclass(frozen=True)
class MappingOptions:
    target_ou: str
    dn_format: DnFormat = DnFormat.OBJECT_ID
    group_type: GroupType = GroupType.DISTRIBUTION
    #: Lower-case names of the optional (Exchange) attributes this forest has.
    schema_attributes: frozenset[str] = frozenset()
    member_limit: int = DEFAULT_MEMBER_LIMIT


@dataclass(frozen=True)
class DesiredGroup:
    """The AD entry a cloud group should be, before comparing with AD."""

    group_id: str
    cn: str
    attributes: dict[str, tuple[str, ...]]
    create_only: dict[str, tuple[str, ...]]
    member_sids: frozenset[str]
    skips: tuple[Skip, ...] = ()


def desired_group(group: CloudGroup, options: MappingOptions) -> DesiredGroup:
    sids, skips = writable_members(group)
    return DesiredGroup(
        group_id=group.id,
        cn=cn_for(group.id, group.display_name, options.dn_format),
        attributes=managed_attributes(group, options),
        create_only={
            "objectClass": ("top", "group"),
            "sAMAccountName": (sam_account_name_for(group.id),),
        },
        member_sids=sids,
        skips=skips,
    )


def managed_attributes(group: CloudGroup, options: MappingOptions) -> dict[str, tuple[str, ...]]:
    """Every managed attribute with its desired values; () means "must be absent"."""
    values: dict[str, tuple[str, ...]] = {
        "adminDescription": (anchor_for(group.id),),
        "groupType": (GROUP_TYPE_VALUES[options.group_type],),
        "displayName": _text("displayName", group.display_name),
        "description": _text("description", group.description),
        "info": (_INFO.format(id=group.id),),
        "mail": _text("mail", group.mail),
        "proxyAddresses": smtp_proxy_addresses(group),
    }
    exchange: dict[str, tuple[str, ...]] = {
        "mailNickname": _text("mailNickname", group.mail_nickname),
        "msExchRecipientTypeDetails": (REMOTE_GROUP_MAILBOX,),
        "msExchRecipientDisplayType": (DISPLAY_TYPE_DISTRIBUTION_GROUP,),
    }
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


def writable_members(group: CloudGroup) -> tuple[frozenset[str], tuple[Skip, ...]]:
    """SIDs of the members that exist on-premises, and a count of the rest.

    Only users synced from AD have an object there; cloud-only users, guests,
    nested groups and devices are skipped and reported per group.
    """
    sids: set[str] = set()
    skipped: Counter[SkipReason] = Counter()
    for member in group.members:
        reason = _skip_reason(member)
        if reason is None and member.sid:
            sids.add(member.sid)
        elif reason is not None:
            skipped[reason] += 1
    skips = tuple(
        Skip(group.id, reason, _SKIP_DETAIL[reason], count)
        for reason, count in sorted(skipped.items(), key=lambda item: item[0].value)
    )
    return frozenset(sids), skips


_SKIP_DETAIL = {
    SkipReason.MEMBER_NOT_ON_PREM: "members without an on-premises account (cloud-only or guest)",
    SkipReason.MEMBER_NOT_A_USER: "members that are not users (nested groups, devices, contacts)",
}


def _skip_reason(member: CloudMember) -> SkipReason | None:
    if member.kind is not MemberKind.USER:
        return SkipReason.MEMBER_NOT_A_USER
    if not (member.synced and member.sid):
        return SkipReason.MEMBER_NOT_ON_PREM
    return None


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
