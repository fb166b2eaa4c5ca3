"""The Bicep template against the code: every setting it reads is set, secrets are
Key Vault references, the identity gets exactly the roles it needs, and the
hardening of issue 12 (finding 9) is there: diagnostic settings on every resource
that holds or moves data, no basic publishing credentials, a closed SCM site,
Entra-only telemetry ingestion, no use of the relay's root key, a long caller key.

These read the template text (the Bicep tooling lives in .venv-infra, see
scripts/validate-infra, which parses it and runs checkov).
"""

from __future__ import annotations

import json
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
    "3913510d-42f4-4e42-8a64-420c390055eb": "Monitoring Metrics Publisher",
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


def test_the_worker_has_a_thread_for_every_concurrent_session() -> None:
    host_json = json.loads((ROOT / "host.json").read_text())
    sessions = host_json["extensions"]["serviceBus"]["maxConcurrentSessions"]
    assert int(app_settings()["PYTHON_THREADPOOL_THREAD_COUNT"].strip("'")) >= sessions


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
    assignments = re.findall(  # single ones, and the operators' loops ([for ...: {)
        r"'Microsoft\.Authorization/roleAssignments@[^']+' = (?:\[for [^{]*)?\{\n(.*?)\n\}",
        text,
        re.DOTALL,
    )
    scopes = [re.search(r"scope: (\w+)\n", block) for block in assignments]
    names = sorted(match.group(1) for match in scopes if match)
    # the app's five and the operators' three (all on the queue): never the group
    assert names == ["account", "insights", "queue", "queue", "queue", "queue", "queue", "vault"]


def test_pausing_stops_the_workers_listener_through_the_hosts_own_switch() -> None:
    """``paused`` sets the host's AzureWebJobs.<function>.Disabled for the trigger (the
    listener is not started: nothing is received or rescheduled) and WRITEBACK_PAUSED
    (the reconcile held, anything delivered anyway parked)."""
    from tests.support.functions_host import app_function

    main = (INFRA / "main.bicep").read_text()
    _, trigger = app_function("worker")
    assert trigger["type"] == "serviceBusTrigger"  # the function the switch names
    assert re.search(r"^  'AzureWebJobs\.worker\.Disabled': paused$", main, re.MULTILINE)
    assert app_settings()["WRITEBACK_PAUSED"] == "paused"
    assert re.search(r"^param paused string = 'false'$", main, re.MULTILINE)
    parameters = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert parameters["paused"]["value"] == "true"  # a first deployment starts paused
    readme = (INFRA / "README.md").read_text()
    pausing = readme.split("## Pausing", 1)[1].split("\n## ", 1)[0]
    assert "AzureWebJobs.worker.Disabled" in pausing and "WRITEBACK_PAUSED" in pausing
    sample = json.loads((ROOT / "local.settings.sample.json").read_text())
    assert sample["Values"]["AzureWebJobs.worker.Disabled"] == "false"


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


# -- finding 9 of issue 12 -----------------------------------------------------------


def module(name: str) -> str:
    return (INFRA / "modules" / f"{name}.bicep").read_text()


def diagnostic_settings(text: str) -> dict[str, str]:
    """Scope name -> body of every diagnostic setting in ``text``."""
    blocks = re.findall(
        r"'Microsoft\.Insights/diagnosticSettings@[^']+' = \{\n(.*?)\n\}\n", text, re.DOTALL
    )
    found = {}
    for block in blocks:
        scope = re.search(r"^  scope: (\w+)$", block, re.MULTILINE)
        assert scope, block
        assert "workspaceId: workspaceId" in block
        found[scope.group(1)] = block
    return found


def test_every_resource_sends_its_logs_to_log_analytics() -> None:
    vault = diagnostic_settings(module("keyvault"))["vault"]
    assert "category: 'AuditEvent'" in vault  # every secret read is audited
    assert "category: 'FunctionAppLogs'" in diagnostic_settings(module("functionapp"))["site"]
    bus = diagnostic_settings(module("servicebus-diagnostics"))["namespace"]
    assert "categoryGroup: 'allLogs'" in bus
    assert "existing" in module("servicebus-diagnostics")
    assert "category: 'HybridConnectionsEvent'" in diagnostic_settings(module("relay"))["namespace"]
    storage = diagnostic_settings(module("storage"))
    assert set(storage) == {"account", "blobs", "files"}
    for service in ("blobs", "files"):
        assert "logs: storageLogs" in storage[service]
    for category in ("StorageRead", "StorageWrite", "StorageDelete"):
        assert f"category: '{category}'" in module("storage")
    main = (INFRA / "main.bicep").read_text()
    assert main.count("workspaceId: monitoring.outputs.workspaceId") == 5
    assert "output workspaceId string = workspace.id" in module("monitoring")


