"""AD through the relay: cloud side → Relay stand-in → agent → real Samba AD DC.

The agent is the real AgentService behind the real Hybrid Connection listener; the
cloud side is the real RelayDirectory over the real sender; the stand-in speaks
the published protocol over TLS. AD is read back over an independent admin
connection.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ldap3 import BASE, MODIFY_ADD

from tests.support.relay import LISTEN, PATH, SEND, RelayRig, relay_rig
from tests.support.world import World, make_world
from writeback.adapters.hybrid_connection import (
    HybridConnectionListener,
    RelayRequest,
    RelayResponse,
)
from writeback.adapters.local_queue import LocalQueue
from writeback.adapters.relay import RelayDirectory
from writeback.agent_protocol import ForgedReply, audience, encode, operation_to_json, sign
from writeback.cli import EXIT_FAILURES, EXIT_OK, main
from writeback.domain.model import Add, Changes, Delete, Modify, Operation, Rename, anchor_for
from writeback.domain.naming import dn_for
from writeback.errors import LdapUnavailable, PolicyRefused, RelayRefused, RelayUnavailable
from writeback.hosting.serve import ServeConfig, Server
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with make_world(samba_dc, make_ou(samba_dc)) as w:
        yield w


@pytest.fixture
def rig() -> Iterator[RelayRig]:
    with relay_rig() as r:
        yield r


def through_relay(world: World, rig: RelayRig, **agent: Any) -> RelayDirectory:
    """Starts an agent for the world's OU and points the world's sync at the relay."""
    agent.setdefault("group_type", world.options.group_type)
    agent.setdefault("dn_format", world.options.dn_format)
    rig.start_agent(lambda: world.dc.directory(world.ou), world.ou, **agent)
    world.directory.close()
    world.directory = rig.directory(world.ou)  # type: ignore[assignment]
    return world.directory  # type: ignore[return-value]


def usn_changed(world: World, dn: str) -> int:
    conn = world.dc.connection()
    try:
        assert conn.search(dn, "(objectClass=*)", BASE, attributes=["uSNChanged"])
        return int(conn.entries[0].uSNChanged.value)
    finally:
        conn.unbind()


def test_sync_through_the_relay_writes_one_round_trip_per_operation(
    world: World, rig: RelayRig
) -> None:
    relay = through_relay(world, rig)
    sales = world.add_group(1, "Sales", ["user0", "user1", "cloudonly"])
    ops = world.add_group(2, "Ops", ["user2"])
    result = world.sync()
    assert result.applied == {"add": 2}
    entry = world.ad_entry(sales)
    assert entry is not None
    assert entry["displayname"] == ["Sales"]
    assert entry["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}
    assert world.ad_entry(ops) is not None
    world.tenant.update_group(sales, display_name="Sales EMEA")
    world.tenant.add_members(ops, [world.uid("user3")])
    trips = relay.round_trips
    assert world.sync().applied == {"modify": 2}
    # two writes, one listing page, and the guards' reads (member SIDs, nesting)
    assert relay.round_trips - trips == 2 + 1 + 2
    trips = relay.round_trips
    assert world.sync().applied == {}
    # one listing page and the nesting read; no SID to resolve: AD holds every member
    assert relay.round_trips - trips == 1 + 1
    entry = world.ad_entry(ops)
    assert entry is not None
    assert entry["member_sids"] == {world.sid_of("user2"), world.sid_of("user3")}


def test_large_member_lists_are_read_in_pages_of_one_reading(world: World, rig: RelayRig) -> None:
    relay = through_relay(world, rig, member_page=2)
    users = ["user0", "user1", "user2", "user3", "user4"]
    gid = world.add_group(1, "Paged", users)
    world.add_group(2, "Small", ["user5"])
    world.sync()
    trips = relay.round_trips
    group = relay.find_group(gid)
    assert group is not None
    assert group.member_sids == {world.sid_of(u) for u in users}
    assert relay.round_trips - trips == 3  # 2 + 2 + 1 members
    listed = {g.group_id: g for g in relay.iter_groups()}
    assert listed[gid].member_sids == {world.sid_of(u) for u in users}
    assert world.sync().applied == {}


# --------------------------------------------------------- a cloud side gone wrong


def _decoys(world: World) -> dict[str, str]:
    """Objects the agent must never touch: no anchor in the OU, anchor outside it."""
    outside = world.dc.create_ou("Outside", world.ou.split(",", 1)[1])
    conn = world.dc.connection()
    decoys = {
        "no anchor": dn_for("Decoy", world.ou),
        "anchor outside": f"CN=Anchored outside,{outside}",
        "foreign anchor": dn_for("Foreign", world.ou),
    }
    assert conn.add(decoys["no anchor"], ["top", "group"], {"displayName": "decoy"})
    assert conn.add(
        decoys["anchor outside"],
        ["top", "group"],
        {"adminDescription": anchor_for(world.gid(7)), "displayName": "decoy"},
    )
    assert conn.add(
        decoys["foreign anchor"],
        ["top", "group"],
        {"adminDescription": "Group_someone-else", "displayName": "decoy"},
    )
    conn.unbind()
    return decoys


def test_the_agent_refuses_what_a_modified_cloud_side_sends(world: World, rig: RelayRig) -> None:
    relay = through_relay(world, rig)
    ours = world.add_group(1, "Ours", ["user0"])
    world.sync()
    entry = world.ad_entry(ours)
    assert entry is not None
    decoys = _decoys(world)
    before = {dn: usn_changed(world, dn) for dn in decoys.values()}
    sid = f"<SID={world.sid_of('user1')}>"
    admins = f"CN=Administrator,CN=Users,{world.dc.base_dn}"
    hostile: list[Operation] = [
        Delete(ours, decoys["no anchor"]),
        Delete(world.gid(7), decoys["anchor outside"]),
        Modify(ours, decoys["foreign anchor"], Changes(add_members=(sid,))),
        Modify(ours, decoys["no anchor"], Changes(replace={"displayName": ("pwned",)})),
        Rename(ours, decoys["no anchor"], "CN=Renamed"),
        Modify(ours, entry["dn"], Changes(add_members=(admins,))),
        Modify(ours, entry["dn"], Changes(replace={"adminDescription": ()})),
        Rename(ours, entry["dn"], "CN=Escaped,CN=Users"),
        Add(
            world.gid(8),
            dn_for("Planted", world.ou),
            {"objectClass": ("top", "group"), "adminDescription": ("Group_someone-else",)},
        ),
        Delete(ours, f"CN=Administrator,CN=Users,{world.dc.base_dn}"),
    ]
    for operation in hostile:
        with pytest.raises(PolicyRefused):
            relay.apply(operation)
    assert {dn: usn_changed(world, dn) for dn in decoys.values()} == before
    after = world.ad_entry(ours)
    assert after is not None
    assert after["member_sids"] == {world.sid_of("user0")}
    assert after["dn"] == entry["dn"]


def test_unsigned_or_wrongly_signed_requests_never_reach_ad(world: World, rig: RelayRig) -> None:
    through_relay(world, rig)
    gid = world.add_group(1, "Kept", ["user0"])
    world.sync()
    entry = world.ad_entry(gid)
    assert entry is not None
    before = usn_changed(world, entry["dn"])
    delete = Delete(gid, entry["dn"])
    # The agent refuses, and signs its refusal with its own key: a reply the cloud side
    # cannot verify, reported with what it claims (and retried, never believed).
    with pytest.raises(ForgedReply, match="HTTP 401: request signature does not match"):
        rig.directory(world.ou, caller_key="x" * 43).apply(delete)
    sender = rig.sender()
    body = encode({"operation": {"kind": "delete", "group_id": gid, "dn": entry["dn"]}})
    assert sender.request("POST", "/v1/apply", body).status == 401
    signed = sign(rig.caller_key, "POST", "/v1/apply", body, audience=rig.audience)
    assert sender.request("POST", "/v1/apply", body, signed).status == 200
    assert sender.request("POST", "/v1/apply", body, signed).status == 401  # a replay
    assert world.ad_entry(gid) is None  # the one signed request did delete it
    world.tenant.hard_delete_group(gid)
    with pytest.raises(RelayRefused):  # the relay itself refuses a wrong Send key
        rig.sender(key=LISTEN.key).request("POST", "/v1/schema", b"{}")
    assert before > 0


def test_the_agent_holds_its_own_delete_limit(world: World, rig: RelayRig) -> None:
    relay = through_relay(world, rig, delete_limit=1)
    world.add_group(9, "Stays", ["user0"])
    gids = [world.add_group(n, f"G{n}", ["user0"]) for n in range(2)]
    world.sync()
    for gid in gids:
        world.tenant.hard_delete_group(gid)
    first, second = world.plan().operations
    assert isinstance(first, Delete) and isinstance(second, Delete)
    assert relay.apply(first) > 0
    with pytest.raises(PolicyRefused, match="delete limit"):
        relay.apply(second)
    assert [world.ad_entry(gid) is None for gid in gids].count(True) == 1


def test_every_request_leaves_an_audit_line(
    world: World, rig: RelayRig, caplog: pytest.LogCaptureFixture
) -> None:
    relay = through_relay(world, rig)
    gid = world.add_group(1, "Audited", ["user0"])
    with caplog.at_level(logging.INFO, logger="writeback.audit"):
        world.sync()
        with pytest.raises(PolicyRefused):
            relay.apply(Delete(gid, dn_for("Decoy", world.ou)))
    lines = [r for r in caplog.records if r.name == "writeback.audit"]
    calls = [(r.call, r.outcome) for r in lines]  # type: ignore[attr-defined]
    assert ("apply", "ok") in calls
    assert ("apply", "refused") in calls
    assert ("list_groups", "ok") in calls
    written = next(r for r in lines if r.call == "apply" and r.outcome == "ok")  # type: ignore[attr-defined]
    assert written.group_id == gid  # type: ignore[attr-defined]
    assert written.operation == "add"  # type: ignore[attr-defined]
    assert rig.caller_key not in caplog.text
    assert world.dc.admin_password not in caplog.text


def test_ad_down_behind_the_agent_is_transient(world: World, rig: RelayRig) -> None:
    relay = through_relay(world, rig)
    world.dc.stop()
    try:
        with pytest.raises(LdapUnavailable):
            relay.find_group(world.gid(1))
    finally:
        world.dc.start()
    assert relay.find_group(world.gid(1)) is None


def test_no_agent_listening_is_transient_and_a_second_agent_takes_over(
    world: World, rig: RelayRig
) -> None:
    relay = through_relay(world, rig)
    second = rig.start_agent(lambda: world.dc.directory(world.ou), world.ou)
    assert rig.standin.wait_for_listeners(PATH, 2)
    gids = [world.add_group(n, f"G{n}", ["user0"]) for n in range(6)]
    world.sync()
    stats = rig.standin.stats(PATH)
    assert len([n for n in stats["per_listener"].values() if n]) == 2, stats
    rig.agents[0].stop()
    world.tenant.update_group(gids[0], display_name="Still reachable")
    assert world.sync().applied == {"modify": 1}
    second.stop()
    with pytest.raises(RelayUnavailable):
        relay.find_group(gids[0])


def test_status_says_whether_the_agent_answers(
    world: World, rig: RelayRig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    through_relay(world, rig)
    LocalQueue(tmp_path / "queue.sqlite3").close()
    for name in [n for n in os.environ if n.startswith("WRITEBACK_")]:
        monkeypatch.delenv(name)
    for name, value in {
        "WRITEBACK_QUEUE": "local",
        "WRITEBACK_QUEUE_PATH": str(tmp_path / "queue.sqlite3"),
        "WRITEBACK_STATE_PATH": str(tmp_path / "state.json"),
        "WRITEBACK_DIRECTORY": "relay",
        "WRITEBACK_TARGET_OU": world.ou,
        "WRITEBACK_RELAY_NAMESPACE": rig.standin.namespace,
        "WRITEBACK_RELAY_PATH": PATH,
        "WRITEBACK_RELAY_SEND_KEY": SEND.key,
        "WRITEBACK_RELAY_CALLER_KEY": rig.caller_key,
        "WRITEBACK_RELAY_CA_FILE": str(rig.standin.ca_file),
    }.items():
        monkeypatch.setenv(name, value)
    out = io.StringIO()
    assert main(["status"], out=out) == EXIT_OK
    assert f"relay agent: {rig.standin.namespace}/{PATH} answered a signed call" in out.getvalue()
    monkeypatch.setenv("WRITEBACK_RELAY_CALLER_KEY", "w" * 40)
    out = io.StringIO()
    assert main(["status"], out=out) == EXIT_FAILURES
    assert "FAILED: ForgedReply: an answer (HTTP 401: request signature does not match" in (
        out.getvalue()
    )
    assert rig.caller_key not in out.getvalue()


def test_the_agent_and_sync_commands_through_the_relay(
    world: World, rig: RelayRig, tmp_path: Path
) -> None:
    """``python -m writeback agent`` on-prem, ``sync`` with WRITEBACK_DIRECTORY=relay."""
    gid = world.add_group(1, "Via commands", ["user0", "user1"])
    common = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WRITEBACK_")},
        "WRITEBACK_TARGET_OU": world.ou,
        "WRITEBACK_RELAY_NAMESPACE": rig.standin.namespace,
        "WRITEBACK_RELAY_PATH": PATH,
        "WRITEBACK_RELAY_CALLER_KEY": rig.caller_key,
        "WRITEBACK_RELAY_CA_FILE": str(rig.standin.ca_file),
    }
    agent_env = {
        **common,
        "WRITEBACK_LDAP_URL": world.dc.ldaps_url,
        "WRITEBACK_LDAP_USER": world.dc.admin_dn,
        "WRITEBACK_LDAP_PASSWORD": world.dc.admin_password,
        "WRITEBACK_LDAP_CA_FILE": world.dc.ca_file,
        "WRITEBACK_AGENT_LISTEN_KEY_NAME": LISTEN.name,
        "WRITEBACK_AGENT_LISTEN_KEY": LISTEN.key,
        "WRITEBACK_AGENT_STATE_PATH": str(tmp_path / "agent" / "state.sqlite3"),
        "WRITEBACK_AGENT_MAIL_DOMAINS": "contoso.com",
    }
    cloud_env = {
        **common,
        "WRITEBACK_DIRECTORY": "relay",
        "WRITEBACK_RELAY_SEND_KEY_NAME": SEND.name,
        "WRITEBACK_RELAY_SEND_KEY": SEND.key,
        "WRITEBACK_GRAPH_URL": world.standin.url,
        "WRITEBACK_GRAPH_AUTH": "none",
    }
    agent = subprocess.Popen(
        [sys.executable, "-m", "writeback", "agent"],
        env=agent_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert rig.standin.wait_for_listeners(PATH, 1, timeout=30), agent.stderr
        sync = subprocess.run(
            [sys.executable, "-m", "writeback", "sync"],
            env=cloud_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert sync.returncode == 0, sync.stderr
        agent.terminate()
        out, err = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, err
    assert "writeback agent: stopped" in out
    state = tmp_path / "agent" / "state.sqlite3"
    assert state.stat().st_mode & 0o777 == 0o600  # the delete budget: nobody else resets it
    entry = world.ad_entry(gid)
    assert entry is not None
    assert entry["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}
    audit = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(a.get("call") == "apply" and a.get("outcome") == "ok" for a in audit), err
    for secret in (LISTEN.key, SEND.key, rig.caller_key, world.dc.admin_password):
        assert secret not in out + err + sync.stdout + sync.stderr


# --------------------------------------------------------- an agent outage mid-stream


def test_an_agent_outage_mid_stream_dead_letters_nothing(world: World, rig: RelayRig) -> None:
    """Issue 16: while no agent listens, the relay answers 404 with its text in the
    reason phrase and a JSON body that does not name listeners (the stand-in answers
    as the service does). Every event sent meanwhile must wait, none dead-lettered,
    and all of them apply once an agent is back."""
    rig.start_agent(lambda: world.dc.directory(world.ou), world.ou)
    with tempfile.TemporaryDirectory() as tmp:
        queue = LocalQueue(Path(tmp) / "queue.sqlite3", lock_duration=30, max_delivery_count=50)
        server = Server(
            queue=queue,
            cloud=world.cloud,
            directory_factory=lambda: rig.directory(world.ou),
            options=world.options,
            client_states=[STREAM_SECRET],
            config=STREAM,
            owned=[queue],
        )
        server.start()
        try:
            assert server.wait_ready(30)
            before = [world.add_group(n, f"Before {n}", ["user0"]) for n in range(3)]
            _settle(world, server)
            [agent] = rig.agents
            agent.stop()  # the agent goes away in the middle of the stream
            assert rig.standin.wait_for_listeners(PATH, 0)
            during = [world.add_group(10 + n, f"During {n}", ["user1"]) for n in range(5)]
            world.tenant.add_members(before[0], [world.uid("user2")])
            assert world.standin.wait_idle(10)  # the webhook took every notification
            # Each is tried, and put back to wait (or, wrongly, dead-lettered).
            _wait(lambda: server.stats.abandoned >= 6 or server.stats.dead_lettered > 0)
            assert [d.reason for d in server.queue.dead_letters()] == []
            rig.agents.clear()
            rig.start_agent(lambda: world.dc.directory(world.ou), world.ou)
            _settle(world, server, timeout=30)
            for gid in before + during:
                assert world.ad_entry(gid) is not None, gid
            first = world.ad_entry(before[0])
            assert first is not None
            assert first["member_sids"] == {world.sid_of("user0"), world.sid_of("user2")}
            assert server.queue.dead_letters() == []
            assert server.stats.dead_lettered == 0
        finally:
            server.stop()


STREAM_SECRET = "relay-outage-client-state"
STREAM = ServeConfig(
    settle=0.3,
    workers=2,
    reconcile_at_start=False,
    reconcile_interval=3600,
    subscription_interval=3600,
    retry_delay=0.2,
    attempts=1,
    max_wait=0.1,
    redelivery_scale=0.05,
    max_redelivery_delay=0.5,
    receive_wait=0.1,
)


def _settle(world: World, server: Server, timeout: float = 20.0) -> None:
    assert world.standin.wait_idle(timeout), "the stand-in still has notifications to deliver"
    assert server.wait_idle(timeout), "the pipeline did not go idle"


def _wait(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --------------------------------------------------------- issue 12, findings 5 and 6


def test_the_agent_pins_what_a_group_may_become_inside_the_ou(world: World, rig: RelayRig) -> None:
    """Finding 5: with the caller key one could add a global security group named
    linux-admins with Domain Admins as a member, flip a group to security on a
    distribution-only deployment, claim another recipient's address, and remove
    members given by DN. The agent refuses each, and AD is left as it was."""
    relay = through_relay(world, rig)
    ours = world.add_group(1, "Ours", ["user0", "user1"], mail="ours@contoso.com")
    world.sync()
    entry = world.ad_entry(ours)
    assert entry is not None
    before = usn_changed(world, entry["dn"])
    domain_admins = f"<SID={world.dc.domain_sid()}-512>"
    planted = world.gid(8)
    user0_dn = f"CN={world.token}user0,{world.users_ou}"  # a member, with a SID
    hostile: list[Operation] = [
        Add(
            planted,
            f"CN=linux-admins,{world.ou}",
            {
                "objectClass": ("top", "group"),
                "adminDescription": (anchor_for(planted),),
                "groupType": (str(0x2 - 0x80000000),),  # global security
                "sAMAccountName": ("linux-admins",),
            },
            (domain_admins,),
        ),
        Modify(ours, entry["dn"], Changes(replace={"groupType": (str(0x8 - 0x80000000),)})),
        Modify(ours, entry["dn"], Changes(replace={"proxyAddresses": ("SMTP:ceo@fabrikam.com",)})),
        Modify(ours, entry["dn"], Changes(replace={"mail": ("ceo@fabrikam.com",)})),
        Rename(ours, entry["dn"], "CN=linux-admins"),
        Modify(
            ours,
            entry["dn"],
            Changes(remove_members=(f"CN=Administrator,CN=Users,{world.dc.base_dn}",)),
        ),
    ]
    hostile.append(Modify(ours, entry["dn"], Changes(remove_members=(user0_dn,))))
    for operation in hostile:
        with pytest.raises(PolicyRefused):
            relay.apply(operation)
    assert world.ad_entry(planted) is None
    assert usn_changed(world, entry["dn"]) == before
    after = world.ad_entry(ours)
    assert after is not None
    assert after["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}
    assert [str(v) for v in after["grouptype"]] == ["8"]
    # and what the planner sends still passes: a rename of the display name is a modify
    world.tenant.update_group(ours, display_name="Ours renamed")
    assert world.sync().applied == {"modify": 1}


def test_a_member_without_a_sid_is_removed_by_dn_only_when_the_group_holds_it(
    world: World, rig: RelayRig
) -> None:
    relay = through_relay(world, rig)
    gid = world.add_group(1, "With a contact", ["user0"])
    world.sync()
    entry = world.ad_entry(gid)
    assert entry is not None
    conn = world.dc.connection()
    contact = f"CN=A contact,{world.ou}"
    stranger = f"CN=Not a member,{world.ou}"
    try:
        for dn in (contact, stranger):
            assert conn.add(dn, ["top", "person", "organizationalPerson", "contact"], {"sn": "x"})
        assert conn.modify(entry["dn"], {"member": [(MODIFY_ADD, [contact])]})
    finally:
        conn.unbind()
    with pytest.raises(PolicyRefused, match="must be members of group"):
        relay.apply(Modify(gid, entry["dn"], Changes(remove_members=(stranger,))))
    assert world.sync().applied == {"modify": 1}  # the planner removes the contact by DN
    conn = world.dc.connection()
    try:
        assert conn.search(entry["dn"], "(objectClass=*)", BASE, attributes=["member"])
        members = [str(v).lower() for v in conn.entries[0].entry_attributes_as_dict["member"]]
    finally:
        conn.unbind()
    assert members == [f"cn={world.token}user0,{world.users_ou}".lower()]


def _apply_body(gid: str, dn: str) -> bytes:
    return encode({"operation": {"kind": "delete", "group_id": gid, "dn": dn}})


def test_a_captured_request_is_refused_by_a_second_agent_and_after_a_restart(
    world: World, rig: RelayRig
) -> None:
    """Finding 6: a signed request refused (as a replay) by one agent was applied by a
    second, and by the same agent after a restart. Agents on one host share the state
    file, so a replay that would undo a later revocation is refused by all of them."""
    through_relay(world, rig)
    rig.start_agent(lambda: world.dc.directory(world.ou), world.ou)  # a second agent
    gid = world.add_group(1, "Captured", ["user0"])
    world.sync()
    entry = world.ad_entry(gid)
    assert entry is not None
    grant = Modify(gid, entry["dn"], Changes(add_members=(f"<SID={world.sid_of('user1')}>",)))
    body = encode({"operation": operation_to_json(grant)})
    captured = sign(rig.caller_key, "POST", "/v1/apply", body, audience=rig.audience)
    sender = rig.sender()
    assert sender.request("POST", "/v1/apply", body, captured).status == 200
    assert world.sync().applied == {"modify": 1}  # the cloud side revokes it again
    for _ in range(6):  # whichever agent the relay picks
        answer = sender.request("POST", "/v1/apply", body, captured)
        assert (answer.status, b"replayed" in answer.body) == (401, True)
    for agent in list(rig.agents):
        agent.stop()
    rig.agents.clear()
    rig.start_agent(lambda: world.dc.directory(world.ou), world.ou)  # restarted
    answer = sender.request("POST", "/v1/apply", body, captured)
    assert (answer.status, b"replayed" in answer.body) == (401, True)
    after = world.ad_entry(gid)
    assert after is not None and after["member_sids"] == {world.sid_of("user0")}


def test_stamps_in_the_future_and_other_connections_signatures_are_refused(
    world: World, rig: RelayRig
) -> None:
    """Finding 6: a request stamped 290 s ahead was accepted (and again 301 s later);
    the MAC did not bind the namespace or the connection name."""
    through_relay(world, rig)
    gid = world.add_group(1, "Kept", ["user0"])
    world.sync()
    entry = world.ad_entry(gid)
    assert entry is not None
    body = _apply_body(gid, entry["dn"])
    sender = rig.sender()
    ahead = sign(
        rig.caller_key, "POST", "/v1/apply", body, audience=rig.audience, now=time.time() + 290
    )
    answer = sender.request("POST", "/v1/apply", body, ahead)
    assert (answer.status, b"in the future" in answer.body) == (401, True)
    for hc in (
        audience("contoso.servicebus.windows.net", PATH),
        audience(rig.standin.namespace, "another-agent"),
    ):
        elsewhere = sign(rig.caller_key, "POST", "/v1/apply", body, audience=hc)
        answer = sender.request("POST", "/v1/apply", body, elsewhere)
        assert (answer.status, b"does not match" in answer.body) == (401, True)
    assert world.ad_entry(gid) is not None


def test_answers_from_anyone_but_the_agent_are_never_believed(world: World, rig: RelayRig) -> None:
    """Finding 6: anyone holding a Listen key could answer apply with "done" (a
    revocation silently dropped) or poison the cached schema."""
    relay = RelayDirectory(rig.sender(), rig.caller_key, target_ou=world.ou)

    def impostor(request: RelayRequest) -> RelayResponse:
        if request.target.endswith("/schema"):
            return RelayResponse(
                200,
                {"content-type": "application/json"},
                b'{"attributes": ["mailnickname", "evil"]}',
            )
        return RelayResponse(200, {"content-type": "application/json"}, b'{"requests": 1}')

    rogue = HybridConnectionListener(rig.endpoint, LISTEN.name, LISTEN.key, impostor)
    with rogue:
        assert rogue.connected.wait(10) and rig.standin.wait_for_listeners(PATH, 1)
        with pytest.raises(ForgedReply, match="without a signature"):
            relay.schema_attributes()
        with pytest.raises(ForgedReply):
            relay.apply(
                Modify(
                    world.gid(1),
                    f"CN=Group_{world.gid(1)},{world.ou}",
                    Changes(remove_members=(f"<SID={world.sid_of('user0')}>",)),
                )
            )
    assert isinstance(ForgedReply("x"), RelayUnavailable)  # the event waits for the agent
    through_relay(world, rig)
    assert "evil" not in relay.schema_attributes()


def test_the_agents_delete_limit_survives_a_restart(world: World, rig: RelayRig) -> None:
    """Finding 6: the agent's delete limit was per process."""
    relay = through_relay(world, rig, delete_limit=1)
    world.add_group(9, "Stays", ["user0"])
    gids = [world.add_group(n, f"G{n}", ["user0"]) for n in range(2)]
    world.sync()
    for gid in gids:
        world.tenant.hard_delete_group(gid)
    first, second = world.plan().operations
    assert relay.apply(first) > 0
    [agent] = rig.agents
    agent.stop()
    rig.agents.clear()
    rig.start_agent(lambda: world.dc.directory(world.ou), world.ou, delete_limit=1)
    with pytest.raises(PolicyRefused, match="delete limit"):
        relay.apply(second)
    assert [world.ad_entry(gid) is None for gid in gids].count(True) == 1


