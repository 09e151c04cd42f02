"""Batch runs recorded in the database, nothing enqueued: the part of jobs/batch/actions.py that code below the
tasks (jobs/finetune/advancing.py, which a task calls) shares with it. The caller stages the run once the write
commits (actions.start_run, or the task that called)."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.files import File
from django.db import transaction

from jobs.batch.forms import Checked, run_columns
from jobs.models import BatchRun, LLMSession, State, active_shares


def add_run(session: LLMSession, batch: Checked, ends_session: bool, **extra: Any) -> BatchRun:
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


def on_session(session: LLMSession, batch: Checked, **extra: Any) -> BatchRun:
    """A batch run on a running session, recorded (actions.start_run says what it is): checked, added, and its
    concurrency kept within the room the session leaves for chat."""
    if session.state != State.RUNNING:
        raise ValidationError(f"The session is {session.get_state_display()}: a run needs it running.")
    if batch.columns.get("replicas", 1) > 1:
        raise ValidationError("Replicas are for batch launches; a run on a session uses its server.")
    with transaction.atomic():
        run = add_run(session, batch, ends_session=False, **extra)
        if session.parallel > 1 and (batch.columns.get("concurrency") is None or shared_server(session)):
            room = session.parallel - 1
            BatchRun.objects.filter(pk=run.pk, concurrency__gt=room).update(concurrency=room)
    run.refresh_from_db()
    return run


def shared_server(session: LLMSession) -> bool:
    """Whether others than the session's owner use its server now: a grant is in force on it, or it is a service's
    replica."""
    return session.service_id is not None or session.shares.filter(active_shares()).exists()
