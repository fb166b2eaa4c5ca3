// Azure Relay Hybrid Connection between the Function app (Send) and the on-premises
// agent (Listen). Two rules with one right each, so the cloud key cannot listen and
// the agent's key cannot send; clients must present a SAS token.
param location string
param name string
param hybridConnectionName string
param tags object

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

output namespaceName string = namespace.name
output namespaceHost string = '${namespace.name}.servicebus.windows.net'
output hybridConnectionName string = hybridConnection.name
output listenRuleName string = listen.name
output sendRuleName string = send.name
output sendRuleId string = send.id
