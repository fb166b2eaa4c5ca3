"""One very large group (250,000 members by default) against one throwaway Samba AD DC.

Through the worker's own path (:func:`~writeback.service.handle_event.converge`,
Graph stand-in in process, the real LDAP adapter), in one run on the same DC:

1. the group's first event: a full read from Graph and its creation in AD (one
   add, the members chunked by ``WRITEBACK_MEMBER_CHUNK``);
2. its confirmation, as the pipeline schedules it a settle interval later: a
   full read that finds nothing to write, which is what makes the delta link
   taken with the first read trusted (a single full read may come from a
   lagging replica, so its link is never used before that);
3. one member removed in the cloud, then one added back: each must be one
   small LDAP write (the member delta since the trusted link), whatever the
   group's size;
4. a no-op full sync over it (reads every member value from both sides), with the
   adapter's default LDAP timeout and, if that times out, with a long one;

each with the Graph requests, LDAP requests, values written, member values
read and seconds, next to a plain ldap3 loop making the same writes (the add
in the same chunks, then one modify adding one member) on a copy in another OU.
Users are created offline (``SambaDC.create_users`` above 1,000 names), 100,000
at a time.

    .venv/bin/python -m bench.large_group --members 250000
"""

from __future__ import annotations

import argparse
import resource
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from ldap3 import BASE, MODIFY_ADD
from ldap3.core.exceptions import LDAPSocketReceiveError

from writeback.adapters.directory import LdapDirectory
from writeback.adapters.graph import GraphCloud
from writeback.domain.mapping import MAX_MEMBER_LIMIT, MappingOptions
from writeback.domain.model import Add, Modify, Operation, Rename
from writeback.errors import LdapUnavailable
from writeback.report import markdown_table
from writeback.service.handle_event import Converged, Work, WorkerContext, converge, converge_groups
from writeback.service.reconcile import SyncPolicy, apply_plan, plan_sync
from writeback_sandbox.graph_standin import GraphStandIn, Tenant
from writeback_sandbox.samba import SambaDC, free_loopback_address, running_dc

CHUNK = 5000
#: Users per offline creation: one transaction of 250,000 overflows LMDB (MDB_TXN_FULL).
USER_BATCH = 100_000
#: Seconds a read may take when the default is not enough.
LONG_TIMEOUT = 300.0
#: Longest the plain ldap3 read of every member value is given.
PLAIN_READ_TIMEOUT = 120
#: Extended-DN control asking for the string form (<GUID=...>;<SID=...>;CN=...).
EXTENDED_DN = ("1.2.840.113556.1.4.529", False, b"\x30\x03\x02\x01\x01")
#: What one measured step did: the operation it applied (if any) and its LDAP requests.
Step = tuple[Operation | None, int]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--members", type=int, default=MAX_MEMBER_LIMIT)
    parser.add_argument("--address", default=None, help="loopback address for the DC")
    args = parser.parse_args(argv)
    address = args.address or free_loopback_address("127.0.0.32")
    with running_dc(address=address) as dc:
        print_table(run(dc, args.members))


@dataclass(frozen=True)
class Cost:
    graph: int
    ldap: int
    written: int
    read: int
    seconds: float

    def row(self) -> str:
        return f"{self.graph} / {self.ldap} / {self.written:,} / {self.read:,} / {self.seconds:.2f}"


def run(dc: SambaDC, size: int) -> list[tuple[str, str]]:
    users_ou = dc.create_ou("BenchBigUsers")
    started = time.monotonic()
    names = [f"m{i}" for i in range(size)]
    sids: dict[str, str] = {}
    for start in range(0, size, USER_BATCH):
        sids |= dc.create_users(users_ou, names[start : start + USER_BATCH])
    print(f"setup: {size} users in {time.monotonic() - started:.1f} s", flush=True)
    plain_add, plain_modify, plain_dn = plain_loop(dc, [sids[n] for n in names])
    plain_read = plain_member_read(dc, plain_dn)
    tenant = Tenant()
    for name in names:
        tenant.add_user(_uid(name), sid=sids[name], synced=True)
    group = str(uuid.uuid5(uuid.NAMESPACE_URL, "bench-large-group"))
    tenant.add_group(group, display_name="Everyone", members=[_uid(n) for n in names])
    target = dc.create_ou("BenchBigGroup")
    with GraphStandIn(tenant, page_size=999) as standin:
        cloud = GraphCloud(base_url=standin.url)
        directory = dc.directory(target, chunk_size=CHUNK)
        try:
            options = MappingOptions(
                target_ou=target,
                member_limit=MAX_MEMBER_LIMIT,
                schema_attributes=directory.schema_attributes(),
            )
            context = WorkerContext(cloud=cloud, directory=directory, options=options)
            costs = Costs(standin, directory)

            def event(change: Callable[[], None] = lambda: None) -> Step:
                change()
                operation, requests, _ = converge(group, context)
                return operation, requests

            def confirmation() -> Step:
                result = converge_groups([Work(group, confirming=True)], context)[group]
                assert isinstance(result, Converged), result
                assert result.operation is None, "the confirmation found something to write"
                return None, result.requests

            first, one = [_uid(names[0])], _uid(names[0])
            created = costs.measure(event)
            confirmed = costs.measure(confirmation)
            removed = costs.measure(lambda: event(lambda: tenant.remove_members(group, first)))
            added = costs.measure(lambda: event(lambda: tenant.add_members(group, [one])))
        finally:
            directory.close()
        try:
            noop = no_op_syncs(standin, cloud, dc, options, plain_read)
        finally:
            cloud.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return [
        ("members of the group", f"{size:,}"),
        (
            "figures below",
            "Graph requests / LDAP requests / values written / member values read / s",
        ),
        ("first event: full read and creation", created.row()),
        ("plain ldap3: the same add in the same chunks, s", f"{plain_add:.2f}"),
        ("ratio creation / plain", f"{created.seconds / plain_add:.2f}"),
        ("its confirmation read (full, nothing to write; trusts the link)", confirmed.row()),
        ("1 member removed (member delta)", removed.row()),
        ("1 member added back (member delta)", added.row()),
        ("plain ldap3: one modify adding one member, s", f"{plain_modify:.3f}"),
        ("ratio 1-member event / plain modify", f"{added.seconds / plain_modify:.1f}"),
        ("plain ldap3: reading its members as SIDs (extended DN), s", _seconds(plain_read)),
        *noop,
        ("peak RSS of this process, MB", f"{peak:.0f}"),
    ]