def test_no_basic_publishing_credentials_and_a_closed_scm_site() -> None:
    app = module("functionapp")
    policies = re.findall(
        r"basicPublishingCredentialsPolicies@[^']+' = \{\n  parent: site\n  name: '(\w+)'\n"
        r"  properties: \{\n    allow: false\n",
        app,
    )
    assert sorted(policies) == ["ftp", "scm"]
    assert "ftpsState: 'Disabled'" in app
    assert "scmIpSecurityRestrictionsDefaultAction: 'Deny'" in app
    assert "scmIpSecurityRestrictionsUseMain: false" in app
    assert "[for cidr in scmAllowedIpRanges:" in app
    assert "param scmAllowedIpRanges array = []" in (INFRA / "main.bicep").read_text()


def test_application_insights_takes_only_entra_authenticated_telemetry() -> None:
    monitoring = module("monitoring")
    assert "DisableLocalAuth: true" in monitoring
    assert "scope: insights" in monitoring and "3913510d-42f4-4e42-8a64-420c390055eb" in monitoring
    setting = app_settings()["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"]
    # The form the Functions host and azure-monitor-opentelemetry-exporter read.
    assert setting == "'Authorization=AAD;ClientId=${identity.properties.clientId}'"
    assert app_settings()["AZURE_CLIENT_ID"] == "identity.properties.clientId"


def test_the_relay_root_key_is_never_used_and_its_removal_is_given() -> None:
    text = template_text()
    keys = re.findall(r"(?<![.\w])listKeys\((\w+),", text)
    assert keys == ["relaySendRuleId"]  # the Hybrid Connection's Send-only rule
    assert re.findall(r"(\w+)\.listKeys\(", text) == ["storage"]  # the content share's key
    assert "sendRuleId string = send.id" in module("relay")
    root_lines = [line for line in text.splitlines() if "RootManageSharedAccessKey" in line]
    allowed = ("//", "@description(", "output relayRootKeyDeleteCommand")
    assert all(line.startswith(allowed) for line in root_lines), root_lines
    assert any(line.startswith("output relayRootKeyDeleteCommand") for line in root_lines)
    code = [line for line in module("relay").splitlines() if not line.startswith("//")]
    assert not [line for line in code if "disableLocalAuth" in line]  # Relay has none


def test_the_caller_key_is_secure_and_long() -> None:
    main = (INFRA / "main.bicep").read_text()
    declaration = re.search(r"((?:^@.*\n)+)param relayCallerKey string(.*)$", main, re.MULTILINE)
    assert declaration, "no relayCallerKey parameter"
    decorators, default = declaration.group(1), declaration.group(2)
    assert "@secure()" in decorators and "@minLength(32)" in decorators
    assert default.strip() == ""  # no default: an empty or short key is refused at deployment


# -- issue 15: alerts and the workbook (infra/modules/alerts.bicep) ------------------

#: Metric names as Azure Monitor documents them ("Supported metrics" reference pages:
#: microsoft-servicebus-namespaces-metrics, microsoft-relay-namespaces-metrics,
#: microsoft-insights-components-metrics), with the aggregations they offer.
DOCUMENTED_METRICS = {
    "microsoft.servicebus/namespaces": {
        "ActiveMessages": {"Average", "Minimum", "Maximum"},
        "DeadletteredMessages": {"Average", "Minimum", "Maximum"},
        "ScheduledMessages": {"Average", "Minimum", "Maximum"},
        "IncomingMessages": {"Total"},
        "OutgoingMessages": {"Total"},
        "CompleteMessage": {"Total"},
        "AbandonMessage": {"Total"},
    },
    "microsoft.relay/namespaces": {"ActiveListeners": {"Total"}, "ActiveConnections": {"Total"}},
    "microsoft.insights/components": {"requests/failed": {"Count"}, "requests/count": {"Count"}},
}
#: What the issue asks an operator to be told of.
ALERTS = {
    "dead-letters",
    "backlog",
    "backlog-age",
    "function-failures",
    "relay-no-listener",
    "subscription-upkeep-failed",
    "reconcile-failed",
    "reconcile-stale",
    "relay-agent-unreachable",
}
WORKBOOK_TILES = {
    "Events per minute",
    "Latency from notification to write, ms (p50, p99)",
    "Outcomes by reason (messages)",
    "Dead letters by reason",
    "Members left out, by reason",
    "Last reconciles",
    "Dead-lettered messages in the queue (Service Bus)",
}


def alerts_module() -> str:
    return module("alerts")


