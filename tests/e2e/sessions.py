"""Helpers for session tests against the local cluster: an account, launching, driving polls, cleaning up."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from catalog.models import ClusterAccount
from jobs.models import LLMSession
from jobs.tasks import poll_account
from portal import ssh


def local_account(user: Any, local: dict[str, Any]) -> ClusterAccount:
    from catalog.models import Cluster

    account = ClusterAccount(
        cluster=Cluster.objects.get(slug="local"), user=user, kind="personal", username=local["user"]
    )
    account.set_private_key(Path(local["private_key"]).read_text())
    account.save()
    return account


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
    session: LLMSession, done: Callable[[LLMSession], bool], timeout_s: float = 120, every_s: float = 0.5
) -> LLMSession:
    """Poll the session's account as beat would, until done(session) or the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        poll_account(session.account_id)
        session.refresh_from_db()
        if done(session):
            return session
        if time.monotonic() > deadline:
            events = "\n".join(str(e) for e in session.events.all())
            raise AssertionError(f"session stuck in {session.state} after {timeout_s}s; events:\n{events}")
        time.sleep(every_s)


def cancel_all_jobs() -> None:
    """Tests leave no jobs behind: scancel every portal job on the local cluster (as root, on this host)."""
    subprocess.run(["scancel", "--name", ",".join(_portal_job_names())], capture_output=True)


def _portal_job_names() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout
    return [name for name in out.split() if name.startswith("hpcllm-")] or ["hpcllm-none"]


def jobs_named(name: str) -> list[str]:
    """Every job Slurm holds with this name, running, pending or recently finished."""
    out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True).stdout
    return [line.split()[0].split("=")[1] for line in out.splitlines() if f" JobName={name} " in line]
