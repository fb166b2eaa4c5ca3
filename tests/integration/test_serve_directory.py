"""serve's per-thread directory keeps the worker's cheap read: a group without its members."""

from __future__ import annotations

from collections.abc import Callable

from tests.support.world import make_world
from writeback.adapters.directory import LdapDirectory
from writeback.adapters.thread_local import ThreadLocalDirectory
from writeback_sandbox.samba import SambaDC


def test_attribute_read_passes_through_and_reads_no_member_values(
    samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]
) -> None:
    with make_world(samba_dc, make_ou(samba_dc)) as world:
        gid = world.add_group(1, "Through", ["user0", "user1"])
        world.sync()
        made: list[LdapDirectory] = []

        def factory() -> LdapDirectory:
            made.append(samba_dc.directory(world.ou))
            return made[-1]

        directory = ThreadLocalDirectory(factory)
        try:
            found = directory.find_groups([gid], members=False).get(gid)
            assert found is not None and found.group_id == gid
            assert found.member_sids == frozenset()
            assert made[0].member_values_read == 0
            full = directory.find_group(gid)
            assert full is not None and len(full.member_sids) == 2
        finally:
            directory.close()
