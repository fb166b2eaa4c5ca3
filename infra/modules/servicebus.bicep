// The event queue: sessions per group (FIFO per group, one worker per group at a
// time), duplicate detection on the notification id, a 5-minute lock (the longest
// Service Bus allows), and dead-lettering on expiry so nothing is dropped silently.
// Local (SAS) auth is off: every client uses Entra ID, with roles on the queue only.
param location string
param name string
param queueName string
param principalId string
param tags object

@description('Object ids of the people (or a group of them) who run `python -m writeback replay` and `status` from outside the app.')
param operatorPrincipalIds array = []

@description('What operatorPrincipalIds are: User, Group or ServicePrincipal.')
@allowed([ 'User', 'Group', 'ServicePrincipal' ])
param operatorPrincipalType string = 'Group'

@description('true also lets the operators read the queue depth (`status`): that needs Manage, which only Azure Service Bus Data Owner on the queue gives, and it can change or delete the queue too.')
param operatorQueueOwner bool = false

var dataSender = '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39'
var dataReceiver = '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'
var dataOwner = '090c5cfd-751d-490a-894a-3ce6f1109419'

// Above the app's own bound (WRITEBACK_MAX_DELIVERY_COUNT, 100: with waits of 2^n s up
// to 300 s that is about 7.7 hours of retries), so the app dead-letters a fault that
// outlived its retries with its own reason, and the queue's count stays the backstop
// for immediate redeliveries (a settlement that itself failed, a crashed instance).
var maxDeliveryCount = 120

resource namespace 'Microsoft.ServiceBus/namespaces@2024-01-01' = {
  name: name
  location: location
  tags: tags
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' = {
  parent: namespace
  name: queueName
  properties: {
    requiresSession: true
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: 'PT10M'
    lockDuration: 'PT5M'
    maxDeliveryCount: maxDeliveryCount
    deadLetteringOnMessageExpiration: true
    defaultMessageTimeToLive: 'P14D'
    maxSizeInMegabytes: 1024
    enablePartitioning: false
  }
}

resource sender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, principalId, dataSender)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', dataSender)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

resource receiver 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, principalId, dataReceiver)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', dataReceiver)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

// Operators: replay receives from the dead-letter sub-queue and sends to the queue;
// status peeks the dead letters. Both on this queue only.
resource operatorReceiver 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for operator in operatorPrincipalIds: {
  name: guid(queue.id, operator, dataReceiver)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', dataReceiver)
    principalId: operator
    principalType: operatorPrincipalType
  }
}]

resource operatorSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for operator in operatorPrincipalIds: {
  name: guid(queue.id, operator, dataSender)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', dataSender)
    principalId: operator
    principalType: operatorPrincipalType
  }
}]

resource operatorOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for operator in operatorPrincipalIds: if (operatorQueueOwner) {
  name: guid(queue.id, operator, dataOwner)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', dataOwner)
    principalId: operator
    principalType: operatorPrincipalType
  }
}]

output fullyQualifiedNamespace string = '${namespace.name}.servicebus.windows.net'
output queueName string = queue.name
output maxDeliveryCount int = maxDeliveryCount
