"""``permissions --apply`` on a real Samba DC, proved by what the account can then do.

A fresh, unprivileged account gets the delegation on the target OU through the
CLI; then a real sync bound as that account creates, updates, renames and
deletes groups there, and the same account is refused (by the DC, over a raw
connection, not by our adapter's own guard) when it creates, modifies or deletes
anything outside the OU, creates anything but a group in it, adds itself or
anyone to a group outside the OU, or writes a DACL (the OU's, the domain's, a
group's outside or inside the OU).

One thing Samba does not enforce as Windows does: OWNER RIGHTS. The delegation
puts an inherited OWNER RIGHTS ACE (READ_CONTROL only) on every group below the
OU; Windows Server 2008 and later then deny the owner, the account for the
groups it created, its implicit WRITE_DAC, while Samba 4.17 still grants it. The
test that shows this asserts what Samba does and says so.

Finding 1 of issue 12 (a default container as the target) and finding 3 (the
account owns the groups it creates) each have a test here that fails on main.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator

import pytest
from ldap3 import BASE, MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE
from ldap3.protocol.microsoft import security_descriptor_control

from tests.support.accounts import (
    Account,
    create_account,
    dacl_of,
    object_sid,
    run_permissions,
    widened_dacl,
)
from tests.support.world import World, make_world
from writeback import cli
from writeback.adapters.directory import LdapDirectory
from writeback.domain.naming import DnFormat
from writeback.permissions import (
    OWNER_RIGHTS,
    Right,
    SecurityDescriptor,
    delegation,
    owner_rights_ace,
    parse_security_descriptor,
    sid_to_bytes,
)
from writeback.service.reconcile import SyncPolicy, apply_plan, plan_sync
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba

INSUFFICIENT_ACCESS = 50
SUCCESS = 0


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


def test_apply_grants_exactly_the_delegation_once(
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
    assert f"dsacls '{world.ou}' /I:T /G \"${{account}}:CCDC;group\"" in out.getvalue()


# -- finding 1: the target must be an OU of the domain's own --------------------------


def test_a_default_container_or_the_domain_root_is_refused_and_nothing_is_granted(
    samba_dc: SambaDC, make_ou: Callable[[SambaDC], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On main, ``--ou CN=Users,...`` was granted, and the account then added itself
    to Domain Admins (Samba does not protect it with AdminSDHolder's DACL)."""
    account = create_account(samba_dc, make_ou(samba_dc))
    domain_admins = f"CN=Domain Admins,CN=Users,{samba_dc.base_dn}"
    targets = [
        samba_dc.users_dn,
        f"cn = users , {samba_dc.base_dn.lower()}",
        f"CN=Builtin,{samba_dc.base_dn}",
        f"OU=Domain Controllers,{samba_dc.base_dn}",
        samba_dc.base_dn,
    ]
    before = {dn: dacl_of(samba_dc, dn) for dn in (samba_dc.users_dn, samba_dc.base_dn)}
    for target in targets:
        code, _ = run_permissions(samba_dc, target, account.dn, monkeypatch, "--apply")
        assert code == 2, target
        code, _ = run_permissions(samba_dc, target, account.dn, monkeypatch, "--apply", "--force")
        assert code == 2, target  # --force never overrides the container rule
    assert {dn: dacl_of(samba_dc, dn) for dn in before} == before
    me = account.dn
    added = raw_conn_result(
        samba_dc, account, lambda c: c.modify(domain_admins, {"member": [(MODIFY_ADD, [me])]})
    )
    assert added == INSUFFICIENT_ACCESS


