// writeback on Azure: Graph webhook -> Service Bus (sessions per group) -> worker ->
// AD, either over LDAP through VNet integration (directory = 'ldap') or through an
// Azure Relay Hybrid Connection to the on-premises agent (directory = 'relay').
// Deploy: see infra/README.md. Every setting the code reads is set below.
targetScope = 'resourceGroup'

@description('Azure region of every resource.')
param location string = resourceGroup().location

@description('Short name used in resource names (letters and digits).')
@minLength(3)
@maxLength(11)
param prefix string = 'writeback'

@description('How the Function app reaches AD: ldap (VNet integration and VPN/ExpressRoute to the DCs) or relay (the on-premises agent).')
@allowed([ 'ldap', 'relay' ])
param directory string = 'relay'

@description('DN of the OU the groups are written to.')
param targetOu string

@description('ldap only: ldaps://dc:636 or ldap://dc:389 (StartTLS).')
param ldapUrl string = ''

@description('ldap only: the service account (DN or UPN) with the delegation from `python -m writeback permissions`.')
param ldapUser string = ''

@description('ldap only: its password, stored in Key Vault.')
@secure()
param ldapPassword string = ''

@description('ldap only: subnet (delegated to Microsoft.Web/serverFarms) for VNet integration; empty for none.')
param subnetId string = ''

@description('Graph subscription clientState secret (python -c "import secrets; print(secrets.token_urlsafe(48))").')
@secure()
@minLength(32)
param clientState string

@description('Function host key for the Graph webhook URLs (32+ URL-safe characters).')
@secure()
@minLength(32)
param webhookKey string

@description('The caller key the Function app and the relay agent share, 32+ characters (python -c "import secrets; print(secrets.token_urlsafe(48))"). Required in both modes so a short key can never be deployed; with directory=ldap it is not stored anywhere.')
@secure()
@minLength(32)
param relayCallerKey string

@description('CIDR ranges (e.g. your workstation\'s "203.0.113.7/32") allowed to reach the SCM (Kudu) site, for publishing the code and SSH; empty (the default) denies everyone.')
param scmAllowedIpRanges array = []

@allowed([ 'objectid', 'displayname', 'cloudsync' ])
param dnFormat string = 'objectid'

@allowed([ 'distribution', 'security', 'mail-enabled-security' ])
param groupType string = 'distribution'

@description('Path of the scoping and placement rules file in the deployed package (docs/rules.md), e.g. /home/site/wwwroot/rules.toml; empty: group writeback V1\'s scope.')
param rulesPath string = ''

@description('Without a rules file: also write cloud security and mail-enabled security groups.')
@allowed([ 'true', 'false' ])
param securityGroups string = 'false'

@description('What happens to the AD object of a group that falls out of scope.')
@allowed([ 'keep', 'delete' ])
param outOfScope string = 'keep'

@description('Read writebackConfiguration from Graph beta (for rules written for Entra Connect V2 migrants).')
@allowed([ 'true', 'false' ])
param graphWritebackConfiguration string = 'false'

@description('Write msExchHideFromAddressLists from Graph\'s hideFromAddressLists (an Exchange-prepared forest).')
@allowed([ 'true', 'false' ])
param hideFromAddressLists string = 'false'

@description('Whether the identity holds Member.Read.Hidden; auto reads it from its token.')
@allowed([ 'auto', 'true', 'false' ])
param memberReadHidden string = 'auto'

@allowed([ 'keep', 'delete' ])
param softDelete string = 'keep'

@description('true writes groups; false makes the reconcile delete every group we wrote (behind the threshold). Never use false to pause: see WRITEBACK_PAUSED.')
@allowed([ 'true', 'false' ])
param enabled string = 'true'

@description('true pauses: the host stops the worker trigger\'s listener (AzureWebJobs.worker.Disabled), so events wait in the queue untouched, and WRITEBACK_PAUSED holds the reconcile and parks anything delivered anyway.')
@allowed([ 'true', 'false' ])
param paused string = 'false'

param memberLimit int = 50000
param deleteThreshold int = 500

@description('SIDs never written as members, beyond the privileged principals the member guard always refuses (comma-separated; docs/security.md).')
param memberDeny string = ''

@description('SIDs of groups the nesting guard treats as protected, beyond adminCount=1, built-in and privileged groups (comma-separated; docs/security.md).')
param protectedGroups string = ''

@description('Elastic Premium size.')
@allowed([ 'EP1', 'EP2', 'EP3' ])
param planSku string = 'EP1'

@description('Always-ready (pre-warmed) instances: no cold start on a notification.')
@minValue(1)
@maxValue(20)
param alwaysReady int = 1

@maxValue(100)
param maximumBurst int = 10

