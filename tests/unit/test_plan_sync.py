"""plan_sync reads Graph and AD at the same time, AD on the calling thread.

The two sides here are in-memory doubles of the ports (no I/O is the point:
only the threading is under test); the real adapters are driven by
tests/integration/test_sync.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest

from writeback.domain.mapping import MappingOptions
from writeback.domain.model import CloudGroup, DirectoryGroup, Operation
from writeback.errors import GraphUnavailable, LdapUnavailable
from writeback.ports import CloudSnapshot, GroupRead
from writeback.service.reconcile import SyncPolicy, plan_sync

OU = "OU=W,DC=corp,DC=example"
WAIT = 10.0


def gid(n: int) -> str:
    return f"00000000-0000-0000-0000-{n:012d}"


class Cloud:
    """A snapshot that only completes once the directory has started reading."""

    def __init__(self, started_ad: threading.Event, *, fail: bool = False) -> None:
        self.started_ad = started_ad
        self.fail = fail
        self.thread: threading.Thread | None = None
        self.started = threading.Event()

    def snapshot(self) -> CloudSnapshot:
        self.thread = threading.current_thread()
        self.started.set()
        assert self.started_ad.wait(WAIT), "the AD read did not run meanwhile"
        if self.fail:
            raise GraphUnavailable("graph down")
        return CloudSnapshot((CloudGroup(gid(1), "G1"),), frozenset())

    def get_group(self, group_id: str) -> CloudGroup | None:
        raise NotImplementedError

    def get_groups(self, group_ids: Sequence[str]) -> dict[str, GroupRead]:
        raise NotImplementedError

    def soft_deleted_group_ids(self) -> frozenset[str]:
        return frozenset()


class Directory:
    """Anchored groups 1 and 2, read only while the snapshot is under way."""

    def __init__(self, cloud: Cloud, started_ad: threading.Event, *, fail: bool = False) -> None:
        self.cloud = cloud
        self.started_ad = started_ad
        self.fail = fail
        self.thread: threading.Thread | None = None

    def schema_attributes(self) -> frozenset[str]:
        return frozenset()

    def find_group(self, group_id: str) -> DirectoryGroup | None:
        raise NotImplementedError

    def find_groups(
        self, group_ids: Sequence[str], *, members: bool = True
    ) -> dict[str, DirectoryGroup]:
        raise NotImplementedError

    def iter_groups(self) -> Iterator[DirectoryGroup]:
        self.thread = threading.current_thread()
        assert self.cloud.started.wait(WAIT), "the Graph read did not run meanwhile"
        self.started_ad.set()
        if self.fail:
            raise LdapUnavailable("dc down")
        for n in (1, 2):
            yield DirectoryGroup(f"CN=Group_{gid(n)},{OU}", gid(n), {"displayName": (f"G{n}",)})

    def apply(self, operation: Operation) -> int:
        raise NotImplementedError

    def close(self) -> None:
        return None


def sides(*, cloud_fails: bool = False, ad_fails: bool = False) -> tuple[Cloud, Directory]:
    started_ad = threading.Event()
    cloud = Cloud(started_ad, fail=cloud_fails)
    return cloud, Directory(cloud, started_ad, fail=ad_fails)


def test_both_sides_are_read_at_once_and_ad_on_the_calling_thread() -> None:
    cloud, directory = sides()
    plan = plan_sync(cloud, directory, MappingOptions(target_ou=OU), SyncPolicy())
    assert directory.thread is threading.current_thread()
    assert cloud.thread is not None and cloud.thread is not threading.current_thread()
    assert plan.groups_in_cloud == 1 and plan.groups_in_directory == 2
    assert [op.group_id for op in plan.deletes] == [gid(2)]


def test_a_failed_read_on_either_side_fails_the_plan() -> None:
    cloud, directory = sides(cloud_fails=True)
    with pytest.raises(GraphUnavailable):
        plan_sync(cloud, directory, MappingOptions(target_ou=OU), SyncPolicy())
    cloud, directory = sides(ad_fails=True)
    with pytest.raises(LdapUnavailable):
        plan_sync(cloud, directory, MappingOptions(target_ou=OU), SyncPolicy())
