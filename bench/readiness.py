"""How soon a session shows Running after its server answers its health check, and ended after its job stops: with
the watch (the watch_sessions task) against the regular poll alone, in the same run. A benchmark, not a test.

    .venv/bin/python bench/readiness.py [--launches 6] [--interval 5]

Needs the local cluster (scripts/local-cluster up, as root). A scratch SQLite database with the local catalog; each
launch is the tiny model with llama.cpp, submitted as the portal submits it. Beat is played by a thread that polls
the account every --interval seconds (PORTAL_POLL_INTERVAL_S) and, in the "watch" runs, runs watch_sessions as
beat and each submit start it. Measured per launch, on the one clock of this machine:

- ready: from the job's connection.json (written the moment llama-server answers /health with the model loaded;
  its modification time, read with stat) to the moment the database shows the session Running (read every 20 ms,
  as the card, the API and `sessions launch --wait running` read it);
- ended: the server is killed (SIGKILL, as an out-of-memory kill would), from the job's error file to the moment
  the database shows the session ended.

Launches alternate between the two ways so that drift on a shared machine falls on both. Printed: p50 and the worst
of each, the SSH commands per second each way, and the target (<= 1 s at p50).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SCRATCH = Path(tempfile.mkdtemp(prefix="hpcllm-bench-readiness-"))
os.environ.update(
    DJANGO_SETTINGS_MODULE="portal.settings",
    PORTAL_VAR_DIR=str(SCRATCH),
    PORTAL_LOG_LEVEL="WARNING",
)
os.environ.pop("DATABASE_URL", None)
os.environ.pop("REDIS_URL", None)

import django  # noqa: E402

django.setup()

from django.contrib.auth.models import User  # noqa: E402
from django.db import transaction  # noqa: E402

from bench.local import CountingPool, setup  # noqa: E402
from catalog.models import ClusterAccount  # noqa: E402
from jobs import tasks  # noqa: E402
from jobs.cluster import layout  # noqa: E402
from jobs.models import LLMSession, State  # noqa: E402
from jobs.sessions.actions import launch  # noqa: E402
from portal import ssh  # noqa: E402

LAUNCH = {"cluster": "local", "partition": "gpu", "gpu": "a100-80g", "gpus": 1, "model": "tiny-llama",
          "quant": "F16", "runtime": "llama.cpp", "context": 1024, "walltime": 10}  # fmt: skip


class Beat:
    """The account's poll every `interval` s, and with `watch` the watch for each interval, on threads of their own."""

    def __init__(self, account: ClusterAccount, interval: float, watch: bool) -> None:
        self.account, self.interval, self.watch = account, interval, watch
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.poll_loop, daemon=True)]
        if watch:
            self.threads.append(threading.Thread(target=self.watch_loop, daemon=True))

    def __enter__(self) -> Beat:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=self.interval + 40)

    def poll_loop(self) -> None:
        while not self.stop.is_set():
            tasks.poll_account(self.account.pk)  # as beat polls: the sessions, then their batch runs
            self.stop.wait(self.interval)

    def watch_loop(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            tasks.watch_sessions()
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - started)))


def stat_time(account: ClusterAccount, path: str) -> datetime:
    result = ssh.pool.run(account.ssh_target(), f"stat -c %.6Y {path}")
    return datetime.fromtimestamp(float(result.stdout), tz=timezone.utc)


def wait_for(session: LLMSession, done: object, timeout_s: float = 120) -> datetime:
    """When the database first showed done(session), read every 20 ms as the card, the API and the CLI read it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        session.refresh_from_db()
        if done(session):  # type: ignore[operator]
            return datetime.now(tz=timezone.utc)
        time.sleep(0.02)
    raise SystemExit(f"session {session.pk} stuck in {session.state}")


def one_launch(account: ClusterAccount, home: str, watch: bool) -> tuple[float, float]:
    """Seconds from ready to shown Running, and from the job's end to shown ended, for one session."""
    with transaction.atomic():
        session = launch(User.objects.get(pk=account.user_id or 0), LAUNCH)
    tasks.submit_session.apply(args=(str(session.pk),))  # as a worker would take it from the broker
    if watch:  # and the watch the submit asks for (watch_sessions.delay)
        threading.Thread(target=tasks.watch_sessions, daemon=True).start()
    shown = wait_for(session, lambda s: s.state == State.RUNNING or s.is_ended)
    if session.state != State.RUNNING:
        raise SystemExit(f"the session failed: {session.end_reason}")
    directory = f"{home}/{layout.session_dir(str(session.pk))}"
    ready = (shown - stat_time(account, f"{directory}/connection.json")).total_seconds()
    subprocess.run(["pkill", "-KILL", "-f", f"api-key-file {directory}/api_key"], check=True)
    shown = wait_for(session, lambda s: s.is_ended)
    ended = (shown - stat_time(account, f"{directory}/error")).total_seconds()
    return ready, ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=6, help="launches each way")
    parser.add_argument("--interval", type=float, default=5.0, help="PORTAL_POLL_INTERVAL_S")
    args = parser.parse_args()
    account = setup()
    counting = CountingPool()
    ssh.pool = counting
    home = ssh.pool.run(account.ssh_target(), "echo $HOME").stdout.strip()
    results: dict[str, dict[str, list[float]]] = {way: {"ready": [], "ended": []} for way in ("poll only", "watch")}
    commands: dict[str, tuple[int, float]] = {way: (0, 0.0) for way in results}
    for i in range(args.launches * 2):
        way = "watch" if i % 2 else "poll only"
        before, started = counting.commands, time.monotonic()
        with Beat(account, args.interval, watch=way == "watch"):
            ready, ended = one_launch(account, home, watch=way == "watch")
        n, seconds = commands[way]
        commands[way] = (n + counting.commands - before, seconds + time.monotonic() - started)
        results[way]["ready"].append(ready)
        results[way]["ended"].append(ended)
        print(f"launch {i + 1} ({way}): shown Running {ready:.2f} s after ready, ended {ended:.2f} s after the end",
              flush=True)  # fmt: skip
    print(f"\n{'':>10} {'ready p50':>10} {'worst':>7} {'ended p50':>10} {'worst':>7} {'SSH cmds/s':>10}")
    for way, figures in results.items():
        n, seconds = commands[way]
        shown, gone = figures["ready"], figures["ended"]
        print(f"{way:>10} {statistics.median(shown):>9.2f}s {max(shown):>6.2f}s "
              f"{statistics.median(gone):>9.2f}s {max(gone):>6.2f}s {n / seconds:>10.1f}")  # fmt: skip
    base, watch = statistics.median(results["poll only"]["ready"]), statistics.median(results["watch"]["ready"])
    print(
        f"target: Running within 1 s at p50 -> {watch:.2f} s with the watch "
        f"({'met' if watch <= 1 else 'missed'}); {base / max(watch, 1e-3):.1f}x sooner than the poll alone"
    )


if __name__ == "__main__":
    main()
