"""The agent's policy with placement rules: what its own copy of the rules file
lets a group become and where it may go, and nothing more."""

from __future__ import annotations

from pathlib import Path

import pytest

from writeback.agent_protocol import operation_to_json, parse_operation
from writeback.config import load_agent_settings
from writeback.domain.mapping import GroupType
from writeback.domain.model import Add, Changes, Modify, Rename, anchor_for
from writeback.domain.naming import DnFormat
from writeback.domain.policy import AgentPolicy, check_operation
from writeback.errors import PolicyRefused
from writeback.hosting.agent import placement_limits

OU = "OU=Writeback,DC=corp,DC=example"
FIN = f"OU=Finance,{OU}"
GID = "3a5c3221-c465-48c0-95b8-e9305786a271"
SECURITY = str(0x8 - 0x80000000)
POLICY = AgentPolicy(
    target_ou=OU,
    mail_domains=frozenset({"contoso.com"}),
    ous=frozenset({FIN}),
    group_types=frozenset({GroupType.SECURITY}),
    dn_formats=frozenset({DnFormat.CLOUD_SYNC}),
)


def add(dn: str, group_type: str = SECURITY, members: tuple[str, ...] = ()) -> Add:
    return Add(
        GID,
        dn,
        {
            "objectClass": ("top", "group"),
            "adminDescription": (anchor_for(GID),),
            "groupType": (group_type,),
            "sAMAccountName": ("Group_3a5c3221c46548",),
        },
        members,
    )


def test_the_rules_ous_types_and_formats_pass() -> None:
    check_operation(add(f"CN=Group_{GID},{FIN}"), POLICY)
    check_operation(add(f"CN=Budget_{GID[-12:]},{OU}"), POLICY)  # the cloudsync format
    check_operation(add(f"CN=Group_{GID},{OU}", "8"), POLICY)  # the settings' own type
    move = Rename(GID, f"CN=Group_{GID},{OU}", f"CN=Group_{GID}", new_parent=FIN)
    check_operation(move, POLICY)
    child_dn = f"CN=Group_0b7e9f8c-1d2e-4f5a-8b6c-7d8e9f0a1b2c,{FIN}"
    check_operation(add(f"CN=Group_{GID},{OU}", members=(child_dn,)), POLICY)
    check_operation(Modify(GID, f"CN=Group_{GID},{OU}", Changes(add_members=(child_dn,))), POLICY)
    assert parse_operation(operation_to_json(move)) == move


@pytest.mark.parametrize(
    ("operation", "reason"),
    [
        (add(f"CN=Group_{GID},OU=Sales,{OU}"), "directly in the target OU"),
        (
            Rename(GID, f"CN=Group_{GID},{OU}", f"CN=Group_{GID}", new_parent=f"OU=Sales,{OU}"),
            "moves only to",
        ),
        (
            Rename(GID, f"CN=Group_{GID},{OU}", f"CN=Group_{GID}", new_parent="OU=Admins,DC=corp"),
            "not below the target OU|moves only to",
        ),
        (add(f"CN=Group_{GID},{OU}", "2"), "not this agent's group type"),
        (
            add(f"CN=Group_{GID},{OU}", members=("CN=Domain Admins,CN=Users,DC=corp,DC=example",)),
            "<SID=...> reference or the DN of a group below",
        ),
    ],
)
def test_anything_else_is_refused(operation: Add | Rename, reason: str) -> None:
    with pytest.raises(PolicyRefused, match=reason):
        check_operation(operation, POLICY)


def agent_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "WRITEBACK_TARGET_OU": OU,
        "WRITEBACK_LDAP_URL": "ldaps://dc.corp.example",
        "WRITEBACK_LDAP_USER": "svc",
        "WRITEBACK_LDAP_PASSWORD": "pw",
        "WRITEBACK_RELAY_NAMESPACE": "contoso.servicebus.windows.net",
        "WRITEBACK_RELAY_PATH": "writeback-agent",
        "WRITEBACK_AGENT_LISTEN_KEY": "k" * 44,
        "WRITEBACK_RELAY_CALLER_KEY": "c" * 40,
        "WRITEBACK_AGENT_STATE_PATH": str(tmp_path / "agent.sqlite3"),
        "WRITEBACK_AGENT_MAIL_DOMAINS": "contoso.com",
        **extra,
    }


def test_the_agent_learns_its_limits_from_its_own_rules_file(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\nkinds = ["security"]\nou = "OU=Finance"\ndn_format = "cloudsync"\n'
        '[[rule]]\nkinds = ["microsoft365"]\ngroup_type = "mail-enabled-security"\n'
    )
    settings = load_agent_settings(agent_env(tmp_path, WRITEBACK_RULES=str(rules)))
    limits = placement_limits(settings.directory)
    assert limits["ous"] == {FIN}
    assert limits["dn_formats"] == {DnFormat.CLOUD_SYNC}
    assert limits["group_types"] == {GroupType.SECURITY, GroupType.MAIL_ENABLED_SECURITY}
    v1 = placement_limits(load_agent_settings(agent_env(tmp_path)).directory)
    assert v1 == {"ous": frozenset(), "group_types": frozenset(), "dn_formats": frozenset()}
