// Azure Relay Hybrid Connection between the Function app (Send) and the on-premises
// agent (Listen). Two rules with one right each, so the cloud key cannot listen and
// the agent's key cannot send; clients must present a SAS token.
//
// Every Relay namespace is created with a namespace-wide Manage/Send/Listen rule,
// RootManageSharedAccessKey. Nothing here uses it (the app's Send key is the Hybrid
// Connection's own rule), and a template cannot remove it: ARM deployments create and
// update, and Relay, unlike Service Bus, has no disableLocalAuth (its Hybrid
// Connections authorize with SAS rules only, so turning SAS off would cut the agent
// off too). Delete it after the deployment with the command in the
// relayRootKeyDeleteCommand output (infra/README.md, step 1); its keys are readable
// only by principals with listKeys on the namespace (Owner, Contributor).
param location string
param name string
param hybridConnectionName string
param tags object
param workspaceId string

resource namespace 'Microsoft.Relay/namespaces@2021-11-01' = {
  name: name
  location: location
  tags: tags
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
}

resource hybridConnection 'Microsoft.Relay/namespaces/hybridConnections@2021-11-01' = {
  parent: namespace
  name: hybridConnectionName
  properties: {
    requiresClientAuthorization: true
    userMetadata: 'writeback: the on-premises agent listens, the Function app sends'
  }
}

resource listen 'Microsoft.Relay/namespaces/hybridConnections/authorizationRules@2021-11-01' = {
  parent: hybridConnection
  name: 'listen'
  properties: {
    rights: [ 'Listen' ]
  }
}

resource send 'Microsoft.Relay/namespaces/hybridConnections/authorizationRules@2021-11-01' = {
  parent: hybridConnection
  name: 'send'
  properties: {
    rights: [ 'Send' ]
  }
}

resource logs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: namespace
  properties: {
    workspaceId: workspaceId
    logs: [
      {
        category: 'HybridConnectionsEvent'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output namespaceName string = namespace.name
output namespaceHost string = '${namespace.name}.servicebus.windows.net'
output hybridConnectionName string = hybridConnection.name
output listenRuleName string = listen.name
output sendRuleName string = send.name
output sendRuleId string = send.id
