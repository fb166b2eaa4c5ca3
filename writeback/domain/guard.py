"""The guards between cloud membership and on-premises privilege (issue 12, finding 2).

Whoever controls a group's membership in the cloud (its owner; an Entra admin;
whatever writes ``onPremisesSecurityIdentifier``) decides who becomes a member
on-premises. Two guards keep that from becoming privilege:

**The member guard** decides, SID by SID, what may be written as a member:

1. never a SID on the admin's deny list (``WRITEBACK_MEMBER_DENY``);
2. never a well-known principal: anything that is not a domain account SID
   ``S-1-5-21-<domain>-<RID>`` (built-in groups ``S-1-5-32-*``, Everyone,
   Authenticated Users, SYSTEM...), and no domain RID below 1000, which AD keeps
   for its well-known accounts and groups (500 Administrator, 502 krbtgt,
   512 Domain Admins, 513 Domain Users, 516 Domain Controllers, 518-520,
   521, 522, 525-527, 553, 571...; new accounts start at 1000);
3. never a SID that resolves to no object in the directory (nothing to check it
   against), nor to anything but a user: a computer, a foreign principal, a
   contact, a group;
4. never a user with ``adminCount=1`` (protected by AdminSDHolder: an admin now or
   once);
5. the one exception to 3: a SID that resolves to one of *our own* groups (a
   group object carrying our canonical anchor below the target OU), so a cloud
   group nested in another is written as a member by its SID (nested groups).

**The nesting guard** freezes a group of ours that is a member, directly or
through other groups, of a protected group: ``adminCount=1`` groups, every
built-in group, the domain's privileged groups by RID, the groups known to hold
domain-wide rights without a fixed RID (DnsAdmins, Exchange's), any group the
admin lists (``WRITEBACK_PROTECTED_GROUPS``), and any group on the way up that
cannot be read (closed, not open, when in doubt). A frozen group gets no member
added: every addition would hand out what the protected group grants. Removals
and attribute changes are still written, since they take nothing from AD's
security and a frozen group must still lose members the cloud removed.

Pure: the directory reads (:class:`Principal`, :class:`Ancestry`) come in, the
decisions go out as :class:`~writeback.domain.model.Skip` records, one per
refused member and one per frozen group, so ``plan`` and the event log show
each with its reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import lru_cache

from writeback.domain.mapping import DesiredGroup
from writeback.domain.model import DirectoryGroup, Skip, SkipReason
from writeback.domain.naming import DnKey, dn_key

#: A SID in its string form (S-1-<authority>-<sub-authorities>).
SID = re.compile(r"S-1-\d{1,15}(?:-\d{1,10}){1,15}")
BUILTIN_PREFIX = "S-1-5-32-"
DOMAIN_PREFIX = "S-1-5-21-"
#: Domain RIDs below this are AD's well-known accounts and groups (MS-SAMR).
FIRST_ACCOUNT_RID = 1000

#: Names of well-known RIDs, for the reasons people read.
WELL_KNOWN_RIDS = {
    498: "Enterprise Read-only Domain Controllers",
    500: "Administrator",
    501: "Guest",
    502: "krbtgt",
    503: "DefaultAccount",
    504: "WDAGUtilityAccount",
    512: "Domain Admins",
    513: "Domain Users",
    514: "Domain Guests",
    515: "Domain Computers",
    516: "Domain Controllers",
    517: "Cert Publishers",
    518: "Schema Admins",
    519: "Enterprise Admins",
    520: "Group Policy Creator Owners",
    521: "Read-only Domain Controllers",
    522: "Cloneable Domain Controllers",
    525: "Protected Users",
    526: "Key Admins",
    527: "Enterprise Key Admins",
    553: "RAS and IAS Servers",
    571: "Allowed RODC Password Replication Group",
    572: "Denied RODC Password Replication Group",
}
#: Built-in groups (S-1-5-32-RID) by RID, for the reasons.
BUILTIN_RIDS = {
    544: "Administrators",
    545: "Users",
    546: "Guests",
    547: "Power Users",
    548: "Account Operators",
    549: "Server Operators",
    550: "Print Operators",
    551: "Backup Operators",
    552: "Replicator",
    554: "Pre-Windows 2000 Compatible Access",
    555: "Remote Desktop Users",
    556: "Network Configuration Operators",
    557: "Incoming Forest Trust Builders",
    558: "Performance Monitor Users",
    559: "Performance Log Users",
    560: "Windows Authorization Access Group",
    561: "Terminal Server License Servers",
    562: "Distributed COM Users",
    568: "IIS_IUSRS",
    569: "Cryptographic Operators",
    573: "Event Log Readers",
    574: "Certificate Service DCOM Access",
    575: "RDS Remote Access Servers",
    576: "RDS Endpoint Servers",
    577: "RDS Management Servers",
    578: "Hyper-V Administrators",
    579: "Access Control Assistance Operators",
    580: "Remote Management Users",
    582: "Storage Replica Administrators",
}
#: Other well-known principals a member SID might name.
WELL_KNOWN_SIDS = {
    "S-1-1-0": "Everyone",
    "S-1-5-7": "Anonymous Logon",
    "S-1-5-9": "Enterprise Domain Controllers",
    "S-1-5-11": "Authenticated Users",
    "S-1-5-18": "Local System",
}
#: Domain groups whose members hold privilege (nesting one of ours into one freezes
#: it). Domain Users, Guests, Computers, Protected Users and the Denied RODC group
#: grant nothing a member did not have, so nesting into them freezes nothing.
PROTECTED_GROUP_RIDS = frozenset({498, 512, 516, 517, 518, 519, 520, 521, 522, 526, 527, 553, 571})
#: Privileged groups without a fixed RID, by sAMAccountName (case-blind): DnsAdmins
#: (a known path to SYSTEM on DCs) and the Exchange groups that hold rights on the
#: domain object itself.
PROTECTED_GROUP_NAMES = frozenset(
    {
        "dnsadmins",
        "exchange windows permissions",
        "exchange trusted subsystem",
        "organization management",
    }
)
#: groupType flag of AD's built-in (domain local, system-created) groups.
BUILTIN_GROUP_FLAG = 0x1
MEMBER_DENY_SETTING = "WRITEBACK_MEMBER_DENY"
PROTECTED_GROUPS_SETTING = "WRITEBACK_PROTECTED_GROUPS"


def is_sid(text: str) -> bool:
    return SID.fullmatch(text) is not None


def canonical_sid(text: str) -> str:
    """SIDs are compared in one spelling: upper-case ``S``, no surrounding space."""
    return text.strip().upper()


def rid_of(sid: str) -> int | None:
    """The last sub-authority of a SID (its RID), or None for a malformed one."""
    tail = sid.rpartition("-")[2]
    return int(tail) if tail.isdigit() else None


class PrincipalKind(StrEnum):
    USER = "user"
    COMPUTER = "computer"
    GROUP = "group"
    FOREIGN = "foreign-security-principal"
    OTHER = "other"

    @classmethod
    def of(cls, object_classes: Iterable[str]) -> PrincipalKind:
        """The kind of an object of these classes (the most specific first: a
        computer is a user too)."""
        classes = {c.lower() for c in object_classes}
        for name, kind in (
            ("computer", cls.COMPUTER),
            ("user", cls.USER),
            ("group", cls.GROUP),
            ("foreignsecurityprincipal", cls.FOREIGN),
        ):
            if name in classes:
                return kind
        return cls.OTHER


@dataclass(frozen=True)
class Principal:
    """What the directory holds for one SID (the member guard's lookup)."""

    sid: str
    dn: str
    kind: PrincipalKind
    admin_count: bool = False
    #: Set when the object is one of our own groups: a group carrying our canonical
    #: anchor strictly below the target OU (the id its anchor names).
    group_id: str | None = None


@dataclass(frozen=True)
class ParentGroup:
    """A group one of ours is in, directly or through nesting, as the directory read it."""

    dn: str
    sid: str | None = None
    admin_count: bool = False
    #: groupType carries the built-in flag (a system-created domain local group).
    builtin: bool = False
    #: sAMAccountName.
    name: str = ""
    #: DNs of the groups this one is a member of.
    parents: tuple[str, ...] = ()
    #: False when the group could not be read (gone, or no right to read it).
    readable: bool = True


@dataclass(frozen=True)
class Ancestry:
    """Which groups our groups are in, read upward from the target OU.

    ``parents``: for each group of ours that is a member of any group, the DNs of
    the groups it is directly in. ``groups``: every group reached on the way up
    (ours included, when one of ours is nested in another), by DN.
    """

    parents: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    groups: Mapping[str, ParentGroup] = field(default_factory=dict)


@dataclass(frozen=True)
class GuardRules:
    """The admin's settings for the guards (SIDs in canonical spelling)."""

    #: Member SIDs never written (WRITEBACK_MEMBER_DENY).
    deny: frozenset[str] = frozenset()
    #: Group SIDs treated as protected by the nesting guard (WRITEBACK_PROTECTED_GROUPS).
    protected: frozenset[str] = frozenset()


# --------------------------------------------------------------------------- members


def static_refusal(sid: str, rules: GuardRules) -> tuple[SkipReason, str] | None:
    """What the SID alone says, with no directory read: the deny list and the
    well-known principals. None: the directory decides."""
    return _static_refusal(sid, rules.deny)


@lru_cache(maxsize=1 << 16)
def _static_refusal(sid: str, deny: frozenset[str]) -> tuple[SkipReason, str] | None:
    """:func:`static_refusal`, memoised on the deny list alone (a frozenset keeps its
    hash; the rules' dataclass would compute one per call): a full sync asks this of
    every membership (400,000 at 20,000 groups), of the same few thousand users."""
    key = canonical_sid(sid)
    if not is_sid(key):
        return SkipReason.MEMBER_PRIVILEGED, f"{sid!r} is not a SID"
    if key in deny:
        return SkipReason.MEMBER_DENIED, f"{key} is on the deny list ({MEMBER_DENY_SETTING})"
    if key.startswith(BUILTIN_PREFIX):
        name = BUILTIN_RIDS.get(rid_of(key) or 0, "a built-in group")
        return SkipReason.MEMBER_PRIVILEGED, f"{key} is a built-in principal ({name})"
    parts = key.split("-")
    if not key.startswith(DOMAIN_PREFIX) or len(parts) != 8:
        name = WELL_KNOWN_SIDS.get(key, "not a domain account")
        return SkipReason.MEMBER_PRIVILEGED, f"{key} is a well-known principal ({name})"
    rid = rid_of(key)
    if rid is None or rid < FIRST_ACCOUNT_RID:
        name = WELL_KNOWN_RIDS.get(rid or 0, "a reserved RID")
        return SkipReason.MEMBER_PRIVILEGED, f"{key} has the well-known RID {rid} ({name})"
    return None


#: deny list -> SIDs the static rules let through; set algebra in C instead of a
#: Python call per membership, on the hot path of a full sync (100,000 memberships
#: held at 5,000 groups, nearly all allowed). Cleared when it grows past the cap.
_PASSED: dict[frozenset[str], set[str]] = {}
_PASSED_CAP = 1 << 17


def _static_refusals(
    sids: frozenset[str], deny: frozenset[str]
) -> dict[str, tuple[SkipReason, str]]:
    """:func:`_static_refusal` of many SIDs at once: only those the static rules have
    not let through before are asked; the ones let through now are remembered."""
    passed = _PASSED.get(deny)
    if passed is None or len(passed) > _PASSED_CAP:
        _PASSED.clear()  # one deny list in use at a time, in practice
        passed = _PASSED[deny] = set()
    refused: dict[str, tuple[SkipReason, str]] = {}
    for sid in sids - passed:
        why = _static_refusal(sid, deny)
        if why is None:
            passed.add(sid)
        else:
            refused[sid] = why
    return refused


def sids_to_resolve(desired: Iterable[str], held: Iterable[str], rules: GuardRules) -> list[str]:
    """Of one group's desired member SIDs, those the directory must be asked about:
    the ones AD does not hold yet (``held``) and the static rules leave open."""
    already = set(held)
    return needs_lookup((sid for sid in desired if sid not in already), rules)


def needs_lookup(sids: Iterable[str], rules: GuardRules) -> list[str]:
    """The SIDs (canonical, each once) that only the directory can decide."""
    wanted = dict.fromkeys(canonical_sid(s) for s in sids)
    return [sid for sid in wanted if static_refusal(sid, rules) is None]


def member_refusal(
    sid: str, principal: Principal | None, rules: GuardRules
) -> tuple[SkipReason, str] | None:
    """Why ``sid`` may not be written as a member, or None when it may (rules 1-5
    of the module docstring). ``principal``: what the directory holds for it."""
    static = static_refusal(sid, rules)
    if static is not None:
        return static
    key = canonical_sid(sid)
    if principal is None:
        return SkipReason.MEMBER_UNRESOLVED, f"{key} resolves to no object in the directory"
    if principal.kind is PrincipalKind.GROUP and principal.group_id is not None:
        return None  # one of our own groups: a nested cloud group
    if principal.kind is not PrincipalKind.USER:
        return (
            SkipReason.MEMBER_NOT_A_USER_OBJECT,
            f"{key} is a {principal.kind.value}, not a user: {principal.dn}",
        )
    if principal.admin_count:
        return (
            SkipReason.MEMBER_PROTECTED,
            f"{key} is a protected account (adminCount=1): {principal.dn}",
        )
    return None


def member_refusals(
    sids: Iterable[str], principals: Mapping[str, Principal], rules: GuardRules
) -> dict[str, tuple[SkipReason, str]]:
    """Every refused SID of ``sids`` with its reason (``principals`` by canonical SID)."""
    refused: dict[str, tuple[SkipReason, str]] = {}
    for sid in sids:
        why = member_refusal(sid, principals.get(canonical_sid(sid)), rules)
        if why is not None:
            refused[sid] = why
    return refused


# --------------------------------------------------------------------------- nesting


def protected_reason(group: ParentGroup, rules: GuardRules) -> str | None:
    """Why a group one of ours is in is protected, or None when it is not."""
    sid = canonical_sid(group.sid or "")
    rid = rid_of(sid) if sid else None
    reasons = (
        (not group.readable, "could not be read, so it is taken as protected"),
        (bool(sid) and sid in rules.protected, f"listed in {PROTECTED_GROUPS_SETTING}"),
        (group.admin_count, "adminCount=1 (protected by AdminSDHolder)"),
        (
            group.builtin or sid.startswith(BUILTIN_PREFIX),
            f"a built-in group ({BUILTIN_RIDS.get(rid or 0, 'S-1-5-32')})",
        ),
        (
            sid.startswith(DOMAIN_PREFIX) and rid in PROTECTED_GROUP_RIDS,
            f"a privileged domain group (RID {rid}, {WELL_KNOWN_RIDS.get(rid or 0, '')})",
        ),
        (group.name.casefold() in PROTECTED_GROUP_NAMES, f"a privileged group ({group.name})"),
    )
    return next((why for applies, why in reasons if applies), None)


def frozen_groups(ancestry: Ancestry, rules: GuardRules) -> dict[str, tuple[str, ...]]:
    """Our groups nested, directly or through other groups, in a protected group:
    group id -> one line per protected group reached (its DN and why), in the
    order they were reached. Cycles in the nesting are walked once."""
    by_key: dict[DnKey, ParentGroup] = {dn_key(dn): g for dn, g in ancestry.groups.items()}
    frozen: dict[str, tuple[str, ...]] = {}
    for group_id, parents in sorted(ancestry.parents.items()):
        reached: list[str] = []
        seen: set[DnKey] = set()
        frontier = list(parents)
        while frontier:
            dn = frontier.pop(0)
            key = dn_key(dn)
            if key in seen:
                continue
            seen.add(key)
            group = by_key.get(key, ParentGroup(dn, readable=False))
            why = protected_reason(group, rules)
            if why is not None:
                reached.append(f"{group.dn} ({why})")
            frontier.extend(group.parents)
        if reached:
            frozen[group_id] = tuple(reached)
    return frozen


# --------------------------------------------------------------------------- both


@dataclass(frozen=True)
class GuardView:
    """What the guards know for one planning pass: the rules, the principals of the
    SIDs looked up (by canonical SID; a SID absent resolved to nothing), and the
    frozen groups (:func:`frozen_groups`)."""

    rules: GuardRules = field(default_factory=GuardRules)
    principals: Mapping[str, Principal] = field(default_factory=dict)
    frozen: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def guard_desired(
    desired: DesiredGroup, current: DirectoryGroup | None, view: GuardView
) -> DesiredGroup:
    """``desired`` with the guards applied: refused members left out (so any already
    in AD are removed), and for a frozen group no member AD does not hold already.
    Each refused member, and a frozen group, adds a skip with the reason.

    A member AD already holds is checked against the rules that need no directory
    (the deny list, the well-known principals), so one of those already there is
    removed; so is a member group of ours (``desired.nested_sids``, read from its
    anchored object below the target OU: rule 5 without a lookup); the directory's
    answers (``view.principals``) are needed only for the other members a write
    would add (:func:`sids_to_resolve`). A frozen group gets no member group added
    by DN either (one created in the same run). Members of a group whose list Graph
    may have cut short (``keep_members``) are kept, except those the rules that
    need no directory refuse (``refused_sids``: removed all the same)."""
    held = current.member_sids if current is not None else frozenset()
    deny, members = view.rules.deny, desired.member_sids
    known = (members & held) | (members & desired.nested_sids)  # the static rules decide
    refused = _static_refusals(known, deny)
    for sid in members - known:
        why = member_refusal(sid, view.principals.get(canonical_sid(sid)), view.rules)
        if why is not None:
            refused[sid] = why
    if len(refused) > 1:
        refused = dict(sorted(refused.items()))  # skips in SID order, whatever the set's
    if desired.keep_members:  # held members the list may hide stay, unless never allowed
        refused.update(sorted(_static_refusals(held - members, deny).items()))
    kept = desired.member_sids - refused.keys()
    skips = [
        Skip(desired.group_id, reason, detail, member=sid)
        for sid, (reason, detail) in refused.items()
    ]
    nested_in = view.frozen.get(desired.group_id)
    member_dns = desired.member_dns
    if nested_in is not None and current is not None:
        withheld = len(kept - current.member_sids) + len(member_dns)
        kept -= kept - current.member_sids
        member_dns = frozenset()
        skips.append(
            Skip(
                desired.group_id,
                SkipReason.GROUP_FROZEN,
                f"nested in a protected group, so no member is added "
                f"({withheld} withheld): {'; '.join(nested_in)}",
                count=withheld,
            )
        )
    if not skips:
        return desired
    return replace(
        desired,
        member_sids=frozenset(kept),
        member_dns=member_dns,
        refused_sids=frozenset(refused) & held,
        skips=(*desired.skips, *skips),
    )
