"""Batch runs end to end on the local cluster with the real llama-server: a batch launch works through its prompts
file and the job ends itself; killed in the middle, the runner starts again and answers every line exactly once."""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils.datastructures import MultiValueDict

from jobs.batch.forms import BatchForm
from jobs.cluster import backend
from jobs.models import BatchRun, LLMSession, State
from jobs.sessions.actions import launch
from jobs.tasks import submit_session
from portal import ssh
from tests.conftest import LAUNCH
from tests.e2e.sessions import cancel_all_jobs, drive, local_account, shell

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]


@pytest.fixture
def account(local_catalog: dict[str, Any], owner: Any) -> Iterator[None]:
    local_account(owner, local_catalog)
    yield
    cancel_all_jobs()
    ssh.pool.close_all()
    backend.close_forwards()


def batch_launch(owner: Any, capture: Any, prompts: list[str], **batch: Any) -> tuple[LLMSession, BatchRun]:
    form = BatchForm(
        {"max_tokens": 8, "temperature": 0, **batch},
        MultiValueDict({"prompts": [SimpleUploadedFile("questions.txt", "\n".join(prompts).encode())]}),
    )
    assert form.is_valid(), form.errors
    with capture(execute=False):
        session = launch(owner, {**LAUNCH, "purpose": "batch"}, batch=form.checked)
    submit_session.apply(args=(str(session.pk),))
    return LLMSession.objects.get(pk=session.pk), BatchRun.objects.get(session=session)


def run_file(local_catalog: dict[str, Any], run: BatchRun, name: str) -> list[dict[str, Any]]:
    text = shell(local_catalog, f"cat ~/.hpc-llm-portal/sessions/{run.session_id}/batch/{run.pk}/{name}").stdout
    return [json.loads(line) for line in io.StringIO(text) if line.strip()]


def test_a_batch_launch_answers_every_line_in_order_and_the_job_ends_itself(
    account: None, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any]
) -> None:
    prompts = [f"Question number {i}?" for i in range(200)]
    session, run = batch_launch(owner, django_capture_on_commit_callbacks, prompts)
    assert (run.prompts, run.concurrency, run.ends_session) == (200, 4, True)
    session = drive(session, lambda s: s.is_ended, timeout_s=300)
    assert session.state == State.COMPLETED, session.end_reason
    run.refresh_from_db()
    assert (run.state, run.done, run.failed, run.remaining) == (BatchRun.State.FINISHED, 200, 0, 0)
    assert run.completion_tokens > 0 and run.prompt_tokens > 0 and run.finished_at is not None
    output = run_file(local_catalog, run, "output.jsonl")
    assert [r["id"] for r in output] == [f"line-{i}" for i in range(1, 201)]
    assert all(r["error"] is None and r["response"]["choices"][0]["message"] for r in output)
    assert {r["response"]["usage"]["completion_tokens"] for r in output} <= set(range(1, 9))  # max_tokens reached them


def test_a_runner_killed_in_the_middle_starts_again_and_answers_each_line_once(
    account: None, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any]
) -> None:
    prompts = [f"Tell me about the number {i}." for i in range(200)]
    session, run = batch_launch(owner, django_capture_on_commit_callbacks, prompts, max_tokens=32, concurrency=2)
    results = f"~/.hpc-llm-portal/sessions/{session.pk}/batch/{run.pk}/results.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        drive(session, lambda s: True)
        count = shell(local_catalog, f"cat {results} 2>/dev/null | wc -l").stdout.strip()
        if count.isdigit() and int(count) >= 20:
            break
        time.sleep(0.5)
    killed = subprocess.run(["pkill", "-KILL", "-f", f"batchrun.py --requests .*{run.pk}"], capture_output=True)
    assert killed.returncode == 0, "no runner to kill"
    session = drive(session, lambda s: s.is_ended, timeout_s=300)
    assert session.state == State.COMPLETED, session.end_reason
    answered = run_file(local_catalog, run, "results.jsonl")
    assert sorted(r["line"] for r in answered) == list(range(1, 201))  # every line, none twice
    assert len(run_file(local_catalog, run, "output.jsonl")) == 200
    log = shell(local_catalog, f"cat ~/.hpc-llm-portal/sessions/{session.pk}/job.log").stdout
    assert "the batch runner stopped with code 137; starting it again" in log
    run.refresh_from_db()
    assert (run.state, run.done) == (BatchRun.State.FINISHED, 200)


def test_a_cancelled_batch_launch_stops_its_run_and_keeps_what_is_done(
    account: None, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any]
) -> None:
    from jobs.sessions.actions import request_cancel
    from jobs.tasks import cancel_session

    session, run = batch_launch(owner, django_capture_on_commit_callbacks, [f"p{i}" for i in range(2000)])
    session = drive(session, lambda s: s.state == State.RUNNING or s.is_ended, timeout_s=120)
    request_cancel(session, "test")
    cancel_session.apply(args=(str(session.pk),))
    session = drive(session, lambda s: s.is_ended)
    assert session.state == State.CANCELLED
    run.refresh_from_db()
    assert run.state == BatchRun.State.STOPPED and "ended before the run did" in run.end_reason
    assert run.done <= len(run_file(local_catalog, run, "results.jsonl")) < 2000  # the last poll may lag
