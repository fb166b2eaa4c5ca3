"""Full-sync benchmark against one throwaway Samba AD DC.

Prints groups, memberships, LDAP operations, seconds for a full initial sync
and a no-op re-sync, and the sync's LDAP write rate next to plain loops that
add the same groups with as many members to other OUs of the same DC, in the
same run (bare ldap3 calls, and bare python-ldap calls: the adapter's own
client when it is installed), the three writing in turns so that none meets a
smaller database than the others; the no-op re-sync next to plain paged reads of
those copies with their members by each client (the sync reads Graph as well,
so it can only be slower; the python-ldap read once more with the extended-DN
control, which the sync asks for to read each member's objectSid), with the
sync's two reads timed alone as well (it makes them at the same time) and the
CPU each process spent on the re-sync, and the least time that CPU can take on
this machine's cores (the DC and the stand-in run here too: a bound no overlap
of the reads and the planning can beat). Sizes are arguments so CI-sized and
full-sized runs share code.

The Graph stand-in serves from a forked child process, as Graph is another
machine in production (in this process its JSON encoding would compete with
the sync for the GIL); ``--graph-latency`` adds that many seconds to each of
its responses where the stand-in has such a setting.

    .venv/bin/python -m bench.reconcile --groups 20000 --memberships 400000

``--rules N`` runs the same sync under a scoping and placement rules file of N
rules (docs/rules.md): id lists placing groups in sub-OUs, display-name globs and
regular expressions that most groups test and miss, kind rules, and a last
catch-all, so nearly every group is tried against every rule; the Graph client
then reads what rules need (security groups, member groups). It prints the
planning alone (the pure build_plan over the same snapshot and AD read, with
those rules and without) next to the sync, as a share of it.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import random
import resource
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ldap3 import SUBTREE, Connection

from bench.standin import RemoteStandIn, cpu_seconds
from writeback.adapters.directory import LdapDirectory
from writeback.adapters.graph import GraphCloud, GraphReads
from writeback.adapters.ldap_clients import (
    EXTENDED_DN_OID,
    EXTENDED_DN_VALUE,
    python_ldap_available,
)
from writeback.domain.mapping import MappingOptions
from writeback.domain.model import Add
from writeback.domain.rules import parse_rules
from writeback.report import markdown_table
from writeback.service.reconcile import (
    Plan,
    SyncPolicy,
    SyncResult,
    apply_plan,
    build_plan,
    guard_view,
    plan_sync,
)
from writeback_sandbox.graph_standin import GraphStandIn, Tenant
from writeback_sandbox.samba import SambaDC, free_loopback_address, running_dc

#: Turns the writers take (see ``run``).
ROUNDS = 10


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--memberships", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--graph-latency", type=float, default=0.0, help="seconds per response")
    parser.add_argument("--address", default=None, help="loopback address for the DC")
    parser.add_argument("--rules", type=int, default=0, help="plan under a rules file of N rules")
    args = parser.parse_args(argv)
    with running_dc(address=args.address or free_loopback_address("127.0.0.30")) as dc:
        run(dc, args.groups, args.memberships, args.users, args.graph_latency, rules=args.rules)


def run(
    dc: SambaDC, groups: int, memberships: int, users: int, latency: float, *, rules: int = 0
) -> None:
    users_ou = dc.create_ou("BenchUsers")
    t = time.monotonic()
    sids = dc.create_users(users_ou, [f"u{i}" for i in range(users)])
    mirrors = [mirror_population(dc, users_ou, sids, prefix) for prefix in ("a", "b")]
    print(f"setup: 3 x {users} users in {time.monotonic() - t:.1f} s", flush=True)
    tenant = build_tenant(sids, groups, memberships)
    target = dc.create_ou("BenchGroups")
    options, latency_note = standin_options(latency)
    standin = RemoteStandIn(tenant, **options)
    rules_text = rules_file(dc, target, tenant, rules) if rules else None
    # The child serves it now. Graph's data is not in the sync's process in
    # production, and kept here its millions of objects would be walked by every
    # full collection the sync's own allocations set off.
    del tenant
    gc.collect()
    try:
        options_ = MappingOptions(target_ou=target)
        if rules_text is not None:
            rule_set = parse_rules(rules_text, target_ou=target)
            options_ = replace(options_, rules=rule_set)
        reads = GraphReads(all_groups=options_.wants_all_groups, nested=options_.nesting)
        cloud = GraphCloud(base_url=standin.url, reads=reads)
        directory = dc.directory(target)
        started = time.monotonic()
        plan = plan_sync(cloud, directory, options_, SyncPolicy())
        read_seconds = time.monotonic() - started
        native = python_ldap_available()
        writers: list[PlainWriter] = [PlainLdap3(dc, mirrors[0])]
        if native:
            writers.append(PlainPythonLdap(dc, mirrors[1]))
        first = write_in_turns(plan, directory, writers)
        ldap3_rate = writers[0].rate
        pyl_rate = writers[1].rate if native else 0.0
        print(f"plain ldap3 add loop: {ldap3_rate:.0f}/s", flush=True)
        if native:
            print(f"plain python-ldap add loop: {pyl_rate:.0f}/s", flush=True)
        print(f"initial sync: {first.ldap_requests / first.seconds:.0f} writes/s", flush=True)
        for writer in writers:
            writer.close()
        ldap3_read = plain_ldap3_read(dc, writers[0].ou)
        pyl_read = plain_python_ldap_read(dc, writers[1].ou) if native else 0.0
        pyl_extended = plain_python_ldap_read(dc, writers[1].ou, extended=True) if native else 0.0
        first_total = read_seconds + first.seconds
        cpu_before = (cpu_seconds(), standin.cpu(), dc.cpu_seconds())
        again, again_total, _ = timed_sync(cloud, directory, options_)
        again_cpu = [
            after - before
            for after, before in zip(
                (cpu_seconds(), standin.cpu(), dc.cpu_seconds()), cpu_before, strict=True
            )
        ]
        graph_alone = timed(cloud.snapshot)
        ad_alone = timed(lambda: sum(1 for _ in directory.iter_groups()))
        planning = planning_seconds(cloud, directory, options_) if rules else None
        client = directory.client_name
        cloud.close()
        directory.close()
    finally:
        standin.close()
    sync_rate = first.ldap_requests / first.seconds if first.seconds else 0.0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cores = os.cpu_count() or 1  # the DC and the stand-in share them with this process
    least = sum(again_cpu) / cores
    rows = [
        ("groups", f"{groups}"),
        ("memberships", f"{memberships}"),
        ("directory adapter's LDAP client", client),
        ("Graph stand-in latency", latency_note),
        ("LDAP operations, initial sync", f"{first.ldap_requests}"),
        ("initial sync, seconds (read + plan + write)", f"{first_total:.2f}"),
        ("  of which reading Graph and AD + planning", f"{read_seconds:.2f}"),
        ("no-op re-sync, seconds", f"{again_total:.2f}"),
        (
            "  its CPU seconds: this process / Graph stand-in / DC",
            " / ".join(f"{c:.2f}" for c in again_cpu),
        ),
        (
            f"  the least it can take here: that CPU ÷ {cores} cores, seconds",
            f"{least:.2f}",
        ),
        ("  its Graph snapshot alone, seconds", f"{graph_alone:.2f}"),
        ("  its AD read alone (iter_groups), seconds", f"{ad_alone:.2f}"),
        ("plain ldap3 paged read of the same groups and members, seconds", f"{ldap3_read:.2f}"),
        ("ratio no-op re-sync / plain ldap3 read", f"{again_total / ldap3_read:.2f}"),
    ]
    if native:
        rows += [
            (
                "plain python-ldap paged read of the same groups and members, seconds",
                f"{pyl_read:.2f}",
            ),
            ("ratio no-op re-sync / plain python-ldap read", f"{again_total / pyl_read:.2f}"),
            (
                "  the least it can take here (above) / plain python-ldap read",
                f"{least / pyl_read:.2f}",
            ),
            (
                "plain python-ldap paged read with extended DNs (member SIDs), seconds",
                f"{pyl_extended:.2f}",
            ),
            (
                "ratio no-op re-sync / plain python-ldap read with extended DNs",
                f"{again_total / pyl_extended:.2f}",
            ),
        ]
    rows += [
        ("LDAP operations, no-op re-sync", f"{again.ldap_requests}"),
        ("sync LDAP writes per second", f"{sync_rate:.1f}"),
        ("plain ldap3 add loop writes per second", f"{ldap3_rate:.1f}"),
        ("ratio sync / plain ldap3 loop", f"{sync_rate / ldap3_rate:.2f}"),
    ]
    if native:
        rows += [
            ("plain python-ldap add loop writes per second", f"{pyl_rate:.1f}"),
            ("ratio sync / plain python-ldap loop", f"{sync_rate / pyl_rate:.2f}"),
        ]
    if planning is not None:
        with_rules, without = planning
        rows += [
            ("rules in the rules file", f"{rules}"),
            (f"planning alone with {rules} rules (build_plan), seconds", f"{with_rules:.2f}"),
            ("planning alone without rules (V1), seconds", f"{without:.2f}"),
            ("planning with rules, share of the initial sync", f"{with_rules / first_total:.1%}"),
            ("planning with rules, share of the no-op re-sync", f"{with_rules / again_total:.1%}"),
        ]
    rows.append(("peak RSS of this process, MB", f"{peak_mb:.0f}"))
    print_table(rows)


def rules_file(dc: SambaDC, target: str, tenant: Tenant, count: int) -> str:
    """A rules file of ``count`` rules over the bench tenant (see the module docstring):
    a fifth are id lists of 10 groups each, placed in OUs of their own (created
    here), the rest display-name globs and regular expressions that match no
    bench group, then kind rules, and a catch-all for Microsoft 365 groups last."""
    rng = random.Random(7)
    ids = sorted(tenant.group_ids())
    placed = max(1, count // 5)
    lines = ['[defaults]\ndn_format = "objectid"\n']
    for n in range(placed):
        dc.create_ou(f"Placed{n}", target)
        chosen = ", ".join(f'"{gid}"' for gid in rng.sample(ids, min(10, len(ids))))
        fmt = "displayname" if n % 2 else "objectid"
        lines.append(
            f'[[rule]]\nname = "placed {n}"\nids = [{chosen}]\nou = "OU=Placed{n}"\n'
            f'dn_format = "{fmt}"\n'
        )
    misses = max(0, count - placed - 2)
    for n in range(misses):
        if n % 2:
            lines.append(f'[[rule]]\nname = "dept {n}"\ndisplay_name = "Dept {n} *"\n')
        else:
            lines.append(
                f'[[rule]]\nname = "project {n}"\ndisplay_name_regex = "^Project-{n}-"\n'
                'group_type = "security"\n'
            )
    lines.append('[[rule]]\nname = "security groups"\nkinds = ["security"]\n')
    lines.append('[[rule]]\nname = "every other M365 group"\nkinds = ["microsoft365"]\n')
    return "\n".join(lines[: count + 1])


def planning_seconds(
    cloud: GraphCloud, directory: LdapDirectory, options: MappingOptions
) -> tuple[float, float]:
    """build_plan alone over one snapshot and AD read, with the guards' view read
    before (as plan_sync does): with the rules, and without."""
    options = replace(options, schema_attributes=directory.schema_attributes())
    snapshot = cloud.snapshot()
    current = list(directory.iter_groups())
    policy = SyncPolicy()
    guard = guard_view(snapshot.groups, current, directory, options, policy)
    started = time.monotonic()
    build_plan(snapshot, current, options, policy, guard)
    with_rules = time.monotonic() - started
    v1 = replace(options, rules=None)
    started = time.monotonic()
    build_plan(snapshot, current, v1, policy, guard)
    return with_rules, time.monotonic() - started


def mirror_population(dc: SambaDC, ou: str, sids: dict[str, str], prefix: str) -> dict[str, str]:
    """As many users again, and each ``<SID=>`` of the first population -> its mirror's.

    Each plain loop writes the same groups with members of a population of its own,
    so every writer's users end up with as many memberOf back-links."""
    count = len(sids)
    mirror = dc.create_users(ou, [f"{prefix}{i}" for i in range(count)])
    return {f"<SID={sids[f'u{i}']}>": f"<SID={mirror[f'{prefix}{i}']}>" for i in range(count)}


