"""Single-machine mode's settings and the server's refusals, without a DC."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from writeback.adapters.local_queue import LocalQueue
from writeback.config import Host, QueueKind, load_pipeline_settings
from writeback.domain.mapping import MappingOptions
from writeback.errors import ConfigError
from writeback.hosting.serve import ServeConfig, Server, ServerStats

OU = "OU=Groups,DC=corp,DC=example"


def test_serve_settings_from_the_environment() -> None:
    env = {
        "WRITEBACK_CLIENT_STATE": "secret",
        "WRITEBACK_LISTEN_ADDRESS": "::1",
        "WRITEBACK_LISTEN_PORT": "8443",
        "WRITEBACK_WORKERS": "4",
        "WRITEBACK_RECONCILE_INTERVAL": "900",
        "WRITEBACK_WEBHOOK_KEY": "k" * 32,
        "WRITEBACK_STATE_PATH": "/var/lib/writeback/state.json",
        "WRITEBACK_PAUSED": "yes",
    }
    pipeline = load_pipeline_settings(env, host=Host.SERVE)
    assert pipeline.queue is QueueKind.LOCAL
    assert "k" * 32 not in repr(pipeline) and "secret" not in repr(pipeline)
    config = ServeConfig.from_settings(pipeline)
    assert (config.address, config.port, config.workers) == ("::1", 8443, 4)
    assert (config.reconcile_interval, config.subscription_interval) == (900, 6 * 3600)
    assert config.paused and config.state_path == "/var/lib/writeback/state.json"
    assert (config.incremental, config.full_every) == (True, 48)
    off = load_pipeline_settings(
        {**env, "WRITEBACK_RECONCILE_INCREMENTAL": "false", "WRITEBACK_FULL_SYNC_EVERY": "6"},
        host=Host.SERVE,
    )
    assert (ServeConfig.from_settings(off).incremental, off.full_sync_every) == (False, 6)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WRITEBACK_LISTEN_ADDRESS", "localhost"),
        ("WRITEBACK_WEBHOOK_KEY", "short"),
        ("WRITEBACK_WEBHOOK_KEY", "has spaces in it, which a URL cannot carry"),
        ("WRITEBACK_RECONCILE_INTERVAL", "10"),
        ("WRITEBACK_WORKERS", "0"),
        ("WRITEBACK_FULL_SYNC_EVERY", "0"),
        ("WRITEBACK_RECONCILE_INCREMENTAL", "sometimes"),
    ],
)
def test_bad_serve_settings_name_the_setting(name: str, value: str) -> None:
    env = {"WRITEBACK_CLIENT_STATE": "secret", name: value}
    with pytest.raises(ConfigError, match=name):
        load_pipeline_settings(env, host=Host.SERVE)


def test_the_tools_need_no_client_state_but_serve_does() -> None:
    assert load_pipeline_settings({}, require_client_state=False, host=Host.SERVE)
    with pytest.raises(ConfigError, match="WRITEBACK_CLIENT_STATE"):
        load_pipeline_settings({}, host=Host.SERVE)


def server(tmp_path: Path, **config: Any) -> Server:
    queue = LocalQueue(tmp_path / "q.sqlite3")
    return Server(
        queue=queue,
        cloud=None,  # type: ignore[arg-type]  # never reached: start() refuses first
        directory_factory=lambda: None,  # type: ignore[arg-type,return-value]
        options=MappingOptions(target_ou=OU),
        client_states=["secret"],
        config=ServeConfig(**config),
        owned=[queue],
    )


def test_listening_everywhere_needs_explicit_public_urls_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    refused = server(tmp_path, address="0.0.0.0")  # noqa: S104 - the case under test
    with pytest.raises(ConfigError, match="WRITEBACK_NOTIFICATION_URL"):
        refused.start()
    started = time.monotonic()
    refused.stop()
    assert time.monotonic() - started < 5


def test_a_server_needs_a_client_state_and_a_worker(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="WRITEBACK_CLIENT_STATE"):
        Server(
            queue=LocalQueue(tmp_path / "q.sqlite3"),
            cloud=None,  # type: ignore[arg-type]
            directory_factory=lambda: None,  # type: ignore[arg-type,return-value]
            options=MappingOptions(target_ou=OU),
            client_states=[""],
        )
    with pytest.raises(ConfigError, match="worker"):
        server(tmp_path, workers=0)


def test_latency_percentiles_are_nearest_rank() -> None:
    stats = ServerStats(latencies=tuple(float(n) for n in range(1, 101)))
    assert (stats.percentile(50), stats.percentile(99), stats.percentile(100)) == (50, 99, 100)
    assert ServerStats().percentile(50) is None
