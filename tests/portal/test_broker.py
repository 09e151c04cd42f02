"""The embedded broker (kombu's filesystem transport) carries a task to a real Celery worker process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_worker_runs_a_task_sent_through_the_filesystem_broker(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update({"PORTAL_VAR_DIR": str(tmp_path / "var"), "DJANGO_SETTINGS_MODULE": "portal.settings"})
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "portal",
            "worker",
            "--pool=solo",
            "--loglevel=INFO",
            "-n",
            "t@%h",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        send = "import django; django.setup(); from portal.celery import ping; r = ping.delay(); print(r.id)"
        sent = subprocess.run([sys.executable, "-c", send], cwd=REPO, env=env, capture_output=True, text=True)
        assert sent.returncode == 0, sent.stderr
        task_id = sent.stdout.strip()
        deadline = time.monotonic() + 60
        seen = []
        assert worker.stdout is not None
        os.set_blocking(worker.stdout.fileno(), False)
        while time.monotonic() < deadline:
            line = worker.stdout.readline()
            if not line:
                if worker.poll() is not None:
                    break
                time.sleep(0.1)
                continue
            seen.append(line)
            if f"Task portal.ping[{task_id}] succeeded" in line:
                break
        else:
            raise AssertionError("worker did not run the task in 60 s:\n" + "".join(seen))
        assert any(f"Task portal.ping[{task_id}] succeeded" in line for line in seen), "".join(seen)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
