"""Handlers behind the Function app's entry points.

They take settings from app settings (environment) and log one structured
line per run; an error is raised so the Functions host records the failure.
"""

from __future__ import annotations

import logging

from writeback.config import load_settings
from writeback.errors import WritebackError
from writeback.service.reconcile import SyncPolicy, SyncResult, apply_plan, plan_sync
from writeback.wiring import build_cloud, build_directory

log = logging.getLogger("writeback.reconcile")


def run_reconcile(*, past_due: bool = False) -> SyncResult:
    settings = load_settings()
    policy = SyncPolicy.from_settings(settings)
    cloud, directory = build_cloud(settings), build_directory(settings)
    try:
        plan = plan_sync(cloud, directory, settings.mapping(), policy)
        result = apply_plan(plan, directory)
    finally:
        directory.close()
        cloud.close()
    log.info(
        "reconcile done",
        extra={
            "past_due": past_due,
            "applied": result.applied,
            "ldap_requests": result.ldap_requests,
            "failures": len(result.failures),
            "deletes_blocked": plan.deletes_blocked,
            "seconds": round(result.seconds, 3),
        },
    )
    if result.failures:
        raise WritebackError(f"reconcile: {len(result.failures)} operations failed")
    return result
