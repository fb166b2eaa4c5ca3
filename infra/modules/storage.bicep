// Host storage of the Function app. The host reaches blobs with the managed identity
// (AzureWebJobsStorage__accountName); only the Elastic Premium content share (Azure
// Files over SMB, which takes no identity) needs the account key, so shared keys stay
// on and the key-based connection string lives in Key Vault only. Reads, writes and
// deletes on blobs (host keys and leases) and on the content share are logged to the
// Log Analytics workspace, with the account's transaction metrics.
param location string
param name string
param contentShare string
param principalId string
param tags object
param workspaceId string

var blobDataOwner = 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'

resource account 'Microsoft.Storage/storageAccounts@2023-01-01' = {
  #checkov:skip=CKV_AZURE_35:without VNet integration and private endpoints the Functions host reaches its storage over the public endpoint; access needs Entra ID or the key kept in Key Vault
  #checkov:skip=CKV_AZURE_59:the Functions host reaches its storage over the public endpoint unless VNet integration with private endpoints is configured
  #checkov:skip=CKV_AZURE_206:LRS is enough for host storage that holds only leases, keys and the deployed package
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
  properties: {
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    allowSharedKeyAccess: true
    defaultToOAuthAuthentication: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource files 'Microsoft.Storage/storageAccounts/fileServices@2023-01-01' = {
  parent: account
  name: 'default'
}

resource blobs 'Microsoft.Storage/storageAccounts/blobServices@2023-01-01' = {
  parent: account
  name: 'default'
}

var storageLogs = [
  {
    category: 'StorageRead'
    enabled: true
  }
  {
    category: 'StorageWrite'
    enabled: true
  }
  {
    category: 'StorageDelete'
    enabled: true
  }
]
var transactions = [
  {
    category: 'Transaction'
    enabled: true
  }
]

resource accountMetrics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: account
  properties: {
    workspaceId: workspaceId
    metrics: transactions
  }
}

resource blobLogs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: blobs
  properties: {
    workspaceId: workspaceId
    logs: storageLogs
    metrics: transactions
  }
}

resource fileLogs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: files
  properties: {
    workspaceId: workspaceId
    logs: storageLogs
    metrics: transactions
  }
}

resource share 'Microsoft.Storage/storageAccounts/fileServices/shares@2023-01-01' = {
  parent: files
  name: contentShare
}

resource hostBlobs 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, principalId, blobDataOwner)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', blobDataOwner)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output name string = account.name
#disable-next-line outputs-should-not-contain-secrets
output id string = account.id
