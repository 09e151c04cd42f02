"""Sessions through a real Celery worker (beat embedded): the command line, and a worker killed mid-submit."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.test import Client

from catalog.models import ClusterAccount
from jobs.cluster.slurm import job_name
from jobs.models import END_STATES, LLMSession, State
from jobs.sessions.actions import launch
from portal import ssh
from tests.conftest import LAUNCH
from tests.e2e.sessions import cancel_all_jobs, jobs_named, local_account
from tests.worker import REPO, Worker

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def worker_env() -> dict[str, str]:
    """The worker must see this test's database and broker: same var dir and secret key, the test DB file."""
    db = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if connection.vendor == "sqlite":
        env["PORTAL_SQLITE_PATH"] = str(db["NAME"])
    else:
        env["DATABASE_URL"] = f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    env.update(
        DJANGO_SECRET_KEY=settings.SECRET_KEY,
        PORTAL_POLL_INTERVAL_S="1",
        PORTAL_SUBMIT_STALE_S="3",
        DJANGO_SETTINGS_MODULE="portal.settings",
    )
    return env


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    queue = Path(str(settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("data_folder_in", tmp_path)))
    for stale_message in queue.glob("*"):
        stale_message.unlink(missing_ok=True)  # a previous run's leftovers would run against this database
    w = Worker(worker_env(), tmp_path / "worker.log")
    w.start()
    yield w
    w.stop()
    cancel_all_jobs()
    ssh.pool.close_all()


@pytest.fixture
def account(local_catalog: dict[str, Any], owner: Any) -> ClusterAccount:
    return local_account(owner, local_catalog)


def manage(*args: str, env: dict[str, str], timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s
    )


def launch_args(**changes: Any) -> list[str]:
    options = {**LAUNCH, **changes}
    args = ["sessions", "launch", "--user", "ada"]
    for name, value in options.items():
        args += [f"--{name}", str(value)]
    return args


def test_the_command_line_launches_waits_and_cancels(
    worker: Worker, account: ClusterAccount, client: Client, owner: Any
) -> None:
    env = worker_env()
    started = manage(*launch_args(), "--wait", "running", "--json", env=env)
    assert started.returncode == 0, started.stderr + worker.log()[-3000:]
    shown = json.loads(started.stdout)
    assert shown["state"] == "running" and shown["job_id"] and shown["node_list"].startswith("node")

    listed = json.loads(manage("sessions", "list", "--user", "ada", "--json", env=env).stdout)
    assert [s["uuid"] for s in listed] == [shown["uuid"]]
    detail = json.loads(manage("sessions", "show", shown["uuid"], "--json", env=env).stdout)
    assert [e["to"] for e in detail["events"]] == ["pending", "submitting", "queued", "starting", "running"]
    log = manage("sessions", "log", shown["uuid"], env=env)
    assert "ready at" in log.stdout
    # The log page shows what the worker fetched into the shared cache; the page itself runs no SSH command.
    client.force_login(owner)
    deadline = time.monotonic() + 60
    while "ready at" not in (page := client.get(f"/sessions/{shown['uuid']}/log").content.decode()):
        assert time.monotonic() < deadline, page + worker.log()[-3000:]
        time.sleep(1)

    cancelled = manage("sessions", "cancel", shown["uuid"], "--wait", "--json", env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["state"] == "cancelled"


def test_the_command_line_exits_non_zero_with_slurms_reason(worker: Worker, account: ClusterAccount) -> None:
    failed = manage(*launch_args(gpus=3), "--wait", "queued", "--json", env=worker_env())
    assert failed.returncode != 0
    assert "Requested node configuration is not available" in failed.stderr
    assert json.loads(failed.stdout)["state"] == "failed"
    refused = manage(*launch_args(partition="nope"), env=worker_env())
    assert refused.returncode != 0 and "partition: Local test cluster has no partition 'nope'" in refused.stderr


def submit_window_s(owner: Any) -> float:
    """How long an undisturbed submit on this machine holds its claim: from "submitting" to "queued"."""
    session = launch(owner, LAUNCH)
    deadline = time.monotonic() + 60
    while LLMSession.objects.get(pk=session.pk).state in {State.PENDING, State.SUBMITTING}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    events = {e.to_state: e.at for e in session.events.all()}
    subprocess.run(["scancel", LLMSession.objects.get(pk=session.pk).job_id], check=True)
    return (events[State.QUEUED] - events[State.SUBMITTING]).total_seconds()


def test_a_worker_killed_mid_submit_leaves_exactly_one_job(worker: Worker, account: ClusterAccount, owner: Any) -> None:
    """Kill the worker (SIGKILL, whole group) at a random moment after it claimed a submit; a new worker retries
    (redelivery or the stale-claim sweep). Slurm must hold exactly one job for the session every time."""
    rng = random.Random(int(os.environ.get("KILL_SEED", "0")) or None)
    trials = int(os.environ.get("KILL_TRIALS", "10"))
    killed_while_submitting = submitted_before_kill = 0
    window_s = submit_window_s(owner)
    for trial in range(trials):
        session = launch(owner, LAUNCH)
        deadline = time.monotonic() + 60
        while LLMSession.objects.get(pk=session.pk).state == State.PENDING:
            assert time.monotonic() < deadline, f"trial {trial}: no worker took the submit\n{worker.log()[-3000:]}"
            time.sleep(0.05)
        # Kill somewhere inside the submit's window (SSH login, staging, sbatch, the UPDATE).
        time.sleep(rng.uniform(0, 0.7 * window_s))
        worker.kill()
        if LLMSession.objects.get(pk=session.pk).state == State.SUBMITTING:
            killed_while_submitting += 1
            submitted_before_kill += bool(jobs_named(job_name(str(session.pk))))
        worker.start()
        deadline = time.monotonic() + 90
        while (state := LLMSession.objects.get(pk=session.pk).state) in {State.PENDING, State.SUBMITTING}:
            assert time.monotonic() < deadline, f"trial {trial}: stuck in {state}\n{worker.log()[-3000:]}"
            time.sleep(0.2)
        session.refresh_from_db()
        assert session.state not in END_STATES, session.end_reason
        assert jobs_named(job_name(str(session.pk))) == [session.job_id], f"trial {trial}"
        subprocess.run(["scancel", session.job_id], check=True)
    print(
        f"submit window {window_s:.3f}s; {trials} trials: {killed_while_submitting} killed mid-submit, "
        f"{submitted_before_kill} after sbatch ran"
    )
    # Not vacuous: kills must land inside the submit, not only before or after it.
    assert killed_while_submitting >= trials // 4, killed_while_submitting
