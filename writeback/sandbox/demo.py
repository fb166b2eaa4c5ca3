"""The embedded default: a full sync with no Azure tenant at all.

A throwaway Samba AD DC on loopback, a sample tenant served by the Graph
stand-in, and the real adapters and reconcile service between them. It syncs,
changes the cloud the way users do (rename, membership, deletes), syncs again,
and shows that a third sync writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from writeback import report
from writeback.adapters.directory import LdapDirectory
from writeback.adapters.graph import GraphCloud
from writeback.domain.mapping import MappingOptions
from writeback.domain.naming import DnFormat
from writeback.sandbox.graph_standin import GraphStandIn, Tenant
from writeback.sandbox.samba import SambaDC, running_dc
from writeback.sandbox.sample_tenant import build_sample_tenant
from writeback.service.reconcile import SyncPolicy, SyncResult, apply_plan, plan_sync

DEMO_ADDRESS = "127.0.0.20"
SAMPLE_USERS = 40


def run_demo(out: TextIO, *, keep: bool = False) -> int:
    say = _printer(out)
    say("Starting a throwaway Samba AD DC on loopback (seconds; the first run provisions it)...")
    started = time.monotonic()
    with running_dc(address=DEMO_ADDRESS, exchange_schema=True, keep=keep) as dc:
        say(f"  DC {dc.realm} at {dc.ldaps_url} ready in {time.monotonic() - started:.1f} s")
        users_ou = dc.create_ou("Synced Users")
        target_ou = dc.create_ou("M365 Groups")
        sids = dc.create_users(users_ou, [f"user{i:02d}" for i in range(SAMPLE_USERS)])
        say(f"  {len(sids)} on-premises users in {users_ou}; target OU {target_ou}")
        tenant = build_sample_tenant(sids)
        with GraphStandIn(tenant) as standin:
            say(f"Sample tenant served by the Graph stand-in at {standin.url}")
            return _sync_rounds(dc, target_ou, tenant, standin, say)


def _sync_rounds(
    dc: SambaDC, target_ou: str, tenant: Tenant, standin: GraphStandIn, say: Callable[[str], None]
) -> int:
    cloud = GraphCloud(base_url=standin.url)
    directory = LdapDirectory(
        url=dc.ldaps_url,
        user=dc.admin_dn,
        password=dc.admin_password,
        target_ou=target_ou,
        ca_file=dc.ca_file,
    )
    options = MappingOptions(target_ou=target_ou, dn_format=DnFormat.DISPLAY_NAME)
    try:
        failures = _round("1. Initial full sync", cloud, directory, options, say)
        _change_the_cloud(tenant, say)
        failures += _round("2. Sync after cloud changes", cloud, directory, options, say)
        failures += _round("3. Sync again (nothing changed)", cloud, directory, options, say)
    finally:
        cloud.close()
        directory.close()
    say("Done." if not failures else f"Done, with {failures} failed operations.")
    return 1 if failures else 0


def _round(
    title: str,
    cloud: GraphCloud,
    directory: LdapDirectory,
    options: MappingOptions,
    say: Callable[[str], None],
) -> int:
    say(f"\n{title}")
    plan = plan_sync(cloud, directory, options, SyncPolicy())
    result: SyncResult = apply_plan(plan, directory)
    for operation in plan.operations:
        say("  " + report.describe(operation))
    for skip in plan.skips:
        say(f"  skipped in group {skip.group_id}: {skip.count} {skip.detail or skip.reason.value}")
    applied = ", ".join(f"{n} {k}" for k, n in sorted(result.applied.items())) or "no writes"
    say(f"  => {applied}; {result.ldap_requests} LDAP requests in {result.seconds:.2f} s")
    for operation, error in result.failures:
        say(f"  FAILED {operation.kind} {operation.dn}: {error}")
    return len(result.failures)


def _change_the_cloud(tenant: Tenant, say: Callable[[str], None]) -> None:
    groups = tenant.unified_group_ids()
    renamed, rejoined, soft, hard = groups[0], groups[1], groups[2], groups[3]
    tenant.update_group(renamed, display_name="Renamed in the cloud")
    members = tenant.member_ids(rejoined)
    tenant.remove_members(rejoined, members[:2])
    tenant.soft_delete_group(soft)
    tenant.hard_delete_group(hard)
    say(
        "\nCloud changes: one group renamed, two members removed from another, "
        "one group soft-deleted (kept on-prem until purged), one deleted for good."
    )


def _printer(out: TextIO) -> Callable[[str], None]:
    def say(line: str) -> None:
        print(line, file=out, flush=True)

    return say
