"""Finding 1 of issue 12: the target can be a default container.

On main ``WRITEBACK_TARGET_OU=CN=Users,...`` was accepted (any first RDN ``CN=``
with a ``DC=`` anywhere), and ``permissions --apply`` then put the account's
write rights on Domain Admins. The rule is in writeback/domain/target.py; the
config names the setting when it refuses.
"""

from __future__ import annotations

import pytest

from writeback.config import load_settings
from writeback.domain.target import TargetRefused, check_target_ou, domain_dn, is_within
from writeback.errors import ConfigError

BASE = {
    "WRITEBACK_LDAP_URL": "ldaps://dc.corp.example:636",
    "WRITEBACK_LDAP_USER": "svc@corp.example",
    "WRITEBACK_LDAP_PASSWORD": "not-a-real-one",
    "WRITEBACK_GRAPH_AUTH": "none",
    "WRITEBACK_GRAPH_URL": "http://127.0.0.1:1/v1.0",
}

REFUSED = [
    ("CN=Users,DC=corp,DC=example", "default container CN=users"),
    ("cn = users , dc=corp,dc=example", "default container CN=users"),
    ("CN=Builtin,DC=corp,DC=example", "default container CN=builtin"),
    ("CN=Computers,DC=corp,DC=example", "default container CN=computers"),
    ("CN=System,DC=corp,DC=example", "default container CN=system"),
    ("CN=AdminSDHolder,CN=System,DC=corp,DC=example", "default container CN=system"),
    ("CN=Program Data,DC=corp,DC=example", "default container CN=program data"),
    ("CN=ForeignSecurityPrincipals,DC=corp,DC=example", "CN=foreignsecurityprincipals"),
    ("CN=Managed Service Accounts,DC=corp,DC=example", "CN=managed service accounts"),
    ("OU=Inner,CN=Users,DC=corp,DC=example", "default container CN=users"),
    ("CN=Users\\20,DC=corp,DC=example", "default container CN=users"),
    ("CN=Configuration,DC=corp,DC=example", "default container CN=configuration"),
    ("OU=G,CN=Schema,CN=Configuration,DC=corp,DC=example", "CN=configuration"),
    ("OU=Domain Controllers,DC=corp,DC=example", "OU=domain controllers"),
    ("ou=DOMAIN CONTROLLERS , DC=corp,DC=example", "OU=domain controllers"),
    ("OU=Domain\\20Controllers,DC=corp,DC=example", "OU=domain controllers"),
    ("OU=Sub,OU=Domain Controllers,DC=corp,DC=example", "OU=domain controllers"),
    ("2.5.4.11=Domain Controllers,DC=corp,DC=example", "OU=domain controllers"),
    ("OU=Microsoft Exchange Security Groups,DC=corp,DC=example", "privileged"),
    ("DC=corp,DC=example", "domain root"),
    (" dc = corp , DC=example ", "domain root"),
    ("CN=Groups,DC=corp,DC=example", "only OU="),
    ("OU=Groups,CN=Team,OU=x,DC=corp,DC=example", "CN=team"),
    ("OU=Groups,O=corp", "not under a domain"),
    ("OU=Groups,DC=corp,OU=x", "not under a domain"),
    ("OU=Groups", "not under a domain"),
    ("", "not a DN"),
    ("OU=,DC=corp,DC=example", "not a DN"),
    ("OU=a+CN=b,DC=corp,DC=example", "multi-valued"),
    ("OU=G\n,DC=corp,DC=example", "control character"),
    ("OU=G,DC=corp,DC=example\x00", "control character"),
]

ACCEPTED = [
    "OU=M365 Groups,DC=corp,DC=example",
    "ou = m365 groups , dc = corp , dc = example",
    "OU=Groups,OU=Sync,DC=corp,DC=example",
    "OU=Users,DC=corp,DC=example",  # an OU of one's own may be called Users
    "OU=Team\\, Sales,DC=corp,DC=example",  # an escaped comma is part of the name
    "OU=Domain Controllers Team,DC=corp,DC=example",
    "OU=G,DC=example",
]


@pytest.mark.parametrize(("dn", "why"), REFUSED)
def test_default_containers_and_the_domain_root_are_refused(dn: str, why: str) -> None:
    with pytest.raises(TargetRefused, match=f"(?i){why}"):
        check_target_ou(dn)


@pytest.mark.parametrize("dn", ACCEPTED)
def test_ous_of_ones_own_are_accepted(dn: str) -> None:
    check_target_ou(dn)


@pytest.mark.parametrize(("dn", "why"), REFUSED[:3] + REFUSED[13:14] + REFUSED[19:20])
def test_the_config_names_the_setting(dn: str, why: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**BASE, "WRITEBACK_TARGET_OU": dn}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="WRITEBACK_TARGET_OU") as refused:
        load_settings()
    assert "not-a-real-one" not in str(refused.value)


def test_the_config_accepts_a_plain_ou(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**BASE, "WRITEBACK_TARGET_OU": ACCEPTED[0]}.items():
        monkeypatch.setenv(name, value)
    assert load_settings().target_ou == ACCEPTED[0]


def test_within_and_domain_compare_by_rdn() -> None:
    assert is_within("CN=x,OU=G,DC=corp,DC=example", "ou = g,dc=CORP,dc=example")
    assert is_within("OU=G,DC=corp,DC=example", "OU=G,DC=corp,DC=example")
    assert not is_within("OU=G2,DC=corp,DC=example", "OU=G,DC=corp,DC=example")
    assert not is_within("OU=G\\,x,DC=corp,DC=example", "OU=x,DC=corp,DC=example")
    assert domain_dn("OU=a\\,DC=b,OU=c,DC=corp,DC=example") == "DC=corp,DC=example"
    assert domain_dn("OU=a") == ""
