"""The hosts' garbage-collector settings, each in a fresh interpreter (the collector
is process state: this test process has long been tuned by the servers other
tests started)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

from writeback.hosting.collector import YOUNG_THRESHOLD


def run(code: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_first_call_freezes_start_up_and_raises_the_young_threshold_once() -> None:
    facts = run(
        """
        import gc, json
        import writeback.adapters.graph  # the SDKs' modules: what start-up leaves
        from writeback.hosting.collector import tune_collector
        before = gc.get_threshold()
        first = tune_collector()
        frozen = gc.get_freeze_count()
        second = tune_collector()

        class Cycle:
            pass
        a, b = Cycle(), Cycle()
        a.other, b.other = b, a
        del a, b
        print(json.dumps({
            "before": before, "after": gc.get_threshold(), "first": first,
            "second": second, "frozen": frozen, "frozen_again": gc.get_freeze_count(),
            "cycle_collected": gc.collect(), "enabled": gc.isenabled(),
        }))
        """
    )
    assert facts["first"] is True and facts["second"] is False
    assert facts["frozen"] > 10_000, "start-up's objects are out of every collection"
    assert facts["frozen_again"] == facts["frozen"], "a second call froze nothing more"
    assert facts["after"] == [YOUNG_THRESHOLD, *facts["before"][1:]]
    assert facts["cycle_collected"] >= 2, "garbage made after start-up is still collected"
    assert facts["enabled"] is True


def test_a_disabled_collector_and_a_higher_threshold_are_left_as_the_process_set_them() -> None:
    disabled = run(
        """
        import gc, json
        from writeback.hosting.collector import tune_collector
        gc.disable()
        tuned = tune_collector()
        print(json.dumps([tuned, gc.isenabled(), gc.get_freeze_count(), gc.get_threshold()[0]]))
        """
    )
    assert disabled == [True, False, 0, 700]
    higher = run(
        f"""
        import gc, json
        from writeback.hosting.collector import tune_collector
        gc.set_threshold({YOUNG_THRESHOLD * 5}, 20, 30)
        tune_collector()
        print(json.dumps(gc.get_threshold()))
        """
    )
    assert higher == [YOUNG_THRESHOLD * 5, 20, 30]


def test_serve_tunes_the_collector_when_it_starts() -> None:
    facts = run(
        """
        import gc, json, tempfile
        from pathlib import Path
        from writeback.adapters.graph import GraphCloud
        from writeback.adapters.local_queue import LocalQueue
        from writeback.domain.mapping import MappingOptions
        from writeback.hosting.serve import ServeConfig, Server
        from writeback_sandbox.graph_standin import GraphStandIn, Tenant

        def no_directory():
            raise AssertionError("paused: no worker opens the directory")

        with tempfile.TemporaryDirectory() as tmp, GraphStandIn(Tenant()) as standin:
            queue = LocalQueue(Path(tmp) / "queue.sqlite3")
            cloud = GraphCloud(base_url=standin.url)
            server = Server(
                queue=queue, cloud=cloud, directory_factory=no_directory,
                options=MappingOptions(target_ou="OU=Writeback,DC=corp,DC=example"),
                client_states=["collector-client-state"],
                config=ServeConfig(paused=True, subscribe=False, reconcile_at_start=False),
                owned=[queue, cloud],
            )
            before = [gc.get_freeze_count(), gc.get_threshold()[0]]
            server.start()
            try:
                after = [gc.get_freeze_count(), gc.get_threshold()[0]]
            finally:
                server.stop()
        print(json.dumps([before, after]))
        """
    )
    (frozen_before, young_before), (frozen_after, young_after) = facts
    assert (frozen_before, young_before) == (0, 700)
    assert frozen_after > 10_000 and young_after == YOUNG_THRESHOLD
