"""The batch pages (jobs/batch/views.py): a run's page with its history and the time its answers may take, for those
who may see its session; the list of my runs; a stop; and the admin's read-only view of runs and their history."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from jobs.models import BatchRun, transition_run

pytestmark = pytest.mark.django_db


def test_a_runs_page_shows_each_change_of_its_state_with_the_reason(
    run: BatchRun, owner: Any, other_user: Any, client: Client
) -> None:
    transition_run(run.pk, BatchRun.State.RUNNING, reason="the runner is sending the prompts")
    transition_run(run.pk, BatchRun.State.FAILED, reason="the job gave the run up: no python3", end_reason="x")
    client.force_login(owner)
    page = client.get(f"/batch/{run.pk}/").content.decode()
    assert "a batch launch of 3 prompts from p.txt" in page
    assert "waiting → <strong>running</strong>: the runner is sending the prompts" in page
    assert "running → <strong>failed</strong>: the job gave the run up: no python3" in page
    polled = client.get(f"/batch/{run.pk}/", headers={"HX-Request": "true"}).content.decode()
    assert "the job gave the run up" in polled and "<h1>" not in polled  # the polled part carries the history
    client.force_login(other_user)
    assert client.get(f"/batch/{run.pk}/").status_code == 404


def test_admins_see_a_runs_history_and_cannot_edit_or_add_runs(run: BatchRun, admin_client: Client) -> None:
    transition_run(run.pk, BatchRun.State.RUNNING, reason="the runner is sending the prompts")
    page = admin_client.get(f"/admin/jobs/batchrun/{run.pk}/change/").content.decode()
    assert "the runner is sending the prompts" in page and "a batch launch of 3 prompts" in page
    assert 'name="state"' not in page  # read-only: the state changes through transition_run
    assert "p.txt" in admin_client.get("/admin/jobs/batchrun/").content.decode()
    assert admin_client.get("/admin/jobs/batchrun/add/").status_code == 403


def test_an_admin_stops_a_runs_job_from_the_list(
    run: BatchRun, admin_client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        response = admin_client.post("/admin/jobs/batchrun/", {"action": "stop_runs", "_selected_action": [run.pk]})
    assert response.status_code == 302
    # A batch launch's run stops with its job: the session is cancelled.
    assert run.session.events.filter(cause__startswith="batch run stopped").exists()


def test_a_new_runs_page_shows_the_most_its_answers_take_at_the_measured_pace(
    run: BatchRun, owner: Any, client: Any, other_user: Any
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    client.force_login(owner)
    assert "at most about" not in client.get(f"/batch/{run.pk}/").content.decode()  # no history yet
    earlier = BatchRun.objects.get(pk=run.pk)
    earlier.pk = None  # a finished run of the same model on the same GPU type, 10 tokens/s
    earlier.save()
    started = timezone.now() - timedelta(seconds=100)
    BatchRun.objects.filter(pk=earlier.pk).update(
        state="finished",
        done=3,
        completion_tokens=1000,
        started_at=started,
        finished_at=started + timedelta(seconds=100),
    )
    page = client.get(f"/batch/{run.pk}/").content.decode()
    assert "at most about 1 min" in page  # 3 answers x 5 tokens at 10 tokens/s: under a minute, shown as 1
    client.force_login(other_user)
    assert client.get(f"/batch/{run.pk}/").status_code == 404


def test_my_batch_runs_lists_mine_only_in_a_fixed_number_of_queries(
    run: BatchRun, owner: Any, other_user: Any, client: Client, django_assert_num_queries: Any
) -> None:
    second = BatchRun.objects.get(pk=run.pk)
    second.pk = None
    second.name = "second.txt"
    second.save()
    client.force_login(owner)
    with django_assert_num_queries(3):  # the session, the user, the runs with their models
        page = client.get("/batch/").content.decode()
    assert "p.txt" in page and "second.txt" in page
    client.force_login(other_user)
    assert "p.txt" not in client.get("/batch/").content.decode()


def test_stopping_a_run_from_its_page_is_for_those_who_may_see_it(
    run: BatchRun, owner: Any, other_user: Any, client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    client.force_login(other_user)
    assert client.post(f"/batch/{run.pk}/stop").status_code == 404
    client.force_login(owner)
    with django_capture_on_commit_callbacks(execute=False):
        assert client.post(f"/batch/{run.pk}/stop")["Location"] == f"/batch/{run.pk}/"
    assert run.session.events.filter(cause__startswith="batch run stopped").exists()
