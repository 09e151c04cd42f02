"""What people do to batch runs, the one path for the pages, the Batch API, the admin and `manage.py batch|sessions`:
a batch launch, a run on a running session, a stop. Each writes the database and enqueues the worker's part once the
write commits. A batch launch is a launch (jobs.sessions.actions.launch) with its run added in the same transaction;
this module sits above the sessions and nothing in jobs.sessions imports it (tests/test_layout.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from jobs import tasks
from jobs.batch import runs
from jobs.batch.forms import Checked
from jobs.models import BatchRun, LLMSession
from jobs.sessions import actions


def launch(user: User, data: Mapping[str, Any], request_token: str = "", *, batch: Checked) -> LLMSession:
    """A batch launch: a session (LaunchForm's checks, the user's limits counting every replica) whose job works
    through the checked prompts file and ends itself. The session and its run are created in one transaction and
    the job is submitted once; a request_token seen before returns that session, run and all."""
    replicas = batch.columns.get("replicas", 1)
    return actions.launch(
        user,
        data,
        request_token,
        replicas=replicas,
        with_session=lambda session: runs.add_run(session, batch, ends_session=True),
    )


def start_run(session: LLMSession, batch: Checked, **extra: Any) -> BatchRun:
    """A batch run on a running session: recorded, then sent to the cluster, where the job starts its runner beside
    the server. The session stays up for chat and the API; by default the run leaves one of its slots free, and on a
    server others use too (runs.shared_server) always, whatever it asked for: its runner talks to the server on the
    node, past the proxy's fair share, so the room for chat is kept by its own concurrency."""
    with transaction.atomic():
        run = runs.on_session(session, batch, **extra)
        stage(run)
    return run


def stage(run: BatchRun) -> None:
    """Send a recorded run to the cluster once the write commits."""
    transaction.on_commit(lambda: tasks.stage_batch.delay(str(run.pk)))


def stop_run(run: BatchRun) -> None:
    """Stop a batch run, keeping what is answered: a batch launch's job is cancelled; on a running session, the job
    is asked to stop the runner."""
    if run.is_ended:
        return
    if run.ends_session:
        actions.request_cancel(run.session, "batch run stopped", "the batch run was stopped from the portal")
        return
    if BatchRun.objects.filter(pk=run.pk, stop_requested_at__isnull=True).update(stop_requested_at=timezone.now()):
        transaction.on_commit(lambda: tasks.stop_batch.delay(str(run.pk)))
