"""What people do to batch runs, the one path for the pages, the Batch API, the admin and `manage.py batch|sessions`:
a batch launch, a run on a running session, a stop. Each writes the database and enqueues the worker's part once the
write commits. A batch launch is a launch (jobs.sessions.actions.launch) with its run added in the same transaction;
this module sits above the sessions and nothing in jobs.sessions imports it (tests/test_layout.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.files import File
from django.db import transaction
from django.utils import timezone

from jobs import tasks
from jobs.batch.forms import Checked, run_columns
from jobs.models import BatchRun, LLMSession, State, active_shares
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
        with_session=lambda session: _add_run(session, batch, ends_session=True),
    )


def _add_run(session: LLMSession, batch: Checked, ends_session: bool, **extra: Any) -> BatchRun:
    run = BatchRun(
        owner=session.owner,
        session=session,
        ends_session=ends_session,
        **run_columns(batch, session.parallel),
        **extra,
    )
    run.requests.save("requests.jsonl", File(batch.requests), save=False)
    run.save()
    how = "a batch launch" if ends_session else "a run on a running session"
    run.events.create(to_state=run.state, reason=f"{how} of {run.prompts} prompts from {run.name}"[:500])
    return run


def start_run(session: LLMSession, batch: Checked, **extra: Any) -> BatchRun:
    """A batch run on a running session: recorded, then sent to the cluster, where the job starts its runner beside
    the server. The session stays up for chat and the API; by default the run leaves one of its slots free, and on a
    server others use too (shared_server) always, whatever it asked for: its runner talks to the server on the node,
    past the proxy's fair share, so the room for chat is kept by its own concurrency."""
    if session.state != State.RUNNING:
        raise ValidationError(f"The session is {session.get_state_display()}: a run needs it running.")
    if batch.columns.get("replicas", 1) > 1:
        raise ValidationError("Replicas are for batch launches; a run on a session uses its server.")
    with transaction.atomic():
        run = _add_run(session, batch, ends_session=False, **extra)
        if session.parallel > 1 and (batch.columns.get("concurrency") is None or shared_server(session)):
            room = session.parallel - 1
            BatchRun.objects.filter(pk=run.pk, concurrency__gt=room).update(concurrency=room)
        transaction.on_commit(lambda: tasks.stage_batch.delay(str(run.pk)))
    run.refresh_from_db()
    return run


def shared_server(session: LLMSession) -> bool:
    """Whether others than the session's owner use its server now: a grant is in force on it, or it is a service's
    replica."""
    return session.service_id is not None or session.shares.filter(active_shares()).exists()


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
