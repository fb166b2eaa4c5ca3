"""Fault-injection run of the single-machine pipeline (see ``chaos.py``).

CI runs it at a modest size; ``./scripts/reliability --events 1000 --groups 120``
(or ``WRITEBACK_RELIABILITY_EVENTS`` / ``WRITEBACK_RELIABILITY_GROUPS``) runs
the full one. The figures are printed whatever pytest captures.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.reliability.chaos import EXPECTED_REASONS, Chaos, ChaosConfig
from tests.support.world import World, make_world
from writeback_sandbox.samba import SambaDC

pytestmark = pytest.mark.reliability


@pytest.fixture
def world(samba_dc: SambaDC, make_ou: Callable[[SambaDC], str]) -> Iterator[World]:
    with make_world(samba_dc, make_ou(samba_dc), users=24) as w:
        yield w


def _config() -> ChaosConfig:
    return ChaosConfig(
        events=int(os.environ.get("WRITEBACK_RELIABILITY_EVENTS", "300")),
        groups=int(os.environ.get("WRITEBACK_RELIABILITY_GROUPS", "100")),
    )


def test_every_group_converges_through_faults(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config()
    report = Chaos(world, tmp_path, config).run()
    with capsys.disabled():
        print("\nreliability run:\n  " + "\n  ".join(report.lines()))

    faults = report.faults
    assert report.events == config.events
    assert faults["DC stopped and restarted"] == 1
    assert report.put_back > 0, "the outage and the faults never reached the workers"
    assert faults["Graph 429 with Retry-After"] > 0 and faults["Graph 503"] > 0
    assert faults["duplicate notification POSTs"] > 0
    assert faults["late, out-of-order notifications"] > 0
    assert faults["worker killed after its LDAP write (child process)"] == config.crashes
    assert faults["error after LDAP write, before ack (in process)"] == config.errors_after_write
    # Every group in AD as in the cloud, read independently; nothing left in the queue.
    assert report.groups_checked >= config.groups * 0.9
    assert report.mismatches == []
    # Only the poison messages and the over-limit groups' events are dead letters.
    assert set(report.dead_letters) == EXPECTED_REASONS
    assert report.dead_letters["PoisonEvent"] == config.poison
    assert report.dead_letters_without_reason == 0
    # Limit raised and dead letters replayed: everything converges; poison stays poison.
    assert report.replayed == sum(report.dead_letters.values())
    assert report.mismatches_after_replay == []
    assert report.dead_letters_after_replay == {"PoisonEvent": config.poison}
    assert report.writes_planned_after == 0