def log_queries() -> dict[str, str]:
    """Name -> text of every KQL query in the alerts module (its ''' strings)."""
    text = alerts_module()
    found = dict(re.findall(r"^var (\w+) = (?:replace\()?'''\n(.*?)'''", text, re.M | re.S))
    assert found and all("AppTraces" in query for query in found.values()), found
    return found


def logged_fields() -> tuple[set[str], set[str]]:
    """The ``extra=`` keys the product's code logs with, and every string constant in it."""
    import ast

    keys: set[str] = set()
    constants: set[str] = set()
    for path in (ROOT / "writeback").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                constants.add(node.value)
            value = node.value if isinstance(node, ast.keyword) and node.arg == "extra" else None
            if isinstance(value, ast.Dict):
                keys.update(
                    k.value
                    for k in value.keys
                    if isinstance(k, ast.Constant) and isinstance(k.value, str)
                )
    return keys, constants


def test_every_log_query_reads_fields_the_code_logs() -> None:
    """In Application Insights the records' extra= fields are custom dimensions:
    Properties in the workspace's AppTraces (customDimensions in the classic traces)."""
    keys, constants = logged_fields()
    errors = set(
        re.findall(r"^class (\w+)\(", (ROOT / "writeback" / "errors.py").read_text(), re.M)
    )
    used: set[str] = set()
    for name, query in log_queries().items():
        fields = set(re.findall(r"Properties\.(\w+)", query))
        assert fields, name
        assert fields <= keys, f"{name} reads fields no code logs: {sorted(fields - keys)}"
        used |= fields
        compared = re.findall(r'Properties\.(\w+)\) (?:==|in) \(?("[^)]*")', query)
        for field, values in compared:
            for value in re.findall(r'"([^"]*)"', values):
                assert value in constants or value in errors, f"{name}: {field} == {value!r}"
    assert {"outcome", "reason", "reconcile_reason", "subscription_action", "latency_ms",
            "notifications", "messages", "skipped", "error", "group_id"} <= used  # fmt: skip


def test_every_metric_an_alert_or_the_workbook_uses_is_documented() -> None:
    text = alerts_module()
    pairs = re.findall(
        r"namespace: '([^']+)'\n    metric: '([^']+)'\n    aggregation: '(\w+)'", text
    )
    pairs += re.findall(
        r"metricNamespace: '([^']+)'\n\s+metricName: '([^']+)'\n\s+timeAggregation: '(\w+)'",
        text,
    )
    assert len(pairs) == 5, pairs
    for namespace, metric, aggregation in pairs:
        offered = DOCUMENTED_METRICS[namespace.lower()].get(metric)
        assert offered is not None, f"{namespace} has no metric {metric}"
        assert aggregation in offered, f"{metric} offers {offered}, not {aggregation}"
    workbook = re.findall(r"metric: '([\w./]+)--(\w+)'", text)
    assert workbook
    assert all(m in DOCUMENTED_METRICS[ns] for ns, m in workbook), workbook


def test_the_alerts_cover_what_an_operator_must_know_and_reach_the_action_group() -> None:
    text = alerts_module()
    names = set(re.findall(r"^    name: '([\w-]+)'$", text, re.M))
    names |= {
        re.sub(r"^\$\{prefix\}-", "", n) for n in re.findall(r"name: '(\$\{prefix\}-[\w-]+)'", text)
    }
    assert names >= ALERTS, ALERTS - names
    assert "emailAddress: alertEmail" in text and "useCommonAlertSchema: true" in text
    assert text.count("actionGroupId: operators.id") == 2  # the metric alerts (loop, relay)
    assert "actionGroups: [ operators.id ]" in text  # the log alerts (loop)
    main = (INFRA / "main.bicep").read_text()
    assert re.search(r"^param alertEmail string$", main, re.M)  # required: no silent deployment
    assert "alertEmail: alertEmail" in main
    assert "WRITEBACK_RECONCILE_INTERVAL: string(reconcileInterval)" in main
    assert "reconcileInterval: reconcileInterval" in main
    assert "var staleAfter = '${2 * reconcileInterval}s'" in text
    assert "ago(STALE_AFTER)" in log_queries()["reconcileStaleQuery"]
    assert "if (useRelay)" in text and "], useRelay ? [" in text  # relay alerts only with relay


def test_the_workbook_has_the_pipelines_figures() -> None:
    text = alerts_module()
    titles = set(re.findall(r"title: '([^']+)'", text))
    assert titles >= WORKBOOK_TILES, WORKBOOK_TILES - titles
    assert "serializedData: string(workbookContent)" in text
    assert "name: guid(" in text  # a workbook's name must be a GUID
