"""Graph's hidden memberships and Exchange's hidden recipients, on a real Samba DC.

Without ``Member.Read.Hidden`` Graph answers for a ``visibility=HiddenMembership``
group as if it had no members (200, an empty list: the stand-in does the same
for a token without the role). Writeback reads its own token's roles, and then
never removes a member of such a group, in a full sync, an incremental one or
an event, and reports it; with the permission it converges as usual.
``hideFromAddressLists``, readable only by a GET of one group with ``$select``,
becomes msExchHideFromAddressLists when asked for, in an Exchange-prepared forest.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.support.beyond import attributes, beyond_world
from writeback.adapters.graph import GraphCloud, GraphReads
from writeback.domain.model import Modify, SkipReason
from writeback.service.handle_event import WorkerContext, converge
from writeback.service.incremental import reconcile_incremental
from writeback.service.reconcile import SyncPolicy, apply_plan, plan_sync
from writeback_sandbox.graph_standin import DEFAULT_APP_ROLES, MEMBER_READ_HIDDEN, StandInCredential
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba

WITHOUT = StandInCredential(DEFAULT_APP_ROLES - {MEMBER_READ_HIDDEN})
WITH = StandInCredential(DEFAULT_APP_ROLES)


def test_a_hidden_membership_group_never_loses_members_without_the_permission(
    samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]
) -> None:
    with beyond_world(samba_dc, make_ou(samba_dc), credential=WITHOUT) as world:
        hidden = world.add_group(1, "Board", ["user0", "user1"], visibility="HiddenMembership")
        open_group = world.add_group(2, "Everyone", ["user2", "user3"])
        with GraphCloud(base_url=world.standin.url, credential=WITH) as granted:
            apply_plan(
                plan_sync(granted, world.directory, world.options, SyncPolicy()), world.directory
            )
        board = world.ad_entry(hidden)
        assert board is not None
        assert board["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}

        # The app without Member.Read.Hidden is shown no member of the hidden group.
        assert world.cloud.get_group(hidden) is not None
        read = world.cloud.get_groups([hidden])[hidden]
        assert not isinstance(read, Exception) and getattr(read, "members", None) == ()
        assert getattr(read, "members_hidden", False) is True

        world.tenant.remove_members(open_group, [world.uid("user3")])
        world.tenant.add_members(hidden, [world.uid("user4")])  # invisible to this app
        plan = world.plan()
        skips = [s for s in plan.skips if s.reason is SkipReason.HIDDEN_MEMBERSHIP]
        assert [s.group_id for s in skips] == [hidden]
        removing = [
            op
            for op in plan.operations
            if op.group_id == hidden and isinstance(op, Modify) and op.changes.remove_members
        ]
        assert removing == []
        world.sync()
        board = world.ad_entry(hidden)
        assert board is not None
        assert board["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}
        everyone = world.ad_entry(open_group)
        assert everyone is not None and everyone["member_sids"] == {world.sid_of("user2")}

        # An incremental reconcile of the changed group removes nothing either.
        link = world.cloud.snapshot().groups_delta_link
        world.tenant.update_group(hidden, description="changed, so the delta reports it")
        outcome = reconcile_incremental(
            world.cloud, world.directory, world.options, SyncPolicy(), delta_link=link
        )
        assert outcome.mode == "incremental" and outcome.changed == 1
        assert outcome.result.applied == {"modify": 1}
        board = world.ad_entry(hidden)
        assert board is not None and len(board["member_sids"]) == 2

        # The event path too: a notification for the hidden group removes nothing.
        context = WorkerContext(world.cloud, world.directory, world.options, attempts=1)
        operation, _, skipped = converge(hidden, context)
        assert operation is None
        assert [s.reason for s in skipped] == [SkipReason.HIDDEN_MEMBERSHIP]
        board = world.ad_entry(hidden)
        assert board is not None and len(board["member_sids"]) == 2

        # With the permission the group converges: user4 added, nothing hidden any more.
        with GraphCloud(base_url=world.standin.url, credential=WITH) as granted:
            plan = plan_sync(granted, world.directory, world.options, SyncPolicy())
            assert not [s for s in plan.skips if s.reason is SkipReason.HIDDEN_MEMBERSHIP]
            apply_plan(plan, world.directory)
        board = world.ad_entry(hidden)
        assert board is not None
        assert board["member_sids"] == {
            world.sid_of("user0"),
            world.sid_of("user1"),
            world.sid_of("user4"),
        }


def test_the_setting_overrides_what_the_token_says(
    samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]
) -> None:
    reads = {"member_read_hidden": False}
    with beyond_world(samba_dc, make_ou(samba_dc), credential=WITH, reads=reads) as world:
        hidden = world.add_group(1, "Board", ["user0"], visibility="HiddenMembership")
        world.sync()
        world.tenant.remove_members(hidden, [world.uid("user0")])
        world.sync()
        board = world.ad_entry(hidden)
        assert board is not None and board["member_sids"] == {world.sid_of("user0")}


def test_hide_from_address_lists_becomes_ms_exch_hide_from_address_lists(
    exchange_dc: SambaDC, make_ou: Callable[[SambaDC], str]
) -> None:
    reads = {"hide_from_address_lists": True}
    with beyond_world(
        exchange_dc, make_ou(exchange_dc), reads=reads, hide_from_address_lists=True
    ) as world:
        hidden = world.add_group(1, "Secret project", ["user0"], hide_from_address_lists=True)
        shown = world.add_group(2, "Everyone", ["user1"])
        world.standin.reset_log()
        world.sync()
        single = [r.target for r in world.standin.log if "hideFromAddressLists" in r.target]
        one_group = re.compile(r"/v1\.0/groups/[0-9a-f-]{36}\?\$select=id,hideFromAddressLists")
        assert len(single) == 2 and all(one_group.fullmatch(target) for target in single)
        secret, everyone = world.ad_entry(hidden), world.ad_entry(shown)
        assert secret is not None and everyone is not None
        flag = "msExchHideFromAddressLists"
        assert attributes(world, secret["dn"], flag) == {flag.lower(): ["TRUE"]}
        assert attributes(world, everyone["dn"], flag) == {}
        world.tenant.update_group(hidden, hide_from_address_lists=False)
        world.sync()
        assert attributes(world, secret["dn"], flag) == {}
        assert world.plan().operations == []

    with beyond_world(exchange_dc, make_ou(exchange_dc)) as v1:  # not asked: V1 leaves it
        gid = v1.add_group(1, "Secret project", ["user0"], hide_from_address_lists=True)
        v1.sync()
        entry = v1.ad_entry(gid)
        assert entry is not None
        assert attributes(v1, entry["dn"], "msExchHideFromAddressLists") == {}
        assert not any("hideFromAddressLists" in r.target for r in v1.standin.log)
    assert GraphReads().hide_from_address_lists is False
