"""The least-privilege delegation the service account needs on the target OU.

Pure: the ACEs, their SDDL, the same grant as ``dsacls`` and PowerShell commands
for an administrator to run, and the binary security-descriptor form that
``adapters/acl.py`` writes over LDAP. No I/O, so each rule is unit-tested alone.

The grant is what Entra Connect's ``Set-ADSyncUnifiedGroupWritebackPermissions``
gives, narrowed: create and delete *group* children on the OU and every OU
below it, and read, write and delete the group objects there. Unlike Connect's
grant it has no Delete Tree and nothing on other object classes, and never
WRITE_DAC or WRITE_OWNER.

Ownership. The account owns every group it creates, and an owner holds
READ_CONTROL and WRITE_DAC implicitly, whatever the DACL says: it could grant
anyone write on those groups. A third ACE, inherited by group objects, gives
the OWNER RIGHTS principal (S-1-3-4) READ_CONTROL only; from Windows Server
2008 on, AD then grants an owner what OWNER RIGHTS ACEs say instead of the
implicit rights ("AD DS: Owner Rights"), so the account cannot change the DACL
of a group it created. Setting the owner to an admin group at creation is not
open to it: MS-ADTS (6.1.3) lets the OWNER field name only the requester, a
group it holds with SE_GROUP_OWNER (the administrators group, for admins) or
anyone with SeRestorePrivilege, so that would need an admin account. What
still holds on Windows: MS-ADTS lets an add carry any security descriptor, so
an account that may create groups can create one with a protected DACL of its
choosing (writeback itself never sends one, and the agent refuses it); and
Samba (4.17 here) does not honour OWNER RIGHTS at all, so there the account
keeps WRITE_DAC on the groups it created. docs/security.md has the details.
"""

from __future__ import annotations

import re
import struct
import uuid
from dataclasses import dataclass, field
from enum import IntFlag

#: schemaIDGUID of the ``group`` class (the same in every AD forest).
GROUP_CLASS = uuid.UUID("bf967a9c-0de6-11d0-a285-00aa003049e2")
#: The well-known OWNER RIGHTS principal: ACEs for it replace an owner's implicit rights.
OWNER_RIGHTS = "S-1-3-4"
ACCESS_ALLOWED_OBJECT, ACCESS_DENIED_OBJECT = 0x05, 0x06
ACL_REVISION_DS = 4
_OBJECT_TYPE_PRESENT, _INHERITED_OBJECT_TYPE_PRESENT = 0x1, 0x2
_SE_DACL_PRESENT, _SE_SELF_RELATIVE = 0x0004, 0x8000
_SID_PATTERN = re.compile(r"S-1-(\d+)((?:-\d+){1,15})", re.IGNORECASE)


class Right(IntFlag):
    """Directory-service access rights (MS-ADTS 5.1.3.2)."""

    CREATE_CHILD = 0x1
    DELETE_CHILD = 0x2
    LIST_CHILDREN = 0x4
    SELF_WRITE = 0x8
    READ_PROPERTY = 0x10
    WRITE_PROPERTY = 0x20
    DELETE_TREE = 0x40
    LIST_OBJECT = 0x80
    CONTROL_ACCESS = 0x100
    DELETE = 0x10000
    READ_CONTROL = 0x20000
    WRITE_DAC = 0x40000
    WRITE_OWNER = 0x80000


class AceFlag(IntFlag):
    OBJECT_INHERIT = 0x1
    CONTAINER_INHERIT = 0x2
    NO_PROPAGATE = 0x4
    INHERIT_ONLY = 0x8
    INHERITED = 0x10


_SDDL_RIGHTS = {  # in the order Windows and Samba print them
    Right.READ_PROPERTY: "RP",
    Right.WRITE_PROPERTY: "WP",
    Right.CREATE_CHILD: "CC",
    Right.DELETE_CHILD: "DC",
    Right.LIST_CHILDREN: "LC",
    Right.SELF_WRITE: "SW",
    Right.LIST_OBJECT: "LO",
    Right.DELETE_TREE: "DT",
    Right.CONTROL_ACCESS: "CR",
    Right.DELETE: "SD",
    Right.READ_CONTROL: "RC",
    Right.WRITE_DAC: "WD",
    Right.WRITE_OWNER: "WO",
}
_SDDL_FLAGS = {
    AceFlag.OBJECT_INHERIT: "OI",
    AceFlag.CONTAINER_INHERIT: "CI",
    AceFlag.NO_PROPAGATE: "NP",
    AceFlag.INHERIT_ONLY: "IO",
    AceFlag.INHERITED: "ID",
}
#: The same rights as .NET ActiveDirectoryRights names, for the PowerShell form.
_DOTNET_RIGHTS = {
    Right.CREATE_CHILD: "CreateChild",
    Right.DELETE_CHILD: "DeleteChild",
    Right.LIST_CHILDREN: "ListChildren",
    Right.READ_PROPERTY: "ReadProperty",
    Right.WRITE_PROPERTY: "WriteProperty",
    Right.LIST_OBJECT: "ListObject",
    Right.DELETE: "Delete",
    Right.READ_CONTROL: "ReadControl",
}

