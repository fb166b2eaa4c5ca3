// Key Vault (RBAC) holding every secret the Function app reads, as Key Vault
// references. Secrets the template can derive (the content share's connection
// string, the relay Send key, the webhook URLs with their function key) are written
// here so they never appear in app settings or deployment outputs. Every data-plane
// call, each secret read included, is audited (AuditEvent) to the Log Analytics
// workspace.
param location string
param name string
param principalId string
param tags object
param storageAccountName string
param relaySendRuleId string
param workspaceId string
@secure()
param secretValues object

var secretsUser = '4633458b-17de-408a-b874-0445c86b69e6'

resource storage 'Microsoft.Storage/storageAccounts@2023-01-01' existing = {
  name: storageAccountName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  #checkov:skip=CKV_AZURE_109:Key Vault references from a Function app without VNet integration resolve over the public endpoint; access is RBAC-only
  #checkov:skip=CKV_AZURE_189:see CKV_AZURE_109: public network access is needed unless the app is VNet-integrated with a private endpoint
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource audit 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: vault
  properties: {
    workspaceId: workspaceId
    logs: [
      {
        category: 'AuditEvent'
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

var storageConnection = 'DefaultEndpointsProtocol=https;AccountName=${storage.name};AccountKey=${storage.listKeys().keys[0].value};EndpointSuffix=${environment().suffixes.storage}'
var derived = union({ 'content-share-connection': storageConnection }, empty(relaySendRuleId) ? {} : {
  'relay-send-key': listKeys(relaySendRuleId, '2021-11-01').primaryKey
})
var secrets = union(secretValues, derived)

resource secret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = [for item in items(secrets): if (!empty(item.value)) {
  #checkov:skip=CKV_AZURE_41:these secrets are rotated by redeploying (keys, URLs) or by the operator (caller key, client state); an expiry would break the app silently
  #checkov:skip=CKV_AZURE_114:the content type adds nothing for these plain-text secrets
  parent: vault
  name: item.key
  properties: {
    value: item.value
  }
}]

resource reader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, principalId, secretsUser)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', secretsUser)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output name string = vault.name
output uri string = vault.properties.vaultUri
