"""The batch pages (jobs/batch/views.py): a run's page with its history and the time its answers may take, for those
who may see its session; the list of my runs; a stop; the admin's read-only view of runs and their history; and the
results' download, streamed from the cluster as uvicorn serves it (tests/asgi.py) and whole to Django's test client."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client

from jobs.batch import outputs
from jobs.models import BatchRun, transition_run
from portal import ssh
from tests import asgi
from tests.jobs.batch.results import Results

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


@pytest.mark.django_db(transaction=True)
@pytest.mark.filterwarnings("error:StreamingHttpResponse must consume")  # Django reads the iterator whole
def test_a_download_sends_its_first_results_before_the_cluster_has_sent_the_rest(
    run: BatchRun, owner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = Results(monkeypatch, count=3)
    headers = asgi.browser(owner)

    async def download() -> tuple[int, str, bytes, bytes]:
        async with (
            asgi.client(headers) as page,
            page.stream("GET", f"/batch/{run.pk}/output/jsonl") as reply,
        ):
            pieces = reply.aiter_raw()
            first = await anext(pieces)  # while the cluster's stream waits for it
            results.seen.set()
            return reply.status_code, reply.headers["content-type"], first, b"".join([p async for p in pieces])

    status, content_type, first, rest = asgi.run(download())
    assert (status, content_type) == (200, "application/jsonl")
    assert [json.loads(line)["reply"] for line in first.splitlines()] == ["answer 1"]
    assert [json.loads(line)["line"] for line in (first + rest).splitlines()] == [1, 2, 3]
    assert results.closed.is_set()


@pytest.mark.django_db(transaction=True)
def test_a_client_that_leaves_a_download_closes_its_stream_from_the_cluster(
    run: BatchRun, owner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = Results(monkeypatch, count=None)  # endless
    headers = asgi.browser(owner)

    async def leave_after_the_first_results() -> None:
        async with (
            asgi.client(headers) as page,
            page.stream("GET", f"/batch/{run.pk}/output/openai") as reply,
        ):
            assert json.loads((await anext(reply.aiter_raw())).splitlines()[0])["custom_id"] == "line-1"
            results.seen.set()

    asgi.run(leave_after_the_first_results())  # returns once the application has finished with the request
    assert results.closed.is_set()


def test_django_s_test_client_gets_a_download_whole_as_wsgi_serves_it(
    run: BatchRun, owner: Any, other_user: Any, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = Results(monkeypatch, count=3)
    results.seen.set()
    client.force_login(owner)
    reply = client.get(f"/batch/{run.pk}/output/csv")
    assert reply.streaming and reply["Content-Disposition"] == 'attachment; filename="p-csv-results.csv"'
    rows = b"".join(reply.streaming_content).decode().splitlines()  # type: ignore[attr-defined]
    assert rows[0].startswith("line,id,prompt,reply") and [row.split(",")[3] for row in rows[1:]] == [
        "answer 1", "answer 2", "answer 3"
    ]  # fmt: skip
    client.force_login(other_user)
    assert client.get(f"/batch/{run.pk}/output/csv").status_code == 404


def test_a_csv_download_from_the_cluster_defuses_formulas_and_holds_no_line_past_the_bound(
    run: BatchRun, owner: Any, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The results as staging.results reads them over SSH (for the page, `manage.py batch output` and the Files API
    alike): a formula in the owner's records is quoted, and a line past the bound is cut as it streams by."""
    bound = 1 << 20
    monkeypatch.setattr(outputs, "MAX_RECORD_BYTES", bound)
    monkeypatch.setattr(ssh.pool, "run", lambda *args, **kwargs: ssh.CommandResult(0, "yes\n", ""))

    def cluster(*args: Any, **kwargs: Any) -> Iterator[bytes]:
        yield json.dumps({"line": 1, "id": "=cmd()", "error": "@x", "response": None}).encode() + b"\n"
        yield b'{"line": 2, "id": "q2", "response": "'
        for _ in range(4 * bound // 65536):
            yield b"y" * 65536
        yield b'"}\n'

    monkeypatch.setattr(ssh.pool, "read", cluster)
    client.force_login(owner)
    rows = b"".join(client.get(f"/batch/{run.pk}/output/csv").streaming_content).decode()  # type: ignore[attr-defined]
    _, first, second = csv.reader(io.StringIO(rows, newline=""))
    assert first[1] == "'=cmd()" and first[-1] == "'@x"
    assert second[:2] == ["2", "q2"] and second[-1] == "the result is longer than 1,048,576 bytes and was left out"
