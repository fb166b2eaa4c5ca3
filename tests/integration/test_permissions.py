"""``permissions --apply`` on a real Samba DC, proved by what the account can then do.

A fresh, unprivileged account gets the delegation on the target OU through the
CLI; then a real sync bound as that account creates, updates, renames and
deletes groups there, and the same account is refused (by the DC, over a raw
connection, not by our adapter's own guard) when it creates, modifies or deletes
anything outside the OU, creates anything but a group in it, or touches the
OU's own security descriptor.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator

import pytest
from ldap3 import BASE, MODIFY_REPLACE
from ldap3.protocol.microsoft import security_descriptor_control

from tests.support.accounts import Account, create_account, object_sid, run_permissions
from tests.support.world import World, make_world
from writeback import cli
from writeback.adapters.directory import LdapDirectory
from writeback.domain.naming import DnFormat
from writeback.permissions import delegation, parse_security_descriptor
from writeback.service.reconcile import SyncPolicy, apply_plan, plan_sync
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba

INSUFFICIENT_ACCESS = 50


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    # Display-name DNs, so a cloud rename is an LDAP rename the account must be allowed.
    with make_world(samba_dc, make_ou(samba_dc), dn_format=DnFormat.DISPLAY_NAME) as w:
        yield w


@pytest.fixture
def account(world: World) -> Account:
    return create_account(world.dc, world.users_ou)


def grant(world: World, account: Account, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    return run_permissions(world.dc, world.ou, account.dn, monkeypatch, "--apply")


def as_account(world: World, account: Account) -> LdapDirectory:
    return LdapDirectory(
        url=world.dc.ldaps_url,
        user=account.dn,
        password=account.password,
        target_ou=world.ou,
        ca_file=world.dc.ca_file,
    )


def apply_as(world: World, directory: LdapDirectory) -> dict[str, int]:
    plan = plan_sync(world.cloud, directory, world.options, SyncPolicy())
    result = apply_plan(plan, directory)
    assert result.failures == [], result.failures
    return result.applied


def raw_result(world: World, account: Account, send: Callable[..., object]) -> int:
    conn = world.dc.connection(user=account.dn, password=account.password, raise_exceptions=False)
    try:
        send(conn)
        return int(conn.result["result"])
    finally:
        conn.unbind()


def ou_dacl(world: World) -> list[bytes]:
    conn = world.dc.connection()
    try:
        conn.search(
            world.ou,
            "(objectClass=*)",
            BASE,
            attributes=["nTSecurityDescriptor"],
            controls=security_descriptor_control(sdflags=0x4),
        )
        raw = conn.response[0]["raw_attributes"]["nTSecurityDescriptor"][0]
    finally:
        conn.unbind()
    return parse_security_descriptor(raw).dacl or []


def test_without_the_delegation_the_account_cannot_write_the_ou(
    world: World, account: Account
) -> None:
    dn = f"CN=before-{uuid.uuid4().hex[:8]},{world.ou}"
    added = raw_result(world, account, lambda c: c.add(dn, ["top", "group"], {}))
    assert added == INSUFFICIENT_ACCESS


def test_apply_grants_exactly_the_two_aces_once(
    world: World, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, text = grant(world, account, monkeypatch)
    assert code == 0
    assert world.dc.admin_password not in text
    dacl = ou_dacl(world)
    account_sid = object_sid(world.dc, account.dn)
    wanted = [ace.to_bytes() for ace in delegation(account_sid)]
    assert [raw for raw in dacl if raw in wanted] == wanted
    assert account_sid in text  # the SDDL printed names the real SID

    again, _ = grant(world, account, monkeypatch)
    assert again == 0
    assert ou_dacl(world) == dacl


def test_the_account_writes_back_groups_in_the_ou_and_nothing_outside(
    world: World, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _ = grant(world, account, monkeypatch)
    assert code == 0
    first = world.add_group(1, "Sales", ["user0", "user1"], mail="sales@contoso.com")
    second = world.add_group(2, "Legal", ["user2"])
    directory = as_account(world, account)
    try:
        assert apply_as(world, directory) == {"add": 2}
        world.tenant.update_group(first, display_name="Sales EMEA")
        world.tenant.add_members(first, [world.uid("user3")])
        world.tenant.remove_members(first, [world.uid("user0"), world.uid("user1")])
        world.tenant.update_group(second, description="legal team")
        assert apply_as(world, directory) == {"rename": 1, "modify": 1}
        world.tenant.hard_delete_group(second)
        assert apply_as(world, directory) == {"delete": 1}
        assert apply_as(world, directory) == {}
    finally:
        directory.close()
    entry = world.ad_entry(first)
    assert entry is not None
    assert entry["displayname"] == ["Sales EMEA"]
    assert entry["dn"].startswith("CN=Sales EMEA_")
    assert entry["member_sids"] == {world.sid_of("user3")}
    assert world.ad_entry(second) is None


def test_the_account_is_refused_everywhere_else(
    world: World, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _ = grant(world, account, monkeypatch)
    assert code == 0
    outside = world.dc.create_ou("Outside", world.users_ou.split(",", 1)[1])
    victim = world.dc.create_group(outside, f"victim{uuid.uuid4().hex[:8]}")
    attempts: dict[str, Callable[..., object]] = {
        "create outside": lambda c: c.add(f"CN=new-outside,{outside}", ["top", "group"], {}),
        "modify outside": lambda c: c.modify(
            victim, {"description": [(MODIFY_REPLACE, ["changed"])]}
        ),
        "delete outside": lambda c: c.delete(victim),
        "create a user in the OU": lambda c: c.add(
            f"CN=not-a-group,{world.ou}", ["top", "person", "organizationalPerson", "user"], {}
        ),
        "change the OU itself": lambda c: c.modify(
            world.ou, {"description": [(MODIFY_REPLACE, ["changed"])]}
        ),
    }
    results = {name: raw_result(world, account, send) for name, send in attempts.items()}
    assert results == {name: INSUFFICIENT_ACCESS for name in attempts}
    conn = world.dc.connection()
    try:
        conn.search(victim, "(objectClass=*)", BASE, attributes=["description"])
        assert conn.entries[0].entry_attributes_as_dict.get("description", []) == []
    finally:
        conn.unbind()


def test_print_only_needs_no_connection(
    world: World, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WRITEBACK_LDAP_URL", raising=False)
    out = io.StringIO()
    code = cli.main(["permissions", "--account", account.dn, "--ou", world.ou], out)
    assert code == 0
    assert f'dsacls "{world.ou}" /I:T /G "${{account}}:CCDC;group"' in out.getvalue()
