// Log Analytics workspace and the workspace-based Application Insights the app logs to.
// Local (instrumentation-key) ingestion is off: only telemetry sent with an Entra token
// of an identity holding Monitoring Metrics Publisher on the component is accepted,
// so the connection string in the app settings lets nobody write fake telemetry.
param location string
param prefix string
param tags object
@description('The app identity (principal id): the only one allowed to send telemetry.')
param principalId string

var metricsPublisher = '3913510d-42f4-4e42-8a64-420c390055eb'

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: 'log-${prefix}'
  location: location
  tags: tags
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: 90
  }
}

resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: 'appi-${prefix}'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    DisableLocalAuth: true
  }
}

resource publisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(insights.id, principalId, metricsPublisher)
  scope: insights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', metricsPublisher)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output connectionString string = insights.properties.ConnectionString
@description('The component the metric alert on failed invocations watches.')
output insightsId string = insights.id
@description('Where every resource sends its diagnostic settings (resource logs and metrics).')
output workspaceId string = workspace.id
