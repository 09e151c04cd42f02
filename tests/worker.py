"""Run a real Celery worker process and prove a task sent through the configured broker reaches it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ping_through_worker(env: Mapping[str, str], timeout_s: float = 60) -> list[str]:
    """Start a worker, send portal.ping from another process, return the worker's log once it ran the task."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "portal", "worker", "--pool=solo", "--loglevel=INFO", "-n", "t@%h"],
        cwd=REPO,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        send = "import django; django.setup(); from portal.celery import ping; print(ping.delay().id)"
        sent = subprocess.run([sys.executable, "-c", send], cwd=REPO, env=dict(env), capture_output=True, text=True)
        assert sent.returncode == 0, sent.stderr
        done = f"Task portal.ping[{sent.stdout.strip()}] succeeded"
        assert worker.stdout is not None
        os.set_blocking(worker.stdout.fileno(), False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = worker.stdout.readline()
            if line:
                seen.append(line)
                if done in line:
                    return seen
            elif worker.poll() is not None:
                break
            else:
                time.sleep(0.1)
        raise AssertionError(f"the worker did not run the task within {timeout_s} s:\n" + "".join(seen))
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()


def clean_env(var_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update({"PORTAL_VAR_DIR": str(var_dir), "DJANGO_SETTINGS_MODULE": "portal.settings", **extra})
    return env
