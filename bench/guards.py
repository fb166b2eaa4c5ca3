"""What the member and nesting guards cost on AD, against the obvious alternatives.

On one throwaway Samba AD DC, in one run:

1. ``resolve_sids`` of every user SID (the member guard's bulk lookup, batches of
   ``GUARD_BATCH`` SIDs ORed in one filter) next to one ldap3 search per SID, and
   next to the same lookup in batches of 500 and 1,000 (why the batch is small:
   Samba's OR gets slower per term as it grows);
2. ``group_ancestry`` over an OU of anchored groups, one of them nested through
   another group into Backup Operators (a ``(memberOf=*)`` search, then the groups
   above), next to the ``LDAP_MATCHING_RULE_IN_CHAIN`` search over the same OU for
   groups nested in any protected group, ``(memberOf:1.2.840.113556.1.4.1941:=...)``
   ORed over the protected groups.

    .venv/bin/python bench/guards.py --users 5000 --groups 3000
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial

import ldap3
from ldap3 import MODIFY_ADD, SUBTREE

import writeback.adapters.directory as directory_module
from writeback.domain.guard import Ancestry, GuardRules, frozen_groups
from writeback.domain.model import anchor_for
from writeback.report import markdown_table
from writeback_sandbox.samba import SambaDC, free_loopback_address, running_dc

IN_CHAIN = "1.2.840.113556.1.4.1941"
PROTECTED = "(&(objectClass=group)(|(adminCount=1)(groupType:1.2.840.113556.1.4.803:=1)))"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--groups", type=int, default=3000)
    parser.add_argument("--address")
    args = parser.parse_args(argv)
    with running_dc(address=args.address or free_loopback_address("127.0.0.33")) as dc:
        run(dc, args.users, args.groups)


def timed(work: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def run(dc: SambaDC, users: int, groups: int) -> None:
    people = dc.create_ou("GuardUsers")
    sids = list(dc.create_users(people, [f"g{i}" for i in range(users)]).values())
    target = dc.create_ou("GuardGroups")
    conn = dc.connection()
    nested_dn = ""
    for n in range(groups):
        gid = str(uuid.uuid4())
        dn = f"CN=Group_{gid},{target}"
        attributes = {"adminDescription": anchor_for(gid), "sAMAccountName": f"gg{n}"}
        assert conn.add(dn, ["top", "group"], {**attributes, "groupType": 8}), conn.result
        nested_dn = nested_dn or dn
    middle = f"CN=middle,{people}"
    assert conn.add(middle, ["top", "group"], {"sAMAccountName": "guard-middle"})
    assert conn.modify(middle, {"member": [(MODIFY_ADD, [nested_dn])]})
    operators = f"CN=Backup Operators,CN=Builtin,{dc.base_dn}"
    assert conn.modify(operators, {"member": [(MODIFY_ADD, [middle])]})

    def one_search_per_sid() -> int:
        found = 0
        for sid in sids:
            conn.search(dc.base_dn, f"(objectSid={sid})", SUBTREE, attributes=["objectClass"])
            found += len([e for e in conn.response if e.get("type") == "searchResEntry"])
        return found

    rows: list[tuple[str, str]] = [("users / anchored groups", f"{users} / {groups}")]
    default_batch = directory_module.GUARD_BATCH
    by_batch: dict[int, float] = {}
    for batch in (default_batch, 500, 1000):
        directory_module.GUARD_BATCH = batch
        adapter = dc.directory(target)
        adapter.schema_attributes()  # the connection opened outside the timing
        seconds, found = timed(partial(adapter.resolve_sids, sids))
        assert isinstance(found, dict) and len(found) == users
        by_batch[batch] = seconds
        label = "resolve_sids" + (" (the adapter's batch)" if batch == default_batch else "")
        searches = adapter.request_counts["search"] - 2  # less the schema's two reads
        per_sid = seconds / users * 1e6
        rows.append(
            (
                f"{label}, {batch} SIDs a search: s / us per SID / searches",
                f"{seconds:.2f} / {per_sid:.0f} / {searches}",
            )
        )
        adapter.close()
    directory_module.GUARD_BATCH = default_batch
    plain_seconds, plain_found = timed(one_search_per_sid)
    assert plain_found == users
    rows.append(("plain ldap3: one search per SID, s", f"{plain_seconds:.2f}"))
    ratio = by_batch[default_batch] / plain_seconds
    rows.append(("ratio resolve_sids / one search per SID", f"{ratio:.2f}"))

    adapter = dc.directory(target)
    adapter.schema_attributes()
    ancestry_seconds, ancestry = timed(adapter.group_ancestry)
    assert isinstance(ancestry, Ancestry)
    assert len(frozen_groups(ancestry, GuardRules())) == 1
    ancestry_searches = adapter.request_counts["search"] - 2
    conn.search(dc.base_dn, PROTECTED, SUBTREE, attributes=["cn"])
    protected = [e["dn"] for e in conn.response if e.get("type") == "searchResEntry"]
    chain = "".join(f"(memberOf:{IN_CHAIN}:={dn})" for dn in protected)
    chain_filter = f"(&(objectClass=group)(adminDescription=Group_*)(|{chain}))"
    chain_seconds, _ = timed(lambda: conn.search(target, chain_filter, SUBTREE, attributes=["cn"]))
    chained = [e for e in conn.response if e.get("type") == "searchResEntry"]
    assert len(chained) == 1
    rows += [
        (
            "group_ancestry over the OU (1 group nested), s / searches",
            f"{ancestry_seconds:.3f} / {ancestry_searches}",
        ),
        (
            f"in-chain filter over the OU, {len(protected)} protected groups ORed, s",
            f"{chain_seconds:.3f}",
        ),
        ("ratio group_ancestry / in-chain filter", f"{ancestry_seconds / chain_seconds:.3f}"),
    ]
    adapter.close()
    conn.modify(operators, {"member": [(ldap3.MODIFY_DELETE, [middle])]})
    conn.unbind()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
