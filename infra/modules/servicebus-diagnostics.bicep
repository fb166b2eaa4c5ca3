// Resource logs of the Service Bus namespace (operations on the namespace and its
// queue, and network filtering) and its metrics, to the Log Analytics workspace. Kept
// apart from servicebus.bicep, which declares the namespace; this refers to it by name.
param namespaceName string
param workspaceId string

resource namespace 'Microsoft.ServiceBus/namespaces@2024-01-01' existing = {
  name: namespaceName
}

resource logs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: namespace
  properties: {
    workspaceId: workspaceId
    logs: [
      {
        categoryGroup: 'allLogs'
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
