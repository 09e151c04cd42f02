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


class Worker:
    """A real `celery worker -B` (beat embedded) process against the test database, logging to a file."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env, self.log_path = dict(env), log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        schedule = self.log_path.with_suffix(".beat")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "portal", "worker", "-B", "-s", str(schedule),
                 "--pool=threads", "--concurrency=4", "--loglevel=INFO", "-n", f"e2e-{time.monotonic_ns()}@%h"],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL the whole process group: no warm shutdown, no acknowledgements, as a crashed host would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class PortalServer:
    """The portal under uvicorn (ASGI, as in production), static files collected, against the test database."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env, self.log_path = dict(env), log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> str:
        import socket

        import httpx

        subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"], cwd=REPO, env=self.env,
                       check=True)  # fmt: skip
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "portal.asgi:application", "--port", str(port), "--lifespan", "off"],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                httpx.get(f"{self.url}/healthz", timeout=1)
                return self.url
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError(f"uvicorn did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
