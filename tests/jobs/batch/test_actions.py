"""What people do to batch runs (jobs/batch/actions.py): a batch launch is one launch, its run created in the same
transaction and its job submitted once; a run on a running session is sent to the cluster once the row commits; a
stop asks once."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ValidationError

from catalog.models import ClusterAccount
from jobs.batch import actions
from jobs.batch.forms import Checked
from jobs.models import BatchRun, LLMSession, State, transition
from jobs.sessions import actions as session_actions
from tests.conftest import LAUNCH
from tests.jobs.batch.test_progress import batch_form

pytestmark = pytest.mark.django_db

BATCH_LAUNCH = {**LAUNCH, "purpose": "batch"}


def checked(prompts: bytes = b"one\ntwo\nthree\n", **fields: Any) -> Checked:
    form = batch_form(prompts, **fields)
    assert form.is_valid(), form.errors
    assert form.checked is not None
    return form.checked


def test_a_batch_launch_creates_its_session_and_run_together_and_submits_once(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as enqueued:
        session = actions.launch(owner, BATCH_LAUNCH, "token-1", batch=checked(max_tokens=5))
    assert len(enqueued) == 1  # the submit; the job takes the run with it
    run = BatchRun.objects.get(session=session)
    assert (run.ends_session, run.prompts, run.defaults) == (True, 3, {"max_tokens": 5})
    assert [e.reason for e in run.events.all()] == ["a batch launch of 3 prompts from p.txt"]
    with django_capture_on_commit_callbacks(execute=False) as again:
        assert actions.launch(owner, BATCH_LAUNCH, "token-1", batch=checked()) == session  # the same request
    assert again == [] and BatchRun.objects.count() == 1


def test_a_batch_launch_over_the_users_limits_counts_every_replica_and_creates_nothing(
    account: ClusterAccount, owner: Any, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.PORTAL_MAX_GPUS_PER_USER = 2
    with django_capture_on_commit_callbacks(execute=False) as enqueued, pytest.raises(ValidationError) as refused:
        actions.launch(owner, BATCH_LAUNCH, batch=checked(replicas=3))
    assert "3 more GPUs" in str(refused.value)
    assert enqueued == [] and not LLMSession.objects.exists() and not BatchRun.objects.exists()


def test_a_launch_whose_addition_fails_rolls_back_and_submits_nothing(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    def refuse(session: LLMSession) -> None:
        assert LLMSession.objects.filter(pk=session.pk).exists()  # inside the launch's transaction, after the row
        raise ValidationError("the run cannot be added")

    with django_capture_on_commit_callbacks(execute=False) as enqueued, pytest.raises(ValidationError):
        session_actions.launch(owner, BATCH_LAUNCH, with_session=refuse)
    assert enqueued == [] and not LLMSession.objects.exists()


def test_replicas_hold_one_node_each(account: ClusterAccount, owner: Any) -> None:
    with pytest.raises(ValidationError, match="ask for 1 node"):
        session_actions.launch(owner, {**BATCH_LAUNCH, "nodes": 2}, replicas=2)


def test_a_run_on_a_running_session_is_sent_once_committed_and_leaves_a_slot_free(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        session = session_actions.launch(owner, BATCH_LAUNCH)
    with pytest.raises(ValidationError, match="a run needs it running"):
        actions.start_run(session, checked())
    transition(session.pk, State.RUNNING, cause="test", host="127.0.0.7", port=8080)
    session.refresh_from_db()
    with pytest.raises(ValidationError, match="Replicas are for batch launches"):
        actions.start_run(session, checked(replicas=2))
    with django_capture_on_commit_callbacks(execute=False) as enqueued:
        run = actions.start_run(session, checked())
    assert len(enqueued) == 1  # stage_batch
    assert (run.ends_session, run.concurrency) == (False, session.parallel - 1)
    assert [e.reason for e in run.events.all()] == ["a run on a running session of 3 prompts from p.txt"]


def test_a_stop_asks_the_job_once_and_a_batch_launchs_stop_cancels_its_session(
    run: BatchRun, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    transition(run.session_id, State.RUNNING, cause="test", host="127.0.0.7", port=8080)
    session = LLMSession.objects.get(pk=run.session_id)
    with django_capture_on_commit_callbacks(execute=False):
        on_session = actions.start_run(session, checked())
    with django_capture_on_commit_callbacks(execute=False) as enqueued:
        actions.stop_run(on_session)
        actions.stop_run(on_session)
    assert len(enqueued) == 1  # stop_batch, once
    on_session.refresh_from_db()
    assert on_session.stop_requested_at is not None

    with django_capture_on_commit_callbacks(execute=False) as enqueued:
        actions.stop_run(run)  # the batch launch's own run: its job ends
    session.refresh_from_db()
    assert len(enqueued) == 1  # cancel_session
    assert session.cancel_reason == "the batch run was stopped from the portal"
