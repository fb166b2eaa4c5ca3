"""Settings of the relay path: the cloud side (Send) and the agent (Listen)."""

from __future__ import annotations

import pytest

from writeback.config import DirectoryKind, load_agent_settings, load_settings
from writeback.errors import ConfigError

CALLER = "c" * 40
CLOUD = {
    "WRITEBACK_TARGET_OU": "OU=Groups,DC=corp,DC=example",
    "WRITEBACK_DIRECTORY": "relay",
    "WRITEBACK_RELAY_NAMESPACE": "https://contoso.servicebus.windows.net/",
    "WRITEBACK_RELAY_PATH": "writeback-agent",
    "WRITEBACK_RELAY_SEND_KEY": "send-key",
    "WRITEBACK_RELAY_CALLER_KEY": CALLER,
}
AGENT = {
    "WRITEBACK_TARGET_OU": "OU=Groups,DC=corp,DC=example",
    "WRITEBACK_DIRECTORY": "relay",  # ignored: the agent always talks LDAP itself
    "WRITEBACK_LDAP_URL": "ldaps://dc01.corp.example",
    "WRITEBACK_LDAP_USER": "svc",
    "WRITEBACK_LDAP_PASSWORD": "ldap-password",
    "WRITEBACK_RELAY_NAMESPACE": "contoso.servicebus.windows.net",
    "WRITEBACK_RELAY_PATH": "writeback-agent",
    "WRITEBACK_AGENT_LISTEN_KEY": "listen-key",
    "WRITEBACK_RELAY_CALLER_KEY": CALLER,
    "WRITEBACK_AGENT_DELETE_LIMIT": "20",
    "WRITEBACK_AGENT_STATE_PATH": "/var/lib/writeback/agent.sqlite3",
    "WRITEBACK_AGENT_MAIL_DOMAINS": "Contoso.com, contoso.onmicrosoft.com",
    "WRITEBACK_GROUP_TYPE": "security",
}


def test_the_cloud_side_needs_no_ad_credential_with_the_relay() -> None:
    settings = load_settings(CLOUD)
    assert settings.directory is DirectoryKind.RELAY
    assert settings.ldap_password == "" and settings.ldap_url == ""
    assert settings.relay is not None
    assert settings.relay.namespace == "contoso.servicebus.windows.net"
    assert (settings.relay.key_name, settings.relay.key) == ("send", "send-key")
    for secret in ("send-key", CALLER):
        assert secret not in repr(settings)


def test_the_agent_uses_the_listen_rule_and_its_own_limits() -> None:
    agent = load_agent_settings(AGENT)
    assert agent.directory.directory is DirectoryKind.LDAP
    assert agent.directory.ldap_url == "ldaps://dc01.corp.example"
    assert (agent.relay.key_name, agent.relay.key) == ("listen", "listen-key")
    assert (agent.delete_limit, agent.concurrency) == (20, 4)
    assert agent.state_path == "/var/lib/writeback/agent.sqlite3"
    assert agent.mail_domains == {"contoso.com", "contoso.onmicrosoft.com"}
    assert agent.directory.group_type.value == "security"  # the agent's own group type
    for secret in ("listen-key", CALLER, "ldap-password"):
        assert secret not in repr(agent)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"WRITEBACK_RELAY_CALLER_KEY": "short"}, "WRITEBACK_RELAY_CALLER_KEY"),
        ({"WRITEBACK_RELAY_SEND_KEY": ""}, "WRITEBACK_RELAY_SEND_KEY"),
        ({"WRITEBACK_RELAY_PATH": ""}, "WRITEBACK_RELAY_PATH"),
        ({"WRITEBACK_DIRECTORY": "carrier-pigeon"}, "WRITEBACK_DIRECTORY"),
    ],
)
def test_a_bad_relay_setting_is_named(change: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings({**CLOUD, **change})


def test_the_agent_refuses_to_start_without_ldap_settings() -> None:
    without = {k: v for k, v in AGENT.items() if k != "WRITEBACK_LDAP_PASSWORD"}
    with pytest.raises(ConfigError, match="WRITEBACK_LDAP_PASSWORD"):
        load_agent_settings(without)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"WRITEBACK_AGENT_STATE_PATH": ""}, "WRITEBACK_AGENT_STATE_PATH"),
        ({"WRITEBACK_AGENT_MAIL_DOMAINS": ""}, "WRITEBACK_AGENT_MAIL_DOMAINS"),
        ({"WRITEBACK_AGENT_MAIL_DOMAINS": "contoso.com,@evil"}, "WRITEBACK_AGENT_MAIL_DOMAINS"),
        ({"WRITEBACK_AGENT_MAIL_DOMAINS": "localhost"}, "WRITEBACK_AGENT_MAIL_DOMAINS"),
    ],
)
def test_the_agent_needs_its_state_file_and_mail_domains(
    change: dict[str, str], named: str
) -> None:
    """The delete budget and the nonces live on disk; addresses only in the agent's domains."""
    with pytest.raises(ConfigError, match=named):
        load_agent_settings({**AGENT, **change})
