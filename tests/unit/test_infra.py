"""The Bicep template against the code: every setting it reads is set, secrets are
Key Vault references, and the identity gets exactly the roles it needs.

These read the template text (the Bicep tooling lives in .venv-infra, see
scripts/validate-infra, which parses it and runs checkov).
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.settings import ROOT, agent_only_settings, settings_read_by_the_code

INFRA = ROOT / "infra"
SECRETS = {
    "WRITEBACK_CLIENT_STATE",
    "WRITEBACK_NOTIFICATION_URL",
    "WRITEBACK_LIFECYCLE_URL",
    "WRITEBACK_LDAP_PASSWORD",
    "WRITEBACK_RELAY_SEND_KEY",
    "WRITEBACK_RELAY_CALLER_KEY",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
}
ROLES = {
    "69a216fc-b8fb-44d8-bc22-1f3c2cd27a39": "Azure Service Bus Data Sender",
    "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0": "Azure Service Bus Data Receiver",
    "4633458b-17de-408a-b874-0445c86b69e6": "Key Vault Secrets User",
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner",
    "090c5cfd-751d-490a-894a-3ce6f1109419": "Azure Service Bus Data Owner",  # operators, opt-in
}


def template_text() -> str:
    return "\n".join(path.read_text() for path in sorted(INFRA.rglob("*.bicep")))


def app_settings() -> dict[str, str]:
    """Name -> value expression of ``var appSettings = { ... }`` in main.bicep."""
    text = (INFRA / "main.bicep").read_text()
    block = re.search(r"^var appSettings = \{\n(.*?)^\}", text, re.MULTILINE | re.DOTALL)
    assert block, "main.bicep has no `var appSettings = {` block"
    pairs = re.findall(r"^  ([A-Za-z_][A-Za-z0-9_]*): (.+)$", block.group(1), re.MULTILINE)
    return dict(pairs)


def test_every_setting_the_code_reads_is_set_by_the_template() -> None:
    read = settings_read_by_the_code()
    assert {"WRITEBACK_TARGET_OU", "WRITEBACK_CLIENT_STATE", "AZURE_CLIENT_ID"} <= read
    settings = app_settings()
    missing = {
        name
        for name in read - agent_only_settings(read)
        if name not in settings and not any(key.startswith(name + "__") for key in settings)
    }
    assert missing == set(), f"not set in infra/main.bicep: {sorted(missing)}"


def test_no_agent_setting_is_given_to_the_function_app() -> None:
    assert [name for name in app_settings() if name.startswith("WRITEBACK_AGENT_")] == []


def test_relay_settings_the_other_side_reads_are_there() -> None:
    relay = {
        "WRITEBACK_DIRECTORY",
        "WRITEBACK_RELAY_NAMESPACE",
        "WRITEBACK_RELAY_PATH",
        "WRITEBACK_RELAY_SEND_KEY_NAME",
        "WRITEBACK_RELAY_SEND_KEY",
        "WRITEBACK_RELAY_CALLER_KEY",
        "WRITEBACK_RELAY_TIMEOUT",
    }
    assert relay <= set(app_settings())


def test_secrets_are_key_vault_references_never_values() -> None:
    settings = app_settings()
    for name in SECRETS:
        assert "${kv}" in settings[name], name
    assert "var kv = '@Microsoft.KeyVault(VaultName=" in (INFRA / "main.bicep").read_text()
    outputs = [line for line in template_text().splitlines() if line.startswith("output")]
    secret_inputs = ("webhookKey", "clientState", "ldapPassword", "relayCallerKey", "listKeys")
    assert not [line for line in outputs if any(word in line for word in secret_inputs)]


def test_the_identity_gets_exactly_the_roles_it_needs() -> None:
    text = template_text()
    assigned = set(re.findall(r"var \w+ = '([0-9a-f-]{36})'", text))
    assert assigned == set(ROLES), {g: ROLES.get(g, "unexpected") for g in assigned}
    scopes = re.findall(r"scope: (\w+)\n", text)
    # the app's four, and the operators' three, all on the queue: never the group
    assert sorted(scopes) == ["account", "queue", "queue", "queue", "queue", "queue", "vault"]


def test_the_queue_has_sessions_duplicate_detection_and_dead_lettering() -> None:
    queue = (INFRA / "modules" / "servicebus.bicep").read_text()
    for needed in (
        "requiresSession: true",
        "requiresDuplicateDetection: true",
        "lockDuration: 'PT5M'",
        "deadLetteringOnMessageExpiration: true",
        "disableLocalAuth: true",
    ):
        assert needed in queue


def test_listen_and_send_are_separate_rules() -> None:
    relay = (INFRA / "modules" / "relay.bicep").read_text()
    rights = re.findall(r"name: '(\w+)'\n  properties: \{\n    rights: \[ ([^\]]+) \]", relay)
    assert rights == [("listen", "'Listen'"), ("send", "'Send'")]
    assert "requiresClientAuthorization: true" in relay


def test_every_checkov_skip_gives_a_reason() -> None:
    skips = re.findall(r"#checkov:skip=([A-Z0-9_]+)(:?)(.*)", template_text())
    assert skips
    assert all(colon and len(reason.strip()) > 20 for _, colon, reason in skips)


def test_the_test_script_validates_the_infra_in_its_own_venv() -> None:
    script = (ROOT / "scripts" / "test").read_text()
    assert "bash scripts/validate-infra" in script
    validate = Path(ROOT / "scripts" / "validate-infra").read_text()
    assert ".venv-infra" in validate and "infra/parse.py" in validate
    assert "checkov" in (INFRA / "requirements.txt").read_text()


def test_operators_get_replay_rights_on_the_queue_and_data_owner_only_when_asked() -> None:
    queue = (INFRA / "modules" / "servicebus.bicep").read_text()
    blocks = re.findall(
        r"resource (operator\w+) 'Microsoft.Authorization/roleAssignments@[^']+' = "
        r"\[for operator in operatorPrincipalIds: (if \(operatorQueueOwner\) )?\{(.*?)\n\}\]",
        queue,
        re.DOTALL,
    )
    roles = {name: (bool(condition), body) for name, condition, body in blocks}
    assert set(roles) == {"operatorReceiver", "operatorSender", "operatorOwner"}
    for name, (conditional, body) in roles.items():
        assert "scope: queue" in body and "principalId: operator" in body
        assert conditional == (name == "operatorOwner")
    assert "roleDefinitions', dataOwner)" in roles["operatorOwner"][1]
    assert "param operatorQueueOwner bool = false" in queue  # least privilege by default
    main = (INFRA / "main.bicep").read_text()
    for name in ("operatorPrincipalIds", "operatorPrincipalType", "operatorQueueOwner"):
        assert f"param {name} " in main and f"{name}: {name}" in main


def test_the_queue_outlasts_the_apps_own_redelivery_schedule() -> None:
    from writeback.service.handle_event import MAX_REDELIVERY_DELAY, redelivery_delay

    queue = (INFRA / "modules" / "servicebus.bicep").read_text()
    queue_count = int(re.search(r"var maxDeliveryCount = (\d+)", queue).group(1))  # type: ignore[union-attr]
    assert "maxDeliveryCount: maxDeliveryCount" in queue
    app_count = int(app_settings()["WRITEBACK_MAX_DELIVERY_COUNT"].strip("'"))
    assert queue_count > app_count  # the app dead-letters first, with its own reason
    hours = sum(redelivery_delay(n) for n in range(app_count)) / 3600
    assert MAX_REDELIVERY_DELAY == 300 and 7 < hours < 8.5  # what the README states


def test_the_readme_documents_replay_status_and_pausing_the_listener() -> None:
    readme = (INFRA / "README.md").read_text()
    for needed in (
        "AzureWebJobs.worker.Disabled",
        "operatorPrincipalIds",
        "operatorQueueOwner",
        "python -m writeback replay",
        "Azure Service Bus Data Owner",
    ):
        assert needed in readme, needed
