"""Names AD will hold for a cloud group: CN, DN and sAMAccountName.

Display names are untrusted text typed by any group owner, so everything that
goes into a DN or a search filter is escaped here (RFC 4514 for DN values,
RFC 4515 for filter values) and nowhere else.
"""

from __future__ import annotations

import functools
from enum import StrEnum

from writeback.domain.model import ANCHOR_PREFIX

#: AD's rangeUpper for cn; longer CNs are refused by the DC.
MAX_CN = 64
#: sAMAccountName for groups: at most 20 characters (pre-Windows 2000 name).
MAX_SAM = 20
_SUFFIX_LEN = 12


class DnFormat(StrEnum):
    OBJECT_ID = "objectid"
    DISPLAY_NAME = "displayname"
    #: Entra Cloud Sync's CN: ``Left(Trim(displayName),51)+"_"+Mid(objectId,25,12)``,
    #: so groups Cloud Sync wrote are adopted without a rename.
    CLOUD_SYNC = "cloudsync"


#: Characters of the display name Cloud Sync's CN expression keeps.
_CLOUD_SYNC_NAME = 51


def cn_for(group_id: str, display_name: str, dn_format: DnFormat) -> str:
    """The unescaped CN, as Entra Connect group writeback V1 names it.

    Display-name format: ``<displayName>_<last 12 of objectId>``, the name
    trimmed and cut so the CN stays within 64 characters; the suffix keeps it
    unique and stable across renames to the same text.
    """
    if dn_format is DnFormat.OBJECT_ID:
        return f"{ANCHOR_PREFIX}{group_id}"
    suffix = "_" + group_id[-_SUFFIX_LEN:]
    if dn_format is DnFormat.CLOUD_SYNC:
        # Trim, then Left(51): no folding of inner whitespace, no second trim.
        cut = display_name.strip()[:_CLOUD_SYNC_NAME]
        name = "".join(ch if ch.isprintable() else " " for ch in cut)
        return (name if name.strip() else "Group") + suffix
    name = _clean(display_name)[: MAX_CN - len(suffix)].strip() or "Group"
    return name + suffix


def _clean(text: str) -> str:
    """Drop characters AD cannot hold in a CN (controls, NUL) and fold whitespace runs."""
    printable = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(printable.split())


