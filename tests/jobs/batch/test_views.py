"""The batch pages (jobs/batch/views.py): a run's page shows its history to those who may see its session, and the
admin shows it too, read-only."""

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
