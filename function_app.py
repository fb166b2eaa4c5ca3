"""Azure Functions entry points (Python v2 model): wire in, handler out, nothing else.

Heavy imports (Graph SDK, ldap3) happen inside the handlers so a cold start
only pays for what the triggered function uses.
"""

from __future__ import annotations

import logging

import azure.functions as func

app = func.FunctionApp()
log = logging.getLogger("writeback")


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
