"""Adopting the groups Entra Cloud Sync wrote, in place, on a real Samba DC.

Cloud Sync ("provision groups to AD") writes a cloud security group as a
universal security group named by ``Left(Trim(displayName),51)+"_"+Mid(objectId,25,12)``,
anchored by ``msDS-ExternalDirectoryObjectId=Group_<objectId>`` and stamped
``adminDescription=Group_<objectId>`` too, with a random sAMAccountName. The
Exchange-prepared test forest carries the 2016 schema attribute. With
``WRITEBACK_SECURITY_GROUPS=true`` and ``WRITEBACK_DN_FORMAT=cloudsync`` writeback
takes such a group over as it is: same object (objectSid, objectGUID), same CN,
same sAMAccountName, Cloud Sync's anchor left alone; only what it manages and
Cloud Sync did not write (its info line) changes, and members converge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.support.beyond import attributes, beyond_world, object_sid
from tests.support.world import World
from writeback.domain.model import Modify, Rename
from writeback.domain.naming import DnFormat, cn_for, escape_dn_value
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba

SECURITY = "-2147483640"
#: 60 characters, with a space at character 51: Cloud Sync's Left(...,51) keeps it.
LONG_NAME = "Regional Security Operations Engineering Team North Europe"[:50] + " tail words."


def cloud_sync_wrote(world: World, gid: str, display_name: str, members: list[str]) -> str:
    """The object Cloud Sync's group provisioning makes (its documented attribute map)."""
    cn = display_name.strip()[:51] + "_" + gid[24:36]
    dn = f"CN={escape_dn_value(cn)},{world.ou}"
    attrs: dict[str, Any] = {
        "adminDescription": f"Group_{gid}",
        "msDS-ExternalDirectoryObjectId": f"Group_{gid}",
        "groupType": int(SECURITY),
        "displayName": display_name,
        "description": "from Cloud Sync",
        "sAMAccountName": f"$C5K{gid[:6]}-{world.token}",
        "member": [f"<SID={world.sid_of(m)}>" for m in members],
    }
    conn = world.dc.connection()
    try:
        assert conn.add(dn, ["top", "group"], attrs), conn.result
    finally:
        conn.unbind()
    return dn


def test_a_group_cloud_sync_wrote_is_adopted_in_place(
    exchange_dc: SambaDC, make_ou: Callable[[SambaDC], str]
) -> None:
    with beyond_world(
        exchange_dc, make_ou(exchange_dc), security_groups=True, dn_format=DnFormat.CLOUD_SYNC
    ) as world:
        gid = world.gid(1)
        world.tenant.add_group(
            gid,
            display_name=LONG_NAME,
            description="from Cloud Sync",
            group_types=(),
            members=[world.uid("user0"), world.uid("user1")],
        )
        dn = cloud_sync_wrote(world, gid, LONG_NAME, ["user0", "user2"])
        before = world.ad_entry(gid)
        assert before is not None and before["dn"] == dn
        assert cn_for(gid, LONG_NAME, DnFormat.CLOUD_SYNC) != cn_for(
            gid, LONG_NAME, DnFormat.DISPLAY_NAME
        )  # V1's display-name format would rename it: the trailing space is cut

        plan = world.plan()
        [operation] = plan.operations
        assert isinstance(operation, Modify) and not isinstance(operation, Rename)
        assert set(operation.changes.replace) == {"info"}
        assert operation.changes.add_members == (f"<SID={world.sid_of('user1')}>",)
        assert operation.changes.remove_members == (f"<SID={world.sid_of('user2')}>",)
        world.sync()

        after = world.ad_entry(gid)
        assert after is not None
        assert after["dn"] == dn
        assert object_sid(after) == object_sid(before)
        assert after["objectguid"] == before["objectguid"]
        assert after["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}
        kept = attributes(
            world, dn, "sAMAccountName", "msDS-ExternalDirectoryObjectId", "groupType", "info"
        )
        assert kept["samaccountname"] == [f"$C5K{gid[:6]}-{world.token}"]
        assert kept["msds-externaldirectoryobjectid"] == [f"Group_{gid}"]
        assert kept["grouptype"] == [SECURITY]
        assert kept["info"][0].startswith(f"Security group {gid}, written back")
        assert world.plan().operations == []