class Costs:
    """Graph requests (the stand-in's log), LDAP requests, values written and read."""

    def __init__(self, standin: GraphStandIn, directory: LdapDirectory) -> None:
        self.standin = standin
        self.directory = directory

    def measure(self, step: Callable[[], Step]) -> Cost:
        self.standin.reset_log()
        read_before = self.directory.member_values_read
        started = time.monotonic()
        operation, requests = step()
        seconds = time.monotonic() - started
        return Cost(
            graph=self.standin.count(),
            ldap=requests,
            written=values_written(operation),
            read=self.directory.member_values_read - read_before,
            seconds=seconds,
        )


def no_op_syncs(
    standin: GraphStandIn,
    cloud: GraphCloud,
    dc: SambaDC,
    options: MappingOptions,
    plain_read: float | None,
) -> list[tuple[str, str]]:
    """The reconcile's full read over the group, with the adapter's default LDAP timeout
    and, when that is not enough, with a long one, so both outcomes are on record."""
    rows = []
    for timeout in (None, LONG_TIMEOUT):
        label = f"no-op full sync, LDAP timeout {timeout or 'default'} s"
        directory = dc.directory(options.target_ou, **({"timeout": timeout} if timeout else {}))
        started = time.monotonic()
        try:
            cost = Costs(standin, directory).measure(partial(full_sync, cloud, directory, options))
        except LdapUnavailable as error:
            seconds = time.monotonic() - started
            rows.append((label, f"fails after {seconds:.0f} s: {type(error).__name__}"))
            continue
        finally:
            directory.close()
        rows.append((label, cost.row()))
        if plain_read is not None:
            ratio = f"{cost.seconds / plain_read:.2f}"
            rows.append(("ratio no-op full sync / plain member read", ratio))
        break
    return rows


def full_sync(cloud: GraphCloud, directory: LdapDirectory, options: MappingOptions) -> Step:
    result = apply_plan(plan_sync(cloud, directory, options, SyncPolicy()), directory)
    assert not result.plan.operations, "the group did not converge"
    return None, result.ldap_requests


def values_written(operation: Operation | None) -> int:
    """Attribute and member values an operation sends (the guard's anchor not counted)."""
    if isinstance(operation, Add):
        return sum(len(v) for v in operation.attributes.values()) + len(operation.members)
    if isinstance(operation, Modify | Rename):
        changes = operation.changes
        values = sum(max(1, len(v)) for v in changes.replace.values())
        return values + len(changes.add_members) + len(changes.remove_members)
    return 0


def plain_loop(dc: SambaDC, sids: list[str]) -> tuple[float, float, str]:
    """The same writes as bare ldap3 calls into another OU: the add with the first
    chunk of members, the rest in modifies of the same size; then one modify."""
    ou = dc.create_ou("BenchBigPlain")
    dn = f"CN=plain-large,{ou}"
    values = [f"<SID={sid}>" for sid in sids[1:]]
    conn = dc.connection()
    try:
        started = time.monotonic()
        attributes = {"sAMAccountName": "plain-large", "member": values[:CHUNK]}
        if not conn.add(dn, ["top", "group"], attributes):
            raise RuntimeError(f"plain add failed: {conn.result}")
        for start in range(CHUNK, len(values), CHUNK):
            if not conn.modify(dn, {"member": [(MODIFY_ADD, values[start : start + CHUNK])]}):
                raise RuntimeError(f"plain modify failed: {conn.result}")
        add_seconds = time.monotonic() - started
        started = time.monotonic()
        if not conn.modify(dn, {"member": [(MODIFY_ADD, [f"<SID={sids[0]}>"])]}):
            raise RuntimeError(f"plain modify failed: {conn.result}")
        return add_seconds, time.monotonic() - started, dn
    finally:
        conn.unbind()


def plain_member_read(dc: SambaDC, dn: str) -> float | None:
    """Seconds for a bare ldap3 read of every member value as SIDs (extended DN), as the
    adapter reads them; None when it does not finish within ``PLAIN_READ_TIMEOUT``
    (ldap3's receive buffer is quadratic, which the adapter replaces)."""
    conn = dc.connection(receive_timeout=PLAIN_READ_TIMEOUT)
    try:
        started = time.monotonic()
        conn.search(dn, "(objectClass=group)", BASE, attributes=["member"], controls=[EXTENDED_DN])
        seconds = time.monotonic() - started
        assert conn.entries and conn.entries[0].entry_attributes_as_dict["member"]
        return seconds
    except LDAPSocketReceiveError:
        return None
    finally:
        conn.unbind()


def _seconds(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else f"does not finish in {PLAIN_READ_TIMEOUT} s"


def _uid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench-large-user:{name}"))


def print_table(rows: list[tuple[str, str]]) -> None:
    print()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
