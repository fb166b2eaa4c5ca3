"""How plans and results look to a person and to a script.

``plan --json`` prints one JSON object a line: operations carry ``op`` (add,
modify, rename, delete), ``group_id``, ``dn`` and ``changes``; skips carry
``op: "skip"`` with the reason, so nothing left out is silent: a member the
member guard refused is a skip of its own with its SID in ``member``, and a
skip a person must act on (a duplicated anchor, a frozen group) has
``alert: true``.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, TextIO

from writeback.domain.model import Add, Changes, Delete, Operation, Rename, Skip
from writeback.service.reconcile import Plan, SyncResult


def operation_json(operation: Operation) -> dict[str, Any]:
    return {
        "op": operation.kind,
        "group_id": operation.group_id,
        "dn": operation.dn,
        "changes": _changes_json(operation),
    }


def _changes_json(operation: Operation) -> dict[str, Any]:
    if isinstance(operation, Add):
        return {"attributes": dict(operation.attributes), "members_add": list(operation.members)}
    if isinstance(operation, Delete):
        return {}
    changes = _modify_json(operation.changes)
    if isinstance(operation, Rename):
        changes = {"new_rdn": operation.new_rdn, **changes}
    return changes


def _modify_json(changes: Changes) -> dict[str, Any]:
    return {
        "replace": {name: list(values) for name, values in changes.replace.items()},
        "members_add": list(changes.add_members),
        "members_remove": list(changes.remove_members),
    }


def skip_json(skip: Skip) -> dict[str, Any]:
    line: dict[str, Any] = {
        "op": "skip",
        "group_id": skip.group_id,
        "reason": skip.reason.value,
        "count": skip.count,
        "detail": skip.detail,
    }
    if skip.member:
        line["member"] = skip.member
    if skip.alert:
        line["alert"] = True
    return line


def plan_json_lines(plan: Plan) -> Iterator[str]:
    for operation in plan.operations:
        yield json.dumps(operation_json(operation), ensure_ascii=False)
    for skip in plan.skips:
        yield json.dumps(skip_json(skip), ensure_ascii=False)


def describe(operation: Operation) -> str:
    """One line for a person: what will change, not every value."""
    if isinstance(operation, Add):
        detail = f"{len(operation.members)} members"
    elif isinstance(operation, Delete):
        detail = ""
    else:
        detail = _describe_changes(operation.changes)
        if isinstance(operation, Rename):
            detail = f"to {operation.new_rdn}" + (f"; {detail}" if detail else "")
    return f"{operation.kind:<7} {operation.dn}" + (f"  ({detail})" if detail else "")


def _describe_changes(changes: Changes) -> str:
    parts = []
    if changes.replace:
        parts.append(", ".join(sorted(changes.replace)))
    if changes.add_members:
        parts.append(f"+{len(changes.add_members)} members")
    if changes.remove_members:
        parts.append(f"-{len(changes.remove_members)} members")
    return "; ".join(parts)


def print_plan(plan: Plan, out: TextIO) -> None:
    print(
        f"Cloud: {plan.groups_in_cloud} Microsoft 365 groups; "
        f"directory: {plan.groups_in_directory} written-back groups.",
        file=out,
    )
    for operation in plan.operations:
        print("  " + describe(operation), file=out)
    print_skips(plan.skips, out)
    for alert in plan.alerts:
        print(f"ALERT {alert.reason.value}: group {alert.group_id}: {alert.detail}", file=out)
    print(f"Plan: {_count_ops(plan.operations)}.", file=out)
    if plan.deletes_blocked:
        print(f"Deletes held back: {plan.deletes_blocked}", file=out)


def print_skips(skips: list[Skip], out: TextIO) -> None:
    if not skips:
        return
    print("Skipped:", file=out)
    for skip in skips:
        count = f" x{skip.count}" if skip.count > 1 else ""
        print(f"  {skip.group_id}  {skip.reason.value}{count}  {skip.detail}", file=out)


def _count_ops(operations: list[Operation]) -> str:
    counts = Counter(op.kind for op in operations)
    if not counts:
        return "nothing to do"
    return ", ".join(f"{counts[kind]} {kind}" for kind in ("add", "modify", "rename", "delete"))


def print_result(result: SyncResult, out: TextIO) -> None:
    applied = ", ".join(f"{n} {kind}" for kind, n in sorted(result.applied.items())) or "no writes"
    print(
        f"Done in {result.seconds:.2f} s: {applied}; {result.ldap_requests} LDAP requests.",
        file=out,
    )
    members_skipped = sum(s.count for s in result.plan.skips if s.reason.value.startswith("member"))
    groups_skipped = sum(1 for s in result.plan.skips if not s.reason.value.startswith("member"))
    if members_skipped or groups_skipped:
        print(
            f"Skipped: {members_skipped} members (not on-premises, not users, or refused by "
            f"the member guard); {groups_skipped} groups (see the plan for reasons).",
            file=out,
        )
    for alert in result.plan.alerts:
        print(f"ALERT {alert.reason.value}: group {alert.group_id}: {alert.detail}", file=out)
    for operation, error in result.failures:
        print(f"FAILED  {operation.kind} {operation.dn}: {error}", file=out)
    if result.plan.deletes_blocked:
        print(f"Deletes held back: {result.plan.deletes_blocked}", file=out)


class ProgressBar:
    """A one-line progress bar on a terminal; a line every few seconds otherwise."""

    def __init__(
        self, out: TextIO = sys.stderr, *, label: str = "sync", every: float = 5.0
    ) -> None:
        self._out = out
        self._label = label
        self._every = every
        self._last = 0.0
        self._tty = out.isatty()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        finished = done == total
        if not finished and now - self._last < (0.1 if self._tty else self._every):
            return
        self._last = now
        if self._tty:
            filled = int(30 * done / total) if total else 30
            bar = "#" * filled + "." * (30 - filled)
            end = "\n" if finished else ""
            print(f"\r{self._label} [{bar}] {done}/{total}", end=end, file=self._out, flush=True)
        else:
            print(f"{self._label}: {done}/{total}", file=self._out, flush=True)


def markdown_table(rows: list[tuple[str, str]]) -> str:
    """Benchmark figures as a markdown table, as the README quotes them."""
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'figure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)
