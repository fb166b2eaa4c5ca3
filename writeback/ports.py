"""The two sides writeback talks to, as the service layer sees them.

Adapters (Graph over msgraph-sdk, AD over ldap3, later the relay) implement
these; the service layer depends only on these protocols, so it can be driven
by any of them and tested against the real ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from writeback.domain.model import CloudGroup, DirectoryGroup, Operation


@dataclass(frozen=True)
class CloudSnapshot:
    """Every Unified group in the tenant, members resolved, plus the delta links.

    ``soft_deleted`` holds the ids of groups in the recycle bin (restorable for
    30 days), so an orphan can be told apart from a group deleted for good.
    """

    groups: tuple[CloudGroup, ...]
    soft_deleted: frozenset[str]
    groups_delta_link: str | None = None
    users_delta_link: str | None = None


class CloudSource(Protocol):
    def snapshot(self) -> CloudSnapshot:
        """Read all Unified groups with members (full delta round)."""
        ...

    def get_group(self, group_id: str) -> CloudGroup | None:
        """One group with its members, or None when it no longer exists."""
        ...

    def soft_deleted_group_ids(self) -> frozenset[str]: ...


class Directory(Protocol):
    def schema_attributes(self) -> frozenset[str]:
        """Names (lower case) of the optional attributes the group class may hold."""
        ...

    def find_group(self, group_id: str) -> DirectoryGroup | None:
        """The object anchored to ``group_id`` under the target OU, if any."""
        ...

    def iter_groups(self) -> Iterator[DirectoryGroup]:
        """Every anchored object under the target OU, members included."""
        ...

    def apply(self, operation: Operation) -> int:
        """Carry out one planned operation; returns the LDAP requests it took."""
        ...
