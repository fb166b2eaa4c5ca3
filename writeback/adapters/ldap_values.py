"""Pure helpers for the LDAP adapter: values AD returns, DNs, result codes.

No I/O here, so every parsing rule can be read (and unit-tested) on its own.
"""

from __future__ import annotations

import re
import struct
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from writeback.domain.mapping import MANAGED_ATTRIBUTES
from writeback.domain.naming import DnKey, canonical_dn, dn_key

#: The canonical spelling of every managed attribute, by lower-case name.
CANONICAL_NAMES = {name.lower(): name for name in MANAGED_ATTRIBUTES}


def sid_from_bytes(raw: bytes) -> str:
    """The S-R-I-S... string form of a binary objectSid (MS-DTYP 2.4.2.2)."""
    if len(raw) < 8:
        raise ValueError(f"objectSid too short: {len(raw)} bytes")
    revision, count = raw[0], raw[1]
    if len(raw) != 8 + 4 * count:
        raise ValueError(f"objectSid length {len(raw)} does not fit {count} sub-authorities")
    authority = int.from_bytes(raw[2:8], "big")
    subs = struct.unpack(f"<{count}I", raw[8:])
    return "-".join(["S", str(revision), str(authority), *map(str, subs)])


@dataclass(frozen=True)
class ExtendedDn:
    """A DN as the extended-DN control returns it: ``<GUID=..>;<SID=..>;CN=..``."""

    dn: str
    guid: str | None = None
    sid: str | None = None


def parse_extended_dn(value: str) -> ExtendedDn:
    """Split the ``<NAME=value>;`` prefixes (string form, flag 1) from the DN.

    Only leading ``<...>`` components are prefixes; a ``<`` inside the DN
    itself is always escaped (``\\<`` or ``\\3C``), so it cannot be confused.
    """
    parts: dict[str, str] = {}
    rest = value
    while rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            break
        name, _, part = rest[1:end].partition("=")
        parts[name.upper()] = part
        rest = rest[end + 1 :]
        if rest.startswith(";"):
            rest = rest[1:]
    return ExtendedDn(dn=rest, guid=parts.get("GUID"), sid=parts.get("SID"))


def split_members(values: Iterable[bytes]) -> tuple[set[str], set[str]]:
    """``member`` values (extended DNs, as read) as (SIDs, DNs of members without a SID).

    The hot loop of a full read (400,000 values at 20,000 groups), so the shape
    AD and Samba return, ``<GUID=g>;<SID=s>;dn``, is split with two ``find``
    calls on the bytes (the SID prefix right after the GUID's); anything else
    goes through :func:`parse_extended_dn`.
    """
    sids: set[str] = set()
    others: set[str] = set()
    add_sid = sids.add
    for value in values:
        if value.startswith(b"<GUID="):
            end = value.find(b">", 6)  # the end of the GUID prefix: a GUID holds no ">"
            if value.startswith(b">;<SID=", end):
                stop = value.find(b">", end + 7)
                if stop > 0:
                    add_sid(value[end + 7 : stop].decode("ascii", errors="replace"))
                    continue
        member = parse_extended_dn(value.decode("utf-8", errors="replace"))
        if member.sid:
            add_sid(member.sid)
        else:
            others.add(member.dn)
    return sids, others


def split_plain_members(
    values: Iterable[bytes], resolved: Mapping[bytes, str]
) -> tuple[set[str], set[str]] | None:
    """As :func:`split_members`, for ``member`` values read without the extended-DN
    control: each plain DN's objectSid looked up in ``resolved`` (DN as the DC
    wrote it -> its SID, ``""`` for an object without one). Extended values (a
    ranged read's later slices) are split as before.

    None when a DN is not in ``resolved``: the caller reads that group's members
    again with the control rather than guess (a member it cannot name by SID
    would be removed by DN).
    """
    sids: set[str] = set()
    others: set[str] = set()
    extended: list[bytes] = []
    get = resolved.get
    add_sid = sids.add
    for value in values:
        sid = get(value)
        if sid:
            add_sid(sid)
        elif sid is not None:
            others.add(value.decode("utf-8", errors="replace"))
        elif value.startswith(b"<"):
            extended.append(value)
        else:
            return None
    if extended:
        more, also = split_members(extended)
        sids |= more
        others |= also
    return sids, others