def standin_options(latency: float) -> tuple[dict[str, Any], str]:
    """The stand-in's options, with ``latency`` where it has the setting, and a note."""
    options: dict[str, Any] = {"page_size": 200}
    if "latency" in inspect.signature(GraphStandIn).parameters:
        options["latency"] = latency
        return options, f"{latency * 1000:.0f} ms per response"
    if latency:
        raise SystemExit("this Graph stand-in has no latency setting")
    return options, "none (this stand-in has no latency setting)"


def write_in_turns(plan: Plan, directory: LdapDirectory, writers: list[PlainWriter]) -> SyncResult:
    """The initial sync's writes and the plain loops', taking turns.

    Samba slows down as its database grows, so each writes ROUNDS slices in turn,
    the first of each round rotating: all of them write into databases of the same
    sizes. Returns the sync's requests and seconds."""
    first = SyncResult(plan)
    total = len(plan.operations)
    for r in range(ROUNDS):
        part = plan.operations[r * total // ROUNDS : (r + 1) * total // ROUNDS]
        turns: list[PlainWriter | None] = [*writers, None]
        for turn in turns[r % len(turns) :] + turns[: r % len(turns)]:
            if turn is None:
                done = apply_plan(replace(plan, operations=part), directory)
                assert not done.failures, done.failures[:3]
                first.ldap_requests += done.ldap_requests
                first.seconds += done.seconds
            else:
                turn.write([op for op in part if isinstance(op, Add)])
    return first


def timed(work: Any) -> float:
    started = time.monotonic()
    work()
    return time.monotonic() - started


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


class PlainWriter:
    """The sync's own adds replayed as bare client calls into an OU of their own: one
    add per group with the same attributes and as many members (their ``mirror``
    users), no planning, no guard, no retries."""

    def __init__(self, dc: SambaDC, mirror: dict[str, str], name: str) -> None:
        self.ou = dc.create_ou(name)
        self.mirror = mirror
        self.count = 0
        self.seconds = 0.0

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def write(self, adds: list[Add]) -> None:
        started = time.monotonic()
        for add in adds:
            self.add(self.count, add)
            self.count += 1
        self.seconds += time.monotonic() - started

    def add(self, n: int, add: Add) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class PlainLdap3(PlainWriter):
    def __init__(self, dc: SambaDC, mirror: dict[str, str]) -> None:
        super().__init__(dc, mirror, "BenchPlain")
        self.conn: Connection = dc.connection()

    def add(self, n: int, add: Add) -> None:
        attributes: dict[str, object] = {k: list(v) for k, v in add.attributes.items()}
        attributes["sAMAccountName"] = f"plain{n}"
        attributes["adminDescription"] = f"Plain_{n}"
        if add.members:
            attributes["member"] = [self.mirror[m] for m in add.members]
        if not self.conn.add(f"CN=plain{n},{self.ou}", attributes=attributes):
            raise RuntimeError(f"plain add failed: {self.conn.result}")

    def close(self) -> None:
        self.conn.unbind()


class PlainPythonLdap(PlainWriter):
    def __init__(self, dc: SambaDC, mirror: dict[str, str]) -> None:
        super().__init__(dc, mirror, "BenchPlainPythonLdap")
        self.conn = python_ldap_connection(dc)

    def add(self, n: int, add: Add) -> None:
        entry = [(k, [v.encode() for v in vs]) for k, vs in add.attributes.items() if vs]
        entry = [e for e in entry if e[0] not in ("sAMAccountName", "adminDescription")]
        entry += [("sAMAccountName", [f"plainc{n}".encode()])]
        entry += [("adminDescription", [f"PlainC_{n}".encode()])]
        if add.members:
            entry.append(("member", [self.mirror[m].encode() for m in add.members]))
        self.conn.add_ext_s(f"CN=plainc{n},{self.ou}", entry)

    def close(self) -> None:
        self.conn.unbind_s()


def python_ldap_connection(dc: SambaDC) -> Any:
    import ldap

    conn = ldap.initialize(dc.ldaps_url)
    conn.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
    conn.set_option(ldap.OPT_REFERRALS, 0)
    conn.set_option(ldap.OPT_X_TLS_CACERTFILE, dc.ca_file)
    conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
    conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
    conn.simple_bind_s(dc.admin_dn, dc.admin_password)
    return conn


def plain_python_ldap_read(dc: SambaDC, ou: str, *, extended: bool = False) -> float:
    """Seconds for a bare python-ldap paged search of its copies with their members;
    ``extended``: with the extended-DN control, so that each member comes with its
    objectSid, which is how the sync reads them (it compares members by SID)."""
    import ldap
    from ldap.controls import RequestControl
    from ldap.controls.libldap import SimplePagedResultsControl

    conn = python_ldap_connection(dc)
    started = time.monotonic()
    page = SimplePagedResultsControl(True, size=1000, cookie=b"")
    asked = [RequestControl(EXTENDED_DN_OID, True, EXTENDED_DN_VALUE)] if extended else []
    count = 0
    while True:
        msgid = conn.search_ext(
            ou,
            ldap.SCOPE_SUBTREE,
            "(objectClass=group)",
            ["*", "member"],
            serverctrls=[*asked, page],
        )
        _, entries, _, answered = conn.result3(msgid)
        count += sum(1 for dn, _ in entries if dn is not None)
        cookie = next((c.cookie for c in answered if c.controlType == page.controlType), b"")
        if not cookie:
            break
        page.cookie = cookie
    seconds = time.monotonic() - started
    conn.unbind_s()
    assert count, "the plain copies were not found"
    return seconds


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
