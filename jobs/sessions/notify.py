"""Emails to a session's owner: when it runs, and shortly before its time limit. Each is sent at most once: the
session row is claimed with a conditional UPDATE before the mail goes out."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.mail import send_mail
from django.utils import timezone

from jobs.models import BatchRun, LLMSession, State

log = logging.getLogger(__name__)
EXPIRY_WARNING = timedelta(minutes=15)


def _send(session: LLMSession, subject: str, body: str) -> None:
    send_to(session.owner, subject, body)


def send_to(user: AbstractBaseUser, subject: str, body: str) -> None:
    """One mail to a user with an address (a fine-tune run's end is mailed so too)."""
    address = getattr(user, "email", "")
    if not address:
        return
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, [address])
    except OSError as exc:  # a mail server that is down must not break polling
        log.warning("could not email %s about %s: %s", address, subject, exc)


def session_running(session_id: str) -> bool:
    claimed = LLMSession.objects.filter(pk=session_id, notify_email=True, start_notified_at__isnull=True).update(
        start_notified_at=timezone.now()
    )
    if not claimed:
        return False
    session = LLMSession.objects.select_related("owner", "variant__model", "cluster").get(pk=session_id)
    url = f"{settings.PORTAL_BASE_URL}/sessions/{session.pk}/"
    _send(
        session,
        f"{session.variant.model.name} is running on {session.cluster.name}",
        f"Your session {session.pk} is running on {session.node_list} with {session.walltime_min} minutes "
        f"of walltime.\n\n{url}\n",
    )
    return True


def warn_expiring() -> int:
    """Running sessions with notifications on whose time limit is less than 15 minutes away."""
    now = timezone.now()
    running = LLMSession.objects.filter(
        state=State.RUNNING, notify_email=True, expiry_warned_at__isnull=True, started_at__isnull=False
    )
    due = [
        s for s in running.select_related("owner", "variant__model") if s.ends_at and s.ends_at - now <= EXPIRY_WARNING
    ]
    sent = 0
    for session in due:
        if not LLMSession.objects.filter(pk=session.pk, expiry_warned_at__isnull=True).update(expiry_warned_at=now):
            continue
        _send(
            session,
            f"{session.variant.model.name} stops in {session.time_left_min} minutes",
            f"Your session {session.pk} reaches its time limit at {timezone.localtime(session.ends_at):%H:%M}. "
            "Save what you need; relaunch it from My sessions to go on.\n",
        )
        sent += 1
    return sent


def session_idle_cancelled(session_id: str) -> None:
    session = LLMSession.objects.select_related("owner", "variant__model").get(pk=session_id)
    if session.notify_email:
        _send(
            session,
            f"{session.variant.model.name} was cancelled after {session.idle_cancel_min} idle minutes",
            f"Your session {session.pk} had no requests for {session.idle_cancel_min} minutes and was cancelled, "
            "as you asked at launch. Its chats are kept; relaunch it from My sessions.\n",
        )


def batch_ended(run_id: str) -> bool:
    """A batch run ended: its totals to the owner, once, when the session was launched with email notices."""
    claimed = BatchRun.objects.filter(pk=run_id, session__notify_email=True, notified_at__isnull=True).update(
        notified_at=timezone.now()
    )
    if not claimed:
        return False
    run = BatchRun.objects.select_related("session__owner", "session__variant__model").get(pk=run_id)
    url = f"{settings.PORTAL_BASE_URL}/batch/{run.pk}/"
    wall = (run.finished_at - run.started_at).total_seconds() if run.finished_at and run.started_at else 0.0
    _send(
        run.session,
        f"Batch run {run.name}: {run.get_state_display()}, {run.done} of {run.prompts} answered",
        f"Your batch run of {run.prompts} prompts on {run.session.variant.model.name} {run.get_state_display()}"
        f"{': ' + run.end_reason if run.end_reason else ''}.\n\n"
        f"Answered {run.done}, failed {run.failed}; {run.prompt_tokens} tokens in, {run.completion_tokens} out, "
        f"in {wall / 60:.1f} minutes.\n\n{url}\n",
    )
    return True