_PLAIN_PART = r'[^\s\\+"<>;#\x00=,](?:[^\\+"<>;#\x00=,]*[^\s\\+"<>;#\x00=,])?'
_PLAIN_RDN = f"{_PLAIN_PART}={_PLAIN_PART}"
#: A DN nothing in which is escaped or needs to be: no backslash, no character
#: RFC 4514 escapes, one ``=`` per RDN, no space around ``=`` and ``,``.
_PLAIN_DN = re.compile(f"{_PLAIN_RDN}(?:,{_PLAIN_RDN})*")


def read_dn(dn: str) -> tuple[str, DnKey]:
    """A DN as read from the DC: its :func:`canonical_dn` form and its :func:`dn_key`.

    Most DNs are plain (``CN=Group_<id>,OU=...``): their canonical form is
    themselves and their key a split, which a full read of 20,000 groups would
    otherwise spend a second of parsing on. Anything else takes the full path.
    """
    if _PLAIN_DN.fullmatch(dn):
        return dn, tuple(
            (attr.casefold(), value.casefold())
            for attr, _, value in (rdn.partition("=") for rdn in dn.split(","))
        )
    canonical = canonical_dn(dn)
    return canonical, dn_key(canonical)


def guid_filter_value(guid: str) -> str:
    """An objectGUID (string form) as a filter value: its 16 bytes as ``\\xx`` escapes."""
    return "".join(f"\\{b:02x}" for b in uuid.UUID(guid).bytes_le)


@dataclass(frozen=True)
class MemberRange:
    """One ``member;range=low-high`` slice; ``high`` None means the last one (``*``)."""

    low: int
    high: int | None


def parse_range(attribute: str) -> MemberRange | None:
    """The range of an attribute description like ``member;range=0-1499``, else None."""
    _, sep, options = attribute.partition(";")
    if not sep:
        return None
    for option in options.split(";"):
        name, eq, bounds = option.partition("=")
        if eq and name.strip().lower() == "range":
            low, dash, high = bounds.partition("-")
            if not dash or not low.isdigit() or not (high == "*" or high.isdigit()):
                raise ValueError(f"malformed range option in {attribute!r}")
            return MemberRange(int(low), None if high == "*" else int(high))
    return None


def decode(values: list[bytes] | None) -> tuple[str, ...]:
    """Attribute values as text; AD returns integers and booleans in decimal/TRUE form."""
    if not values:
        return ()
    return tuple(v.decode("utf-8", errors="replace") for v in values)


# LDAP result codes (RFC 4511 4.1.9) and how writeback treats them.
RESULT_NAMES = {
    1: "operationsError",
    2: "protocolError",
    3: "timeLimitExceeded",
    4: "sizeLimitExceeded",
    7: "authMethodNotSupported",
    8: "strongerAuthRequired",
    11: "adminLimitExceeded",
    12: "unavailableCriticalExtension",
    13: "confidentialityRequired",
    16: "noSuchAttribute",
    17: "undefinedAttributeType",
    18: "inappropriateMatching",
    19: "constraintViolation",
    20: "attributeOrValueExists",
    21: "invalidAttributeSyntax",
    32: "noSuchObject",
    34: "invalidDNSyntax",
    48: "inappropriateAuthentication",
    49: "invalidCredentials",
    50: "insufficientAccessRights",
    51: "busy",
    52: "unavailable",
    53: "unwillingToPerform",
    54: "loopDetect",
    64: "namingViolation",
    65: "objectClassViolation",
    66: "notAllowedOnNonLeaf",
    67: "notAllowedOnRDN",
    68: "entryAlreadyExists",
    69: "objectClassModsProhibited",
    71: "affectsMultipleDSAs",
    80: "other",
    81: "serverDown",
    85: "timeout",
    91: "connectError",
}

#: Worth retrying later: the DC is down, busy, slow, or failed internally.
TRANSIENT_RESULTS = frozenset({3, 51, 52, 80, 81, 85, 91})
#: A bind refused for these reasons is a wrong setting, not a passing fault.
BIND_CONFIG_RESULTS = frozenset({7, 8, 13, 48, 49, 50, 53})
#: What a modify fails with when a value it adds exists or one it removes does
#: not: our anchor check, or a member another writer changed first.
VALUE_CONFLICT_RESULTS = frozenset({16, 20, 53, 68})


def result_name(code: int) -> str:
    return RESULT_NAMES.get(code, f"result {code}")
