"""plan_sync reads Graph and AD at the same time, AD on the calling thread.

The two sides here are in-memory doubles of the ports (no I/O is the point:
only the threading is under test); the real adapters are driven by
tests/integration/test_sync.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import cast

import pytest

from writeback.domain.guard import Ancestry
from writeback.domain.mapping import MappingOptions
from writeback.domain.model import CloudGroup, DirectoryGroup
from writeback.errors import GraphUnavailable, LdapUnavailable
from writeback.ports import CloudSnapshot, CloudSource
from writeback.ports import Directory as DirectoryPort
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


class Directory:
    """Anchored groups 1 and 2, read only while the snapshot is under way."""

    def __init__(self, cloud: Cloud, started_ad: threading.Event, *, fail: bool = False) -> None:
        self.cloud = cloud
        self.started_ad = started_ad
        self.fail = fail
        self.thread: threading.Thread | None = None

    def schema_attributes(self) -> frozenset[str]:
        return frozenset()

    def resolve_sids(self, sids: object) -> dict[str, object]:
        return {}

    def group_ancestry(self) -> Ancestry:
        return Ancestry()

    def iter_groups(self) -> Iterator[DirectoryGroup]:
        self.thread = threading.current_thread()
        assert self.cloud.started.wait(WAIT), "the Graph read did not run meanwhile"
        self.started_ad.set()
        if self.fail:
            raise LdapUnavailable("dc down")
        for n in (1, 2):
            yield DirectoryGroup(f"CN=Group_{gid(n)},{OU}", gid(n), {"displayName": (f"G{n}",)})


def sides(
    *, cloud_fails: bool = False, ad_fails: bool = False
) -> tuple[Cloud, Directory, CloudSource, DirectoryPort]:
    """The doubles, and the same as the ports (they have only what plan_sync calls)."""
    started_ad = threading.Event()
    cloud = Cloud(started_ad, fail=cloud_fails)
    directory = Directory(cloud, started_ad, fail=ad_fails)
    return cloud, directory, cast(CloudSource, cloud), cast(DirectoryPort, directory)


def test_both_sides_are_read_at_once_and_ad_on_the_calling_thread() -> None:
    cloud, directory, source, port = sides()
    plan = plan_sync(source, port, MappingOptions(target_ou=OU), SyncPolicy())
    assert directory.thread is threading.current_thread()
    assert cloud.thread is not None and cloud.thread is not threading.current_thread()
    assert plan.groups_in_cloud == 1 and plan.groups_in_directory == 2
    assert [op.group_id for op in plan.deletes] == [gid(2)]


def test_a_failed_read_on_either_side_fails_the_plan() -> None:
    *_, source, port = sides(cloud_fails=True)
    with pytest.raises(GraphUnavailable):
        plan_sync(source, port, MappingOptions(target_ou=OU), SyncPolicy())
    *_, source, port = sides(ad_fails=True)
    with pytest.raises(LdapUnavailable):
        plan_sync(source, port, MappingOptions(target_ou=OU), SyncPolicy())
