"""What the on-premises agent lets through, decided before any LDAP call.

The agent holds the AD credential, so it cannot trust the cloud side to have
planned well: a compromised or buggy sender could ask for anything. These
rules are the agent's own, from its local settings; a request that breaks one
is refused with the reason (PolicyRefused), and nothing is sent to AD.

Pure: the agent adds the one check that needs AD (that the DN really carries
the group's anchor now) around these.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from writeback.domain.mapping import CREATE_ONLY_ATTRIBUTES, MANAGED_ATTRIBUTES
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
from writeback.domain.naming import single_cn_rdn, strictly_within
from writeback.errors import PolicyRefused

#: A member we add is always a principal by SID, never a DN the sender chose.
_SID_REFERENCE = re.compile(r"^<SID=S-1-\d+(?:-\d+){1,15}>$")

_ADD_ATTRIBUTES = frozenset(n.lower() for n in (*MANAGED_ATTRIBUTES, *CREATE_ONLY_ATTRIBUTES))
_REPLACE_ATTRIBUTES = frozenset(n.lower() for n in MANAGED_ATTRIBUTES) - {"admindescription"}


@dataclass(frozen=True)
class AgentPolicy:
    """The agent's local rules: its target OU, and how many deletes per window."""

    target_ou: str
    delete_limit: int = 500
    delete_window: float = 24 * 3600.0


def check_group_id(group_id: str) -> None:
    if not is_object_id(group_id):
        raise PolicyRefused(f"{group_id!r} is not an Entra object id")


def check_operation(operation: Operation, policy: AgentPolicy) -> None:
    """Refuse an operation that could touch anything but one of our groups in the OU."""
    check_group_id(operation.group_id)
    if not strictly_within(operation.dn, policy.target_ou):
        raise PolicyRefused(f"{operation.dn} is not below the target OU {policy.target_ou}")
    if isinstance(operation, Add):
        _check_add(operation)
    elif isinstance(operation, Modify):
        _check_changes(operation.changes)
    elif isinstance(operation, Rename):
        if not single_cn_rdn(operation.new_rdn):
            raise PolicyRefused(f"{operation.new_rdn!r} is not a single CN= RDN")
        _check_changes(operation.changes)
    elif not isinstance(operation, Delete):  # pragma: no cover - closed union
        raise PolicyRefused(f"unknown operation {operation!r}")


def _check_add(op: Add) -> None:
    names = {name.lower(): values for name, values in op.attributes.items()}
    if names.get("admindescription") != (anchor_for(op.group_id),):
        raise PolicyRefused(f"an add must carry adminDescription={anchor_for(op.group_id)}")
    if {v.lower() for v in names.get("objectclass", ())} - {"top"} != {"group"}:
        raise PolicyRefused("an add must create objectClass=group and nothing else")
    _check_names(names, _ADD_ATTRIBUTES)
    _check_member_adds(op.members)


def _check_changes(changes: Changes) -> None:
    _check_names({name.lower() for name in changes.replace}, _REPLACE_ATTRIBUTES)
    _check_member_adds(changes.add_members)


def _check_names(names: Iterable[str], allowed: frozenset[str]) -> None:
    extra = sorted(set(names) - allowed)
    if extra:
        raise PolicyRefused(f"attributes not managed by writeback: {', '.join(extra)}")


def _check_member_adds(values: Iterable[str]) -> None:
    for value in values:
        if not _SID_REFERENCE.match(value):
            raise PolicyRefused(f"a member to add must be a <SID=...> reference, not {value!r}")


class DeleteBudget:
    """At most ``limit`` deletes in any ``window`` seconds, across every caller.

    A reconcile counts its deletes against the threshold as a whole; events arrive
    one group at a time, so the worker (and the agent, for any sender) count them
    over a sliding window instead: a Graph fault answering "not found" for live
    groups deletes at most ``limit`` of them. Thread-safe.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        setting: str = "WRITEBACK_AGENT_DELETE_LIMIT",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``setting`` names the knob in the refusal, so an admin knows what to raise."""
        self._limit = limit
        self._window = window
        self._setting = setting
        self._clock = clock
        self._taken: deque[float] = deque()
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            now = self._clock()
            while self._taken and self._taken[0] <= now - self._window:
                self._taken.popleft()
            if len(self._taken) >= self._limit:
                raise PolicyRefused(
                    f"delete limit reached: {self._limit} deletes in {self._window:.0f} s "
                    f"({self._setting}); replay the event once this is intended"
                )
            self._taken.append(now)

    def give_back(self) -> None:
        """Return the delete taken last: the write failed, so it was not made (a retry
        takes it again). A delete whose answer was lost after the DC made it is given
        back too; its retry finds the object gone and takes none."""
        with self._lock:
            if self._taken:
                self._taken.pop()
