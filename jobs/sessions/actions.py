"""What people do to sessions, the one path for pages, the API, the admin and `manage.py sessions`: launch one,
cancel one, ask for its log. Each writes the database and enqueues the worker's part once the write commits. (What
people do to batch runs, batch launches included, is jobs/batch/actions.py, which builds on these.)"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from jobs import tasks
from jobs.cluster import logs
from jobs.models import LLMSession
from jobs.sessions import launching, lifecycle


def launch(
    user: User,
    data: Mapping[str, Any],
    request_token: str = "",
    *,
    replicas: int = 1,
    with_session: Callable[[LLMSession], object] | None = None,
) -> LLMSession:
    """Validate a request (LaunchForm), create the session and enqueue its submit once the row is committed.
    A request_token seen before for this user returns that session instead of a second one.

    `replicas`: servers of their own, one node each (a batch launch's, jobs/batch/actions.py); the user's limits
    count all of them. `with_session` adds what goes with the session (a batch launch's run) in the same
    transaction, before the submit is enqueued: if it raises, nothing is created and nothing submitted."""
    with transaction.atomic():
        session, created = launching.create(user, data, request_token, replicas=replicas, with_session=with_session)
        if created:
            transaction.on_commit(lambda: tasks.submit_session.delay(str(session.pk)))
    return session


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
