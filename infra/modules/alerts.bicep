// What tells an operator that writeback needs them, before a user notices a missing mail:
// an action group (e-mail), metric alerts on the queue and the app, log alerts on the
// structured logs, and a workbook with the pipeline's figures.
//
// Metrics are the platform's own (Service Bus, Azure Relay, Application Insights). The
// logs are the app's JSON records (writeback/logging_setup.py), exported through
// OpenTelemetry to Application Insights, whose workspace keeps them in AppTraces: each
// record's `extra=` fields are its custom dimensions, the Properties column (as strings:
// numbers go through toint/todouble). tests/unit/test_infra.py holds every query and
// metric here to a field the code logs or a metric Azure documents.
param location string
param prefix string
param tags object
@description('Where the alerts are sent.')
param alertEmail string
@description('The Log Analytics workspace the app\'s Application Insights writes to.')
param workspaceResourceId string
param insightsId string
param serviceBusNamespaceName string
param queueName string
@description('Empty when the app reaches AD directly (directory=ldap).')
param relayNamespaceName string
@description('WRITEBACK_RECONCILE_INTERVAL, seconds: a reconcile older than twice this alerts.')
param reconcileInterval int
@description('Active messages in the queue above which the backlog alerts.')
param backlogThreshold int
@description('Calls to the agent that failed in 15 minutes before the relay alert fires.')
param relayFailureThreshold int

var useRelay = !empty(relayNamespaceName)

resource bus 'Microsoft.ServiceBus/namespaces@2024-01-01' existing = {
  name: serviceBusNamespaceName
}

resource operators 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'ag-${prefix}'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'writeback'
    enabled: true
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

// ------------------------------------------------------------------ metric alerts

var queueDimension = [
  {
    name: 'EntityName'
    operator: 'Include'
    values: [ queueName ]
  }
]

var metricAlerts = [
  {
    name: 'dead-letters'
    description: 'Events were dead-lettered: python -m writeback status shows them by reason; fix the cause, then python -m writeback replay.'
    severity: 2
    scope: bus.id
    namespace: 'Microsoft.ServiceBus/namespaces'
    metric: 'DeadletteredMessages'
    aggregation: 'Maximum'
    operator: 'GreaterThan'
    threshold: 0
    window: 'PT5M'
    frequency: 'PT5M'
    dimensions: queueDimension
  }
  {
    name: 'backlog'
    description: 'More than ${backlogThreshold} events wait in the queue: the workers are behind or failing (AD or Graph unreachable, the agent down, writes paused).'
    severity: 2
    scope: bus.id
    namespace: 'Microsoft.ServiceBus/namespaces'
    metric: 'ActiveMessages'
    aggregation: 'Average'
    operator: 'GreaterThan'
    threshold: backlogThreshold
    window: 'PT15M'
    frequency: 'PT5M'
    dimensions: queueDimension
  }
  {
    name: 'backlog-age'
    description: 'The queue has not been empty for an hour: its oldest event may be that old (Service Bus has no age metric; a queue that never drains is the sign).'
    severity: 2
    scope: bus.id
    namespace: 'Microsoft.ServiceBus/namespaces'
    metric: 'ActiveMessages'
    aggregation: 'Minimum'
    operator: 'GreaterThan'
    threshold: 0
    window: 'PT1H'
    frequency: 'PT15M'
    dimensions: queueDimension
  }
  {
    name: 'function-failures'
    description: 'Function invocations failed (a reconcile that failed or left writes undone, a settlement that failed, an unexpected error): see the Failures blade of Application Insights.'
    severity: 2
    scope: insightsId
    namespace: 'microsoft.insights/components'
    metric: 'requests/failed'
    aggregation: 'Count'
    operator: 'GreaterThan'
    threshold: 0
    window: 'PT15M'
    frequency: 'PT5M'
    dimensions: []
  }
]

resource metricAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = [for alert in metricAlerts: {
  name: '${prefix}-${alert.name}'
  location: 'global'
  tags: tags
  properties: {
    description: alert.description
    severity: alert.severity
    enabled: true
    scopes: [ alert.scope ]
    evaluationFrequency: alert.frequency
    windowSize: alert.window
    autoMitigate: true
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: alert.name
          metricNamespace: alert.namespace
          metricName: alert.metric
          timeAggregation: alert.aggregation
          operator: alert.operator
          threshold: alert.threshold
          dimensions: alert.dimensions
        }
      ]
    }
    actions: [
      {
        actionGroupId: operators.id
      }
    ]
  }
}]