param tags object = { app: 'writeback' }

@description('E-mail address the alerts go to (infra/modules/alerts.bicep: dead letters, backlog, failed invocations, subscription upkeep, reconcile, relay agent).')
param alertEmail string

@description('Seconds between reconciles (WRITEBACK_RECONCILE_INTERVAL); a reconcile older than twice this alerts.')
@minValue(300)
@maxValue(43200)
param reconcileInterval int = 1800

@description('Events waiting in the queue above which the backlog alert fires.')
@minValue(1)
param backlogThreshold int = 1000

@description('directory=relay: failed calls to the agent in 15 minutes before its alert fires.')
@minValue(1)
param relayFailureThreshold int = 3

@description('Object ids of the operators who run `python -m writeback replay` and `status` (Azure Service Bus Data Receiver and Data Sender on the queue).')
param operatorPrincipalIds array = []

@description('What operatorPrincipalIds are: User, Group or ServicePrincipal.')
@allowed([ 'User', 'Group', 'ServicePrincipal' ])
param operatorPrincipalType string = 'Group'

@description('true also gives the operators Azure Service Bus Data Owner on the queue, which `status` needs to read the queue depth (Manage).')
param operatorQueueOwner bool = false

var suffix = uniqueString(resourceGroup().id, prefix)
var appName = 'func-${prefix}-${suffix}'
var hostName = '${appName}.azurewebsites.net'
var vaultName = 'kv-${take(prefix, 8)}-${take(suffix, 10)}'
var queueName = 'group-events'
var contentShare = toLower(take('${appName}-content', 63))
var useRelay = directory == 'relay'
var kv = '@Microsoft.KeyVault(VaultName=${vaultName};SecretName='

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-${prefix}-${suffix}'
  location: location
  tags: tags
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    location: location
    prefix: '${prefix}-${suffix}'
    tags: tags
    principalId: identity.properties.principalId
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    location: location
    name: take('st${prefix}${suffix}', 24)
    contentShare: contentShare
    principalId: identity.properties.principalId
    tags: tags
    workspaceId: monitoring.outputs.workspaceId
  }
}

module serviceBus 'modules/servicebus.bicep' = {
  name: 'servicebus'
  params: {
    location: location
    name: 'sb-${prefix}-${suffix}'
    queueName: queueName
    principalId: identity.properties.principalId
    operatorPrincipalIds: operatorPrincipalIds
    operatorPrincipalType: operatorPrincipalType
    operatorQueueOwner: operatorQueueOwner
    tags: tags
  }
}

module relay 'modules/relay.bicep' = if (useRelay) {
  name: 'relay'
  params: {
    location: location
    name: 'relay-${prefix}-${suffix}'
    hybridConnectionName: 'writeback-agent'
    tags: tags
    workspaceId: monitoring.outputs.workspaceId
  }
}

module serviceBusDiagnostics 'modules/servicebus-diagnostics.bicep' = {
  name: 'servicebus-diagnostics'
  params: {
    namespaceName: split(serviceBus.outputs.fullyQualifiedNamespace, '.')[0]
    workspaceId: monitoring.outputs.workspaceId
  }
}

module vault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    location: location
    name: vaultName
    principalId: identity.properties.principalId
    tags: tags
    storageAccountName: storage.outputs.name
    relaySendRuleId: useRelay ? relay.outputs.sendRuleId : ''
    workspaceId: monitoring.outputs.workspaceId
    secretValues: {
      'client-state': clientState
      'notification-url': 'https://${hostName}/api/notifications?code=${webhookKey}'
      'lifecycle-url': 'https://${hostName}/api/lifecycle?code=${webhookKey}'
      'ldap-password': useRelay ? '' : ldapPassword
      'relay-caller-key': useRelay ? relayCallerKey : ''
    }
  }
}

