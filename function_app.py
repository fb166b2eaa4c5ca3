"""Azure Functions entry points (Python v2 model): wire in, handler out, nothing else.

The handlers, and the design of settlement, lifecycle handling and the pause
switch, are in ``writeback/hosting/functions.py``. Heavy imports (Graph SDK,
ldap3, Service Bus SDK) happen inside the handlers so a cold start only pays
for what the triggered function uses.
"""

from __future__ import annotations

import azure.functions as func

app = func.FunctionApp()


@app.route(route="notifications", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def notifications(req: func.HttpRequest) -> func.HttpResponse:
    """Graph's change notifications (and its validation handshake)."""
    from writeback.hosting.functions import webhook

    return webhook(req, endpoint="notifications")


@app.route(route="lifecycle", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def lifecycle(req: func.HttpRequest) -> func.HttpResponse:
    """Graph's lifecycle notifications (and its validation handshake)."""
    from writeback.hosting.functions import webhook

    return webhook(req, endpoint="lifecycle")


@app.service_bus_queue_trigger(
    arg_name="message",
    connection="WRITEBACK_SERVICEBUS",
    queue_name="%WRITEBACK_SERVICEBUS_QUEUE%",
    is_sessions_enabled=True,
    cardinality=func.Cardinality.ONE,
    auto_complete_messages=True,
)
# Single dispatch: maxConcurrentSessions groups at once per instance, their session
# locks renewed; batch mode takes one session at a time and was about 13 times
# slower for a burst over many groups (bench/functions_trigger.py).
def worker(message: func.ServiceBusMessage) -> None:
    """One event of one group's session: converged with at most one LDAP write."""
    from writeback.hosting.functions import run_worker

    run_worker([message])


@app.timer_trigger(
    arg_name="timer",
    schedule="%WRITEBACK_RECONCILE_SCHEDULE%",
    run_on_startup=False,
    use_monitor=True,
)
def reconcile(timer: func.TimerRequest) -> None:
    """Full sync from Graph: repairs drift and anything a notification missed."""
    from writeback.hosting.functions import run_reconcile

    run_reconcile(past_due=timer.past_due)


@app.timer_trigger(
    arg_name="timer",
    schedule="%WRITEBACK_SUBSCRIPTION_SCHEDULE%",
    run_on_startup=False,
    use_monitor=True,
)
def subscription_upkeep(timer: func.TimerRequest) -> None:
    """Create the Graph subscription if missing, renew it before it expires."""
    from writeback.hosting.functions import run_subscription_upkeep

    run_subscription_upkeep()