#: On the OU and every container below it: create and delete group objects.
CHILD_RIGHTS = Right.CREATE_CHILD | Right.DELETE_CHILD
#: Inherited by every group object below the OU: read, write every property
#: (rename included), delete. The ``List`` rights let it see the objects under
#: List Object mode. No DELETE_TREE, WRITE_DAC, WRITE_OWNER or extended rights.
GROUP_RIGHTS = (
    Right.READ_PROPERTY
    | Right.WRITE_PROPERTY
    | Right.DELETE
    | Right.LIST_CHILDREN
    | Right.LIST_OBJECT
)
#: What the owner of a group below the OU keeps: reading the security descriptor.
OWNER_GROUP_RIGHTS = Right.READ_CONTROL


@dataclass(frozen=True)
class Ace:
    """One access-allowed (or -denied) object ACE, the only kinds used here."""

    sid: str
    rights: Right
    flags: AceFlag
    object_type: uuid.UUID | None = None
    inherited_object_type: uuid.UUID | None = None
    allow: bool = True

    def sddl(self) -> str:
        rights = "".join(code for bit, code in _SDDL_RIGHTS.items() if bit in self.rights)
        flags = "".join(code for bit, code in _SDDL_FLAGS.items() if bit in self.flags)
        obj = str(self.object_type) if self.object_type else ""
        inherited = str(self.inherited_object_type) if self.inherited_object_type else ""
        kind = "OA" if self.allow else "OD"
        return f"({kind};{flags};{rights};{obj};{inherited};{self.sid})"

    def to_bytes(self) -> bytes:
        """The ACE as MS-DTYP 2.4.4.3/2.4.4.4 ACCESS_{ALLOWED,DENIED}_OBJECT_ACE."""
        present = (_OBJECT_TYPE_PRESENT if self.object_type else 0) | (
            _INHERITED_OBJECT_TYPE_PRESENT if self.inherited_object_type else 0
        )
        body = struct.pack("<II", int(self.rights), present)
        body += self.object_type.bytes_le if self.object_type else b""
        body += self.inherited_object_type.bytes_le if self.inherited_object_type else b""
        body += sid_to_bytes(self.sid)
        kind = ACCESS_ALLOWED_OBJECT if self.allow else ACCESS_DENIED_OBJECT
        return struct.pack("<BBH", kind, int(self.flags), 4 + len(body)) + body


def delegation(sid: str) -> tuple[Ace, Ace, Ace]:
    """The ACEs for the service account with objectSid ``sid``: its two grants, and
    the OWNER RIGHTS ACE that takes WRITE_DAC from the owner of every group below."""
    sid_to_bytes(sid)  # reject a malformed SID before anything is built from it
    return (
        Ace(sid, CHILD_RIGHTS, AceFlag.CONTAINER_INHERIT, object_type=GROUP_CLASS),
        Ace(
            sid,
            GROUP_RIGHTS,
            AceFlag.CONTAINER_INHERIT | AceFlag.INHERIT_ONLY,
            inherited_object_type=GROUP_CLASS,
        ),
        owner_rights_ace(),
    )


def owner_rights_ace() -> Ace:
    """OWNER RIGHTS: READ_CONTROL, inherited by group objects only.

    Shared by every account delegated on the OU, and it only ever takes rights
    away (from owners), so a revoke leaves it in place.
    """
    return Ace(
        OWNER_RIGHTS,
        OWNER_GROUP_RIGHTS,
        AceFlag.CONTAINER_INHERIT | AceFlag.INHERIT_ONLY,
        inherited_object_type=GROUP_CLASS,
    )


