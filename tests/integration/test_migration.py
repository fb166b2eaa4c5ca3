"""docs/migration.md, step by step, on a real Samba DC.

The target OU starts the way Entra Connect's group writeback V1 leaves it:
universal distribution groups named ``CN=Group_<objectId>`` and anchored by
``adminDescription=Group_<objectId>``, one of them moved by an administrator into
a child OU, written by a connector account that holds Connect-like rights on the
OU. The guide's commands then run through the CLI as an administrator would, and
every check reads AD back over an independent admin connection. Connect itself
cannot run here; its one dangerous act at cut-over, exporting a delete for every
group it wrote once its writeback is turned off, is played by its connector
account deleting over LDAP.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ldap3 import MODIFY_REPLACE

from tests.support.accounts import Account, create_account, run_permissions
from tests.support.world import World, make_world
from writeback.cli import EXIT_OK, main
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba

INSUFFICIENT_ACCESS = 50


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with make_world(samba_dc, make_ou(samba_dc)) as w:
        yield w


def connect_wrote(world: World, gid: str, parent: str, **attributes: Any) -> str:
    """A group the way group writeback V1 writes it."""
    dn = f"CN=Group_{gid},{parent}"
    conn = world.dc.connection()
    try:
        assert conn.add(
            dn,
            ["top", "group"],
            {
                "adminDescription": f"Group_{gid}",
                "sAMAccountName": f"Group_{gid.replace('-', '')[:14]}c",
                "groupType": 8,
                **attributes,
            },
        ), conn.result
    finally:
        conn.unbind()
    return dn


def identity(world: World, gid: str) -> tuple[str, str, str]:
    entry = world.ad_entry(gid)
    assert entry is not None, gid
    return entry["dn"], str(entry["objectsid"]), str(entry["objectguid"])


def cli(world: World, account: Account, monkeypatch: pytest.MonkeyPatch, *argv: str) -> str:
    settings = {
        "WRITEBACK_TARGET_OU": world.ou,
        "WRITEBACK_LDAP_URL": world.dc.ldaps_url,
        "WRITEBACK_LDAP_USER": account.dn,
        "WRITEBACK_LDAP_PASSWORD": account.password,
        "WRITEBACK_LDAP_CA_FILE": world.dc.ca_file,
        "WRITEBACK_GRAPH_URL": world.standin.url,
        "WRITEBACK_GRAPH_AUTH": "none",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    out = io.StringIO()
    assert main(list(argv), out=out) == EXIT_OK, out.getvalue()
    return out.getvalue()


def as_connect(world: World, connector: Account, send: Callable[[Any], object]) -> int:
    conn = world.dc.connection(
        user=connector.dn, password=connector.password, raise_exceptions=False
    )
    try:
        send(conn)
        return int(conn.result["result"])
    finally:
        conn.unbind()


def deleting(dn: str) -> Callable[[Any], object]:
    return lambda conn: conn.delete(dn)


def test_the_migration_guide_adopts_connects_groups_and_rolls_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: Connect wrote three groups; an admin moved one into a child OU.
    connector = create_account(world.dc, world.users_ou, prefix="msol")
    assert run_permissions(world.dc, world.ou, connector.dn, monkeypatch, "--apply")[0] == 0
    sales = world.add_group(1, "Sales", ["user0", "user1"], mail="sales@contoso.com")
    legal = world.add_group(2, "Legal", ["user2"])
    moved = world.add_group(3, "Moved", ["user3"])
    connect_wrote(
        world,
        sales,
        world.ou,
        displayName="Sales",
        mail="sales@contoso.com",
        proxyAddresses=["SMTP:sales@contoso.com"],
        member=[f"<SID={world.sid_of('user0')}>"],
    )
    connect_wrote(world, legal, world.ou, displayName="Legal (old name)")
    child = world.dc.create_ou("Moved by admin", world.ou)
    connect_wrote(world, moved, child, displayName="Moved")
    before = {gid: identity(world, gid) for gid in (sales, legal, moved)}

    scratch = f"CN=scratch,{world.ou}"  # the connector can delete groups there, for now
    assert as_connect(world, connector, lambda c: c.add(scratch, ["top", "group"], {})) == 0
    assert as_connect(world, connector, deleting(scratch)) == 0

    # 1. A service account with the least-privilege delegation.
    service = create_account(world.dc, world.users_ou)
    assert run_permissions(world.dc, world.ou, service.dn, monkeypatch, "--apply")[0] == 0

    # 2. plan against the existing OU: updates only, nothing added or deleted.
    lines = [
        json.loads(line) for line in cli(world, service, monkeypatch, "plan", "--json").splitlines()
    ]
    ops = {line["group_id"]: line["op"] for line in lines if line["op"] != "skip"}
    assert ops == {sales: "modify", legal: "modify", moved: "modify"}

    # 3. Before Connect's writeback is turned off: deny its account deleting groups.
    guard = ("--deny-deletes", "--apply")
    assert run_permissions(world.dc, world.ou, connector.dn, monkeypatch, *guard)[0] == 0

    # 4. Cut over: sync. Same objects, same SIDs and GUIDs, converged attributes.
    assert "3 modify" in cli(world, service, monkeypatch, "sync")
    assert {gid: identity(world, gid) for gid in before} == before
    entry = world.ad_entry(sales)
    assert entry is not None
    assert entry["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}
    assert world.ad_entry(legal) is not None
    assert world.ad_entry(legal)["displayname"] == ["Legal"]  # type: ignore[index]
    assert "nothing to do" in cli(world, service, monkeypatch, "plan")

    # 5. Connect's writeback turned off: the deletes it exports are refused.
    refused = {as_connect(world, connector, deleting(dn)) for dn, _, _ in before.values()}
    assert refused == {INSUFFICIENT_ACCESS}
    assert {gid: identity(world, gid) for gid in before} == before

    # The trap the guide warns about: WRITEBACK_ENABLED=false plans deleting them all.
    monkeypatch.setenv("WRITEBACK_ENABLED", "false")
    disabled = [
        json.loads(line) for line in cli(world, service, monkeypatch, "plan", "--json").splitlines()
    ]
    assert {line["op"] for line in disabled if line["op"] != "skip"} == {"delete"}
    monkeypatch.delenv("WRITEBACK_ENABLED")

    # Rollback: writeback stopped (no command: nothing runs), the guard removed,
    # Connect's account manages the same objects again; nothing was recreated.
    revoke = ("--deny-deletes", "--revoke", "--apply")
    assert run_permissions(world.dc, world.ou, connector.dn, monkeypatch, *revoke)[0] == 0
    assert {gid: identity(world, gid) for gid in before} == before
    sales_dn = before[sales][0]
    change = {"displayName": [(MODIFY_REPLACE, ["Sales (Connect again)"])]}
    assert as_connect(world, connector, lambda c: c.modify(sales_dn, change)) == 0
