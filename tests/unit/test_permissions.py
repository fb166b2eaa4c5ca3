"""The delegation's ACEs, their SDDL and binary forms, and the printed commands.

The binary encoding is checked against Samba's own NDR code (``python3-samba``,
run with the system Python) where it is installed, so the codec is not only
checked against itself.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import pytest

from writeback.permissions import (
    GROUP_CLASS,
    OWNER_RIGHTS,
    AceFlag,
    Right,
    SecurityDescriptor,
    UnsafeName,
    delegation,
    deletion_guard,
    describe,
    dsacls_commands,
    parse_security_descriptor,
    powershell_commands,
    ps_quote,
    revocable,
    sid_to_bytes,
)

SID = "S-1-5-21-1004336348-1177238915-682003330-1108"
OTHER = "S-1-5-21-1004336348-1177238915-682003330-1109"
SYSTEM_PYTHON = "/usr/bin/python3"


def test_the_delegation_is_object_aces_on_the_group_class() -> None:
    child, groups, owner = delegation(SID)
    assert child.sddl() == f"(OA;CI;CCDC;{GROUP_CLASS};;{SID})"
    assert groups.sddl() == f"(OA;CIIO;RPWPLCLOSD;;{GROUP_CLASS};{SID})"
    assert owner.sddl() == f"(OA;CIIO;RC;;{GROUP_CLASS};{OWNER_RIGHTS})"


def test_no_ace_grants_dacl_or_owner_rights_and_owners_keep_only_read_control() -> None:
    """Finding 3 of issue 12: on main the delegation had no OWNER RIGHTS ACE, so the
    account, owner of every group it creates, kept WRITE_DAC on them."""
    dangerous = Right.WRITE_DAC | Right.WRITE_OWNER | Right.CONTROL_ACCESS | Right.DELETE_TREE
    for ace in delegation(SID):
        assert not ace.rights & dangerous
        assert ace.flags & AceFlag.CONTAINER_INHERIT  # descendants of the OU too
    owners = [ace for ace in delegation(SID) if ace.sid == OWNER_RIGHTS]
    assert len(owners) == 1
    assert owners[0].rights == Right.READ_CONTROL and owners[0].allow
    assert owners[0].inherited_object_type == GROUP_CLASS  # on group objects only
    assert AceFlag.INHERIT_ONLY in owners[0].flags  # not on the OU itself


def test_a_revoke_leaves_the_shared_owner_rights_ace() -> None:
    assert [ace.sid for ace in revocable(delegation(SID))] == [SID, SID]
    revoke = "\n".join(describe("OU=G,DC=x", "CN=s,DC=x", SID, revoke=True))
    assert OWNER_RIGHTS not in revoke and "RemoveAccessRuleSpecific" in revoke


def test_sid_to_bytes_matches_the_wire_form() -> None:
    raw = sid_to_bytes("S-1-5-32-544")
    assert raw == bytes([1, 2, 0, 0, 0, 0, 0, 5, 32, 0, 0, 0, 0x20, 2, 0, 0])


@pytest.mark.parametrize("bad", ["", "S-1", "S-1-5", "X-1-5-21", "S-1-5-4294967296", "S-1-5-21-x"])
def test_malformed_sids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        sid_to_bytes(bad)


def descriptor(*aces: bytes, inherited: bytes | None = None) -> bytes:
    dacl = [*aces, *([inherited] if inherited else [])]
    owner = sid_to_bytes("S-1-5-32-544")
    return SecurityDescriptor(control=0x8C14, owner=owner, dacl=dacl).to_bytes()


def inherited_ace() -> bytes:
    ace = bytearray(delegation(OTHER)[0].to_bytes())
    ace[1] |= AceFlag.INHERITED
    return bytes(ace)


def test_a_descriptor_round_trips_byte_for_byte() -> None:
    blob = descriptor(delegation(OTHER)[1].to_bytes(), inherited=inherited_ace())
    assert parse_security_descriptor(blob).to_bytes() == blob


def test_granting_goes_after_explicit_and_before_inherited_aces_once() -> None:
    explicit = delegation(OTHER)[1].to_bytes()
    sd = parse_security_descriptor(descriptor(explicit, inherited=inherited_ace()))
    aces = delegation(SID)
    granted = sd.granting(aces)
    assert granted.dacl == [explicit, *(a.to_bytes() for a in aces), inherited_ace()]
    assert granted.granting(aces).dacl == granted.dacl
    assert parse_security_descriptor(granted.to_bytes()).dacl == granted.dacl


@pytest.mark.parametrize("cut", [3, 19, 30, -1])
def test_truncated_descriptors_are_refused(cut: int) -> None:
    blob = descriptor(delegation(SID)[0].to_bytes())
    with pytest.raises(ValueError):
        parse_security_descriptor(blob[:cut])


def test_dsacls_and_powershell_name_the_ou_and_resolve_the_account() -> None:
    ou = "OU=M365 Groups,DC=corp,DC=example"
    account = "CN=svc-writeback,OU=Service Accounts,DC=corp,DC=example"
    dsacls = dsacls_commands(ou, account, delegation("S-1-0-0"))
    assert f"'{account}'" in dsacls[0] and "msDS-PrincipalName" in dsacls[0]
    assert dsacls[1:] == [
        f"dsacls '{ou}' /I:T /G \"${{account}}:CCDC;group\"",
        f"dsacls '{ou}' /I:S /G \"${{account}}:RPWPLCLOSD;;group\"",
        f"dsacls '{ou}' /I:S /G \"OWNER RIGHTS:RC;;group\"",
    ]
    script = "\n".join(powershell_commands(ou, account, delegation("S-1-0-0")))
    assert "'CreateChild, DeleteChild', 'Allow', $group, 'All'" in script
    assert "'Allow', 'Descendents', $group" in script
    assert "$ownerRights, 'ReadControl', 'Allow', 'Descendents', $group" in script
    assert "SecurityIdentifier 'S-1-3-4'" in script
    assert "GenericAll" not in script and "WriteDacl" not in script
    assert "Get-Acl -LiteralPath $path" in script and "Set-Acl -LiteralPath $path" in script


def test_the_deletion_guard_denies_both_ways_a_delete_is_allowed() -> None:
    child, groups = deletion_guard(SID)
    assert child.sddl() == f"(OD;CI;DC;{GROUP_CLASS};;{SID})"
    assert groups.sddl() == f"(OD;CIIO;DTSD;;{GROUP_CLASS};{SID})"
    dsacls = dsacls_commands("OU=G,DC=x", "CN=msol,DC=x", deletion_guard(SID))
    assert dsacls[1:] == [
        "dsacls 'OU=G,DC=x' /I:T /D \"${account}:DC;group\"",
        "dsacls 'OU=G,DC=x' /I:S /D \"${account}:DTSD;;group\"",
    ]
    script = "\n".join(powershell_commands("OU=G,DC=x", "CN=msol,DC=x", deletion_guard(SID)))
    assert script.count("'Deny'") == 2 and "'Allow'" not in script


def test_denies_go_first_and_revoking_removes_exactly_those_aces() -> None:
    explicit = delegation(OTHER)[1].to_bytes()
    sd = parse_security_descriptor(descriptor(explicit, inherited=inherited_ace()))
    guarded = sd.granting(deletion_guard(SID)).granting(delegation(SID))
    assert guarded.dacl is not None
    assert {guarded.dacl[0], guarded.dacl[1]} == {a.to_bytes() for a in deletion_guard(SID)}
    assert guarded.dacl[-1] == inherited_ace()
    back = guarded.revoking(deletion_guard(SID)).revoking(delegation(SID))
    assert back.dacl == sd.dacl


def test_powershell_quotes_a_hostile_dn() -> None:
    script = "\n".join(powershell_commands("OU=O'Brien,DC=x", "CN=a'b,DC=x", delegation(SID)))
    assert "'CN=a''b,DC=x'" in script and "'OU=O''Brien,DC=x'" in script


# -- hostile names in the printed commands (issue 12, item 8) -----------------------

PS_QUOTES = "'\u2018\u2019\u201a\u201b"
HOSTILE = [
    "OU=$(Add-ADGroupMember 'Domain Admins' evil),DC=corp,DC=example",
    "OU=`$(calc)`,DC=corp,DC=example",
    "OU=a'; Remove-ADObject 'CN=x' -Confirm:$false; 'b,DC=corp,DC=example",
    "OU=\u2019; calc; \u2018,DC=corp,DC=example",  # typographic quotes end PS strings too
    "OU=${env:PATH} @(1) [x]*?,DC=corp,DC=example",
    "OU=%PATH% ^& calc,DC=corp,DC=example",
]


def ps_tokens(line: str) -> tuple[list[str], str]:
    """PowerShell's reading of ``line``, simplified to what matters here: the values
    of its single-quoted literals, and the text outside them (which PowerShell
    parses and expands). Any of the four single-quote characters opens and closes
    a literal; two of them in a row inside one are one literal quote."""
    literals: list[str] = []
    outside: list[str] = []
    i = 0
    while i < len(line):
        if line[i] in PS_QUOTES:
            value, i = [], i + 1
            while True:
                assert i < len(line), f"unterminated literal in {line!r}"
                if line[i] in PS_QUOTES:
                    if i + 1 < len(line) and line[i + 1] in PS_QUOTES:
                        value.append(line[i])
                        i += 2
                        continue
                    i += 1
                    break
                value.append(line[i])
                i += 1
            literals.append("".join(value))
        else:
            outside.append(line[i])
            i += 1
    return literals, "".join(outside)


@pytest.mark.parametrize("ou", HOSTILE)
def test_a_hostile_ou_name_stays_one_literal_in_every_command(ou: str) -> None:
    account = "CN=svc $(whoami) `n \u2018x,OU=Service Accounts,DC=corp,DC=example"
    lines = [
        *dsacls_commands(ou, account, delegation(SID)),
        *powershell_commands(ou, account, delegation(SID)),
        *powershell_commands(ou, account, delegation(SID), remove=True),
    ]
    for line in lines:
        literals, outside = ps_tokens(line)
        assert "$(" not in outside and "`" not in outside and "%" not in outside, line
        assert not {"Add-ADGroupMember", "Remove-ADObject", "calc", "whoami"} & set(
            outside.replace(";", " ").split()
        ), line
        names = [value for value in literals if value.startswith(("OU=", "CN="))]
        assert all(value in (ou, account) for value in names), (line, names)
    assert ps_tokens(f"$x = {ps_quote(ou)}")[0] == [ou]


def test_a_double_quote_leaves_out_dsacls_and_control_characters_are_refused() -> None:
    quoted = 'OU=a" /G Everyone:GA "b,DC=corp,DC=example'
    with pytest.raises(UnsafeName, match="double quote"):
        dsacls_commands(quoted, "CN=s,DC=x", delegation(SID))
    text = describe(quoted, "CN=s,DC=x", SID)
    assert not [line for line in text if line.startswith("dsacls")]
    assert any("no dsacls lines" in line for line in text)
    paths = [ps_tokens(line)[0] for line in text if line.startswith("$path")]
    assert paths == [["AD:\\", quoted]]
    for bad in ("OU=a\nRemove-ADObject x,DC=x", "OU=a\rb,DC=x", "OU=a\u2028b,DC=x"):
        with pytest.raises(UnsafeName, match="control character"):
            describe(bad, "CN=s,DC=x", SID)
        with pytest.raises(UnsafeName, match="control character"):
            describe("OU=G,DC=x", bad.replace("OU=", "CN="), SID)


def test_describe_shows_the_real_sid_only_when_known() -> None:
    assert SID in "\n".join(describe("OU=G,DC=x", "CN=s,DC=x", SID))
    offline = "\n".join(describe("OU=G,DC=x", "CN=s,DC=x", None))
    assert "<objectSid of the account>" in offline and "S-1-0-0" not in offline


SAMBA_SDDL = """
import base64, json, sys
from samba.dcerpc import security
from samba.ndr import ndr_unpack
blobs = json.load(sys.stdin)
domain = security.dom_sid("S-1-5-21-1004336348-1177238915-682003330")
print(json.dumps([ndr_unpack(security.descriptor, base64.b64decode(b)).as_sddl(domain)
                  for b in blobs]))
"""


def samba_sddl(blobs: list[bytes]) -> list[str]:
    if shutil.which(SYSTEM_PYTHON) is None:
        pytest.skip("no system Python")
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", SAMBA_SDDL],
        input=json.dumps([base64.b64encode(b).decode() for b in blobs]),
        capture_output=True,
        text=True,
        check=False,
    )
    if "No module named 'samba'" in done.stderr:
        pytest.skip("python3-samba is not installed")
    assert done.returncode == 0, done.stderr
    result: list[str] = json.loads(done.stdout)
    return result


def test_samba_reads_our_binary_form_as_our_sddl() -> None:
    aces = delegation(SID)
    blob = SecurityDescriptor(control=0x8004, dacl=[a.to_bytes() for a in aces]).to_bytes()
    (sddl,) = samba_sddl([blob])
    # Samba prints SIDs of the domain it is given by their RID, and OWNER RIGHTS
    # by its alias (OW): compare the ACE parts.
    assert (
        sddl.upper()
        .replace("S-1-5-21-1004336348-1177238915-682003330-1108", SID)
        .replace(";OW)", f";{OWNER_RIGHTS})")
        == ("D:" + "".join(a.sddl() for a in aces)).upper()
    )
