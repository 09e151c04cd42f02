"""Emails when a session runs and before its time is up: sent once each, only when asked for."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.core import mail
from django.utils import timezone

from catalog.models import ClusterAccount
from jobs import tasks
from jobs.cluster import remote
from jobs.models import LLMSession, State, transition
from jobs.sessions import lifecycle, notify
from jobs.sessions.actions import launch
from portal.slurm.squeue import QueuedJob
from tests.conftest import LAUNCH


@pytest.fixture
def session(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> LLMSession:
    with django_capture_on_commit_callbacks(execute=False):
        s = launch(owner, {**LAUNCH, "notify": True})
    transition(s.pk, State.QUEUED, cause="test", job_id="42")
    return LLMSession.objects.get(pk=s.pk)


def running_poll(s: LLMSession) -> remote.PollResult:
    job = QueuedJob("42", "x", "RUNNING", "", None, "node1", 0, 60, "gpu", 1)
    return remote.PollResult(
        squeue_ok=True,
        complete=True,
        queued={"42": job},
        connections={str(s.pk): {"host": "127.0.0.3", "port": 5000}},
        node_names={"node1": {"node1", "127.0.0.3"}},
    )


def test_the_owner_gets_one_email_when_the_session_runs(session: LLMSession) -> None:
    assert session.notify_email
    lifecycle.apply_poll(session, running_poll(session))
    session.refresh_from_db()
    lifecycle.apply_poll(session, running_poll(session))
    assert len(mail.outbox) == 1
    assert "tiny-llama is running on Local test cluster" in mail.outbox[0].subject
    assert mail.outbox[0].to == ["ada@example.edu"]


def test_no_email_unless_asked(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        s = launch(owner, LAUNCH)
    transition(s.pk, State.QUEUED, cause="test", job_id="42")
    s.refresh_from_db()
    lifecycle.apply_poll(s, running_poll(s))
    assert mail.outbox == []


def test_a_warning_goes_out_once_fifteen_minutes_before_the_time_limit(session: LLMSession) -> None:
    transition(session.pk, State.RUNNING, cause="test", started_at=timezone.now() - timedelta(minutes=10))
    assert notify.warn_expiring() == 0  # 20 minutes left
    LLMSession.objects.filter(pk=session.pk).update(started_at=timezone.now() - timedelta(minutes=16))
    assert notify.warn_expiring() == 1
    assert notify.warn_expiring() == 0
    assert "stops in 14 minutes" in mail.outbox[-1].subject or "stops in 13 minutes" in mail.outbox[-1].subject


def test_an_idle_session_is_cancelled_as_asked_and_says_why(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        s = launch(owner, {**LAUNCH, "idle_cancel": 30, "notify": True})
    transition(s.pk, State.RUNNING, cause="test", job_id="42", ready_at=timezone.now() - timedelta(minutes=10))
    with django_capture_on_commit_callbacks(execute=False):
        assert tasks.cancel_idle() == 0  # 10 minutes idle of 30
        LLMSession.objects.filter(pk=s.pk).update(last_activity_at=timezone.now() - timedelta(minutes=31))
        assert tasks.cancel_idle() == 1
        assert tasks.cancel_idle() == 0  # asked once
    s.refresh_from_db()
    assert s.cancel_requested_at is not None and s.cancel_reason.startswith("idle for 30 minutes")
    assert "cancelled after 30 idle minutes" in mail.outbox[-1].subject
    record = {"JobState": "CANCELLED", "ExitCode": "0:15"}
    lifecycle.apply_poll(
        s, remote.PollResult(squeue_ok=True, complete=True, finished={"42": record}, asked_gone={"42"})
    )
    s.refresh_from_db()
    assert s.state == State.CANCELLED and s.end_reason.startswith("idle for 30 minutes")
