"""The CLI as an admin runs it: settings from the environment, real DC and Graph stand-in."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from tests.support.world import World, make_world
from writeback.cli import EXIT_CONFIG, EXIT_OK, EXIT_THRESHOLD, main
from writeback_sandbox.samba import SambaDC

PASSWORD_MARKER = "the-password-must-never-print"


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with make_world(samba_dc, make_ou(samba_dc)) as w:
        yield w


@pytest.fixture
def env(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    settings = {
        "WRITEBACK_TARGET_OU": world.ou,
        "WRITEBACK_LDAP_URL": world.dc.ldaps_url,
        "WRITEBACK_LDAP_USER": world.dc.admin_dn,
        "WRITEBACK_LDAP_PASSWORD": world.dc.admin_password,
        "WRITEBACK_LDAP_CA_FILE": world.dc.ca_file,
        "WRITEBACK_GRAPH_URL": world.standin.url,
        "WRITEBACK_GRAPH_AUTH": "none",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return world


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_plan_json_then_sync_then_nothing_to_do(env: World) -> None:
    gid = env.add_group(1, "Ops", ["user0", "cloudonly"])
    code, output = run("plan", "--json")
    assert code == EXIT_OK
    lines = [json.loads(line) for line in output.splitlines()]
    [add] = [line for line in lines if line["op"] == "add"]
    assert add["group_id"] == gid
    assert add["dn"] == f"CN=Group_{gid},{env.ou}"
    assert add["changes"]["members_add"] == [f"<SID={env.sid_of('user0')}>"]
    [skip] = [line for line in lines if line["op"] == "skip"]
    assert (skip["group_id"], skip["reason"], skip["count"]) == (gid, "member-not-on-prem", 1)
    assert env.ad_entry(gid) is None, "plan must not write"

    code, output = run("sync")
    assert code == EXIT_OK
    assert "1 add" in output
    assert env.ad_entry(gid) is not None
    code, output = run("plan")
    assert code == EXIT_OK
    assert "nothing to do" in output


def test_delete_threshold_exits_3_and_allow_deletes_goes_ahead(
    env: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [env.add_group(10 + i, f"G{i}", ["user0"]) for i in range(3)]
    assert run("sync")[0] == EXIT_OK
    env.tenant.hard_delete_group(ids[0])
    env.tenant.hard_delete_group(ids[1])
    monkeypatch.setenv("WRITEBACK_DELETE_THRESHOLD", "1")
    code, output = run("sync")
    assert code == EXIT_THRESHOLD
    assert "2 deletes exceed the threshold of 1" in output
    assert env.ad_entry(ids[0]) is not None
    assert run("sync", "--allow-deletes")[0] == EXIT_OK
    assert env.ad_entry(ids[0]) is None and env.ad_entry(ids[2]) is not None


def test_disabling_writeback_deletes_only_our_groups(
    env: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [env.add_group(20 + i, f"G{i}", ["user0"]) for i in range(2)]
    run("sync")
    monkeypatch.setenv("WRITEBACK_ENABLED", "false")
    code, output = run("plan", "--json")
    assert code == EXIT_OK
    assert sorted(json.loads(line)["group_id"] for line in output.splitlines()) == sorted(ids)
    assert run("sync")[0] == EXIT_OK
    assert all(env.ad_entry(gid) is None for gid in ids)
    assert env.dc.connection().search(env.users_ou, "(objectClass=user)")


def test_bad_settings_exit_2_naming_the_setting_and_never_print_secrets(
    env: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WRITEBACK_LDAP_PASSWORD", PASSWORD_MARKER)
    monkeypatch.setenv("WRITEBACK_DN_FORMAT", "fancy")
    assert run("plan")[0] == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "WRITEBACK_DN_FORMAT" in err
    assert PASSWORD_MARKER not in err
    monkeypatch.setenv("WRITEBACK_DN_FORMAT", "displayname")
    code, output = run("sync")  # wrong password: the bind is refused
    err = capsys.readouterr().err
    assert code != EXIT_OK
    assert PASSWORD_MARKER not in output + err


def test_graph_auth_none_is_refused_for_a_public_graph() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "writeback", "plan"],
        env={
            "WRITEBACK_TARGET_OU": "OU=W,DC=corp,DC=example",
            "WRITEBACK_LDAP_URL": "ldaps://dc.corp.example",
            "WRITEBACK_LDAP_USER": "svc",
            "WRITEBACK_LDAP_PASSWORD": PASSWORD_MARKER,
            "WRITEBACK_GRAPH_AUTH": "none",
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == EXIT_CONFIG
    assert "WRITEBACK_GRAPH_AUTH=none" in result.stderr
    assert PASSWORD_MARKER not in result.stderr + result.stdout


@pytest.mark.samba
def test_demo_runs_end_to_end_and_its_last_sync_writes_nothing() -> None:
    out = io.StringIO()
    assert main(["demo"], out=out) == EXIT_OK
    text = out.getvalue()
    start = text.split("\n1. ")[1].split("\n2. ")[0]
    stream = text.split("\n2. ")[1].split("\n3. ")[0]
    summary = text.split("\n3. ")[1]
    assert "created through Graph (webhook validated)" in start
    assert "=> 12 add" in start
    assert ".. events received" in stream  # live progress while the changes stream in
    received = re.search(r"events: (\d+) received, (\d+) applied", summary)
    assert received is not None and received[1] == received[2] and int(received[1]) >= 30
    operations = re.search(r"LDAP operations: (.*); LDAP writes \(requests\): (\d+)", summary)
    assert operations is not None
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", operations[1])}
    # Changes to one group that meet in the queue coalesce, so modifies vary with timing.
    assert (counts["add"], counts["rename"], counts["delete"]) == (6, 4, 2)
    assert 1 <= counts["modify"] <= 21
    assert int(operations[2]) >= sum(counts.values())
    assert re.search(r"skipped members: [1-9]", summary)
    assert "dead letters: 0" in summary
    assert re.search(
        r"latency from notification to completed write: p50 \d+ ms, p99 \d+ ms", summary
    )
    assert "Check: a full sync now finds nothing to write" in summary
