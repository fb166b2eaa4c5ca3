"""Security and mail-enabled security groups on a real Samba DC, as the issue asks:
written as universal security groups (the mail-enabled ones with their Exchange
attributes), updated, renamed, and never written when synced from on-premises
or role-assignable without a rule naming them. V1's scope leaves them all out,
and never writes a Microsoft 365 group synced from AD."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from ldap3 import MODIFY_REPLACE

from tests.support.beyond import attributes, beyond_world
from tests.support.world import World, make_world, user_id
from writeback.domain.mapping import MAIL_UNIVERSAL_SECURITY_GROUP
from writeback.domain.model import SkipReason
from writeback.domain.rules import parse_rules
from writeback.service.handle_event import WorkerContext, converge
from writeback.service.incremental import reconcile_incremental
from writeback.service.reconcile import SyncPolicy
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba

SECURITY = "-2147483640"
EXCHANGE = ("groupType", "mail", "proxyAddresses", "mailNickname", "msExchRecipientTypeDetails")


def add_security(world: World, n: int, name: str, members: list[str], **fields: Any) -> str:
    return world.add_group(n, name, members, group_types=(), **fields)


def test_security_and_mail_enabled_security_groups_are_written_and_updated(
    exchange_dc: SambaDC, make_ou: Callable[[SambaDC], str]
) -> None:
    with beyond_world(exchange_dc, make_ou(exchange_dc), security_groups=True) as world:
        sg = add_security(world, 1, "SG-Files", ["user0", "user1"])
        mesg = add_security(
            world,
            2,
            "Ops alerts",
            ["user2"],
            mail="ops@contoso.com",
            mail_nickname="ops",
            proxy_addresses=["SMTP:ops@contoso.com", "smtp:ops@contoso.onmicrosoft.com"],
        )
        m365 = world.add_group(3, "Team", ["user3"], mail="team@contoso.com")
        plan = world.plan()
        assert sorted(op.kind for op in plan.operations) == ["add", "add", "add"]
        world.sync()

        files = world.ad_entry(sg)
        assert files is not None
        got = attributes(world, files["dn"], *EXCHANGE)
        assert got["grouptype"] == [SECURITY]
        assert "mail" not in got and "proxyaddresses" not in got and "mailnickname" not in got
        assert files["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}

        ops = world.ad_entry(mesg)
        assert ops is not None
        got = attributes(world, ops["dn"], *EXCHANGE, "msExchRecipientDisplayType")
        assert got["grouptype"] == [SECURITY]
        assert got["mail"] == ["ops@contoso.com"]
        assert sorted(got["proxyaddresses"]) == [
            "SMTP:ops@contoso.com",
            "smtp:ops@contoso.onmicrosoft.com",
        ]
        assert got["mailnickname"] == ["ops"]
        assert got["msexchrecipienttypedetails"] == [MAIL_UNIVERSAL_SECURITY_GROUP]
        assert got["msexchrecipientdisplaytype"] == ["1073741833"]

        team = world.ad_entry(m365)
        assert team is not None
        assert attributes(world, team["dn"], "groupType")["grouptype"] == ["8"]  # V1's type

        # Updated: members, properties, and an on-premises edit put back.
        world.tenant.add_members(sg, [user_id("user4")])
        world.tenant.remove_members(sg, [user_id("user0")])
        world.tenant.update_group(mesg, display_name="Ops alerts (24x7)")
        conn = world.dc.connection()
        try:
            assert conn.modify(files["dn"], {"description": [(MODIFY_REPLACE, ["hand edit"])]})
        finally:
            conn.unbind()
        world.sync()
        files = world.ad_entry(sg)
        assert files is not None
        assert files["member_sids"] == {world.sid_of("user1"), world.sid_of("user4")}
        assert "description" not in attributes(world, files["dn"], "description")
        ops_now = world.ad_entry(mesg)
        assert ops_now is not None and ops_now["displayname"] == ["Ops alerts (24x7)"]
        assert ops_now["objectsid"] == ops["objectsid"]
        assert world.plan().operations == []


def test_v1s_scope_writes_no_security_group(
    samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]
) -> None:
    with beyond_world(samba_dc, make_ou(samba_dc)) as world:
        sg = add_security(world, 1, "SG-Files", ["user0"])
        team = world.add_group(2, "Team", ["user1"])
        world.sync()
        assert world.ad_entry(sg) is None
        assert world.ad_entry(team) is not None


RULES = """
[[rule]]
name = "all security groups"
kinds = ["security"]

[[rule]]
name = "the one admins group"
ids = ["{admins}"]
ou = "OU=Privileged"
"""


def test_synced_and_role_assignable_groups_are_left_out_and_reported(
    samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]
) -> None:
    with beyond_world(samba_dc, make_ou(samba_dc), security_groups=True) as world:
        world.dc.create_ou("Privileged", world.ou)
        admins = world.gid(3)  # ids are per world: the rules name it once it is known
        world.options = replace(
            world.options,
            security_groups=False,
            rules=parse_rules(RULES.format(admins=admins), target_ou=world.ou),
        )
        synced = add_security(world, 1, "SG from AD", ["user0"], on_premises_sync_enabled=True)
        other_role = add_security(world, 2, "Role group", ["user1"], is_assignable_to_role=True)
        add_security(world, 3, "Tier 0 admins", ["user2"], is_assignable_to_role=True)
        plain = add_security(world, 4, "SG-Plain", ["user3"])
        plan = world.plan()
        reasons = {s.group_id: s.reason for s in plan.skips}
        assert reasons[synced] is SkipReason.SYNCED_FROM_ON_PREMISES
        assert reasons[other_role] is SkipReason.ROLE_ASSIGNABLE
        assert plan.rules[admins] == "the one admins group"
        assert plan.rules[plain] == "all security groups"
        world.sync()
        assert world.ad_entry(synced) is None
        assert world.ad_entry(other_role) is None
        tier0 = world.ad_entry(admins)
        assert tier0 is not None and ",OU=Privileged," in tier0["dn"]
        assert world.ad_entry(plain) is not None
        assert world.plan().operations == []


def test_a_unified_group_synced_from_ad_is_never_written_with_v1s_defaults(
    samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]
) -> None:
    """The loop the issue names: a group Entra Connect syncs up from AD that carries
    groupTypes Unified. With no rules file and default settings (V1's scope) it is
    left out and reported by the full sync, the incremental one and the worker."""
    with make_world(samba_dc, make_ou(samba_dc)) as world:
        looped = world.add_group(1, "Synced up from AD", ["user0"], on_premises_sync_enabled=True)
        ordinary = world.add_group(2, "Cloud team", ["user1"])
        plan = world.plan()
        assert [op.group_id for op in plan.operations] == [ordinary]
        reasons = {s.group_id: s.reason for s in plan.skips}
        assert reasons[looped] is SkipReason.SYNCED_FROM_ON_PREMISES
        world.sync()
        assert world.ad_entry(looped) is None and world.ad_entry(ordinary) is not None

        link = world.cloud.snapshot().groups_delta_link
        world.tenant.update_group(looped, description="changed, so the delta reports it")
        outcome = reconcile_incremental(
            world.cloud, world.directory, world.options, SyncPolicy(), delta_link=link
        )
        assert outcome.mode == "incremental" and outcome.changed == 1
        assert outcome.result.applied == {}
        assert world.ad_entry(looped) is None

        context = WorkerContext(world.cloud, world.directory, world.options, attempts=1)
        operation, _, _ = converge(looped, context)
        assert operation is None
        assert world.ad_entry(looped) is None