def test_a_well_known_container_redirected_to_an_ou_is_refused(
    samba_dc: SambaDC, make_ou: Callable[[SambaDC], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OU the domain names as a well-known container (redirusr/redircmp, or an
    application's otherWellKnownObjects) passes the DN rules; the DC says what it is."""
    ou = make_ou(samba_dc)
    account = create_account(samba_dc, ou)
    value = f"B:32:{uuid.uuid4().hex.upper()}:{ou}"
    conn = samba_dc.connection()
    try:
        assert conn.modify(samba_dc.base_dn, {"otherWellKnownObjects": [(MODIFY_ADD, [value])]}), (
            conn.result
        )
        inner = samba_dc.create_ou("Groups", ou)
        for target in (ou, inner):
            code, _ = run_permissions(samba_dc, target, account.dn, monkeypatch, "--apply")
            assert code == 2
        outer_code, _ = run_permissions(
            samba_dc,
            samba_dc.create_ou(f"outer-{uuid.uuid4().hex[:6]}"),
            account.dn,
            monkeypatch,
            "--apply",
        )
        assert outer_code == 0
    finally:
        conn.modify(samba_dc.base_dn, {"otherWellKnownObjects": [(MODIFY_DELETE, [value])]})
        conn.unbind()
    assert not [
        raw
        for raw in dacl_of(samba_dc, ou)
        if sid_to_bytes(object_sid(samba_dc, account.dn)) in raw
    ]


def test_an_ou_holding_foreign_or_protected_groups_is_refused_unless_forced(
    world: World,
    account: Account,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admins = world.dc.create_group(world.ou, f"Tier0 Admins {uuid.uuid4().hex[:6]}")
    anchored = world.dc.create_group(
        world.ou,
        f"ours{uuid.uuid4().hex[:6]}",
        attributes={"adminDescription": f"Group_{uuid.uuid4()}"},
    )
    before = ou_dacl(world)
    code, _ = grant(world, account, monkeypatch)
    assert code == 2
    refused = capsys.readouterr().err
    assert admins in refused and "no Group_<objectId> anchor" in refused
    assert anchored not in refused
    assert ou_dacl(world) == before

    conn = world.dc.connection()
    try:
        conn.delete(admins)
        assert conn.modify(anchored, {"adminCount": [(MODIFY_REPLACE, ["1"])]}), conn.result
    finally:
        conn.unbind()
    code, _ = grant(world, account, monkeypatch)
    assert code == 2
    assert f"{anchored} (adminCount=1)" in capsys.readouterr().err
    assert ou_dacl(world) == before

    code, _ = run_permissions(world.dc, world.ou, account.dn, monkeypatch, "--apply", "--force")
    assert code == 0
    assert ou_dacl(world) != before


# -- finding 3: ownership, and what the account can never do -------------------------


def test_groups_the_account_creates_carry_owner_rights_read_only(
    world: World, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On main the delegation had no OWNER RIGHTS ACE: the account, owner of the
    groups it creates, held WRITE_DAC on them by ownership alone."""
    code, _ = grant(world, account, monkeypatch)
    assert code == 0
    gid = world.add_group(1, "Sales", ["user0"])
    directory = as_account(world, account)
    try:
        assert apply_as(world, directory) == {"add": 1}
    finally:
        directory.close()
    entry = world.ad_entry(gid)
    assert entry is not None
    sd = full_sd(world.dc, entry["dn"])
    account_sid = object_sid(world.dc, account.dn)
    assert sd.owner == sid_to_bytes(account_sid)  # the creator owns it, as in AD
    inherited = [raw for raw in sd.dacl or [] if sid_to_bytes(OWNER_RIGHTS) in raw]
    assert len(inherited) == 1
    raw = inherited[0]
    assert raw[1] & 0x10  # INHERITED_ACE, from the OU's ACE
    assert int.from_bytes(raw[4:8], "little") == Right.READ_CONTROL  # nothing else
    assert owner_rights_ace().to_bytes() in ou_dacl(world)


def test_the_account_writes_no_dacl_and_no_membership_outside_the_ou(
    world: World, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _ = grant(world, account, monkeypatch)
    assert code == 0
    base = world.dc.base_dn
    outside_ou = world.dc.create_ou("Outside", world.users_ou.split(",", 1)[1])
    plain = world.dc.create_group(outside_ou, f"plain{uuid.uuid4().hex[:8]}")
    inside = world.dc.create_group(  # created by an admin: not the account's own
        world.ou,
        f"adm{uuid.uuid4().hex[:8]}",
        attributes={"adminDescription": f"Group_{uuid.uuid4()}"},
    )
    other = create_account(world.dc, world.users_ou, prefix="usr")
    privileged = [
        f"CN=Domain Admins,CN=Users,{base}",
        f"CN=Enterprise Admins,CN=Users,{base}",
        f"CN=Administrators,CN=Builtin,{base}",
        f"CN=Schema Admins,CN=Users,{base}",
        f"CN=Account Operators,CN=Builtin,{base}",
        plain,
    ]
    results: dict[str, int] = {}
    for group in privileged:
        for who in (account.dn, other.dn):
            name = f"add {'itself' if who == account.dn else 'another user'} to {group}"
            results[name] = raw_result(
                world,
                account,
                lambda c, g=group, w=who: c.modify(g, {"member": [(MODIFY_ADD, [w])]}),
            )
    for dn in (world.ou, base, plain, inside, f"CN=Domain Admins,CN=Users,{base}"):
        widened = widened_dacl(world.dc, dn)
        results[f"write the DACL of {dn}"] = raw_result(
            world,
            account,
            lambda c, d=dn, sd=widened: c.modify(
                d,
                {"nTSecurityDescriptor": [(MODIFY_REPLACE, [sd])]},
                controls=security_descriptor_control(sdflags=0x4),
            ),
        )
    assert results == {name: INSUFFICIENT_ACCESS for name in results}, {
        name: code for name, code in results.items() if code != INSUFFICIENT_ACCESS
    }
    for group in privileged:
        assert world.member_sids(group).isdisjoint(
            {object_sid(world.dc, account.dn), object_sid(world.dc, other.dn)}
        )


def test_on_samba_the_owner_still_writes_the_dacl_of_a_group_it_created(
    world: World, account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Samba does, asserted as such: Samba 4.17 does not evaluate OWNER RIGHTS
    ACEs and grants an owner WRITE_DAC before reading the DACL, so the account can
    still widen the DACL of a group it created (Windows refuses: "AD DS: Owner
    Rights"). On Samba only an administrator taking ownership of those groups
    closes this; docs/security.md says so. If this starts failing, Samba honours
    OWNER RIGHTS now: make it assert the refusal and update the docs."""
    code, _ = grant(world, account, monkeypatch)
    assert code == 0
    gid = world.add_group(1, "Owned", ["user0"])
    directory = as_account(world, account)
    try:
        assert apply_as(world, directory) == {"add": 1}
    finally:
        directory.close()
    entry = world.ad_entry(gid)
    assert entry is not None
    widened = widened_dacl(world.dc, entry["dn"])
    result = raw_result(
        world,
        account,
        lambda c: c.modify(
            entry["dn"],
            {"nTSecurityDescriptor": [(MODIFY_REPLACE, [widened])]},
            controls=security_descriptor_control(sdflags=0x4),
        ),
    )
    assert result == SUCCESS  # Samba; Windows Server 2008+ answers insufficientAccessRights

    # Once an administrator owns the group, the account's rights there are only the
    # delegation's, and Samba refuses the same write.
    conn = world.dc.connection()
    try:
        admins = sid_to_bytes(f"{world.dc.domain_sid()}-512")
        blob = full_sd(world.dc, entry["dn"])
        blob.owner = admins
        assert conn.modify(
            entry["dn"],
            {"nTSecurityDescriptor": [(MODIFY_REPLACE, [blob.to_bytes()])]},
            controls=security_descriptor_control(sdflags=0x1),
        ), conn.result
    finally:
        conn.unbind()
    again = widened_dacl(world.dc, entry["dn"])
    result = raw_result(
        world,
        account,
        lambda c: c.modify(
            entry["dn"],
            {"nTSecurityDescriptor": [(MODIFY_REPLACE, [again])]},
            controls=security_descriptor_control(sdflags=0x4),
        ),
    )
    assert result == INSUFFICIENT_ACCESS


def raw_conn_result(dc: SambaDC, account: Account, send: Callable[..., object]) -> int:
    conn = dc.connection(user=account.dn, password=account.password, raise_exceptions=False)
    try:
        send(conn)
        return int(conn.result["result"])
    finally:
        conn.unbind()


def full_sd(dc: SambaDC, dn: str) -> SecurityDescriptor:
    conn = dc.connection()
    try:
        conn.search(
            dn,
            "(objectClass=*)",
            BASE,
            attributes=["nTSecurityDescriptor"],
            controls=security_descriptor_control(sdflags=0x5),
        )
        return parse_security_descriptor(
            conn.response[0]["raw_attributes"]["nTSecurityDescriptor"][0]
        )
    finally:
        conn.unbind()
