"""A fine-tune run holds a GPU as a session does: the user's live runs count in the per-user GPU limit of their
cluster (jobs/sessions/limits.py), for a session's launch and a run's alike, and the refusal says what holds them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from catalog.models import Cluster, ClusterAccount
from jobs.models import FineTuneRun, transition_finetune
from jobs.sessions.actions import launch
from jobs.sessions.forms import LaunchForm
from tests.conftest import LAUNCH

pytestmark = pytest.mark.django_db


def test_a_live_runs_gpu_counts_in_the_users_gpu_limit_and_the_refusal_says_so(
    start: Callable[..., FineTuneRun], owner: Any, settings: Any
) -> None:
    settings.PORTAL_MAX_GPUS_PER_USER = 2
    run = start()  # queued: it will hold its GPU
    refused = LaunchForm({**LAUNCH, "gpus": 2}, user=owner)
    assert not refused.is_valid()
    message = " ".join(map(str, refused.errors["gpus"]))
    assert "2 more GPUs would make 3 in use on Local test cluster (0 held by your sessions, 1 by your fine-tune runs)" \
        in message and "at most 2 there" in message  # fmt: skip
    assert LaunchForm(LAUNCH, user=owner).is_valid()  # one GPU still free
    transition_finetune(run.pk, FineTuneRun.State.COMPLETED, reason="trained")
    assert LaunchForm({**LAUNCH, "gpus": 2}, user=owner).is_valid()  # an ended run holds none


def test_a_run_is_refused_when_sessions_and_runs_hold_the_users_gpus(
    start: Callable[..., FineTuneRun], owner: Any, other_user: Any, settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    settings.PORTAL_MAX_GPUS_PER_USER = 2
    with django_capture_on_commit_callbacks(execute=False):
        launch(owner, LAUNCH)
    start()
    with pytest.raises(ValidationError, match=r"\(1 held by your sessions, 1 by your fine-tune runs\)"):
        start()
    assert FineTuneRun.objects.filter(owner=owner).count() == 1
    ClusterAccount.objects.create(cluster=Cluster.objects.get(slug="local"), user=other_user, username="grace")
    assert start(user=other_user).state == FineTuneRun.State.QUEUED  # another user's runs are theirs


def test_a_live_run_counts_in_the_users_live_session_limit_and_the_refusal_says_so(
    start: Callable[..., FineTuneRun], owner: Any, settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    settings.PORTAL_MAX_SESSIONS_PER_USER = 2
    run = start()  # queued: a job of the user's on the cluster
    with django_capture_on_commit_callbacks(execute=False):
        launch(owner, LAUNCH)
    refused = LaunchForm(LAUNCH, user=owner)
    assert not refused.is_valid()
    message = " ".join(map(str, refused.errors["cluster"]))
    assert "1 live session and 1 live fine-tune run (a fine-tune run counts as a session)" in message
    with pytest.raises(ValidationError, match="a fine-tune run counts as a session"):
        start()  # a run is refused by the same limit, checked again under the launch lock
    transition_finetune(run.pk, FineTuneRun.State.COMPLETED, reason="trained")
    assert LaunchForm(LAUNCH, user=owner).is_valid()  # an ended run holds no place


def test_runs_alone_can_fill_the_live_session_limit(
    start: Callable[..., FineTuneRun], owner: Any, settings: Any
) -> None:
    settings.PORTAL_MAX_SESSIONS_PER_USER = 1
    start()
    refused = LaunchForm(LAUNCH, user=owner)
    assert not refused.is_valid()
    assert "You have 0 live sessions and 1 live fine-tune run" in " ".join(map(str, refused.errors["cluster"]))