// No agent listening on the Hybrid Connection at any minute for 5 minutes: the Function
// app's directory calls cannot be answered (events wait in the queue meanwhile).
resource noAgent 'Microsoft.Insights/metricAlerts@2018-03-01' = if (useRelay) {
  name: '${prefix}-relay-no-listener'
  location: 'global'
  tags: tags
  properties: {
    description: 'No relay agent listens on the Hybrid Connection: check the writeback agent service on-premises (its log says why it cannot connect).'
    severity: 1
    enabled: true
    scopes: [ resourceId('Microsoft.Relay/namespaces', relayNamespaceName) ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    autoMitigate: true
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'listeners'
          metricNamespace: 'Microsoft.Relay/namespaces'
          metricName: 'ActiveListeners'
          timeAggregation: 'Total'
          operator: 'LessThan'
          threshold: 1
        }
      ]
    }
    actions: [
      {
        actionGroupId: operators.id
      }
    ]
  }
}

// ------------------------------------------------------------------ log alerts

var staleAfter = '${2 * reconcileInterval}s'

var upkeepFailedQuery = '''
AppTraces
| where tostring(Properties.subscription_action) == "failed"
| project TimeGenerated, Message, error = tostring(Properties.error)
'''

var reconcileFailedQuery = '''
AppTraces
| where isnotempty(Properties.reconcile_reason) and tostring(Properties.outcome) == "failed"
| project TimeGenerated, Message, reason = tostring(Properties.reconcile_reason), error = tostring(Properties.error)
'''

// One row when no reconcile has finished for twice its interval (none in the window
// counts: max() of nothing is null).
var reconcileStaleQuery = replace('''
AppTraces
| where isnotempty(Properties.reconcile_reason) and tostring(Properties.outcome) == "done"
| summarize last_done = max(TimeGenerated)
| where isnull(last_done) or last_done < ago(STALE_AFTER)
''', 'STALE_AFTER', staleAfter)

var relayFailedQuery = '''
AppTraces
| where tostring(Properties.reason) == "RelayUnavailable" or tostring(Properties.error) == "RelayUnavailable"
| project TimeGenerated, Message, group_id = tostring(Properties.group_id)
'''

var logAlerts = concat([
  {
    name: 'subscription-upkeep-failed'
    description: 'The Graph subscription could not be created or renewed: when it expires no change notification arrives, and only the reconcile still syncs. The alert carries the error.'
    severity: 1
    query: upkeepFailedQuery
    threshold: 0
    window: 'PT15M'
  }
  {
    name: 'reconcile-failed'
    description: 'A reconcile failed (Graph or AD unreachable, a bad setting, the agent down): drift and missed notifications are not repaired until one succeeds.'
    severity: 2
    query: reconcileFailedQuery
    threshold: 0
    window: 'PT15M'
  }
  {
    name: 'reconcile-stale'
    description: 'No reconcile has finished for twice WRITEBACK_RECONCILE_INTERVAL (${staleAfter}): the timer does not fire, every run fails, or writes are paused (WRITEBACK_PAUSED).'
    severity: 2
    query: reconcileStaleQuery
    threshold: 0
    window: 'P1D'
  }
], useRelay ? [
  {
    name: 'relay-agent-unreachable'
    description: 'Calls to the on-premises agent fail (RelayUnavailable): no agent listens, or it does not answer in time. Events wait in the queue and apply once it is back.'
    severity: 1
    query: relayFailedQuery
    threshold: relayFailureThreshold - 1
    window: 'PT15M'
  }
] : [])

