"""Batch runs end to end on the local cluster with the real llama-server: a batch launch works through its prompts
file and the job ends itself; killed in the middle, the runner starts again and answers every line exactly once."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.test import Client
from django.utils.datastructures import MultiValueDict

from catalog.models import ClusterAccount
from jobs.batch import actions as batch_actions
from jobs.batch.forms import BatchForm
from jobs.cluster import backend, layout
from jobs.models import BatchRun, LLMSession, State
from jobs.sessions.actions import launch
from jobs.tasks import submit_session
from tests.conftest import LAUNCH
from tests.e2e.sessions import drive, shell

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]


def batch_launch(owner: Any, capture: Any, prompts: list[str], **batch: Any) -> tuple[LLMSession, BatchRun]:
    form = BatchForm(
        {"max_tokens": 8, "temperature": 0, **batch},
        MultiValueDict({"prompts": [SimpleUploadedFile("questions.txt", "\n".join(prompts).encode())]}),
    )
    assert form.is_valid(), form.errors
    assert form.checked is not None
    with capture(execute=False):
        session = batch_actions.launch(owner, {**LAUNCH, "purpose": "batch"}, batch=form.checked)
    submit_session.apply(args=(str(session.pk),))
    return LLMSession.objects.get(pk=session.pk), BatchRun.objects.get(session=session)


def run_file(local_catalog: dict[str, Any], run: BatchRun, name: str) -> list[dict[str, Any]]:
    result = shell(local_catalog, f"cat ~/{layout.session_dir(str(run.session_id))}/batch/{run.pk}/{name}")
    records = []
    for number, line in enumerate(result.stdout.split("\n"), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise AssertionError(f"{name} line {number}: {exc}: {line!r} ({len(result.stdout)} chars)") from None
    return records


def test_a_batch_launch_answers_every_line_in_order_and_the_job_ends_itself(
    account: ClusterAccount, owner: Any, other_user: Any, django_capture_on_commit_callbacks: Any,
    local_catalog: dict[str, Any],
) -> None:  # fmt: skip
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

    # The downloads, streamed from the cluster through the portal, for the owner only.
    browser = Client()
    browser.force_login(owner)
    page = browser.get(f"/batch/{run.pk}/").content.decode()
    assert "<strong>200</strong> answered" in page and "hx-trigger" not in page  # ended: no more polling
    plain = [json.loads(line) for line in streamed(browser, f"/batch/{run.pk}/output/jsonl").splitlines()]
    assert [(r["line"], r["id"]) for r in plain] == [(i, f"line-{i}") for i in range(1, 201)]
    assert all(isinstance(r["reply"], str) and r["finish_reason"] and r["completion_tokens"] for r in plain)
    rows = list(csv.reader(io.StringIO(streamed(browser, f"/batch/{run.pk}/output/csv"))))
    assert rows[0][:4] == ["line", "id", "prompt", "reply"] and len(rows) == 201
    assert rows[1][2] == "Question number 0?" and rows[200][2] == "Question number 199?"
    shaped = json.loads(streamed(browser, f"/batch/{run.pk}/output/openai").splitlines()[0])
    assert shaped["custom_id"] == "line-1" and shaped["response"]["status_code"] == 200 and shaped["error"] is None
    # The same from the command line.
    shown = io.StringIO()
    call_command("batch", "show", str(run.pk)[:8], "--json", stdout=shown)
    figures = json.loads(shown.getvalue())
    assert (figures["done"], figures["state"], figures["replicas"]) == (200, "finished", 1) and figures[
        "gpu_hours"
    ] >= 0
    downloaded = io.StringIO()
    call_command("batch", "output", str(run.pk), "--format", "jsonl", stdout=downloaded)
    assert downloaded.getvalue().encode() == streamed(browser, f"/batch/{run.pk}/output/jsonl").encode()
    intruder = Client()
    intruder.force_login(other_user)
    assert intruder.get(f"/batch/{run.pk}/").status_code == 404
    assert intruder.get(f"/batch/{run.pk}/output/jsonl").status_code == 404


def streamed(client: Client, url: str) -> str:
    reply = client.get(url)
    assert reply.status_code == 200 and reply.streaming, (url, reply.status_code)
    return b"".join(reply.streaming_content).decode()  # type: ignore[attr-defined]


def test_a_malformed_prompts_file_is_refused_with_line_numbers_and_starts_nothing(
    account: ClusterAccount, owner: Any, client: Client
) -> None:
    client.force_login(owner)
    query = "&".join(f"{k}={v}" for k, v in {**LAUNCH, "purpose": "batch"}.items())
    page = client.get(f"/batch/new/?{query}")
    assert page.status_code == 200 and 'enctype="multipart/form-data"' in page.content.decode()
    bad = SimpleUploadedFile("bad.jsonl", b'{"prompt": "fine"}\n{"prompt": "x", "temprature": 1}\n{oops\n')
    reply = client.post("/batch/new/", {**LAUNCH, "purpose": "batch", "prompts": bad})
    text = reply.content.decode()
    assert reply.status_code == 200
    assert "line 2: unknown field temprature" in text and "line 3: invalid JSON" in text
    assert not LLMSession.objects.exists() and not BatchRun.objects.exists()
    good = SimpleUploadedFile("good.txt", b"What is 1+1?\nWhat is 2+2?\n")
    reply = client.post("/batch/new/", {**LAUNCH, "purpose": "batch", "prompts": good, "max_tokens": 4})
    run = BatchRun.objects.get()
    assert reply.status_code == 302 and reply["Location"] == f"/batch/{run.pk}/"
    assert (run.prompts, run.name, run.defaults) == (2, "good.txt", {"max_tokens": 4})


def test_a_batch_launch_over_two_replicas_spreads_the_prompts_and_ends_itself(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any]
) -> None:
    prompts = [f"Replica question {i}?" for i in range(200)]
    session, run = batch_launch(owner, django_capture_on_commit_callbacks, prompts, replicas=2)
    assert run.replicas == 2
    session = drive(session, lambda s: s.is_ended, timeout_s=300)
    assert session.state == State.COMPLETED, session.end_reason
    assert len(session.node_list.split(",")) == 2 or "[" in session.node_list  # the job held two nodes
    run.refresh_from_db()
    assert (run.state, run.done) == (BatchRun.State.FINISHED, 200)
    log = shell(local_catalog, f"cat ~/{layout.session_dir(str(session.pk))}/job.log").stdout
    assert "replica 0 ready at" in log and "on each of 2 server(s)" in log
    # Both servers answered: llama-server logs each request it serves, and each replica writes to the job log.
    assert [r["line"] for r in run_file(local_catalog, run, "output.jsonl")] == list(range(1, 201))


def results_on_node(local_catalog: dict[str, Any], run: BatchRun) -> Path:
    """The run's results file, read straight off this host's disk: the local cluster's home is here, and a test that
    waits for the middle of a run must not spend its time on SSH round trips."""
    return (
        Path(local_catalog["home"])
        / layout.SESSIONS_DIR
        / str(run.session_id)
        / "batch"
        / str(run.pk)
        / ("results.jsonl")
    )


def wait_for_answers(path: Path, at_least: int, timeout_s: float = 180) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        count = path.read_bytes().count(b"\n") if path.exists() else 0
        if count >= at_least:
            return count
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} answers in {path} after {timeout_s}s")


def test_a_runner_killed_in_the_middle_starts_again_and_answers_each_line_once(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any]
) -> None:
    # Long enough that the kill lands in the middle: 1000 answers of 48 tokens, 2 at a time.
    prompts = [f"Tell me about the number {i}." for i in range(1000)]
    session, run = batch_launch(owner, django_capture_on_commit_callbacks, prompts, max_tokens=48, concurrency=2)
    wait_for_answers(results_on_node(local_catalog, run), 20)
    killed = subprocess.run(["pkill", "-KILL", "-f", f"batchrun.py --requests .*{run.pk}"], capture_output=True)
    assert killed.returncode == 0, "no runner to kill"
    session = drive(session, lambda s: s.is_ended, timeout_s=300)
    assert session.state == State.COMPLETED, session.end_reason
    answered = run_file(local_catalog, run, "results.jsonl")
    assert sorted(r["line"] for r in answered) == list(range(1, 1001))  # every line, none twice
    assert len(run_file(local_catalog, run, "output.jsonl")) == 1000
    log = shell(local_catalog, f"cat ~/{layout.session_dir(str(session.pk))}/job.log").stdout
    assert f"the runner of batch run {run.pk} stopped with code 137" in log
    assert f"starting the runner of batch run {run.pk} again (1 of 5 restarts)" in log
    run.refresh_from_db()
    assert (run.state, run.done) == (BatchRun.State.FINISHED, 1000)


def test_a_requeued_batch_launch_goes_on_where_it_stopped_and_answers_each_line_once(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any]
) -> None:
    prompts = [f"Requeue question {i}." for i in range(1000)]  # long enough that the requeue lands in the middle
    session, run = batch_launch(owner, django_capture_on_commit_callbacks, prompts, max_tokens=48, concurrency=2)
    results = f"~/{layout.session_dir(str(session.pk))}/batch/{run.pk}/results.jsonl"
    wait_for_answers(results_on_node(local_catalog, run), 30)
    session = drive(session, lambda s: bool(s.job_id))
    subprocess.run(["scontrol", "requeue", session.job_id], check=True, capture_output=True)  # as a preemption would
    name = f"hpcllm-{session.pk}"
    while subprocess.run(["squeue", "-h", "-n", name, "-o", "%T"], capture_output=True, text=True).stdout.split() != [
        "PENDING"
    ]:
        time.sleep(0.2)
    before = len(run_file(local_catalog, run, "results.jsonl"))
    assert 30 <= before < 1000
    time.sleep(2)  # slurmd refuses a start within the second of the requeue (see tests/e2e/test_sessions.py)
    subprocess.run(["scontrol", "update", f"jobid={session.job_id}", "StartTime=now"], check=True, capture_output=True)
    session = drive(session, lambda s: s.is_ended, timeout_s=300)
    assert session.state == State.COMPLETED, session.end_reason
    answered = run_file(local_catalog, run, "results.jsonl")
    assert sorted(r["line"] for r in answered) == list(range(1, 1001))  # none lost, none twice
    run.refresh_from_db()
    assert (run.state, run.done) == (BatchRun.State.FINISHED, 1000)
    progress = json.loads(shell(local_catalog, f"cat {results.replace('results.jsonl', 'progress.json')}").stdout)
    assert progress["answered_this_start"] == 1000 - before  # the second start sent only what was left


def test_a_cancelled_batch_launch_stops_its_run_and_keeps_what_is_done(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any]
) -> None:
    from jobs.sessions.actions import request_cancel
    from jobs.tasks import cancel_session

    # Long enough that the cancel lands in the middle: 3000 answers of 32 tokens.
    session, run = batch_launch(
        owner, django_capture_on_commit_callbacks, [f"p{i}" for i in range(3000)], max_tokens=32
    )
    session = drive(session, lambda s: s.state == State.RUNNING or s.is_ended, timeout_s=120)
    request_cancel(session, "test")
    cancel_session.apply(args=(str(session.pk),))
    session = drive(session, lambda s: s.is_ended)
    assert session.state == State.CANCELLED, session.end_reason
    run.refresh_from_db()
    assert run.state == BatchRun.State.STOPPED and "ended before the run did" in run.end_reason
    assert run.done <= len(run_file(local_catalog, run, "results.jsonl")) < 3000  # the last poll may lag


def checked_prompts(prompts: list[str], **batch: Any) -> Any:
    form = BatchForm(
        {"max_tokens": 8, "temperature": 0, **batch},
        MultiValueDict({"prompts": [SimpleUploadedFile("on-session.txt", "\n".join(prompts).encode())]}),
    )
    assert form.is_valid(), form.errors
    return form.checked


def test_a_run_on_a_running_session_completes_while_its_chat_still_answers_and_a_stop_keeps_what_is_done(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any]
) -> None:
    import httpx

    from jobs.batch.actions import start_run, stop_run
    from jobs.tasks import stage_batch, stop_batch

    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**LAUNCH, "purpose": "batch"})
    submit_session.apply(args=(str(session.pk),))
    session = drive(LLMSession.objects.get(pk=session.pk), lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    with django_capture_on_commit_callbacks(execute=False):
        run = start_run(session, checked_prompts([f"Item {i}" for i in range(100)], max_tokens=24))
    assert (run.ends_session, run.concurrency) == (False, 3)  # one of the 4 slots stays free for chat
    assert stage_batch.apply(args=(str(run.pk),)).get() == "staged"
    assert stage_batch.apply(args=(str(run.pk),)).get() == "staged"  # once, however often it is asked

    chat = {"model": "x", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    key = {"Authorization": f"Bearer {session.api_key}"}
    answered_meanwhile = 0
    while True:
        drive(session, lambda s: True)
        run.refresh_from_db()
        if run.is_ended:
            break
        reply = httpx.post(f"{backend.base_url(session)}/v1/chat/completions", json=chat, headers=key, timeout=30)
        answered_meanwhile += reply.status_code == 200
        time.sleep(0.3)
    assert (run.state, run.done, run.failed) == (BatchRun.State.FINISHED, 100, 0), run.end_reason
    assert answered_meanwhile >= 1
    session.refresh_from_db()
    assert session.state == State.RUNNING  # the session stays up
    assert [r["line"] for r in run_file(local_catalog, run, "output.jsonl")] == list(range(1, 101))

    with django_capture_on_commit_callbacks(execute=False):
        long_run = start_run(session, checked_prompts([f"Long {i}" for i in range(3000)], max_tokens=32))
    stage_batch.apply(args=(str(long_run.pk),))
    drive(session, lambda s: BatchRun.objects.get(pk=long_run.pk).done > 0, timeout_s=60)
    long_run.refresh_from_db()
    with django_capture_on_commit_callbacks(execute=False):
        stop_run(long_run)
    assert stop_batch.apply(args=(str(long_run.pk),)).get() is True
    drive(session, lambda s: BatchRun.objects.get(pk=long_run.pk).is_ended, timeout_s=60)
    long_run.refresh_from_db()
    assert long_run.state == BatchRun.State.STOPPED and "your request" in long_run.end_reason
    assert 0 < long_run.done <= len(run_file(local_catalog, long_run, "results.jsonl")) < 3000


@pytest.mark.django_db(transaction=True)  # the portal runs in its own process (uvicorn) on this test's database
def test_the_openai_clients_batch_calls_work_through_the_portal(
    account: ClusterAccount, owner: Any, other_user: Any, django_capture_on_commit_callbacks: Any,
    local_catalog: dict[str, Any], tmp_path: Any,
) -> None:  # fmt: skip
    import openai

    from jobs.models import ApiToken
    from jobs.tasks import stage_batch
    from tests.e2e.test_worker import worker_env
    from tests.worker import PortalServer

    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**LAUNCH, "purpose": "batch", "alias": "bat"})
    submit_session.apply(args=(str(session.pk),))
    session = drive(LLMSession.objects.get(pk=session.pk), lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    server = PortalServer(worker_env(), tmp_path / "uvicorn.log")
    url = server.start()
    try:
        _, token = ApiToken.issue(owner, "script")
        client = openai.OpenAI(base_url=f"{url}/api/v1", api_key=token, max_retries=0)
        lines: list[dict[str, Any]] = [
            {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "bat", "messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 6}}
            for i in range(50)
        ]  # fmt: skip
        bad = b'{"custom_id": "a", "url": "/v1/chat/completions", "body": {"model": "bat", "messages": []}}\n'
        with pytest.raises(openai.BadRequestError, match="line 1: messages must be a non-empty list"):
            client.files.create(file=("bad.jsonl", bad), purpose="batch")
        uploaded = client.files.create(
            file=("questions.jsonl", "\n".join(json.dumps(line) for line in lines).encode()), purpose="batch"
        )
        assert uploaded.purpose == "batch" and uploaded.filename == "questions.jsonl"
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={"project": "e2e"},
        )  # fmt: skip
        first_status = batch.status
        assert first_status == "validating" and batch.request_counts and batch.request_counts.total == 50
        run = BatchRun.objects.get(session=session)
        stage_batch.apply(args=(str(run.pk),))  # what the worker does once the batch is committed
        deadline = time.monotonic() + 120
        while batch.status != "completed" and time.monotonic() < deadline:
            drive(session, lambda s: True)
            batch = client.batches.retrieve(batch.id)
            time.sleep(0.3)
        assert batch.status == "completed" and batch.output_file_id, batch
        assert batch.request_counts and batch.request_counts.completed == 50 and batch.metadata == {"project": "e2e"}
        output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
        assert [o["custom_id"] for o in output] == [f"q{i}" for i in range(50)]
        assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in output)
        assert batch.id in [b.id for b in client.batches.list()]
        assert client.batches.cancel(batch.id).status == "completed"  # a finished batch stays finished
        assert client.files.content(uploaded.id).content.startswith(b'{"custom_id": "q0"')

        _, stranger_token = ApiToken.issue(other_user, "stranger")
        stranger = openai.OpenAI(base_url=f"{url}/api/v1", api_key=stranger_token, max_retries=0)
        with pytest.raises(openai.NotFoundError):
            stranger.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            stranger.files.content(batch.output_file_id)
        with pytest.raises(openai.NotFoundError):
            stranger.files.content(uploaded.id)
        assert stranger.batches.list().data == []
        with pytest.raises(openai.NotFoundError):  # a file of someone else's cannot start a batch either
            stranger.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h")  # fmt: skip

        # A batch launch through the same calls: the lines name the model as the catalog does, the metadata says
        # where it runs; the job works through the file and ends.
        for line in lines:
            line["body"]["model"] = "tiny-llama"
        launch_file = client.files.create(
            file=("launch.jsonl", "\n".join(json.dumps(line) for line in lines).encode()), purpose="batch"
        )
        where = {"cluster": "local", "partition": "gpu", "gpu": "a100-80g", "gpus": "1", "walltime": "30",
                 "context": "1024", "replicas": "2"}  # fmt: skip
        with pytest.raises(openai.BadRequestError, match="replicas: Ensure this value is less than or equal to 16"):
            client.batches.create(input_file_id=launch_file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={**where, "replicas": "40"})  # fmt: skip
        launched = client.batches.create(
            input_file_id=launch_file.id, endpoint="/v1/chat/completions", completion_window="24h", metadata=where
        )
        run = BatchRun.objects.get(input_file__isnull=False, ends_session=True)
        assert (run.replicas, run.prompts, run.session.variant.model.name) == (2, 50, "tiny-llama")
        submit_session.apply(args=(str(run.session_id),))  # what the worker does once the launch is committed
        ended = drive(LLMSession.objects.get(pk=run.session_id), lambda s: s.is_ended, timeout_s=300)
        assert ended.state == State.COMPLETED, ended.end_reason
        launched = client.batches.retrieve(launched.id)
        assert launched.status == "completed" and launched.output_file_id
        assert len(client.files.content(launched.output_file_id).text.splitlines()) == 50
    finally:
        server.stop()
