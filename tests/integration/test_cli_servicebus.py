"""``python -m writeback replay`` and ``status`` as commands against Service Bus: the
emulator over TLS with its own CA, reached as an operator reaches a namespace, by
settings only (a connection string, ``WRITEBACK_SERVICEBUS_ENDPOINT`` for the AMQP
port and ``WRITEBACK_SERVICEBUS_CA_FILE`` for the CA)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from azure.servicebus import ServiceBusClient

from tests.support.servicebus import (
    dead_letter_directly,
    hand_off_dead_letter,
    queue_name,
    sb,
    sdk_client,
)
from writeback_sandbox.servicebus_emulator import APP_RULE, ROOT_RULE, ServiceBusEmulator

__all__ = ["queue_name", "sb"]  # fixtures

ROOT = Path(__file__).resolve().parents[2]
GROUP = "3a5c3221-c465-48c0-95b8-e9305786a271"


def servicebus_env(sb: ServiceBusEmulator, queue: str, rule: str, tmp: Path) -> dict[str, str]:
    """What an operator sets: no WRITEBACK_QUEUE (a connection string means Service Bus)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("WRITEBACK_") and not k.startswith("AZURE_")
    }
    return {
        **env,
        "WRITEBACK_SERVICEBUS_CONNECTION": sb.connection_string_for(rule),
        "WRITEBACK_SERVICEBUS_QUEUE": queue,
        "WRITEBACK_SERVICEBUS_ENDPOINT": f"sb://{sb.host}:{sb.amqp_port}",
        "WRITEBACK_SERVICEBUS_CA_FILE": sb.ca_file,
        "WRITEBACK_STATE_PATH": str(tmp / "state.json"),
    }


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "writeback", *args],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def seed(client: ServiceBusClient, queue: str) -> None:
    dead_letter_directly(client, queue, [("m-1", "g-1"), ("m-2", "g-2")], "OverMemberLimit")
    hand_off_dead_letter(client, queue, GROUP, "n-1")  # PolicyRefused


def test_status_and_replay_run_as_commands_against_the_emulator(
    sb: ServiceBusEmulator, queue_name: str, tmp_path: Path
) -> None:
    with sdk_client(sb) as client:
        seed(client, queue_name)
    env = servicebus_env(sb, queue_name, ROOT_RULE, tmp_path)

    status = run(env, "status")
    assert status.returncode == 0, status.stderr
    assert "queue: 0 messages" in status.stdout
    assert "dead letters: 3 (OverMemberLimit 2, PolicyRefused 1)" in status.stdout

    dry = run(env, "replay", "--dry-run", "--reason", "OverMemberLimit")
    assert dry.returncode == 0, dry.stderr
    assert "would move: message m-1 group g-1 reason OverMemberLimit" in dry.stdout
    assert "would move: message m-2 group g-2 reason OverMemberLimit" in dry.stdout
    assert "would move 2 of 3 dead letters" in dry.stdout
    assert sb.counts(queue_name)["dead_lettered"] == 3  # a dry run moves nothing

    moved = run(env, "replay", "--group", GROUP)
    assert moved.returncode == 0, moved.stderr
    assert f"moved: message n-1 group {GROUP} reason PolicyRefused" in moved.stdout
    assert "moved 1 of 3 dead letters" in moved.stdout
    counts = sb.counts(queue_name)
    assert (counts["active"], counts["dead_lettered"]) == (1, 2)
    [back] = sb.messages(queue_name)
    assert back.session_id == GROUP  # the group's own session, not the hand-off one

    after = run(env, "status")
    assert "queue: 1 messages" in after.stdout
    assert "dead letters: 2 (OverMemberLimit 2)" in after.stdout
    assert sb.rules[ROOT_RULE].key not in status.stdout + status.stderr + after.stdout


def test_status_without_manage_rights_still_counts_the_dead_letters(
    sb: ServiceBusEmulator, queue_name: str, tmp_path: Path
) -> None:
    """The app's rule (Send and Listen, like the Data Receiver and Sender roles):
    depth needs Manage, the dead letters only Listen."""
    with sdk_client(sb) as client:
        seed(client, queue_name)
    status = run(servicebus_env(sb, queue_name, APP_RULE, tmp_path), "status")
    assert status.returncode == 1  # one figure could not be read
    assert "queue: depth unknown (QueueRefused:" in status.stdout
    assert "dead letters: 3 (OverMemberLimit 2, PolicyRefused 1)" in status.stdout


BAD_SETTINGS = {
    "WRITEBACK_SERVICEBUS_CA_FILE": ("/nonexistent/ca.pem", "is not a readable file"),
    "WRITEBACK_SERVICEBUS_ENDPOINT": ("https://127.0.0.1:5671", "must be sb://host"),
}


@pytest.mark.parametrize("name", sorted(BAD_SETTINGS))
def test_a_bad_servicebus_setting_stops_the_command_with_exit_code_2(
    sb: ServiceBusEmulator, queue_name: str, tmp_path: Path, name: str
) -> None:
    value, says = BAD_SETTINGS[name]
    env = {**servicebus_env(sb, queue_name, ROOT_RULE, tmp_path), name: value}
    result = run(env, "status")
    assert result.returncode == 2
    assert name in result.stderr and says in result.stderr


def test_without_the_emulators_ca_the_certificate_is_refused(
    sb: ServiceBusEmulator, queue_name: str, tmp_path: Path
) -> None:
    env = servicebus_env(sb, queue_name, ROOT_RULE, tmp_path)
    del env["WRITEBACK_SERVICEBUS_CA_FILE"]
    result = run(env, "status")
    assert result.returncode == 1
    assert "depth unknown" in result.stdout and "dead letters: unknown" in result.stdout
    assert "CERTIFICATE_VERIFY_FAILED" in result.stdout or "certificate" in result.stdout.lower()