def deletion_guard(sid: str) -> tuple[Ace, Ace]:
    """Deny ACEs that stop ``sid`` from deleting group objects in the OU.

    For Entra Connect's AD DS connector account during a migration: when its
    group writeback is turned off, Connect exports a delete for every group it
    wrote; with these in place the DC refuses them. AD lets a delete through with
    DELETE on the object *or* DELETE_CHILD on its parent, so both are denied
    (explicit denies come first in the DACL, so they beat inherited allows).
    """
    sid_to_bytes(sid)
    return (
        Ace(
            sid,
            Right.DELETE_CHILD,
            AceFlag.CONTAINER_INHERIT,
            object_type=GROUP_CLASS,
            allow=False,
        ),
        Ace(
            sid,
            Right.DELETE | Right.DELETE_TREE,
            AceFlag.CONTAINER_INHERIT | AceFlag.INHERIT_ONLY,
            inherited_object_type=GROUP_CLASS,
            allow=False,
        ),
    )


def sid_to_bytes(sid: str) -> bytes:
    """The binary form (MS-DTYP 2.4.2.2) of an ``S-1-...`` string."""
    match = _SID_PATTERN.fullmatch(sid.strip())
    if not match:
        raise ValueError(f"not a SID: {sid!r}")
    subs = [int(part) for part in match.group(2).split("-")[1:]]
    if int(match.group(1)) >= 2**48 or any(sub >= 2**32 for sub in subs):
        raise ValueError(f"SID component out of range: {sid!r}")
    authority = int(match.group(1)).to_bytes(6, "big")
    return bytes([1, len(subs)]) + authority + struct.pack(f"<{len(subs)}I", *subs)


# -- the commands an administrator can run instead of --apply ------------------------

_PLACEHOLDER_SID = "S-1-0-0"  # the null SID: only the shape of the ACEs matters here
_DSACLS_RIGHTS = {**_SDDL_RIGHTS, Right.CONTROL_ACCESS: "CA", Right.SELF_WRITE: "WS"}


#: Characters PowerShell takes as a single quote (it accepts the typographic ones too).
_PS_SINGLE_QUOTES = "'\u2018\u2019\u201a\u201b"


class UnsafeName(ValueError):
    """A DN that cannot be put into the printed commands safely; the message says why."""


