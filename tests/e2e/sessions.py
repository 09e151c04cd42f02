"""Helpers for session tests against the local cluster: an account, launching, driving polls, cleaning up."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from catalog.models import ClusterAccount
from jobs.models import LLMSession
from jobs.sessions.actions import launch
from jobs.tasks import poll_account, submit_session
from portal import ssh
from tests.conftest import LAUNCH


def local_account(user: Any, local: dict[str, Any]) -> ClusterAccount:
    from catalog.models import Cluster

    account = ClusterAccount(
        cluster=Cluster.objects.get(slug="local"), user=user, kind="personal", username=local["user"]
    )
    account.set_private_key(Path(local["private_key"]).read_text())
    account.save()
    return account


def local_service_account(local: dict[str, Any]) -> ClusterAccount:
    """A service account on the local cluster, for the reads the portal makes for the whole site (group sync, queue
    figures, the status listing): the cluster has one user, so it logs in as that user with the same key."""
    from catalog.models import Cluster

    account = ClusterAccount(cluster=Cluster.objects.get(slug="local"), kind="service", label="portal",
                             username=local["user"])  # fmt: skip
    account.set_private_key(Path(local["private_key"]).read_text())
    account.save()
    return account


def start(owner: Any, django_capture_on_commit_callbacks: Any, **changes: Any) -> LLMSession:
    """Launch a session of tests.conftest.LAUNCH with these changes and submit it here, as the worker would."""
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**LAUNCH, **changes})
    submit_session.apply(args=(str(session.pk),))
    session.refresh_from_db()
    return session


def shell(local: dict[str, Any], command: str) -> ssh.CommandResult:
    target = ssh.SSHTarget(
        host=local["host"],
        port=local["port"],
        username=local["user"],
        host_keys=local["host_key_line"],
        private_key=Path(local["private_key"]).read_text(),
    )
    return ssh.SSHPool().run(target, command)


def drive(
    session: LLMSession,
    done: Callable[[LLMSession], bool],
    timeout_s: float = 120,
    every_s: float = 0.5,
    poll: bool = True,
) -> LLMSession:
    """Poll the session's account as beat would, until done(session) or the timeout; poll=False only waits for what
    something else (the watch) does."""
    deadline = time.monotonic() + timeout_s
    while True:
        if poll:
            poll_account(session.account_id)
        session.refresh_from_db()
        if done(session):
            return session
        if time.monotonic() > deadline:
            events = "\n".join(str(e) for e in session.events.all())
            raise AssertionError(f"session stuck in {session.state} after {timeout_s}s; events:\n{events}")
        time.sleep(every_s)


def cancel_all_jobs(wait_s: float = 40) -> None:
    """Tests leave no jobs behind: scancel every portal job on the local cluster (as root, on this host), until
    squeue lists none, so that the next test starts on free nodes. A squeue or scancel that fails under load is
    asked again rather than taken as "nothing to cancel"."""
    deadline = time.monotonic() + wait_s
    while True:
        listed = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True)
        jobs = (line.partition(" ") for line in listed.stdout.splitlines())
        ids = [job for job, _, name in jobs if name.startswith("hpcllm-")]
        if listed.returncode == 0 and not ids:
            return
        if ids:  # by id: `scancel --name` as root leaves other users' jobs alone here (Slurm 22.05)
            subprocess.run(["scancel", *ids], capture_output=True)
        if time.monotonic() > deadline:
            return
        time.sleep(0.5)


def jobs_named(name: str) -> list[str]:
    """Every job Slurm holds with this name, running, pending or recently finished."""
    out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True).stdout
    return [line.split()[0].split("=")[1] for line in out.splitlines() if f" JobName={name} " in line]
