"""Graph reads one group at a time next to the batched reads, through the real msgraph-sdk.

For ``--groups`` groups of ``--members`` synced users each, served by the Graph
stand-in from a forked child process (Graph is another machine in production,
so its CPU is not counted here), once with ``--latency`` seconds added to every
answer (30 ms by default: real Graph round trips are tens of milliseconds) and
once with none, in one run:

* full reads: :meth:`GraphCloud.get_group` for each group in turn (what the
  event path does per event today) next to :meth:`GraphCloud.get_groups` for
  ``--batch`` groups at a time (JSON ``$batch``, 20 requests a round trip);
* member deltas: :meth:`GraphCloud.group_delta` per group next to
  :meth:`GraphCloud.group_deltas` for ``--batch`` groups at a time, after one
  member was added to every group, plus :meth:`GraphCloud.resolve_users` for
  the added members (one call per group next to one call per step);

each with wall ms per group, CPU ms per group in this process (all its threads:
the SDK's event loop runs in one of them), and Graph requests and round trips
per group as the stand-in counted them.

    .venv/bin/python -m bench.graph_reads --groups 400 --members 20
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.standin import RemoteStandIn
from writeback.adapters.graph import GraphCloud
from writeback.report import markdown_table
from writeback_sandbox.graph_standin import Tenant


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--groups", type=int, default=400)
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--batch", type=int, default=20, help="groups per batched call")
    parser.add_argument("--latency", type=float, default=0.030)
    args = parser.parse_args(argv)
    rows: list[tuple[str, str]] = [
        (
            "groups / members each / groups per batched call",
            f"{args.groups} / {args.members} / {args.batch}",
        ),
    ]
    for latency in (args.latency, 0.0):
        rows.extend(run(args.groups, args.members, args.batch, latency))
    print(markdown_table(rows))


@dataclass(frozen=True)
class Cost:
    """One way of reading every group: per group figures."""

    wall_ms: float
    cpu_ms: float
    requests: float
    round_trips: float

    def cell(self) -> str:
        return (
            f"{self.wall_ms:.2f} / {self.cpu_ms:.2f} / {self.requests:.2f} / {self.round_trips:.2f}"
        )


def run(groups: int, members: int, batch: int, latency: float) -> list[tuple[str, str]]:
    tenant, ids = build_tenant(groups, members)
    standin = RemoteStandIn(tenant, latency=latency)
    label = f"latency {latency * 1000:.0f} ms"
    try:
        with GraphCloud(base_url=standin.url, max_wait=5.0) as cloud:
            chunks = [ids[i : i + batch] for i in range(0, len(ids), batch)]
            # Warm up: connections, the SDK's lazily built builders, the stand-in's pages.
            cloud.get_group(ids[0])
            cloud.get_groups(chunks[0])

            def single_reads() -> None:
                for gid in ids:
                    assert cloud.get_group(gid) is not None

            def batched_reads() -> None:
                for chunk in chunks:
                    found = cloud.get_groups(chunk)
                    assert all(not isinstance(v, Exception) for v in found.values())

            single = measure(standin, groups, single_reads)
            batched = measure(standin, groups, batched_reads)

            links = {gid: cloud.group_delta_link(gid) or "" for gid in ids}
            for n, gid in enumerate(ids):
                standin.tenant("add_members", gid, [f"new-{n:05d}"])

            def single_deltas() -> None:
                for gid in ids:
                    delta = cloud.group_delta(gid, links[gid])
                    assert delta is not None and len(delta.added) == 1
                    cloud.resolve_users([m.id for m in delta.added])

            def batched_deltas() -> None:
                for chunk in chunks:
                    deltas = cloud.group_deltas({gid: links[gid] for gid in chunk})
                    added = [
                        m.id
                        for d in deltas.values()
                        if d is not None and not isinstance(d, Exception)
                        for m in d.added
                    ]
                    assert len(added) == len(chunk)
                    assert len(cloud.resolve_users(added)) == len(chunk)

            delta_single = measure(standin, groups, single_deltas)
            delta_batched = measure(standin, groups, batched_deltas)
    finally:
        standin.close()
    head = "wall ms / CPU ms / requests / round trips, per group"
    return [
        (f"{label}: full read, one group at a time: {head}", single.cell()),
        (f"{label}: full read, batched: {head}", batched.cell()),
        (f"{label}: full read, CPU batched / one at a time", ratio(batched, single)),
        (f"{label}: delta + SIDs, one group at a time: {head}", delta_single.cell()),
        (f"{label}: delta + SIDs, batched: {head}", delta_batched.cell()),
        (f"{label}: delta + SIDs, CPU batched / one at a time", ratio(delta_batched, delta_single)),
    ]


def ratio(batched: Cost, single: Cost) -> str:
    return f"{batched.cpu_ms / single.cpu_ms:.2f}" if single.cpu_ms else "n/a"


def measure(standin: RemoteStandIn, groups: int, work: Callable[[], None]) -> Cost:
    standin.standin("reset_log")
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    requests, round_trips = standin.standin("count"), standin.standin("round_trips")
    return Cost(
        wall_ms=wall * 1000 / groups,
        cpu_ms=cpu * 1000 / groups,
        requests=requests / groups,
        round_trips=round_trips / groups,
    )


def build_tenant(groups: int, members: int) -> tuple[Tenant, list[str]]:
    tenant = Tenant()
    users = [f"user-{i:05d}" for i in range(groups + members)]
    for i, user_id in enumerate(users):
        tenant.add_user(user_id, sid=f"S-1-5-21-1-2-3-{1000 + i}", synced=True)
    for n in range(groups):
        tenant.add_user(f"new-{n:05d}", sid=f"S-1-5-21-1-2-4-{1000 + n}", synced=True)
    ids = [f"00000000-0000-4000-8000-{n:012d}" for n in range(groups)]
    for n, gid in enumerate(ids):
        tenant.add_group(
            gid,
            display_name=f"Group {n}",
            mail=f"group{n}@contoso.com",
            proxy_addresses=[f"SMTP:group{n}@contoso.com"],
            members=users[n : n + members],
        )
    return tenant, ids


if __name__ == "__main__":
    main()