// app settings: every setting the code reads (tests/unit/test_infra.py checks it),
// plus the host's own. Empty means the code's default.
var appSettings = {
  FUNCTIONS_EXTENSION_VERSION: '~4'
  FUNCTIONS_WORKER_RUNTIME: 'python'
  // The worker runs one sync invocation per pool thread: as many as host.json's
  // maxConcurrentSessions (16), or single dispatch would wait for threads.
  PYTHON_THREADPOOL_THREAD_COUNT: '16'
  APPLICATIONINSIGHTS_CONNECTION_STRING: monitoring.outputs.connectionString
  // Local auth is off on the component: the host and the OpenTelemetry exporter send
  // with an Entra token of the app identity (Monitoring Metrics Publisher).
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'Authorization=AAD;ClientId=${identity.properties.clientId}'
  AzureWebJobsStorage__accountName: storage.outputs.name
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identity.properties.clientId
  WEBSITE_CONTENTAZUREFILECONNECTIONSTRING: '${kv}content-share-connection)'
  WEBSITE_CONTENTSHARE: contentShare
  WEBSITE_SKIP_CONTENTSHARE_VALIDATION: '1'
  WEBSITE_RUN_FROM_PACKAGE: '1'
  // The zip is built locally with its dependencies (scripts/package): no build on deployment.
  SCM_DO_BUILD_DURING_DEPLOYMENT: 'false'
  ENABLE_ORYX_BUILD: 'false'

  WRITEBACK_SERVICEBUS__fullyQualifiedNamespace: serviceBus.outputs.fullyQualifiedNamespace
  WRITEBACK_SERVICEBUS__credential: 'managedidentity'
  WRITEBACK_SERVICEBUS__clientId: identity.properties.clientId
  WRITEBACK_SERVICEBUS_NAMESPACE: serviceBus.outputs.fullyQualifiedNamespace
  WRITEBACK_SERVICEBUS_QUEUE: serviceBus.outputs.queueName
  WRITEBACK_SERVICEBUS_CONNECTION: ''
  WRITEBACK_SERVICEBUS_ENDPOINT: ''
  WRITEBACK_SERVICEBUS_CA_FILE: ''
  WRITEBACK_QUEUE: 'servicebus'
  WRITEBACK_QUEUE_PATH: ''
  WRITEBACK_MAX_DELIVERY_COUNT: '100'

  WRITEBACK_RECONCILE_SCHEDULE: '0 */5 * * * *'
  WRITEBACK_RECONCILE_INTERVAL: string(reconcileInterval)
  WRITEBACK_SETTLE_SECONDS: '60'
  WRITEBACK_SUBSCRIPTION_SCHEDULE: '0 17 3 * * *'
  WRITEBACK_RECONCILE_INCREMENTAL: 'true'
  WRITEBACK_FULL_SYNC_EVERY: '48'
  WRITEBACK_STATE_PATH: '/home/data/writeback/state.json'
  WRITEBACK_PAUSED: paused
  // The host's own switch: while true the Service Bus trigger's listener is not
  // started, so nothing is received, rescheduled or counted (the worker is `worker`).
  'AzureWebJobs.worker.Disabled': paused

  WRITEBACK_CLIENT_STATE: '${kv}client-state)'
  WRITEBACK_CLIENT_STATE_PREVIOUS: ''
  WRITEBACK_NOTIFICATION_URL: '${kv}notification-url)'
  WRITEBACK_LIFECYCLE_URL: '${kv}lifecycle-url)'

  WRITEBACK_GRAPH_AUTH: 'managed-identity'
  WRITEBACK_GRAPH_URL: 'https://graph.microsoft.com/v1.0'
  AZURE_CLIENT_ID: identity.properties.clientId
  AZURE_TENANT_ID: tenant().tenantId
  AZURE_CLIENT_SECRET: ''
  AZURE_CLIENT_CERTIFICATE_PATH: ''

  WRITEBACK_TARGET_OU: targetOu
  WRITEBACK_DIRECTORY: directory
  WRITEBACK_LDAP_URL: useRelay ? '' : ldapUrl
  WRITEBACK_LDAP_USER: useRelay ? '' : ldapUser
  WRITEBACK_LDAP_PASSWORD: useRelay ? '' : '${kv}ldap-password)'
  WRITEBACK_LDAP_CA_FILE: ''
  WRITEBACK_DN_FORMAT: dnFormat
  WRITEBACK_GROUP_TYPE: groupType
  WRITEBACK_MEMBER_LIMIT: string(memberLimit)
  WRITEBACK_MEMBER_CHUNK: '5000'
  WRITEBACK_DELETE_THRESHOLD: string(deleteThreshold)
  WRITEBACK_ENABLED: enabled
  WRITEBACK_SOFT_DELETE: softDelete
  WRITEBACK_RULES: rulesPath
  WRITEBACK_SECURITY_GROUPS: securityGroups
  WRITEBACK_OUT_OF_SCOPE: outOfScope
  WRITEBACK_GRAPH_WRITEBACK_CONFIGURATION: graphWritebackConfiguration
  WRITEBACK_HIDE_FROM_ADDRESS_LISTS: hideFromAddressLists
  WRITEBACK_MEMBER_READ_HIDDEN: memberReadHidden
  WRITEBACK_MEMBER_DENY: memberDeny
  WRITEBACK_PROTECTED_GROUPS: protectedGroups
  WRITEBACK_LOG_LEVEL: 'INFO'

  WRITEBACK_RELAY_NAMESPACE: useRelay ? relay.outputs.namespaceHost : ''
  WRITEBACK_RELAY_PATH: useRelay ? relay.outputs.hybridConnectionName : ''
  WRITEBACK_RELAY_SEND_KEY_NAME: useRelay ? relay.outputs.sendRuleName : ''
  WRITEBACK_RELAY_SEND_KEY: useRelay ? '${kv}relay-send-key)' : ''
  WRITEBACK_RELAY_CALLER_KEY: useRelay ? '${kv}relay-caller-key)' : ''
  WRITEBACK_RELAY_TIMEOUT: '30'
  WRITEBACK_RELAY_CA_FILE: ''

  // Read only by single-machine mode (python -m writeback serve), not by the
  // Function app: empty, so a console session in the app sees no surprise.
  WRITEBACK_SUBSCRIPTION_INTERVAL: ''
  WRITEBACK_LISTEN_ADDRESS: ''
  WRITEBACK_LISTEN_PORT: ''
  WRITEBACK_WORKERS: ''
  WRITEBACK_WEBHOOK_KEY: ''
  WRITEBACK_MAX_CONNECTIONS: ''
}

