"""The embedded broker (kombu's filesystem transport) carries a task to a real Celery worker process."""

from __future__ import annotations

from pathlib import Path

from tests.worker import clean_env, ping_through_worker


def test_a_worker_runs_a_task_sent_through_the_filesystem_broker(tmp_path: Path) -> None:
    log = ping_through_worker(clean_env(tmp_path / "var"))
    assert any("filesystem://" in line for line in log)