def test_a_write_is_checked_against_the_agents_own_reading(
    world: World, rig: RelayRig, caplog: pytest.LogCaptureFixture
) -> None:
    """The read a write is planned from and the write meet on one shard: the agent
    checks the write against that reading instead of reading the group again, and
    reads it itself when it has none (or the DN differs)."""
    relay = through_relay(world, rig)
    gid = world.add_group(1, "Read then written", ["user0"])
    world.sync()
    sid = f"<SID={world.sid_of('user1')}>"
    with caplog.at_level(logging.INFO, logger="writeback.audit"):
        caplog.clear()  # the sync's own lines, when an earlier test left INFO on
        current = relay.find_group_attributes(gid)
        assert current is not None
        relay.apply(Modify(gid, current.dn, Changes(add_members=(sid,))))
        relay.apply(Modify(gid, current.dn, Changes(remove_members=(sid,))))  # no reading now
        with pytest.raises(PolicyRefused, match="not the object that carries the anchor"):
            relay.find_group_attributes(gid)
            relay.apply(Modify(gid, dn_for("Decoy", world.ou), Changes(add_members=(sid,))))
    checks = [
        r.checked  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "writeback.audit" and getattr(r, "call", "") == "apply"
    ]
    assert checks == ["reading", "read", "read"]
    entry = world.ad_entry(gid)
    assert entry is not None and entry["member_sids"] == {world.sid_of("user0")}