def check_printable(what: str, dn: str) -> None:
    """Refuse a DN with control characters: a newline in it would start a new command
    line in the script an administrator pastes (and AD names never need one)."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F or ch in "\u2028\u2029\x85" for ch in dn):
        raise UnsafeName(f"{what} {dn!r} holds a control character or line break")


def ps_quote(text: str) -> str:
    """``text`` as a PowerShell single-quoted literal: nothing in it is expanded
    (``$()``, backticks and ``"`` are plain characters there); every character
    PowerShell reads as a single quote is doubled."""
    check_printable("text", text)
    return "'" + "".join(ch * 2 if ch in _PS_SINGLE_QUOTES else ch for ch in text) + "'"


def _inherit_only(ace: Ace) -> bool:
    return AceFlag.INHERIT_ONLY in ace.flags


def dsacls_commands(target_ou: str, account_dn: str, aces: tuple[Ace, ...]) -> list[str]:
    """``aces`` as dsacls commands, run from PowerShell (the account is resolved
    to DOMAIN\\name first, since dsacls does not take a DN).

    Every name is a PowerShell single-quoted literal, so ``$(...)``, backticks
    and ``"`` in an OU name expand to nothing. A ``"`` is refused all the same:
    Windows PowerShell 5.1 passes it to a native program unescaped, which would
    split the argument (dsacls would read the rest as options); the PowerShell
    commands take such a name intact.
    """
    check_printable("the OU", target_ou)
    check_printable("the account", account_dn)
    if '"' in target_ou:
        raise UnsafeName(
            f"the OU {target_ou!r} holds a double quote, which Windows PowerShell "
            "does not pass to dsacls intact"
        )
    ou = ps_quote(target_ou)
    lines = [
        f"$account = (Get-ADObject -Identity {ps_quote(account_dn)} "
        "-Properties 'msDS-PrincipalName').'msDS-PrincipalName'"
    ]
    for ace in aces:
        rights = "".join(code for bit, code in _DSACLS_RIGHTS.items() if bit in ace.rights)
        scope = "/I:S" if _inherit_only(ace) else "/I:T"
        verb = "/G" if ace.allow else "/D"
        target = ";;group" if ace.inherited_object_type else ";group"
        trustee = "OWNER RIGHTS" if ace.sid == OWNER_RIGHTS else "${account}"
        lines.append(f'dsacls {ou} {scope} {verb} "{trustee}:{rights}{target}"')
    return lines


def powershell_commands(
    target_ou: str, account_dn: str, aces: tuple[Ace, ...], *, remove: bool = False
) -> list[str]:
    """``aces`` with the ActiveDirectory module and .NET access rules.

    Names are single-quoted literals (see :func:`ps_quote`), and the OU's path is
    given as ``-LiteralPath``, so ``[``, ``]``, ``*`` and ``?`` in it are not
    wildcards that could match another object.
    """
    check_printable("the account", account_dn)
    method = "RemoveAccessRuleSpecific" if remove else "AddAccessRule"
    lines = [
        "Import-Module ActiveDirectory",
        f"$sid = (Get-ADObject -Identity {ps_quote(account_dn)} -Properties objectSid).objectSid",
        f"$group = [Guid]'{GROUP_CLASS}'",
        f"$path = 'AD:\\' + {ps_quote(target_ou)}",
        "$acl = Get-Acl -LiteralPath $path",
    ]
    if any(ace.sid == OWNER_RIGHTS for ace in aces):
        lines.insert(
            3,
            f"$ownerRights = New-Object System.Security.Principal.SecurityIdentifier "
            f"'{OWNER_RIGHTS}'",
        )
    for ace in aces:
        kind = "'Allow'" if ace.allow else "'Deny'"
        shape = "'Descendents', $group" if _inherit_only(ace) else "$group, 'All'"
        trustee = "$ownerRights" if ace.sid == OWNER_RIGHTS else "$sid"
        lines.append(
            f"$acl.{method}((New-Object System.DirectoryServices.ActiveDirectoryAccessRule "
            f"{trustee}, '{_dotnet(ace.rights)}', {kind}, {shape}))"
        )
    return [*lines, "Set-Acl -LiteralPath $path -AclObject $acl"]


def _dotnet(rights: Right) -> str:
    return ", ".join(name for bit, name in _DOTNET_RIGHTS.items() if bit in rights)


def revocable(aces: tuple[Ace, ...]) -> tuple[Ace, ...]:
    """What a revoke removes: the account's own ACEs, not the shared OWNER RIGHTS one."""
    return tuple(ace for ace in aces if ace.sid != OWNER_RIGHTS)


def describe(
    target_ou: str,
    account_dn: str,
    sid: str | None,
    *,
    guard: bool = False,
    revoke: bool = False,
) -> list[str]:
    """The whole explanation the ``permissions`` command prints.

    :class:`UnsafeName` for a DN that cannot be printed safely (control
    characters); a double quote in the OU only leaves out the dsacls lines.
    """
    check_printable("the OU", target_ou)
    check_printable("the account", account_dn)
    aces: tuple[Ace, ...] = (deletion_guard if guard else delegation)(sid or _PLACEHOLDER_SID)
    if revoke:
        aces = revocable(aces)
    sddl = [ace.sddl().replace(_PLACEHOLDER_SID, "<objectSid of the account>") for ace in aces]
    what = (
        ["# deny deleting group objects (Entra Connect's AD DS connector account, migration)"]
        if guard
        else [
            "# create, delete, read and write group objects; nothing on other classes;",
            "# no WRITE_DAC or WRITE_OWNER anywhere, and the owner of a group below the OU",
            "# (the account, for the groups it creates) keeps only READ_CONTROL on it where",
            "# the DC honours OWNER RIGHTS (Windows Server 2008 and later; not Samba)",
        ]
    )
    try:
        shell = (
            [
                f"dsacls {ps_quote(target_ou)} /R <DOMAIN\\name>"
                "  # caution: removes ALL its ACEs there"
            ]
            if revoke
            else dsacls_commands(target_ou, account_dn, aces)
        )
    except UnsafeName as unsafe:
        shell = [f"# (no dsacls lines: {unsafe}; use the PowerShell commands)"]
    if '"' in target_ou and revoke:
        shell = ["# (no dsacls line: the OU's DN holds a double quote; use PowerShell)"]
    return [
        f"# {'Revoke' if revoke else 'Grant'} for {account_dn}",
        f"# on {target_ou} and everything below it:",
        *what,
        "",
        f"# ACEs {'removed from' if revoke else 'added to'} the OU's DACL (SDDL):",
        *(f"#   {line}" for line in sddl),
        "",
        "# dsacls (RSAT), from PowerShell (not cmd.exe):",
        *shell,
        "",
        "# or PowerShell with the ActiveDirectory module:",
        *powershell_commands(target_ou, account_dn, aces, remove=revoke),
    ]


# -- self-relative security descriptors (MS-DTYP 2.4.6) ------------------------------


@dataclass
class SecurityDescriptor:
    """A security descriptor as read from ``nTSecurityDescriptor``.

    Only the DACL is taken apart (into raw ACEs, kept byte for byte); owner,
    group and SACL are carried through untouched, so ACE types this module does
    not know survive a read-modify-write unchanged.
    """

    control: int
    owner: bytes | None = None
    group: bytes | None = None
    sacl: bytes | None = None
    dacl: list[bytes] | None = field(default_factory=list)
    dacl_revision: int = ACL_REVISION_DS

    def has(self, ace: Ace) -> bool:
        return ace.to_bytes() in (self.dacl or [])

    def granting(self, aces: tuple[Ace, ...] | list[Ace]) -> SecurityDescriptor:
        """A copy with ``aces`` added where missing, in the canonical order AD
        expects: explicit denies first, then explicit allows, then inherited ACEs."""
        current = list(self.dacl or [])
        for ace in aces:
            if self.has(ace):
                continue
            at = 0 if not ace.allow else _first_inherited(current)
            current.insert(at, ace.to_bytes())
        return self._with_dacl(current)

    def revoking(self, aces: tuple[Ace, ...] | list[Ace]) -> SecurityDescriptor:
        """A copy without exactly these ACEs (other ACEs of the account stay)."""
        gone = {ace.to_bytes() for ace in aces}
        return self._with_dacl([raw for raw in self.dacl or [] if raw not in gone])

    def _with_dacl(self, dacl: list[bytes]) -> SecurityDescriptor:
        return SecurityDescriptor(
            control=self.control | _SE_DACL_PRESENT,
            owner=self.owner,
            group=self.group,
            sacl=self.sacl,
            dacl=dacl,
            dacl_revision=ACL_REVISION_DS,
        )

    def to_bytes(self) -> bytes:
        parts: list[bytes] = []
        offsets = []
        offset = 20
        dacl = _acl_bytes(self.dacl_revision, self.dacl) if self.dacl is not None else None
        for blob in (self.owner, self.group, self.sacl, dacl):
            offsets.append(offset if blob is not None else 0)
            if blob is not None:
                parts.append(blob)
                offset += len(blob)
        control = self.control | _SE_SELF_RELATIVE
        header = struct.pack("<BBHIIII", 1, 0, control, *offsets)
        return header + b"".join(parts)


def _first_inherited(aces: list[bytes]) -> int:
    return next((i for i, raw in enumerate(aces) if raw[1] & AceFlag.INHERITED), len(aces))


def _acl_bytes(revision: int, aces: list[bytes]) -> bytes:
    body = b"".join(aces)
    return struct.pack("<BBHHH", revision, 0, 8 + len(body), len(aces), 0) + body


def parse_security_descriptor(blob: bytes) -> SecurityDescriptor:
    """Read a self-relative security descriptor; ValueError when it is malformed."""
    if len(blob) < 20 or blob[0] != 1:
        raise ValueError("not a self-relative security descriptor (revision 1)")
    _, _, control, owner, group, sacl, dacl = struct.unpack_from("<BBHIIII", blob)
    if not control & _SE_SELF_RELATIVE:
        raise ValueError("security descriptor is not self-relative")
    revision, aces = _parse_acl(blob, dacl) if dacl else (ACL_REVISION_DS, None)
    return SecurityDescriptor(
        control=control,
        owner=_sid_at(blob, owner) if owner else None,
        group=_sid_at(blob, group) if group else None,
        sacl=_acl_at(blob, sacl) if sacl else None,
        dacl=aces,
        dacl_revision=revision,
    )


def _sid_at(blob: bytes, offset: int) -> bytes:
    _check(blob, offset, 8)
    size = 8 + 4 * blob[offset + 1]
    _check(blob, offset, size)
    return blob[offset : offset + size]


def _acl_at(blob: bytes, offset: int) -> bytes:
    _check(blob, offset, 8)
    (size,) = struct.unpack_from("<H", blob, offset + 2)
    _check(blob, offset, size)
    return blob[offset : offset + size]


def _parse_acl(blob: bytes, offset: int) -> tuple[int, list[bytes]]:
    acl = _acl_at(blob, offset)
    revision, _, _, count, _ = struct.unpack_from("<BBHHH", acl)
    aces, position = [], 8
    for _ in range(count):
        _check(acl, position, 4)
        (ace_size,) = struct.unpack_from("<H", acl, position + 2)
        if ace_size < 4:
            raise ValueError("ACE size below its header")
        _check(acl, position, ace_size)
        aces.append(acl[position : position + ace_size])
        position += ace_size
    return revision, aces


def _check(blob: bytes, offset: int, size: int) -> None:
    if offset + size > len(blob):
        raise ValueError("security descriptor truncated")
