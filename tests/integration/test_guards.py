"""Issue 12, findings 2 and 4, on the real Samba DC: cloud membership never becomes
on-premises privilege, and one id form holds at every boundary.

* Finding 2, the member guard: synced users whose SID is the domain
  Administrator's, krbtgt's, Domain Admins', Domain Users', a built-in group's, a
  SID nothing has, a protected (adminCount=1) user's, a computer's, a group's that
  is not ours or an admin-denied one's are never written, in the reconcile and in
  the event path; each is a skip of its own in ``plan --json`` and a line in the
  event log. A SID of one of our own groups is written (nested groups).
* Finding 2, the nesting guard: one of our groups nested (through another group)
  into Backup Operators, or into a group the admin lists, gets no member added;
  removals and renames still reach AD; ``plan`` and ``status`` say so.
* Finding 4: an anchor in another case is not ours (never deleted, recreated or
  written) and is reported; a queue body with an id in another case is poison;
  one duplicated anchor in a step does not fail the other groups of the step, and
  it is an alert in ``plan`` and ``status``.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ldap3 import BASE, MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE

from tests.support.world import World, make_world, user_id
from writeback.adapters.ldap_values import sid_from_bytes
from writeback.adapters.local_queue import LocalQueue
from writeback.adapters.state import MemoryState
from writeback.cli import main
from writeback.domain.events import Change, GroupChanged
from writeback.domain.guard import GuardRules
from writeback.domain.model import SkipReason, anchor_for
from writeback.domain.naming import dn_for, escape_filter_value
from writeback.ports import OutgoingMessage
from writeback.service.guarding import GuardReads
from writeback.service.handle_event import WorkerContext, process_sessions
from writeback.service.pipeline import Pipeline, PipelineConfig
from writeback.service.reconcile import SyncPolicy
from writeback.service.status import collect_status, format_status
from writeback_sandbox.samba import SambaDC


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with make_world(samba_dc, make_ou(samba_dc)) as w:
        yield w


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[LocalQueue]:
    with LocalQueue(tmp_path / "q.sqlite3", lock_duration=5, max_delivery_count=50) as q:
        yield q


def admin(world: World, dn: str, changes: dict[str, Any]) -> None:
    conn = world.dc.connection()
    try:
        assert conn.modify(dn, changes), conn.result
    finally:
        conn.unbind()


def add_object(world: World, dn: str, classes: list[str], attributes: dict[str, Any]) -> str:
    """An object made by an admin; returns its objectSid."""
    conn = world.dc.connection()
    try:
        assert conn.add(dn, classes, attributes), conn.result
    finally:
        conn.unbind()
    return sid_at(world, dn)


def sid_at(world: World, dn: str) -> str:
    conn = world.dc.connection()
    try:
        assert conn.search(dn, "(objectClass=*)", BASE, attributes=["objectSid"])
        return sid_from_bytes(conn.response[0]["raw_attributes"]["objectSid"][0])
    finally:
        conn.unbind()


def synced(world: World, name: str, sid: str) -> str:
    """A cloud user synced from on-premises with ``sid``; returns its name."""
    world.tenant.add_user(user_id(name), sid=sid, synced=True, display_name=name)
    return name


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


@pytest.fixture
def env(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    for name, value in {
        "WRITEBACK_TARGET_OU": world.ou,
        "WRITEBACK_LDAP_URL": world.dc.ldaps_url,
        "WRITEBACK_LDAP_USER": world.dc.admin_dn,
        "WRITEBACK_LDAP_PASSWORD": world.dc.admin_password,
        "WRITEBACK_LDAP_CA_FILE": world.dc.ca_file,
        "WRITEBACK_GRAPH_URL": world.standin.url,
        "WRITEBACK_GRAPH_AUTH": "none",
    }.items():
        monkeypatch.setenv(name, value)
    return world


def hostile_members(world: World) -> dict[str, tuple[str, SkipReason]]:
    """Cloud users carrying SIDs that must never be written: name -> (sid, reason)."""
    domain = world.dc.domain_sid()
    t = world.token
    protected_dn = f"CN={t}user1,{world.users_ou}"
    admin(world, protected_dn, {"adminCount": [(MODIFY_REPLACE, ["1"])]})
    computer = add_object(
        world,
        f"CN=pc{t},{world.users_ou}",
        ["top", "person", "organizationalPerson", "user", "computer"],
        {"sAMAccountName": f"pc{t}$"},
    )
    group_sid = sid_at(world, world.dc.create_group(world.users_ou, f"helpdesk{t}"))
    cases = {
        "administrator": (f"{domain}-500", SkipReason.MEMBER_PRIVILEGED),
        "krbtgt": (f"{domain}-502", SkipReason.MEMBER_PRIVILEGED),
        "domainadmins": (f"{domain}-512", SkipReason.MEMBER_PRIVILEGED),
        "domainusers": (f"{domain}-513", SkipReason.MEMBER_PRIVILEGED),
        "administrators": ("S-1-5-32-544", SkipReason.MEMBER_PRIVILEGED),
        "everyone": ("S-1-1-0", SkipReason.MEMBER_PRIVILEGED),
        "ghost": (f"{domain}-987654", SkipReason.MEMBER_UNRESOLVED),
        # A domain of its own per test: once some test has written a foreign SID as a
        # member, the shared DC holds a foreign security principal for it, and that
        # SID reads as not-a-user-object (refused all the same) instead.
        "otherdomain": (
            f"S-1-5-21-1-2-{uuid.uuid4().int % 2**31}-4444",
            SkipReason.MEMBER_UNRESOLVED,
        ),
        "protected": (world.sid_of("user1"), SkipReason.MEMBER_PROTECTED),
        "computer": (computer, SkipReason.MEMBER_NOT_A_USER_OBJECT),
        "theirs": (group_sid, SkipReason.MEMBER_NOT_A_USER_OBJECT),
        "denied": (world.sid_of("user2"), SkipReason.MEMBER_DENIED),
    }
    for name, (sid, _) in cases.items():
        if name not in ("protected", "denied"):
            synced(world, f"{name}{t}", sid)
    return cases


def member_names(world: World, cases: dict[str, tuple[str, SkipReason]]) -> list[str]:
    t = world.token
    names = {"protected": "user1", "denied": "user2"}
    return ["user0", *(names.get(name, f"{name}{t}") for name in cases)]


def test_the_member_guard_writes_no_privileged_unresolved_or_denied_member(
    env: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = env
    cases = hostile_members(world)
    monkeypatch.setenv("WRITEBACK_MEMBER_DENY", world.sid_of("user2"))
    gid = world.add_group(1, "Sales", member_names(world, cases))

    code, output = run("plan", "--json")
    assert code == 0, output
    lines = [json.loads(line) for line in output.splitlines()]
    [add] = [line for line in lines if line["op"] == "add"]
    assert add["changes"]["members_add"] == [f"<SID={world.sid_of('user0')}>"]
    guarded = {line["member"]: line for line in lines if line["op"] == "skip" and "member" in line}
    assert {sid: SkipReason(line["reason"]) for sid, line in guarded.items()} == {
        sid: reason for sid, reason in cases.values()
    }
    assert all(line["group_id"] == gid and line["detail"] for line in guarded.values())

    assert run("sync")[0] == 0
    entry = world.ad_entry(gid)
    assert entry is not None
    assert entry["member_sids"] == {world.sid_of("user0")}

    # A privileged member already in AD (written before the guard, or by hand) goes.
    domain_admins = f"{world.dc.domain_sid()}-512"
    admin(world, entry["dn"], {"member": [(MODIFY_ADD, [f"<SID={domain_admins}>"])]})
    code, output = run("plan", "--json")
    [modify] = [json.loads(line) for line in output.splitlines() if '"modify"' in line]
    assert modify["changes"]["members_remove"] == [f"<SID={domain_admins}>"]
    assert modify["changes"]["members_add"] == []
    assert run("sync")[0] == 0
    assert world.member_sids(entry["dn"]) == {world.sid_of("user0")}


def test_a_sid_of_one_of_our_own_groups_is_written_as_a_member(world: World) -> None:
    inner = world.add_group(1, "Inner", ["user0"])
    world.sync()
    inner_entry = world.ad_entry(inner)
    assert inner_entry is not None
    inner_sid = sid_at(world, inner_entry["dn"])
    # A cloud member carrying our group's SID: the one exception to "users only".
    synced(world, "nested", inner_sid)
    outer = world.add_group(2, "Outer", ["user1", "nested"])
    world.sync()
    outer_entry = world.ad_entry(outer)
    assert outer_entry is not None
    assert outer_entry["member_sids"] == {world.sid_of("user1"), inner_sid}


def test_the_event_path_guards_members_and_logs_each(
    world: World, queue: LocalQueue, caplog: pytest.LogCaptureFixture
) -> None:
    cases = hostile_members(world)
    rules = GuardRules(deny=frozenset({world.sid_of("user2")}))
    gid = world.add_group(1, "Sales", member_names(world, cases))
    ctx = WorkerContext(
        world.cloud, world.directory, world.options, attempts=1, guard=GuardReads(rules)
    )
    event = GroupChanged(gid, Change.CREATED, time.time(), "n1")
    queue.send([OutgoingMessage(event.to_json(), "m1", gid)])
    with caplog.at_level(logging.WARNING, logger="writeback.worker"):
        [outcome] = process_sessions(queue, queue.receive_sessions(5, 100, 1.0), ctx)
    assert outcome.settlement == "completed", outcome.error
    entry = world.ad_entry(gid)
    assert entry is not None and entry["member_sids"] == {world.sid_of("user0")}
    assert {(s.member, s.reason) for s in outcome.skips if s.member} == set(cases.values())
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for sid, reason in cases.values():
        assert reason.value in logged and sid in logged


# ------------------------------------------------------------------- the nesting guard


@pytest.fixture
def nested_into_backup_operators(world: World) -> Iterator[tuple[str, str]]:
    """Our group, nested by an admin through a group of theirs into Backup Operators:
    (group id, the middle group's DN). The nesting is undone afterwards (the DC is
    shared by the session)."""
    gid = world.add_group(1, "Ops", ["user0", "user1"])
    world.sync()
    entry = world.ad_entry(gid)
    assert entry is not None
    middle = world.dc.create_group(world.users_ou, f"middle{world.token}")
    operators = f"CN=Backup Operators,CN=Builtin,{world.dc.base_dn}"
    admin(world, middle, {"member": [(MODIFY_ADD, [entry["dn"]])]})
    admin(world, operators, {"member": [(MODIFY_ADD, [middle])]})
    try:
        yield gid, middle
    finally:
        admin(world, operators, {"member": [(MODIFY_DELETE, [middle])]})


def test_a_group_nested_into_a_protected_group_gets_no_member_added(
    env: World, nested_into_backup_operators: tuple[str, str]
) -> None:
    world = env
    gid, _ = nested_into_backup_operators
    world.tenant.add_members(gid, [world.uid("user2"), world.uid("user3")])
    world.tenant.remove_members(gid, [world.uid("user1")])
    world.tenant.update_group(gid, display_name="Ops renamed")

    code, output = run("plan", "--json")
    assert code == 0, output
    lines = [json.loads(line) for line in output.splitlines()]
    [modify] = [line for line in lines if line["op"] == "modify"]
    assert modify["changes"]["members_add"] == []
    assert modify["changes"]["members_remove"] == [f"<SID={world.sid_of('user1')}>"]
    assert modify["changes"]["replace"]["displayName"] == ["Ops renamed"]
    [frozen] = [line for line in lines if line.get("reason") == "group-frozen"]
    assert frozen["group_id"] == gid and frozen["alert"] is True and frozen["count"] == 2
    assert "Backup Operators" in frozen["detail"]
    code, text = run("plan")
    assert "ALERT group-frozen" in text

    assert run("sync")[0] == 0
    entry = world.ad_entry(gid)
    assert entry is not None
    assert entry["member_sids"] == {world.sid_of("user0")}, "removal yes, additions no"
    assert entry["displayname"] == ["Ops renamed"]

    # The event path holds the same line, and status shows the alert.
    world.tenant.add_members(gid, [world.uid("user4")])
    ctx = WorkerContext(world.cloud, world.directory, world.options, attempts=1)
    with LocalQueue(Path(world.dc.workdir) / f"q-{uuid.uuid4().hex}.sqlite3") as queue:
        event = GroupChanged(gid, Change.UPDATED, time.time(), "n1")
        queue.send([OutgoingMessage(event.to_json(), "m1", gid)])
        [outcome] = process_sessions(queue, queue.receive_sessions(5, 100, 1.0), ctx)
    assert outcome.settlement == "completed"
    assert [s.reason for s in outcome.skips] == [SkipReason.GROUP_FROZEN]
    assert world.member_sids(entry["dn"]) == {world.sid_of("user0")}
    state = MemoryState()
    pipeline = Pipeline(
        cloud=world.cloud,
        directory=world.directory,
        config=PipelineConfig(options=world.options),
        state=state,
    )
    assert pipeline.reconcile("test") is not None
    lines = format_status(collect_status(None, state.read()))
    assert any(line.startswith("ALERTS: 1") for line in lines), lines
    assert any("group-frozen" in line and gid in line for line in lines), lines


def test_a_group_the_admin_lists_as_protected_freezes_what_is_nested_in_it(
    world: World,
) -> None:
    gid = world.add_group(1, "Ops", ["user0"])
    world.sync()
    entry = world.ad_entry(gid)
    assert entry is not None
    local_admins = world.dc.create_group(world.users_ou, f"wsadmins{world.token}")
    admin(world, local_admins, {"member": [(MODIFY_ADD, [entry["dn"]])]})
    listed = sid_at(world, local_admins)
    world.tenant.add_members(gid, [world.uid("user1")])
    assert world.plan().operations, "an ordinary group: the add goes through"
    plan = world.plan(SyncPolicy(guard=GuardRules(protected=frozenset({listed}))))
    assert plan.operations == []
    [alert] = plan.alerts
    assert alert.reason is SkipReason.GROUP_FROZEN and "WRITEBACK_PROTECTED_GROUPS" in alert.detail


# ------------------------------------------------------------------- finding 4


def test_an_anchor_in_another_case_is_never_deleted_recreated_or_written(env: World) -> None:
    world = env
    gid = world.add_group(1, "Finance", ["user0"])
    upper = dn_for(f"Group_{gid.upper()}", world.ou)
    add_object(
        world,
        upper,
        ["top", "group"],
        {"adminDescription": f"Group_{gid.upper()}", "sAMAccountName": f"up{world.token}"},
    )
    before = _guid_and_usn(world, upper)

    code, output = run("plan", "--json")
    lines = [json.loads(line) for line in output.splitlines()]
    assert [line["op"] for line in lines] == ["skip"], lines
    assert lines[0]["reason"] == "duplicate-anchor" and lines[0]["alert"] is True
    assert code == 0
    assert run("sync")[0] == 0
    assert _guid_and_usn(world, upper) == before, "not modified, deleted or recreated"
    conn = world.dc.connection()
    conn.search(world.ou, f"(adminDescription={escape_filter_value(anchor_for(gid))})")
    assert len(conn.entries) == 1, "no twin was created beside it"
    conn.unbind()


def _guid_and_usn(world: World, dn: str) -> tuple[str, int]:
    conn = world.dc.connection()
    try:
        assert conn.search(dn, "(objectClass=*)", BASE, attributes=["objectGUID", "uSNChanged"])
        entry = conn.entries[0]
        return str(entry.objectGUID.value), int(entry.uSNChanged.value)
    finally:
        conn.unbind()


def test_a_queue_body_with_an_id_in_another_case_is_poison(world: World, queue: LocalQueue) -> None:
    gid = world.add_group(1, "Kept", ["user0"])
    world.sync()
    entry = world.ad_entry(gid)
    assert entry is not None
    world.tenant.soft_delete_group(gid)
    ctx = WorkerContext(world.cloud, world.directory, world.options, attempts=1)
    for n, hostile in enumerate((gid.upper(), gid + " ", "{" + gid + "}")):
        event = GroupChanged(hostile, Change.DELETED, time.time(), f"n{n}")
        queue.send([OutgoingMessage(event.to_json(), f"m{n}", hostile)])
    outcomes = process_sessions(queue, queue.receive_sessions(5, 100, 1.0), ctx)
    assert [o.settlement for o in outcomes] == ["dead-lettered"] * 3
    assert {d.reason for d in queue.dead_letters()} == {"PoisonEvent"}
    after = world.ad_entry(gid)
    assert after is not None and after["objectsid"] == entry["objectsid"]


def test_one_duplicated_anchor_does_not_fail_the_other_groups_of_its_step(
    world: World, queue: LocalQueue
) -> None:
    doubled = world.add_group(1, "Doubled", ["user0"])
    fine = world.add_group(2, "Fine", ["user0"])
    world.sync()
    decoy = dn_for("Decoy", world.ou)
    add_object(
        world,
        decoy,
        ["top", "group"],
        {"adminDescription": anchor_for(doubled), "sAMAccountName": f"dc{world.token}"},
    )
    world.tenant.add_members(fine, [world.uid("user1")])
    world.tenant.add_members(doubled, [world.uid("user1")])
    ctx = WorkerContext(world.cloud, world.dc.directory(world.ou), world.options, attempts=1)
    for n, gid in enumerate((doubled, fine)):
        event = GroupChanged(gid, Change.UPDATED, time.time(), f"n{n}")
        queue.send([OutgoingMessage(event.to_json(), f"m{n}", gid)])
    batches = queue.receive_sessions(5, 100, 1.0)
    assert len(batches) == 2, "both groups in one step"
    outcomes = {o.group_id: o for o in process_sessions(queue, batches, ctx)}
    assert outcomes[fine].settlement == "completed"
    fine_entry = world.ad_entry(fine)
    assert fine_entry is not None
    assert fine_entry["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}
    assert outcomes[doubled].settlement == "dead-lettered"
    [letter] = queue.dead_letters()
    assert letter.reason == "DuplicateAnchor" and "Decoy" in letter.description

    plan = world.plan()
    [alert] = plan.alerts
    assert (alert.group_id, alert.reason) == (doubled, SkipReason.DUPLICATE_ANCHOR)
    # Not a silent skip: the reconcile records it, and status shows it.
    state = MemoryState()
    pipeline = Pipeline(
        cloud=world.cloud,
        directory=world.dc.directory(world.ou),
        config=PipelineConfig(options=world.options),
        state=state,
    )
    assert pipeline.reconcile("test") is not None
    lines = format_status(collect_status(None, state.read()))
    assert any(line.startswith("ALERTS: 1") for line in lines), lines
    assert any("duplicate-anchor" in line and doubled in line for line in lines), lines
