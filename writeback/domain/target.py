"""Which DNs may be the target OU: the rule that keeps the delegation off privileged ground.

Whatever sits in the target OU receives the service account's write rights
(``permissions`` grants them there, inherited by every group below). Pointed at
``CN=Users`` those rights reach Domain Admins and Enterprise Admins; at
``OU=Domain Controllers`` or ``CN=Builtin`` the groups that run the domain. So
the target must be an organizational unit of the domain's own making:

* its path is ``OU=...`` RDNs only (one or more), under ``DC=...`` RDNs only,
  so it is an OU (the RDN attribute of an ``organizationalUnit``) and never a
  default container (``CN=Users``, ``CN=Builtin``, ``CN=Computers``, ``CN=System``,
  ``CN=Program Data``, ``CN=ForeignSecurityPrincipals``, ``CN=Managed Service
  Accounts``...) nor anything below one, nor the configuration or schema partition;
* it is neither the domain root nor ``OU=Domain Controllers`` (the DCs' own OU,
  at the domain root) nor ``OU=Microsoft Exchange Security Groups`` (groups that
  hold WRITE_DAC on the domain in an Exchange forest), nor below them.

DNs are parsed by RDN (escaped commas, ``\\HH`` escapes, spaces around ``=``,
any letter case, the attribute OIDs), never compared as strings. Pure: the
checks against a live DC (its well-known containers, the groups already in the
subtree) are in :mod:`writeback.adapters.acl`.
"""

from __future__ import annotations

from writeback.domain.naming import DnKey, dn_key, parent_of

#: Containers every AD domain has at its root (cn values, case-folded), named in
#: the error when a target sits in one of them.
DEFAULT_CONTAINERS = frozenset(
    {
        "users",
        "builtin",
        "computers",
        "system",
        "program data",
        "foreignsecurityprincipals",
        "managed service accounts",
        "lostandfound",
        "infrastructure",
        "ntds quotas",
        "tpm devices",
        "keys",
        "configuration",
        "schema",
        "microsoft exchange system objects",
    }
)
#: OUs at the domain root that hold privileged objects (ou values, case-folded).
PROTECTED_OUS = frozenset({"domain controllers", "microsoft exchange security groups"})

#: Attribute types by OID (RFC 4514 allows them in place of the short name).
_OIDS = {"2.5.4.11": "ou", "0.9.2342.19200300.100.1.25": "dc", "2.5.4.3": "cn"}


class TargetRefused(ValueError):
    """The DN is not an acceptable target OU; the message says why."""


def check_target_ou(dn: str) -> DnKey:
    """``dn`` as a key when it is an acceptable target OU, else :class:`TargetRefused`."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in dn):
        raise TargetRefused("holds a control character (a newline, a NUL...)")
    if _multi_valued(dn):
        raise TargetRefused("has a multi-valued RDN (an unescaped '+')")
    key = tuple((_attribute(attr), value) for attr, value in dn_key(dn))
    if not key or any(not value for _, value in key):
        raise TargetRefused("is not a DN (an RDN without a value)")
    domain = _domain_suffix(key)
    if not domain:
        raise TargetRefused("is not under a domain (no DC=... at its end)")
    path = key[: len(key) - len(domain)]
    if not path:
        raise TargetRefused("is the domain root: the delegation would cover the whole domain")
    outside = [(attr, value) for attr, value in path if attr != "ou"]
    if outside:
        attr, value = outside[-1]
        if attr == "cn" and _folded(value) in DEFAULT_CONTAINERS:
            raise TargetRefused(
                f"is in the default container CN={_folded(value)}, whose objects (built-in "
                "and privileged groups among them) would receive the delegation"
            )
        raise TargetRefused(f"has {attr.upper()}={value}: only OU=... RDNs may precede DC=...")
    top = _folded(path[-1][1])
    if top in PROTECTED_OUS:
        raise TargetRefused(f"is in OU={top}, which holds privileged objects")
    return key


def is_within(dn_or_key: str | DnKey, base: str | DnKey) -> bool:
    """True when the first DN is ``base`` itself or below it."""
    key = dn_key(dn_or_key) if isinstance(dn_or_key, str) else dn_or_key
    base_key = dn_key(base) if isinstance(base, str) else base
    key = tuple((_attribute(a), v) for a, v in key)
    base_key = tuple((_attribute(a), v) for a, v in base_key)
    return len(key) >= len(base_key) and key[len(key) - len(base_key) :] == base_key


def domain_dn(dn: str) -> str:
    """The ``DC=...`` suffix of ``dn`` (its domain's naming context), as written in it."""
    rest = dn
    while rest.strip():
        key = dn_key(rest)
        if all(_attribute(attr) == "dc" for attr, _ in key):
            return rest.strip()
        rest = parent_of(rest)
    return ""


def _domain_suffix(key: DnKey) -> DnKey:
    """The trailing run of ``dc`` RDNs; empty when a ``dc`` RDN is followed by another kind."""
    suffix: list[tuple[str, str]] = []
    for attr, value in reversed(key):
        if attr != "dc":
            break
        suffix.insert(0, (attr, value))
    return tuple(suffix)


def _folded(value: str) -> str:
    """Case-folded with whitespace runs as one space and none at the ends."""
    return " ".join(value.split())


def _attribute(attr: str) -> str:
    folded = attr.casefold().removeprefix("oid.")
    return _OIDS.get(folded, folded)


def _multi_valued(dn: str) -> bool:
    i = 0
    while i < len(dn):
        if dn[i] == "\\":
            i += 2
            continue
        if dn[i] == "+":
            return True
        i += 1
    return False
