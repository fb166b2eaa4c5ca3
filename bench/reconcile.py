"""Full-sync benchmark against one throwaway Samba AD DC.

Prints groups, memberships, LDAP operations, seconds for a full initial sync
and a no-op re-sync, and the sync's LDAP write rate next to a plain ldap3 loop
that adds the same groups with the same members to another OU of the same DC,
in the same run; the no-op re-sync next to a plain ldap3 paged read of those
copies with their members (the sync reads Graph as well, so it can only be
slower). Sizes are arguments so CI-sized and full-sized runs share code.

    .venv/bin/python bench/reconcile.py --groups 1000 --memberships 20000
"""

from __future__ import annotations

import argparse
import random
import resource
import time
import uuid
from collections.abc import Sequence

from ldap3 import SUBTREE, Connection

from writeback.adapters.directory import LdapDirectory
from writeback.adapters.graph import GraphCloud
from writeback.domain.mapping import MappingOptions
from writeback.domain.model import Add
from writeback.report import markdown_table
from writeback.service.reconcile import SyncPolicy, SyncResult, apply_plan, plan_sync
from writeback_sandbox.graph_standin import GraphStandIn, Tenant
from writeback_sandbox.samba import SambaDC, free_loopback_address, running_dc


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--memberships", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--address", default=None, help="loopback address for the DC")
    args = parser.parse_args(argv)
    with running_dc(address=args.address or free_loopback_address("127.0.0.30")) as dc:
        run(dc, args.groups, args.memberships, args.users)


def run(dc: SambaDC, groups: int, memberships: int, users: int) -> None:
    users_ou = dc.create_ou("BenchUsers")
    t = time.monotonic()
    sids = dc.create_users(users_ou, [f"u{i}" for i in range(users)])
    print(f"setup: {users} users in {time.monotonic() - t:.1f} s")
    tenant = build_tenant(sids, groups, memberships)
    target = dc.create_ou("BenchGroups")
    with GraphStandIn(tenant, page_size=200) as standin:
        cloud = GraphCloud(base_url=standin.url)
        directory = dc.directory(target)
        options = MappingOptions(target_ou=target)
        # The plain loop runs first, so the sync writes into the fuller database:
        # the ratio errs against the sync, never for it.
        started = time.monotonic()
        plan = plan_sync(cloud, directory, options, SyncPolicy())
        read_seconds = time.monotonic() - started
        baseline_rate, plain_ou = plain_ldap3_loop(
            dc, [op for op in plan.operations if isinstance(op, Add)]
        )
        plain_read_seconds = plain_ldap3_read(dc, plain_ou)
        first = apply_plan(plan, directory)
        assert not first.failures, first.failures[:3]
        first_total = read_seconds + first.seconds
        again, again_total, _ = timed_sync(cloud, directory, options)
        cloud.close()
        directory.close()
    sync_rate = first.ldap_requests / first.seconds if first.seconds else 0.0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print_table(
        [
            ("groups", f"{groups}"),
            ("memberships", f"{memberships}"),
            ("LDAP operations, initial sync", f"{first.ldap_requests}"),
            ("initial sync, seconds (read + plan + write)", f"{first_total:.2f}"),
            ("  of which reading Graph and AD + planning", f"{read_seconds:.2f}"),
            ("no-op re-sync, seconds", f"{again_total:.2f}"),
            (
                "plain ldap3 paged read of the same groups and members, seconds",
                f"{plain_read_seconds:.2f}",
            ),
            ("ratio no-op re-sync / plain read", f"{again_total / plain_read_seconds:.2f}"),
            ("LDAP operations, no-op re-sync", f"{again.ldap_requests}"),
            ("sync LDAP writes per second", f"{sync_rate:.1f}"),
            ("plain ldap3 loop writes per second", f"{baseline_rate:.1f}"),
            ("ratio sync / plain loop", f"{sync_rate / baseline_rate:.2f}"),
            ("peak RSS of this process, MB", f"{peak_mb:.0f}"),
        ]
    )


def build_tenant(sids: dict[str, str], groups: int, memberships: int) -> Tenant:
    rng = random.Random(42)
    tenant = Tenant()
    names = sorted(sids)
    for name in names:
        tenant.add_user(_uid(name), sid=sids[name], synced=True)
    per_group = [memberships // groups] * groups
    for i in range(memberships % groups):
        per_group[i] += 1
    for n, size in enumerate(per_group):
        chosen = rng.sample(names, min(size, len(names)))
        gid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench-group:{n}"))
        tenant.add_group(
            gid,
            display_name=f"Bench group {n}",
            mail=f"bench{n}@contoso.com",
            mail_nickname=f"bench{n}",
            proxy_addresses=[f"SMTP:bench{n}@contoso.com"],
            members=[_uid(m) for m in chosen],
        )
    return tenant


def _uid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench-user:{name}"))


def timed_sync(
    cloud: GraphCloud, directory: LdapDirectory, options: MappingOptions
) -> tuple[SyncResult, float, float]:
    started = time.monotonic()
    plan = plan_sync(cloud, directory, options, SyncPolicy())
    planned = time.monotonic()
    result = apply_plan(plan, directory)
    assert not result.failures, result.failures[:3]
    return result, time.monotonic() - started, planned - started


def plain_ldap3_loop(dc: SambaDC, adds: list[Add]) -> tuple[float, str]:
    """The sync's own adds replayed as bare ldap3 calls into another OU: one add per group
    with the same attributes and members, no planning, no guard, no retries."""
    ou = dc.create_ou("BenchPlain")
    conn: Connection = dc.connection()
    started = time.monotonic()
    for n, add in enumerate(adds):
        attributes: dict[str, object] = {k: list(v) for k, v in add.attributes.items()}
        attributes["sAMAccountName"] = f"plain{n}"
        attributes["adminDescription"] = f"Plain_{n}"
        if add.members:
            attributes["member"] = list(add.members)
        if not conn.add(f"CN=plain{n},{ou}", attributes=attributes):
            raise RuntimeError(f"plain add failed: {conn.result}")
    seconds = time.monotonic() - started
    conn.unbind()
    return len(adds) / seconds, ou


def plain_ldap3_read(dc: SambaDC, ou: str) -> float:
    """Seconds for a bare paged search of the plain copies with their members."""
    conn: Connection = dc.connection()
    started = time.monotonic()
    entries = conn.extend.standard.paged_search(
        ou, "(objectClass=group)", SUBTREE, attributes=["*", "member"], paged_size=1000
    )
    count = sum(1 for _ in entries)
    seconds = time.monotonic() - started
    conn.unbind()
    assert count, "the plain copies were not found"
    return seconds


def print_table(rows: list[tuple[str, str]]) -> None:
    print()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