def escape_dn_value(value: str) -> str:
    r"""Escape an attribute value for use in a DN (RFC 4514 section 2.4).

    ``, + " \ < > ; =`` are backslash-escaped anywhere, a leading ``#`` or space
    and a trailing space too; NUL becomes ``\00``.
    """
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=':
            out.append("\\" + ch)
        elif ch == "\x00":
            out.append("\\00")
        elif (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def rdn_for(cn: str) -> str:
    return "CN=" + escape_dn_value(cn)


def dn_for(cn: str, parent_dn: str) -> str:
    return f"{rdn_for(cn)},{parent_dn}"


def escape_filter_value(value: str) -> str:
    r"""Escape a value for an LDAP search filter (RFC 4515).

    ``* ( ) \`` and NUL must be escaped; control characters are escaped too
    (``\0d``...), since Samba's filter parser mishandles some of them raw.
    """
    return "".join(
        f"\\{ord(ch):02x}" if ch in "*()\\" or ord(ch) < 0x20 or ord(ch) == 0x7F else ch
        for ch in value
    )


def sam_account_name_for(group_id: str) -> str:
    """A deterministic pre-Windows 2000 name within 20 characters.

    ``Group_`` plus the first 14 hex digits of the objectId: 52 random bits of
    the GUID, so a clash is improbable even at hundreds of thousands of groups,
    and an admin can still find the group by the start of its objectId.
    """
    hex_digits = group_id.replace("-", "").lower()
    return (ANCHOR_PREFIX + hex_digits)[:MAX_SAM]


def parent_of(dn: str) -> str:
    """The parent DN, honouring escaped commas in the first RDN."""
    if "\\" not in dn:
        return dn.partition(",")[2]
    i = 0
    while i < len(dn):
        if dn[i] == "\\":
            i += 2
            continue
        if dn[i] == ",":
            return dn[i + 1 :]
        i += 1
    return ""


def first_rdn(dn: str) -> str:
    parent = parent_of(dn)
    return dn[: len(dn) - len(parent) - 1] if parent else dn


#: A DN as a comparable value: (attribute type, unescaped value), both case-folded.
DnKey = tuple[tuple[str, str], ...]


@functools.lru_cache(maxsize=16384)
def dn_key(dn: str) -> DnKey:
    """``dn`` as a tuple of case-folded, unescaped RDNs, outermost last.

    AD escapes differently than we do (``\\3D`` for ``=``, for example), so DNs
    are compared as keys, never as strings. Cached: a write checks its DN's key
    five times or so (scope, in-flight set, settlement), and parsing it each time
    was a tenth of a burst's CPU. A DN without a backslash has nothing to unescape.
    """
    return _escaped_dn_key(dn) if "\\" in dn else _plain_dn_key(dn)


def _escaped_dn_key(dn: str) -> DnKey:
    rdns: list[tuple[str, str]] = []
    rest = dn
    while rest.strip():
        rdn = first_rdn(rest)
        attr, _, value = rdn.partition("=")
        rdns.append((attr.strip().casefold(), unescape_dn_value(_trim(value)).casefold()))
        rest = parent_of(rest)
    return tuple(rdns)


def _plain_dn_key(dn: str) -> DnKey:
    """:func:`dn_key` of a DN with no escapes: every comma separates RDNs."""
    parts = dn.split(",")
    if len(parts) > 1 and not parts[-1]:
        parts[-2:] = [parts[-2] + ","]  # a comma that ends the DN stays in its last RDN
    elif not parts[-1].strip():
        parts.pop()  # what is left after the last comma is blank: no RDN
    rdns = []
    for rdn in parts:
        attr, _, value = rdn.partition("=")
        rdns.append((attr.strip().casefold(), value.strip(" ").casefold()))
    return tuple(rdns)


def _trim(value: str) -> str:
    """Drop unescaped leading and trailing spaces (RFC 4514 says they are not part of it)."""
    value = value.lstrip(" ")
    while value.endswith(" ") and not _escaped_at(value, len(value) - 1):
        value = value[:-1]
    return value


def _escaped_at(value: str, index: int) -> bool:
    backslashes = 0
    i = index - 1
    while i >= 0 and value[i] == "\\":
        backslashes += 1
        i -= 1
    return backslashes % 2 == 1


def strictly_within(dn: str, base_dn: str) -> bool:
    """True when ``dn`` is below ``base_dn`` (never ``base_dn`` itself)."""
    key, base = dn_key(dn), dn_key(base_dn)
    return len(key) > len(base) and key[len(key) - len(base) :] == base


def canonical_dn(dn: str) -> str:
    r"""``dn`` with every single-valued RDN's value re-escaped the RFC 4514 way.

    DNs read from a DC are written back to it (modify, rename, delete), but a DC
    may escape more than RFC 4514 asks and then fail to parse its own form:
    Samba returns ``CN=On call\?`` for a CN holding ``?`` and refuses that DN as
    a base or a target. Unescaping and escaping again gives the form every DC
    accepts; a multi-valued RDN (an unescaped ``+``) is kept as it is.
    """
    rdns: list[str] = []
    rest = dn
    while rest.strip():
        rdn = first_rdn(rest)
        attr, sep, value = rdn.partition("=")
        if not sep or _has_unescaped(rdn, "+"):
            rdns.append(rdn.strip())
        else:
            rdns.append(f"{attr.strip()}={escape_dn_value(unescape_dn_value(_trim(value)))}")
        rest = parent_of(rest)
    return ",".join(rdns)


def single_cn_rdn(rdn: str) -> bool:
    """True for exactly one ``CN=value`` RDN: no unescaped ``,`` or ``+``, a value."""
    if parent_of(rdn) or _has_unescaped(rdn, "+"):
        return False
    attr, sep, value = rdn.partition("=")
    return bool(sep) and attr.strip().casefold() == "cn" and bool(_trim(value))


def _has_unescaped(text: str, char: str) -> bool:
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == char:
            return True
        i += 1
    return False


def unescape_dn_value(value: str) -> str:
    r"""Undo RFC 4514 escaping: ``\,`` and friends, and ``\HH`` hex pairs (UTF-8).

    AD may escape differently than we do (hex for some characters), so names
    are compared unescaped, never as DN strings.
    """
    if "\\" not in value:
        return value
    out = bytearray()
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            pair = value[i + 1 : i + 3]
            if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
                out.append(int(pair, 16))
                i += 3
                continue
            out.extend(value[i + 1].encode())
            i += 2
            continue
        out.extend(ch.encode())
        i += 1
    return out.decode("utf-8", errors="replace")
