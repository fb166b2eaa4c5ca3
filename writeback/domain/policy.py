"""What the on-premises agent lets through, decided before any LDAP call.

The agent holds the AD credential, so it cannot trust the cloud side to have
planned well: a compromised or buggy sender could ask for anything. These
rules are the agent's own, from its local settings; a request that breaks one
is refused with the reason (PolicyRefused), and nothing is sent to AD.

Inside the OU they pin what a group may become, not only where it may be: the
agent's own group types (a distribution-only deployment never gets a security
group), the OUs its own copy of the rules file places groups in (new groups are
created and moved only there), the sAMAccountName and CN that writeback derives
from the object id (no ``linux-admins`` next to ours), mail addresses only in the
agent's accepted domains (no group claiming another recipient's address),
members added only by SID and through the member guard, or by the DN of one of
our own groups below the target OU (a nested group created in the same run; the
agent's LDAP adapter checks it carries our anchor).

Pure: the agent adds the checks that need AD (that the DN really carries the
group's anchor now, that a member removed by DN is one the group holds) around
these.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from writeback.domain.mapping import (
    CREATE_ONLY_ATTRIBUTES,
    GROUP_TYPE_VALUES,
    MANAGED_ATTRIBUTES,
    GroupType,
)
from writeback.domain.model import (
    Add,
    Changes,
    Delete,
    Modify,
    Operation,
    Rename,
    anchor_for,
    is_object_id,
)
from writeback.domain.naming import (
    MAX_CN,
    DnFormat,
    cn_for,
    dn_key,
    first_rdn,
    parent_of,
    sam_account_name_for,
    single_cn_rdn,
    strictly_within,
    unescape_dn_value,
)
from writeback.errors import PolicyRefused

#: A member we add is always a principal by SID, never a DN the sender chose.
_SID_REFERENCE = re.compile(r"^<SID=(S-1-\d+(?:-\d+){1,15})>$")
#: The part of a display-name CN after the name: ``_`` and the last 12 of the id.
_SUFFIX_LEN = 12

_ADD_ATTRIBUTES = frozenset(n.lower() for n in (*MANAGED_ATTRIBUTES, *CREATE_ONLY_ATTRIBUTES))
_REPLACE_ATTRIBUTES = frozenset(n.lower() for n in MANAGED_ATTRIBUTES) - {"admindescription"}
_MAIL_DOMAINS_SETTING = "WRITEBACK_AGENT_MAIL_DOMAINS"

#: Checks the SIDs a write would add as members; raises PolicyRefused for any it
#: refuses (privileged principals, an admin's deny list...). The agent calls it
#: with every SID of an add or modify, after the shape checks here.
MemberGuard = Callable[[Sequence[str]], None]


@dataclass(frozen=True)
class AgentPolicy:
    """The agent's local rules, from its own settings (never from a request).

    ``mail_domains``: the domains (lower case) ``mail`` and ``proxyAddresses`` may
    use; empty refuses every address. ``member_guard``: the hook for the member
    guard against privileged principals; None until one is configured.
    """

    target_ou: str
    delete_limit: int = 500
    delete_window: float = 24 * 3600.0
    group_type: GroupType = GroupType.DISTRIBUTION
    dn_format: DnFormat = DnFormat.OBJECT_ID
    mail_domains: frozenset[str] = frozenset()
    member_guard: MemberGuard | None = field(default=None, compare=False)
    #: From the agent's own rules file and settings: the OUs below the target OU
    #: groups may be created in or moved to, and the further group types and DN
    #: formats they may have.
    ous: frozenset[str] = frozenset()
    group_types: frozenset[GroupType] = frozenset()
    dn_formats: frozenset[DnFormat] = frozenset()

    @property
    def group_type_value(self) -> str:
        return GROUP_TYPE_VALUES[self.group_type]

    @property
    def group_type_values(self) -> frozenset[str]:
        return frozenset(GROUP_TYPE_VALUES[t] for t in {self.group_type, *self.group_types})

    @property
    def formats(self) -> frozenset[DnFormat]:
        return frozenset({self.dn_format, *self.dn_formats})

    def allows_parent(self, dn: str) -> bool:
        """Whether groups may be created in, or moved to, the OU ``dn``."""
        key = dn_key(dn)
        return key == dn_key(self.target_ou) or any(key == dn_key(ou) for ou in self.ous)


def check_group_id(group_id: str) -> None:
    """Object ids come in one form: an Entra GUID, lower case, nothing around it."""
    if not is_object_id(group_id) or group_id != group_id.lower():
        raise PolicyRefused(f"{group_id!r} is not an Entra object id (lower-case GUID)")


def check_operation(operation: Operation, policy: AgentPolicy) -> None:
    """Refuse an operation that could touch anything but one of our groups in the OU,
    or make one of ours into something writeback never writes."""
    check_group_id(operation.group_id)
    if not strictly_within(operation.dn, policy.target_ou):
        raise PolicyRefused(f"{operation.dn} is not below the target OU {policy.target_ou}")
    if isinstance(operation, Add):
        _check_add(operation, policy)
    elif isinstance(operation, Modify):
        _check_changes(operation.changes, policy)
    elif isinstance(operation, Rename):
        if not single_cn_rdn(operation.new_rdn):
            raise PolicyRefused(f"{operation.new_rdn!r} is not a single CN= RDN")
        if operation.new_parent is not None and not policy.allows_parent(operation.new_parent):
            raise PolicyRefused(
                f"a group moves only to the target OU or an OU of this agent's rules, "
                f"not to {operation.new_parent}"
            )
        _check_cn(operation.new_rdn, operation.group_id, policy)
        _check_changes(operation.changes, policy)
    elif not isinstance(operation, Delete):  # pragma: no cover - closed union
        raise PolicyRefused(f"unknown operation {operation!r}")


def removals_by_dn(operation: Operation) -> tuple[str, ...]:
    """Member values the operation removes by DN rather than by SID.

    The planner removes members that have no SID (contacts an admin added) by the
    DN it read; the agent lets such a value through only when its own reading of
    the group holds that DN as a member.
    """
    if isinstance(operation, Modify | Rename):
        return tuple(v for v in operation.changes.remove_members if not _SID_REFERENCE.match(v))
    return ()


def _check_add(op: Add, policy: AgentPolicy) -> None:
    names = {name.lower(): values for name, values in op.attributes.items()}
    if names.get("admindescription") != (anchor_for(op.group_id),):
        raise PolicyRefused(f"an add must carry adminDescription={anchor_for(op.group_id)}")
    if {v.lower() for v in names.get("objectclass", ())} - {"top"} != {"group"}:
        raise PolicyRefused("an add must create objectClass=group and nothing else")
    _check_names(names, _ADD_ATTRIBUTES)
    if not policy.allows_parent(parent_of(op.dn)):
        raise PolicyRefused(
            "a group is created directly in the target OU or in an OU of this agent's "
            f"rules, not at {op.dn}"
        )
    _check_cn(first_rdn(op.dn), op.group_id, policy)
    sam = sam_account_name_for(op.group_id)
    if names.get("samaccountname") != (sam,):
        raise PolicyRefused(f"an add must carry sAMAccountName={sam}")
    if "grouptype" not in names:
        raise PolicyRefused(f"an add must carry groupType={policy.group_type_value}")
    _check_values(names, policy)
    _check_member_adds(op.members, policy)


def _check_changes(changes: Changes, policy: AgentPolicy) -> None:
    names = {name.lower(): values for name, values in changes.replace.items()}
    _check_names(names, _REPLACE_ATTRIBUTES)
    _check_values(names, policy)
    _check_member_adds(changes.add_members, policy)


def _check_names(names: Iterable[str], allowed: frozenset[str]) -> None:
    extra = sorted(set(names) - allowed)
    if extra:
        raise PolicyRefused(f"attributes not managed by writeback: {', '.join(extra)}")


def _check_values(names: Mapping[str, tuple[str, ...]], policy: AgentPolicy) -> None:
    allowed = policy.group_type_values
    if "grouptype" in names and (
        len(names["grouptype"]) != 1 or names["grouptype"][0] not in allowed
    ):
        kinds = ", ".join(sorted(t.value for t in {policy.group_type, *policy.group_types}))
        raise PolicyRefused(
            f"groupType {names['grouptype']!r} is not this agent's group type "
            f"({kinds}: WRITEBACK_GROUP_TYPE and its rules file)"
        )
    for address in names.get("mail", ()):
        _check_address(address, policy)
    for proxy in names.get("proxyaddresses", ()):
        prefix, sep, address = proxy.partition(":")
        if not sep or prefix.lower() != "smtp":
            raise PolicyRefused(f"proxyAddresses value {proxy!r} is not an SMTP address")
        _check_address(address, policy)


def _check_address(address: str, policy: AgentPolicy) -> None:
    local, at, domain = address.rpartition("@")
    if not at or not local or domain.lower() not in policy.mail_domains:
        raise PolicyRefused(
            f"address {address!r} is not in an accepted mail domain ({_MAIL_DOMAINS_SETTING}: "
            f"{', '.join(sorted(policy.mail_domains)) or 'none set'})"
        )


def _check_cn(rdn: str, group_id: str, policy: AgentPolicy) -> None:
    """The RDN is ``CN=`` of the form writeback derives for this group."""
    attr, _, value = rdn.partition("=")
    cn = unescape_dn_value(value.strip())
    suffix = "_" + group_id[-_SUFFIX_LEN:]
    ok = any(
        cn == cn_for(group_id, "", DnFormat.OBJECT_ID)
        if dn_format is DnFormat.OBJECT_ID
        else cn.endswith(suffix) and len(cn) > len(suffix) and len(cn) <= MAX_CN
        for dn_format in policy.formats
    )
    if attr.strip().casefold() != "cn" or not ok:
        formats = ", ".join(sorted(f.value for f in policy.formats))
        raise PolicyRefused(
            f"{rdn!r} is not the CN writeback derives for group {group_id} "
            f"(WRITEBACK_DN_FORMAT and the rules file: {formats})"
        )


def _check_member_adds(values: Iterable[str], policy: AgentPolicy) -> None:
    sids: list[str] = []
    for value in values:
        match = _SID_REFERENCE.match(value)
        if match is None:
            if not value.startswith("<") and strictly_within(value, policy.target_ou):
                continue  # one of our groups by DN: the LDAP adapter checks its anchor
            raise PolicyRefused(
                f"a member to add must be a <SID=...> reference or the DN of a group below "
                f"the target OU, not {value!r}"
            )
        sids.append(match.group(1))
    if sids and policy.member_guard is not None:
        policy.member_guard(sids)


class DeleteLedger(Protocol):
    """Where a delete budget keeps its deletes, so they outlive the process."""

    def record_delete(self, now: float, window: float, limit: int) -> bool:
        """Atomically: forget deletes older than ``window``; if fewer than ``limit``
        remain, record one at ``now`` and return True, else False."""
        ...


class DeleteBudget:
    """At most ``limit`` deletes in any ``window`` seconds, across every caller.

    A reconcile counts its deletes against the threshold as a whole; events arrive
    one group at a time, so the worker (and the agent, for any sender) count them
    over a sliding window instead: a Graph fault answering "not found" for live
    groups deletes at most ``limit`` of them. Thread-safe. With a ``ledger`` (the
    agent's state file) the count survives restarts and is shared by every
    process using that ledger; its clock is then the wall clock.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        setting: str = "WRITEBACK_AGENT_DELETE_LIMIT",
        clock: Callable[[], float] | None = None,
        ledger: DeleteLedger | None = None,
    ) -> None:
        """``setting`` names the knob in the refusal, so an admin knows what to raise."""
        self._limit = limit
        self._window = window
        self._setting = setting
        self._clock = clock or (time.time if ledger is not None else time.monotonic)
        self._ledger = ledger
        self._taken: deque[float] = deque()
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            now = self._clock()
            if self._ledger is not None:
                allowed = self._ledger.record_delete(now, self._window, self._limit)
            else:
                while self._taken and self._taken[0] <= now - self._window:
                    self._taken.popleft()
                allowed = len(self._taken) < self._limit
                if allowed:
                    self._taken.append(now)
            if not allowed:
                raise PolicyRefused(
                    f"delete limit reached: {self._limit} deletes in {self._window:.0f} s "
                    f"({self._setting}); replay the event once this is intended"
                )

    def give_back(self) -> None:
        """Return the delete taken last: the write failed, so it was not made (a retry
        takes it again). A delete whose answer was lost after the DC made it is given
        back too; its retry finds the object gone and takes none. Only the in-process
        count gives back: a ledger's record stays (the agent's budget errs on caution)."""
        with self._lock:
            if self._ledger is None and self._taken:
                self._taken.pop()
