"""A batch run on a running session, on the cluster: its checked requests and the runner staged in the session's
directory, where the job starts the runner beside the server (batch.sh, supervise_batches); and a stop."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

from django.utils import timezone

from jobs.batch import outputs
from jobs.cluster import jobscript, layout, remote
from jobs.models import BatchRun, transition_run
from portal import gate, ssh

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Staged:
    outcome: str  # "staged", "retry" or "failed"
    message: str = ""


def stage(run_id: str) -> Staged:
    """Send the run's files once (the remote side changes nothing when they are there already). SSH trouble and an
    incomplete upload are worth retrying; a session whose directory is gone is not."""
    run = BatchRun.objects.select_related("session__account__cluster").get(pk=run_id)
    if run.staged_at is not None or run.is_ended:
        return Staged("staged")
    with run.requests.open("rb") as requests:
        files = {
            layout.NAMES.requests_file: (requests.read().decode(), 0o600),
            layout.NAMES.concurrency_file: (f"{run.concurrency}\n", 0o600),
            **{name: (text, 0o600) for name, text in jobscript.batch_files().items()},
        }
    payload = remote.tar_payload(files)
    account = run.session.account
    command = remote.stage_batch_command(str(run.session_id), str(run.pk), payload.sha256, gated=account.restricted)
    try:
        result = account.run(command, stdin=payload.stdin, timeout_s=300)
    except ssh.SSHError as exc:
        return Staged("retry" if exc.transient else "failed", str(exc))
    if result.exit_code == 0 and "staged" in result.stdout:
        BatchRun.objects.filter(pk=run.pk, staged_at__isnull=True).update(staged_at=timezone.now())
        return Staged("staged")
    message = result.stderr.strip()[:500] or f"exit code {result.exit_code}"
    return Staged("retry" if result.exit_code == remote.SUBMIT_RETRY else "failed", message)


def lost() -> list[str]:
    """Runs on running sessions whose staging task was lost (a worker died with it): asked for again."""
    overdue = timezone.now() - timedelta(seconds=120)
    waiting = BatchRun.objects.filter(
        ends_session=False, staged_at__isnull=True, state=BatchRun.State.WAITING, created_at__lt=overdue
    )
    return [str(pk) for pk in waiting.values_list("pk", flat=True)[:100]]


def fail(run_id: str, reason: str) -> None:
    transition_run(run_id, BatchRun.State.FAILED, reason=reason, end_reason=reason[:2000])


def stop(run_id: str) -> bool:
    """Ask the job to stop the run's runner; False when the cluster could not be asked (the task tries again)."""
    run = BatchRun.objects.select_related("session__account__cluster").get(pk=run_id)
    try:
        account = run.session.account
        command = remote.stop_batch_command(str(run.session_id), str(run.pk), gated=account.restricted)
        result = account.run(command, timeout_s=60)
    except ssh.SSHError as exc:
        log.warning("stopping batch run %s will be retried: %s", run_id, exc)
        return False
    return result.exit_code == 0


class NoResults(Exception):
    """The run has answered nothing yet."""


def results(run: BatchRun, max_record_bytes: int | None = None) -> tuple[bool, Iterator[bytes]]:
    """The run's result records as lines streamed from the cluster, and whether they are in input order (the whole
    output of a finished run) or in the order they were answered (so far); each line at most `max_record_bytes`
    (outputs.lines). Raises NoResults, or ssh.SSHError when the cluster cannot be asked."""
    finished = run.state == BatchRun.State.FINISHED
    args = [str(run.session_id), str(run.pk), "output" if finished else "results"]
    account = run.session.account
    asked = account.run(gate.command(remote.HAS_RESULTS, args, gated=account.restricted), timeout_s=30)
    if asked.stdout.strip() != "yes":
        raise NoResults("the run has answered nothing yet")
    read = gate.command(remote.RESULTS, args, gated=account.restricted)
    return finished, outputs.lines(ssh.pool.read(account.ssh_target(), read), max_record_bytes)