resource logAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = [for alert in logAlerts: {
  name: '${prefix}-${alert.name}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'writeback: ${alert.name}'
    description: alert.description
    severity: alert.severity
    enabled: true
    scopes: [ workspaceResourceId ]
    evaluationFrequency: 'PT15M'
    windowSize: alert.window
    autoMitigate: false
    criteria: {
      allOf: [
        {
          query: alert.query
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: alert.threshold
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: [ operators.id ]
    }
  }
}]

// ------------------------------------------------------------------ the workbook

var eventsPerMinute = '''
AppTraces
| where isnotempty(Properties.group_id) and tostring(Properties.outcome) == "completed"
| summarize events = sum(toint(Properties.notifications)) by bin(TimeGenerated, 1m)
| render timechart
'''

var latency = '''
AppTraces
| where isnotempty(Properties.latency_ms)
| summarize p50 = percentile(todouble(Properties.latency_ms), 50), p99 = percentile(todouble(Properties.latency_ms), 99) by bin(TimeGenerated, 5m)
| render timechart
'''

var outcomes = '''
AppTraces
| where isnotempty(Properties.outcome) and (isnotempty(Properties.group_id) or tostring(Properties.operation) == "none")
| extend outcome = tostring(Properties.outcome), why = tostring(Properties.reason)
| summarize messages = sum(toint(Properties.messages)) by outcome, reason = iff(isempty(why), "-", why)
| order by messages desc
'''

var deadLetters = '''
AppTraces
| where tostring(Properties.outcome) == "dead-lettered"
| summarize messages = sum(toint(Properties.messages)), groups = dcount(tostring(Properties.group_id)) by reason = tostring(Properties.reason)
| order by messages desc
'''

var skippedMembers = '''
AppTraces
| where isnotempty(Properties.skipped)
| mv-expand pair = extract_all(@"([a-z-]+)=([0-9]+)", tostring(Properties.skipped))
| summarize members = sum(toint(pair[1])), groups = dcount(tostring(Properties.group_id)) by reason = tostring(pair[0])
| order by members desc
'''

var lastReconcile = '''
AppTraces
| where isnotempty(Properties.reconcile_reason) and tostring(Properties.outcome) in ("done", "failed")
| top 5 by TimeGenerated desc
| project TimeGenerated, outcome = tostring(Properties.outcome), reason = tostring(Properties.reconcile_reason), seconds = todouble(Properties.seconds), ldap_requests = toint(Properties.ldap_requests), failures = toint(Properties.failures), error = tostring(Properties.error)
'''

var tiles = [
  { title: 'Events per minute', query: eventsPerMinute, visualization: 'timechart' }
  { title: 'Latency from notification to write, ms (p50, p99)', query: latency, visualization: 'timechart' }
  { title: 'Outcomes by reason (messages)', query: outcomes, visualization: 'table' }
  { title: 'Dead letters by reason', query: deadLetters, visualization: 'table' }
  { title: 'Members left out, by reason', query: skippedMembers, visualization: 'table' }
  { title: 'Last reconciles', query: lastReconcile, visualization: 'table' }
]

var tileItems = [for tile in tiles: {
  type: 3
  name: tile.title
  content: {
    version: 'KqlItem/1.0'
    title: tile.title
    query: tile.query
    size: 0
    queryType: 0
    timeContextFromParameter: 'TimeRange'
    resourceType: 'microsoft.operationalinsights/workspaces'
    crossComponentResources: [ workspaceResourceId ]
    visualization: tile.visualization
  }
}]

var workbookContent = {
  version: 'Notebook/1.0'
  items: concat([
    {
      type: 1
      name: 'intro'
      content: {
        json: '## writeback\nThe event pipeline from the app\'s structured logs (AppTraces, custom dimensions in Properties) and the queue\'s metrics. `python -m writeback status` shows the same from a shell.'
      }
    }
    {
      type: 9
      name: 'time'
      content: {
        version: 'KqlParameterItem/1.0'
        parameters: [
          {
            id: 'c1d4f5a6-8b2e-4f0a-9c3d-5e6f7a8b9c0d'
            version: 'KqlParameterItem/1.0'
            name: 'TimeRange'
            type: 4
            value: { durationMs: 86400000 }
            typeSettings: {
              selectableValues: [
                { durationMs: 3600000 }
                { durationMs: 86400000 }
                { durationMs: 604800000 }
              ]
            }
          }
        ]
      }
    }
  ], tileItems, [
    {
      type: 10
      name: 'dead-lettered messages'
      content: {
        version: 'MetricsItem/2.0'
        title: 'Dead-lettered messages in the queue (Service Bus)'
        size: 0
        chartType: 2
        resourceType: 'microsoft.servicebus/namespaces'
        metricScope: 0
        resourceIds: [ bus.id ]
        timeContextFromParameter: 'TimeRange'
        metrics: [
          {
            namespace: 'microsoft.servicebus/namespaces'
            metric: 'microsoft.servicebus/namespaces--DeadletteredMessages'
            aggregation: 3
          }
          {
            namespace: 'microsoft.servicebus/namespaces'
            metric: 'microsoft.servicebus/namespaces--ActiveMessages'
            aggregation: 3
          }
        ]
      }
    }
  ])
}

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, prefix, 'writeback-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'writeback (${prefix})'
    category: 'workbook'
    sourceId: workspaceResourceId
    serializedData: string(workbookContent)
  }
}

output actionGroupId string = operators.id
output workbookId string = workbook.id
