"""Scoping and placement rules: the file format, its errors, and what the rules decide."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from writeback.config import load_settings
from writeback.domain.mapping import GroupType, MappingOptions, Placement
from writeback.domain.model import CloudGroup, SkipReason, WritebackConfiguration
from writeback.domain.naming import DnFormat
from writeback.domain.rules import Excluded, RulesError, decide, parse_rules
from writeback.errors import ConfigError

OU = "OU=Writeback,DC=corp,DC=example"
M365 = "3a5c3221-c465-48c0-95b8-e9305786a271"
SEC = "0b7e9f8c-1d2e-4f5a-8b6c-7d8e9f0a1b2c"
MESG = "5d4c3b2a-1f0e-4d9c-8b7a-6f5e4d3c2b1a"
ROLE = "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a"


def m365(gid: str = M365, name: str = "Sales", **fields: Any) -> CloudGroup:
    return CloudGroup(gid, name, mail="sales@contoso.com", **fields)


def security(gid: str = SEC, name: str = "SG-Files", **fields: Any) -> CloudGroup:
    return CloudGroup(
        gid, name, group_types=(), security_enabled=True, mail_enabled=False, **fields
    )


def mail_security(gid: str = MESG, name: str = "MESG-Ops") -> CloudGroup:
    return CloudGroup(
        gid,
        name,
        mail="ops@contoso.com",
        group_types=(),
        security_enabled=True,
        mail_enabled=True,
    )


def rules(text: str) -> MappingOptions:
    return MappingOptions(target_ou=OU, rules=parse_rules(textwrap.dedent(text), target_ou=OU))


def test_without_rules_the_scope_is_v1s() -> None:
    options = MappingOptions(target_ou=OU)
    assert decide(m365(), options) == Placement(
        None, None, DnFormat.OBJECT_ID, GroupType.DISTRIBUTION
    )
    excluded = decide(security(), options)
    assert isinstance(excluded, Excluded) and excluded.reason is SkipReason.OUT_OF_SCOPE
    with_security = replace(options, security_groups=True)
    assert decide(security(), with_security) == Placement(
        None, None, DnFormat.OBJECT_ID, GroupType.SECURITY
    )
    assert decide(mail_security(), with_security) == Placement(
        None, None, DnFormat.OBJECT_ID, GroupType.MAIL_ENABLED_SECURITY
    )


def test_synced_groups_are_never_written_and_role_assignable_only_by_id() -> None:
    options = rules(
        f"""
        [[rule]]
        name = "everything"
        kinds = ["microsoft365", "security"]

        [[rule]]
        name = "the admins group, by id"
        ids = ["{ROLE}"]
        """
    )
    synced = security(on_premises_sync_enabled=True)
    assert decide(synced, options) == Excluded(
        SkipReason.SYNCED_FROM_ON_PREMISES,
        "synced from on-premises AD: never written back (it would loop)",
    )
    named_synced = security(ROLE, on_premises_sync_enabled=True)
    assert isinstance(decide(named_synced, options), Excluded)  # not even when named
    role = security(ROLE, is_assignable_to_role=True)
    placed = decide(role, options)
    assert isinstance(placed, Placement) and placed.rule == "the admins group, by id"
    other_role = security("11111111-2222-4333-8444-555555555555", is_assignable_to_role=True)
    refused = decide(other_role, options)
    assert isinstance(refused, Excluded) and refused.reason is SkipReason.ROLE_ASSIGNABLE
    assert isinstance(decide(m365(is_assignable_to_role=True), MappingOptions(OU)), Excluded)


def test_first_matching_rule_decides_ou_format_and_type() -> None:
    options = rules(
        """
        [defaults]
        dn_format = "displayname"

        [[rule]]
        name = "finance"
        display_name = "FIN-*"
        ou = "OU=Finance"
        group_type = "security"

        [[rule]]
        name = "skip drafts"
        display_name_regex = "^draft"
        write = false

        [[rule]]
        name = "the rest of the M365 groups"
        kinds = ["microsoft365"]
        dn_format = "objectid"
        """
    )
    finance = decide(m365(name="fin-Budget"), options)  # globs are case-insensitive
    assert finance == Placement(
        "finance", f"OU=Finance,{OU}", DnFormat.DISPLAY_NAME, GroupType.SECURITY
    )
    draft = decide(m365(name="Draft plan"), options)
    assert draft == Excluded(SkipReason.OUT_OF_SCOPE, "skip drafts: write = false", "skip drafts")
    rest = decide(m365(name="Sales"), options)
    assert rest == Placement(
        "the rest of the M365 groups", None, DnFormat.OBJECT_ID, GroupType.DISTRIBUTION
    )
    nothing = decide(security(), options)
    assert nothing == Excluded(SkipReason.OUT_OF_SCOPE, "no rule matches")


def test_a_plain_security_group_stays_a_security_group() -> None:
    options = rules(
        """
        [[rule]]
        kinds = ["security", "mail-enabled-security"]
        group_type = "distribution"
        """
    )
    placed = decide(security(), options)
    assert isinstance(placed, Placement) and placed.group_type is GroupType.SECURITY
    mailed = decide(mail_security(), options)
    assert isinstance(mailed, Placement) and mailed.group_type is GroupType.DISTRIBUTION


def test_writeback_configuration_rules_follow_v2s_defaults() -> None:
    options = rules(
        """
        [[rule]]
        name = "V2: enabled, type from Graph"
        writeback_enabled = true
        group_type = "from-graph"
        """
    )
    # isEnabled null: on for Microsoft 365 groups (distribution), off for security groups.
    assert decide(m365(), options) == Placement(
        "V2: enabled, type from Graph", None, DnFormat.OBJECT_ID, GroupType.DISTRIBUTION
    )
    assert isinstance(decide(security(), options), Excluded)
    on = WritebackConfiguration(True, "universalMailEnabledSecurityGroup")
    placed = decide(replace(m365(), writeback=on), options)
    assert isinstance(placed, Placement)
    assert placed.group_type is GroupType.MAIL_ENABLED_SECURITY
    off = replace(m365(), writeback=WritebackConfiguration(False, None))
    assert isinstance(decide(off, options), Excluded)
    sec_on = replace(security(), writeback=WritebackConfiguration(True, None))
    placed = decide(sec_on, options)
    assert isinstance(placed, Placement) and placed.group_type is GroupType.SECURITY


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ('[[rule]]\nkinds = ["microsoft365"\n', 2, "Unclosed array"),
        ('[[rule]]\nkinds = ["microsoft365"]\n\n[[rule]]\nkinds = ["teams"]\n', 5, "'teams'"),
        ('[[rule]]\nkinds = ["security"]\ncolour = "blue"\n', 3, "unknown key 'colour'"),
        ('[[rule]]\nname = "no match"\nwrite = false\n', 1, "matches nothing"),
        ('[[rule]]\nids = ["sales"]\n', 2, "not an Entra object id"),
        ('[[rule]]\nkinds = ["security"]\nou = "OU=Elsewhere,DC=corp,DC=example"\n', 3, "outside"),
        ('[[rule]]\nkinds = ["security"]\nou = "CN=Users"\n', 3, "CN=users"),
        ('[[rule]]\nkinds = ["security"]\ndn_format = "guid"\n', 3, "dn_format 'guid'"),
        ('[[rule]]\nkinds = ["security"]\ngroup_type = "global"\n', 3, "group_type 'global'"),
        ('[[rule]]\ndisplay_name_regex = "("\n', 2, "display_name_regex"),
        ('[defaults]\ngroup_typ = "security"\n', 2, "unknown key 'group_typ'"),
        ('[[rule]]\nname = "a"\nkinds = ["security"]\n' * 2, 5, "named"),
        ('writeback = "yes"\n', 1, "unknown key 'writeback'"),
    ],
)
def test_a_bad_rules_file_names_the_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(RulesError) as raised:
        parse_rules(text, target_ou=OU)
    assert raised.value.line == line, str(raised.value)
    assert reason in str(raised.value)
    assert str(raised.value).startswith(f"line {line}: ")


def test_an_ou_below_the_target_is_accepted_relative_or_full() -> None:
    parsed = parse_rules(
        f'[[rule]]\nkinds = ["security"]\nou = "OU=Finance,OU=Europe,{OU}"\n'
        '[[rule]]\nkinds = ["microsoft365"]\nou = "ou=Teams"\n',
        target_ou=OU,
    )
    assert parsed.ous() == {f"OU=Finance,OU=Europe,{OU}", f"ou=Teams,{OU}"}


def env(tmp_path: Path, text: str, **extra: str) -> dict[str, str]:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return {
        "WRITEBACK_TARGET_OU": OU,
        "WRITEBACK_LDAP_URL": "ldaps://dc.corp.example",
        "WRITEBACK_LDAP_USER": "svc",
        "WRITEBACK_LDAP_PASSWORD": "pw",
        "WRITEBACK_RULES": str(path),
        **extra,
    }


def test_settings_read_the_rules_file_and_name_its_line(tmp_path: Path) -> None:
    settings = load_settings(env(tmp_path, '[[rule]]\nkinds = ["security"]\nou = "OU=Sec"\n'))
    assert settings.rules is not None
    assert settings.mapping().rules is settings.rules
    assert settings.mapping().nesting and settings.mapping().wants_all_groups
    with pytest.raises(ConfigError, match=r"rules.toml' line 3: ou 'OU=Sec,DC=other,DC=com'"):
        load_settings(
            env(tmp_path, '[[rule]]\nkinds = ["security"]\nou = "OU=Sec,DC=other,DC=com"\n')
        )
    with pytest.raises(ConfigError, match="line 2: rule 'rule 1' uses Graph's writebackConf"):
        load_settings(env(tmp_path, "[[rule]]\nwriteback_enabled = true\n"))
    ok = load_settings(
        env(
            tmp_path,
            "[[rule]]\nwriteback_enabled = true\n",
            WRITEBACK_GRAPH_WRITEBACK_CONFIGURATION="true",
        )
    )
    assert ok.writeback_configuration
    with pytest.raises(ConfigError, match="WRITEBACK_SECURITY_GROUPS is for deployments"):
        load_settings(
            env(tmp_path, '[[rule]]\nkinds = ["security"]\n', WRITEBACK_SECURITY_GROUPS="true")
        )
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings({**env(tmp_path, ""), "WRITEBACK_RULES": str(tmp_path / "missing.toml")})


def test_no_rules_file_and_default_settings_are_v1() -> None:
    settings = load_settings(
        {
            "WRITEBACK_TARGET_OU": OU,
            "WRITEBACK_LDAP_URL": "ldaps://dc.corp.example",
            "WRITEBACK_LDAP_USER": "svc",
            "WRITEBACK_LDAP_PASSWORD": "pw",
        }
    )
    options = settings.mapping()
    assert options.rules is None and not options.nesting and not options.wants_all_groups
    assert not options.hide_from_address_lists
    assert settings.reads_hidden_members is None
