"""Scoping and placement rules end to end on a real Samba DC, through the CLI as an
administrator runs it (WRITEBACK_RULES and the settings, the real Graph client
against the stand-in): rules choose the OU, the group type and the DN format; a
group whose rule now sends it elsewhere is moved with its objectSid kept; a group
that falls out of scope is kept, or with WRITEBACK_OUT_OF_SCOPE=delete deleted
behind the threshold; ``plan --json`` says which rule matched; rules for V2
migrants read writebackConfiguration from the beta endpoint only when asked."""

from __future__ import annotations

import io
import json
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.beyond import attributes
from tests.support.world import World, make_world
from writeback.cli import EXIT_CONFIG, EXIT_OK, EXIT_THRESHOLD, main
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.samba

SECURITY = "-2147483640"


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with make_world(samba_dc, make_ou(samba_dc)) as w:
        for name in ("Finance", "Teams", "Archive"):
            w.dc.create_ou(name, w.ou)
        yield w


def run(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    rules: str,
    *argv: str,
    expect: int = EXIT_OK,
    settings: dict[str, str] | None = None,
) -> str:
    path = tmp_path / "rules.toml"
    path.write_text(textwrap.dedent(rules))
    env = {
        "WRITEBACK_TARGET_OU": world.ou,
        "WRITEBACK_LDAP_URL": world.dc.ldaps_url,
        "WRITEBACK_LDAP_USER": world.dc.admin_dn,
        "WRITEBACK_LDAP_PASSWORD": world.dc.admin_password,
        "WRITEBACK_LDAP_CA_FILE": world.dc.ca_file,
        "WRITEBACK_GRAPH_URL": world.standin.url,
        "WRITEBACK_GRAPH_AUTH": "none",
        "WRITEBACK_RULES": str(path),
        **(settings or {}),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = io.StringIO()
    code = main(list(argv), out=out)
    assert code == expect, out.getvalue()
    return out.getvalue()


def plan_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


RULES = """
    [defaults]
    dn_format = "displayname"

    [[rule]]
    name = "finance, as security groups"
    display_name = "FIN *"
    ou = "OU=Finance"
    group_type = "security"

    [[rule]]
    name = "teams"
    kinds = ["microsoft365"]
    display_name_regex = "^team"
    ou = "OU=Teams"
    dn_format = "objectid"

    [[rule]]
    name = "security groups"
    kinds = ["security"]
    ou = "OU=Archive"

    [[rule]]
    name = "other M365 groups"
    kinds = ["microsoft365"]
    """


def test_rules_choose_ou_type_and_dn_format_and_plan_names_the_rule(
    world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fin = world.add_group(1, "FIN Budget", ["user0"])
    team = world.add_group(2, "Team Rocket", ["user1"])
    sec = world.add_group(3, "SG Printers", ["user2"], group_types=())
    other = world.add_group(4, "Sales", ["user3"])
    lines = plan_lines(run(world, monkeypatch, tmp_path, RULES, "plan", "--json"))
    by_id = {line["group_id"]: line for line in lines if line["op"] == "add"}
    assert by_id[fin]["rule"] == "finance, as security groups"
    assert by_id[team]["rule"] == "teams"
    assert by_id[sec]["rule"] == "security groups"
    assert by_id[other]["rule"] == "other M365 groups"
    assert by_id[fin]["dn"] == f"CN=FIN Budget_{fin[-12:]},OU=Finance,{world.ou}"
    run(world, monkeypatch, tmp_path, RULES, "sync")

    fin_entry = world.ad_entry(fin)
    assert fin_entry is not None
    assert fin_entry["dn"] == f"CN=FIN Budget_{fin[-12:]},OU=Finance,{world.ou}"
    assert attributes(world, fin_entry["dn"], "groupType")["grouptype"] == [SECURITY]
    team_entry = world.ad_entry(team)
    assert team_entry is not None and team_entry["dn"] == f"CN=Group_{team},OU=Teams,{world.ou}"
    assert attributes(world, team_entry["dn"], "groupType")["grouptype"] == ["8"]
    sec_entry = world.ad_entry(sec)
    assert sec_entry is not None and sec_entry["dn"].endswith(f",OU=Archive,{world.ou}")
    assert attributes(world, sec_entry["dn"], "groupType")["grouptype"] == [SECURITY]
    other_entry = world.ad_entry(other)
    assert other_entry is not None and other_entry["dn"] == f"CN=Sales_{other[-12:]},{world.ou}"
    again = run(world, monkeypatch, tmp_path, RULES, "plan")
    assert "Plan: nothing to do." in again
    assert "[rule: " not in again


def test_a_group_moves_between_ous_with_its_sid_kept(
    world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gid = world.add_group(1, "Team Alpha", ["user0", "user1"])
    run(world, monkeypatch, tmp_path, RULES, "sync")
    before = world.ad_entry(gid)
    assert before is not None and before["dn"] == f"CN=Group_{gid},OU=Teams,{world.ou}"

    world.tenant.update_group(gid, display_name="FIN Alpha")  # the finance rule now matches
    lines = plan_lines(run(world, monkeypatch, tmp_path, RULES, "plan", "--json"))
    [move] = [line for line in lines if line["group_id"] == gid]
    assert move["op"] == "rename" and move["rule"] == "finance, as security groups"
    assert move["changes"]["new_parent"] == f"OU=Finance,{world.ou}"
    run(world, monkeypatch, tmp_path, RULES, "sync")

    after = world.ad_entry(gid)
    assert after is not None
    assert after["dn"] == f"CN=FIN Alpha_{gid[-12:]},OU=Finance,{world.ou}"
    assert after["objectsid"] == before["objectsid"]
    assert after["objectguid"] == before["objectguid"]
    assert after["member_sids"] == {world.sid_of("user0"), world.sid_of("user1")}
    assert attributes(world, after["dn"], "groupType")["grouptype"] == [SECURITY]
    assert "nothing to do" in run(world, monkeypatch, tmp_path, RULES, "plan")


def test_out_of_scope_is_kept_or_deleted_behind_the_threshold(
    world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    groups = [world.add_group(n, f"Sales {n}", [f"user{n}"]) for n in range(3)]
    run(world, monkeypatch, tmp_path, RULES, "sync")
    narrow = """
        [[rule]]
        name = "only Sales 0"
        display_name = "Sales 0"

        [[rule]]
        name = "not the others"
        display_name = "Sales *"
        write = false
        """
    lines = plan_lines(run(world, monkeypatch, tmp_path, narrow, "plan", "--json"))
    kept = [line for line in lines if line["op"] == "skip" and line["reason"] == "out-of-scope"]
    assert sorted(line["group_id"] for line in kept) == sorted(groups[1:])
    assert all(line["rule"] == "not the others" for line in kept)
    run(world, monkeypatch, tmp_path, narrow, "sync")
    assert all(world.ad_entry(gid) is not None for gid in groups)  # kept, as V2 does

    deleting = {"WRITEBACK_OUT_OF_SCOPE": "delete", "WRITEBACK_DELETE_THRESHOLD": "1"}
    out = run(
        world, monkeypatch, tmp_path, narrow, "sync", expect=EXIT_THRESHOLD, settings=deleting
    )
    assert "Deletes held back" in out
    assert all(world.ad_entry(gid) is not None for gid in groups)
    run(world, monkeypatch, tmp_path, narrow, "sync", "--allow-deletes", settings=deleting)
    assert world.ad_entry(groups[0]) is not None
    assert world.ad_entry(groups[1]) is None and world.ad_entry(groups[2]) is None


def test_v2_migrants_rules_read_writeback_configuration_from_beta_only_when_asked(
    world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    on = world.add_group(
        1,
        "Enabled as security",
        ["user0"],
        writeback_configuration={
            "isEnabled": True,
            "onPremisesGroupType": "universalSecurityGroup",
        },
    )
    default = world.add_group(2, "Null config (V1 compatible)", ["user1"])
    off = world.add_group(3, "Disabled", ["user2"], writeback_configuration={"isEnabled": False})
    sec_default = world.add_group(4, "SG not opted in", ["user3"], group_types=())
    v2 = """
        [[rule]]
        name = "as V2 did"
        writeback_enabled = true
        group_type = "from-graph"
        """
    refused = run(world, monkeypatch, tmp_path, v2, "plan", expect=EXIT_CONFIG)
    assert refused == ""  # the message goes to stderr: no Graph call was made
    world.standin.reset_log()
    asked = {"WRITEBACK_GRAPH_WRITEBACK_CONFIGURATION": "true"}
    run(world, monkeypatch, tmp_path, v2, "sync", settings=asked)
    assert any(r.target.startswith("/beta/groups?") for r in world.standin.log)
    assert not any(
        "writebackConfiguration" in r.target and r.target.startswith("/v1.0")
        for r in world.standin.log
    )
    on_entry, default_entry = world.ad_entry(on), world.ad_entry(default)
    assert on_entry is not None and default_entry is not None
    assert attributes(world, on_entry["dn"], "groupType")["grouptype"] == [SECURITY]
    assert attributes(world, default_entry["dn"], "groupType")["grouptype"] == ["8"]
    assert world.ad_entry(off) is None
    assert world.ad_entry(sec_default) is None


def test_a_bad_rules_file_is_a_configuration_error_naming_the_line(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    outside = """
        [[rule]]
        kinds = ["security"]
        ou = "OU=Elsewhere,DC=example,DC=org"
        """
    run(world, monkeypatch, tmp_path, outside, "plan", expect=EXIT_CONFIG)
    assert "rules.toml' line 4: ou 'OU=Elsewhere,DC=example,DC=org' is outside" in (
        capsys.readouterr().err
    )
