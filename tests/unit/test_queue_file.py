"""Issue 12, item 8: the SQLite queue file holds every pending event and dead letter,
so it is created private (0600, its -wal and -shm files too), an existing one is
narrowed, and its path is absolute whatever directory serve was started from."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from writeback.adapters.local_queue import LocalQueue
from writeback.config import Host, load_pipeline_settings
from writeback.ports import OutgoingMessage


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_queue_file_is_created_private_under_a_lax_umask(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "queue.sqlite3"
    previous = os.umask(0o022)
    try:
        logged = caplog.at_level(logging.INFO, logger="writeback.adapters.local_queue")
        with logged, LocalQueue(path) as queue:
            queue.send([OutgoingMessage(b"{}", "m1", "s1")])
            files = [p for p in tmp_path.iterdir() if p.name.startswith("queue.sqlite3")]
            assert {p.name for p in files} >= {"queue.sqlite3", "queue.sqlite3-wal"}
            assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
    finally:
        os.umask(previous)
    assert f"local queue at {path}" in caplog.text


def test_an_existing_queue_file_readable_by_others_is_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    with LocalQueue(path):
        pass
    path.chmod(0o644)
    with LocalQueue(path) as queue:
        assert queue.depth() == 0
    assert mode(path) == 0o600


def test_the_queue_path_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    default = load_pipeline_settings({"WRITEBACK_CLIENT_STATE": "s"}, host=Host.SERVE)
    assert default.queue_path == str(tmp_path / "writeback-queue.sqlite3")
    relative = load_pipeline_settings(
        {"WRITEBACK_CLIENT_STATE": "s", "WRITEBACK_QUEUE_PATH": "var/q.sqlite3"}, host=Host.SERVE
    )
    assert os.path.isabs(relative.queue_path)
    assert relative.queue_path == str(tmp_path / "var" / "q.sqlite3")
    assert not (tmp_path / "writeback-queue.sqlite3").exists()
