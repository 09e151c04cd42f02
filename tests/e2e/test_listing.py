"""A cluster's status account on the real local cluster: one squeue a cycle settles every account whose jobs wait;
a job that starts or ends sends its account to its own poll, which reads it as before."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

import pytest

from catalog.models import Cluster, ClusterAccount
from jobs.models import LLMSession, State, transition
from jobs.sessions import lifecycle, listing
from jobs.sessions.actions import launch
from portal import ssh
from tests.conftest import LAUNCH
from tests.e2e.sessions import local_account, shell

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]


class Counting:
    """The pool's commands, by the account that ran them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by: list[str] = []
        run = ssh.pool.run

        def counted(target: ssh.SSHTarget, command: str, **kwargs: Any) -> ssh.CommandResult:
            self.by.append(target.username)
            return run(target, command, **kwargs)

        monkeypatch.setattr(ssh.pool, "run", counted)


def held_session(user: Any, local: dict[str, Any], captured: Any) -> LLMSession:
    """A portal session whose job waits, held, in the real queue (as a session between submit and start)."""
    with captured(execute=False):
        session = launch(user, LAUNCH)
    job = shell(local, f"sbatch --hold --parsable -J hpcllm-{session.pk} -p gpu -t 5 --mem=64M -o /dev/null "
                       "--wrap 'sleep 60'").stdout.strip()  # fmt: skip
    transition(session.pk, State.QUEUED, cause="submitted (test)", job_id=job)
    return LLMSession.objects.get(pk=session.pk)


def test_a_status_account_lists_every_portal_job_in_one_command(
    account: ClusterAccount,
    other_user: Any,
    local_catalog: dict[str, Any],
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = local_account(other_user, local_catalog)
    status = ClusterAccount(cluster=account.cluster, kind="service", username=local_catalog["user"])
    status.set_private_key(Path(local_catalog["private_key"]).read_text())
    status.save()
    Cluster.objects.filter(pk=account.cluster_id).update(status_account=status)
    mine = [held_session(account.user, local_catalog, django_capture_on_commit_callbacks) for _ in range(2)]
    theirs = held_session(other_user, local_catalog, django_capture_on_commit_callbacks)
    commands = Counting(monkeypatch)

    cycle = listing.cycle(account.cluster_id)
    assert cycle == listing.Cycle(own=[], settled=3, changed=3) and len(commands.by) == 1
    places: list[int] = []
    for session in [*mine, theirs]:
        session.refresh_from_db()
        assert (session.state, session.slurm_reason) == (State.QUEUED, "JobHeldUser")
        assert session.queue_position is not None
        places.append(session.queue_position)
    assert places == sorted(places)  # submitted in this order, all of priority 0

    # One of mine starts: my account reads its job itself (its files are mine); the others stay settled.
    shell(local_catalog, f"scontrol release {mine[0].job_id}")
    for _ in range(100):
        if shell(local_catalog, f"squeue -h -j {mine[0].job_id} -o %T").stdout.strip() == "RUNNING":
            break
        time.sleep(0.2)
    cycle = listing.cycle(account.cluster_id)
    assert cycle.own == [account.pk] and cycle.settled == 1
    lifecycle.poll(account.pk)
    mine[0].refresh_from_db()
    assert mine[0].state == State.STARTING and mine[0].node_list

    # Theirs is cancelled outside the portal: gone from the listing, so their poll asks sacct how it ended.
    shell(local_catalog, f"scancel {theirs.job_id}")
    cycle = listing.cycle(account.cluster_id)
    assert sorted(cycle.own) == sorted([account.pk, other.pk]) and cycle.settled == 0
    for _ in range(20):
        lifecycle.poll(other.pk)
        theirs.refresh_from_db()
        if theirs.state != State.QUEUED:
            break
        time.sleep(0.5)
    assert theirs.state == State.CANCELLED


def test_a_job_name_with_a_newline_forges_no_line_of_the_listing_or_the_poll(
    account: ClusterAccount, local_catalog: dict[str, Any], django_capture_on_commit_callbacks: Any
) -> None:
    """A job named so that, read a line at a time, squeue's output says a waiting portal job runs on node3: the
    status account's listing and the owner's own poll both still see it wait."""
    status = ClusterAccount(cluster=account.cluster, kind="service", username=local_catalog["user"])
    status.set_private_key(Path(local_catalog["private_key"]).read_text())
    status.save()
    Cluster.objects.filter(pk=account.cluster_id).update(status_account=status)
    waiting = held_session(account.user, local_catalog, django_capture_on_commit_callbacks)
    running = f"{waiting.job_id}|hpcllm-{waiting.pk}|RUNNING|None|2026-12-07T10:00:00|node3|1:00|4:00|gpu|1"
    name = f"x\n{local_catalog['user']}|{running}\n{running}\nz"  # a line for the listing, one for the poll
    forger = shell(local_catalog, f"sbatch --hold --parsable -J {shlex.quote(name)} -p gpu -t 5 --mem=64M "
                                  "-o /dev/null --wrap 'sleep 60'").stdout.strip()  # fmt: skip
    try:
        assert forger.isdigit() and int(forger) > int(waiting.job_id)  # listed after the job it forges
        cycle = listing.cycle(account.cluster_id)
        assert cycle.own == [] and cycle.settled == 1
        waiting.refresh_from_db()
        assert (waiting.state, waiting.slurm_reason, waiting.node_list) == (State.QUEUED, "JobHeldUser", "")
        lifecycle.poll(account.pk)
        waiting.refresh_from_db()
        assert (waiting.state, waiting.slurm_reason, waiting.node_list) == (State.QUEUED, "JobHeldUser", "")
    finally:
        shell(local_catalog, f"scancel {forger}")  # not a portal job: the fixture's clean-up would leave it
