// The Linux Function app on an Elastic Premium plan (Python 3.11, always-ready
// instances so a change notification never waits for a cold start), running as the
// user-assigned identity, with every setting the code reads. Secrets are Key Vault
// references resolved with that identity.
//
// Publishing: FTP and basic (user/password) authentication to the SCM (Kudu) site are
// off, so deployments authenticate with Entra ID; the SCM site itself answers only the
// addresses in scmAllowedIpRanges (none by default: deny all). Its own rules, not the
// main site's: the main site must stay open to Graph's webhook calls, the SCM site
// should not be open to anyone. The function app's logs go to Log Analytics.
param location string
param name string
param tags object
param identityId string
param planSku string
param alwaysReady int
param maximumBurst int
param subnetId string
@description('Every app setting, built in main.bicep (secrets as Key Vault references).')
param settings object
@secure()
param webhookKey string
@description('CIDR ranges allowed to reach the SCM (Kudu) site: deployment and SSH; empty denies all.')
param scmAllowedIpRanges array
param workspaceId string

var useVnet = !empty(subnetId)

resource plan 'Microsoft.Web/serverfarms@2023-12-01' = {
  #checkov:skip=CKV_AZURE_225:zone redundancy needs three instances and a zonal region; left to the operator
  name: 'plan-${name}'
  location: location
  tags: tags
  kind: 'elastic'
  sku: {
    name: planSku
    tier: 'ElasticPremium'
  }
  properties: {
    reserved: true
    maximumElasticWorkerCount: maximumBurst
  }
}

resource site 'Microsoft.Web/sites@2023-12-01' = {
  #checkov:skip=CKV_AZURE_222:Graph posts change notifications from the internet, so the webhook must be public; it checks a function key and the clientState
  #checkov:skip=CKV_AZURE_17:Graph presents no client certificate to webhooks; requests are authenticated by function key and clientState
  #checkov:skip=CKV_AZURE_212:numberOfWorkers does not apply to Elastic Premium, which scales itself; alwaysReady keeps warm instances
  #checkov:skip=CKV_AZURE_213:the app has no health endpoint; the platform restarts a failing host, and status/Application Insights show the pipeline's health
  name: name
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    keyVaultReferenceIdentity: identityId
    virtualNetworkSubnetId: useVnet ? subnetId : null
    vnetRouteAllEnabled: useVnet
    siteConfig: {
      linuxFxVersion: 'Python|3.11'
      minimumElasticInstanceCount: alwaysReady
      preWarmedInstanceCount: alwaysReady
      functionsRuntimeScaleMonitoringEnabled: useVnet
      ftpsState: 'Disabled'
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      scmIpSecurityRestrictionsUseMain: false
      scmIpSecurityRestrictionsDefaultAction: 'Deny'
      scmIpSecurityRestrictions: [for cidr in scmAllowedIpRanges: {
        ipAddress: cidr
        action: 'Allow'
        priority: 100
        name: 'operator'
      }]
      http20Enabled: true
      remoteDebuggingEnabled: false
      cors: {
        allowedOrigins: []
      }
      appSettings: [for item in items(settings): {
        name: item.key
        value: item.value
      }]
    }
  }
}

// A host key of our choosing, so the notification URLs (kept in Key Vault) can be
// written before the code is deployed.
resource graphKey 'Microsoft.Web/sites/host/functionKeys@2023-12-01' = {
  name: '${site.name}/default/graph'
  properties: {
    name: 'graph'
    value: webhookKey
  }
}

// No publishing with a user name and password, over FTP or to the SCM site.
resource ftpCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2023-12-01' = {
  parent: site
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmCredentials 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2023-12-01' = {
  parent: site
  name: 'scm'
  properties: {
    allow: false
  }
}

resource logs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: site
  properties: {
    workspaceId: workspaceId
    logs: [
      {
        category: 'FunctionAppLogs'
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

output name string = site.name
output hostName string = site.properties.defaultHostName
