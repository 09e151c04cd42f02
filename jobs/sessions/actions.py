"""What people do to sessions, the one path for pages, the API, the admin and `manage.py sessions`: launch one,
cancel one, ask for its log. Each writes the database and enqueues the worker's part once the write commits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.files import File
from django.db import IntegrityError, transaction
from django.utils import timezone

from jobs import tasks
from jobs.batch import forms as batch_forms
from jobs.cluster import logs
from jobs.models import BatchRun, LLMSession, State
from jobs.sessions import lifecycle, limits
from jobs.sessions.forms import LaunchForm, form_errors


def launch(
    user: User, data: Mapping[str, Any], request_token: str = "", batch: batch_forms.Checked | None = None
) -> LLMSession:
    """Validate a request (LaunchForm), create the session and enqueue its submit once the row is committed.
    A request_token seen before for this user returns that session instead of a second one. With `batch` (a checked
    prompts file, BatchForm) it is a batch launch: the job works through the file and ends itself."""
    if request_token:
        earlier = LLMSession.objects.filter(owner=user, request_token=request_token).first()
        if earlier is not None:
            return earlier
    form = LaunchForm(data, user=user)
    if not form.is_valid():
        raise form_errors(form)
    columns = form.session_columns()
    if batch is not None and batch.columns.get("replicas", 1) > 1 and columns["nodes"] > 1:
        raise ValidationError({"nodes": "A batch launch with replicas runs each on one node; ask for 1 node."})
    try:
        with transaction.atomic():
            # Checked again under a lock on the user: two launches at once cannot both take the last place.
            User.objects.select_for_update().filter(pk=user.pk).first()
            replicas = batch.columns.get("replicas", 1) if batch else 1
            limits.check(user, columns["cluster"], columns["gpus_per_node"] * columns["nodes"] * replicas)
            session = LLMSession.objects.create(owner=user, request_token=request_token, **columns)
            session.events.create(to_state=State.PENDING, cause=f"requested by {user.get_username()}")
            if batch is not None:
                _add_run(session, batch, ends_session=True)
            transaction.on_commit(lambda: tasks.submit_session.delay(str(session.pk)))
    except IntegrityError:
        if not request_token:
            raise
        return LLMSession.objects.get(owner=user, request_token=request_token)  # the other submit won the race
    return session


def _add_run(session: LLMSession, batch: batch_forms.Checked, ends_session: bool, **extra: Any) -> BatchRun:
    run = BatchRun(
        owner=session.owner,
        session=session,
        ends_session=ends_session,
        **batch_forms.run_columns(batch, session.parallel),
        **extra,
    )
    run.requests.save("requests.jsonl", File(batch.requests), save=False)
    run.save()
    how = "a batch launch" if ends_session else "a run on a running session"
    run.events.create(to_state=run.state, reason=f"{how} of {run.prompts} prompts from {run.name}"[:500])
    return run


def start_run(session: LLMSession, batch: batch_forms.Checked, **extra: Any) -> BatchRun:
    """A batch run on a running session: recorded, then sent to the cluster, where the job starts its runner beside
    the server. The session stays up for chat and the API; by default the run leaves one of its slots free."""
    if session.state != State.RUNNING:
        raise ValidationError(f"The session is {session.get_state_display()}: a run needs it running.")
    if batch.columns.get("replicas", 1) > 1:
        raise ValidationError("Replicas are for batch launches; a run on a session uses its server.")
    with transaction.atomic():
        run = _add_run(session, batch, ends_session=False, **extra)
        if batch.columns.get("concurrency") is None and session.parallel > 1:
            BatchRun.objects.filter(pk=run.pk).update(concurrency=session.parallel - 1)
        transaction.on_commit(lambda: tasks.stage_batch.delay(str(run.pk)))
    run.refresh_from_db()
    return run


def stop_run(run: BatchRun) -> None:
    """Stop a batch run, keeping what is answered: a batch launch's job is cancelled; on a running session, the job
    is asked to stop the runner."""
    if run.is_ended:
        return
    if run.ends_session:
        request_cancel(run.session, "batch run stopped", "the batch run was stopped from the portal")
        return
    if BatchRun.objects.filter(pk=run.pk, stop_requested_at__isnull=True).update(stop_requested_at=timezone.now()):
        transaction.on_commit(lambda: tasks.stop_batch.delay(str(run.pk)))


def request_cancel(session: LLMSession, cause: str, end_reason: str = "cancelled from the portal") -> None:
    """Ask for the end of a session: at once when nothing was submitted, else through scancel in a task.
    `cause` goes into the session's history; `end_reason` is what the card says once Slurm confirms."""
    if lifecycle.mark_cancel(session.pk, cause, end_reason):
        transaction.on_commit(lambda: tasks.cancel_session.delay(str(session.pk)))


def job_log(session: LLMSession) -> logs.LogTail | None:
    """The cached tail of the job's log for a page, asking the worker for a fresh one when it is due."""
    tail = logs.cached(session.pk)
    if logs.claim_refresh(session, tail):
        transaction.on_commit(lambda: tasks.fetch_log.delay(str(session.pk)))
    return tail


def delete(session: LLMSession) -> None:
    """An ended session leaves its owner's pages; its conversations and batch runs go with it. The row stays, hidden
    (deleted_at), for the site's usage records: the GPU-hours it held and the requests made through the portal."""
    with transaction.atomic():
        session.conversations.all().delete()
        for run in session.batch_runs.all():
            run.requests.delete(save=False)
            run.delete()
        session.shares.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        LLMSession.objects.filter(pk=session.pk).update(deleted_at=timezone.now(), alias="")