module app 'modules/functionapp.bicep' = {
  name: 'functionapp'
  dependsOn: [ vault ]
  params: {
    location: location
    name: appName
    tags: tags
    identityId: identity.id
    planSku: planSku
    alwaysReady: alwaysReady
    maximumBurst: maximumBurst
    subnetId: subnetId
    settings: appSettings
    webhookKey: webhookKey
    scmAllowedIpRanges: scmAllowedIpRanges
    workspaceId: monitoring.outputs.workspaceId
  }
}

module alerts 'modules/alerts.bicep' = {
  name: 'alerts'
  params: {
    location: location
    prefix: '${prefix}-${suffix}'
    tags: tags
    alertEmail: alertEmail
    workspaceResourceId: monitoring.outputs.workspaceId
    insightsId: monitoring.outputs.insightsId
    serviceBusNamespaceName: split(serviceBus.outputs.fullyQualifiedNamespace, '.')[0]
    queueName: serviceBus.outputs.queueName
    relayNamespaceName: useRelay ? relay.outputs.namespaceName : ''
    reconcileInterval: reconcileInterval
    backlogThreshold: backlogThreshold
    relayFailureThreshold: relayFailureThreshold
  }
}

@description('Where Graph posts change notifications (the function key is in Key Vault, secret notification-url).')
output webhookUrl string = 'https://${app.outputs.hostName}/api/notifications'
output lifecycleUrl string = 'https://${app.outputs.hostName}/api/lifecycle'
output functionAppName string = app.outputs.name
@description('Grant the Graph application permissions to this service principal (infra/README.md).')
output identityPrincipalId string = identity.properties.principalId
output identityClientId string = identity.properties.clientId
output keyVaultName string = vault.outputs.name
@description('The Azure Monitor workbook with the pipeline\'s figures (portal: Monitor, Workbooks).')
output workbookId string = alerts.outputs.workbookId
output serviceBusNamespace string = serviceBus.outputs.fullyQualifiedNamespace
@description('For the on-premises agent: WRITEBACK_RELAY_NAMESPACE.')
output agentRelayNamespace string = useRelay ? relay.outputs.namespaceHost : ''
@description('For the on-premises agent: WRITEBACK_RELAY_PATH.')
output agentRelayPath string = useRelay ? relay.outputs.hybridConnectionName : ''
@description('For the on-premises agent: WRITEBACK_AGENT_LISTEN_KEY_NAME; read the key with agentListenKeyCommand.')
output agentListenKeyName string = useRelay ? relay.outputs.listenRuleName : ''
output agentListenKeyCommand string = useRelay ? 'az relay hyco authorization-rule keys list --resource-group ${resourceGroup().name} --namespace-name ${relay.outputs.namespaceName} --hybrid-connection-name ${relay.outputs.hybridConnectionName} --name ${relay.outputs.listenRuleName} --query primaryKey --output tsv' : ''
@description('Run once after the first deployment: deletes the namespace-wide RootManageSharedAccessKey rule, which Azure creates with every Relay namespace and nothing here uses (infra/README.md).')
output relayRootKeyDeleteCommand string = useRelay ? 'az relay namespace authorization-rule delete --resource-group ${resourceGroup().name} --namespace-name ${relay.outputs.namespaceName} --name RootManageSharedAccessKey' : ''
@description('For the on-premises agent: WRITEBACK_RELAY_CALLER_KEY is the relayCallerKey parameter, also kept here.')
output agentCallerKeySecret string = useRelay ? 'az keyvault secret show --vault-name ${vaultName} --name relay-caller-key --query value --output tsv' : ''
