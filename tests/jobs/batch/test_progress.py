"""What the poll read from a runner's progress file, recorded on its run: only for the sessions polled, never past
the run's own size, and a run whose session ended without it stops with the session's reason."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils.datastructures import MultiValueDict

from jobs.batch import progress
from jobs.batch.forms import BatchForm
from jobs.models import BatchRun, State, transition
from tests.jobs.cluster.framing import framed

pytestmark = pytest.mark.django_db


def batch_form(data: bytes, **fields: Any) -> BatchForm:
    return BatchForm(fields, MultiValueDict({"prompts": [SimpleUploadedFile("p.txt", data)]}))


def test_a_batch_launch_records_its_checked_file_and_its_choices(run: BatchRun) -> None:
    assert (run.name, run.input_format, run.endpoint, run.prompts) == ("p.txt", "text", "/v1/chat/completions", 3)
    assert (run.defaults, run.concurrency, run.ends_session, run.state) == ({"max_tokens": 5}, 4, True, "waiting")
    with run.requests.open("rb") as f:
        assert len(f.read().splitlines()) == 3


def test_progress_is_recorded_for_the_polled_sessions_runs_only_and_within_bounds(run: BatchRun) -> None:
    report = {"state": "running", "done": 2, "failed": 5, "prompt_tokens": 30, "completion_tokens": 9,
              "tokens_per_s": 4.5, "started_at": 1795330000.0}  # fmt: skip
    assert progress.apply(["00000000-0000-0000-0000-000000000000"], {str(run.pk): report}) == []
    run.refresh_from_db()
    assert run.done == 0  # not a run of the sessions polled
    assert progress.apply([str(run.session_id)], {str(run.pk): report}) == []  # recorded, not ended
    run.refresh_from_db()
    assert (run.state, run.done, run.failed, run.remaining, run.completion_tokens) == ("running", 2, 1, 0, 9)
    assert run.started_at is not None and run.tokens_per_s == 4.5
    garbage = {"state": "finished", "done": "all", "failed": -1, "tokens_per_s": "fast"}
    assert progress.apply([str(run.session_id)], {str(run.pk): garbage}) == [str(run.pk)]
    run.refresh_from_db()
    assert (run.state, run.done, run.failed, run.tokens_per_s) == ("finished", 0, 0, 0.0)


def test_a_stopped_runner_is_not_the_end_but_an_ended_session_is(run: BatchRun) -> None:
    progress.apply([str(run.session_id)], {str(run.pk): {"state": "stopped", "done": 1}})
    run.refresh_from_db()
    assert run.state == BatchRun.State.WAITING  # a requeued job goes on
    transition(run.session_id, State.CANCELLED, cause="test", end_reason="cancelled from the portal")
    assert progress.runs_of_ended_sessions() == [str(run.pk)]
    assert progress.runs_of_ended_sessions() == []  # once
    run.refresh_from_db()
    assert run.state == BatchRun.State.STOPPED and "cancelled from the portal" in run.end_reason


def test_a_bad_prompts_file_is_refused_on_the_form_with_its_line_numbers() -> None:
    form = batch_form(b'{"prompt": "a"}\n{"prompt": "b", "colour": 1}\n{oops\n')
    assert not form.is_valid()
    assert form.errors["prompts"] == ["line 2: unknown field colour", "line 3: invalid JSON (Expecting property name "
                                      "enclosed in double quotes at column 2)"]  # fmt: skip
    assert form.checked is None
    assert not batch_form(b"", temperature=3).is_valid()


def test_requests_at_once_never_exceed_the_sessions_slots() -> None:
    from jobs.batch.forms import run_columns

    form = batch_form(b"a\n", concurrency=64)
    assert form.is_valid()
    assert form.checked is not None and run_columns(form.checked, 4)["concurrency"] == 4
    form = batch_form(io.BytesIO(b"a\n").getvalue())
    assert form.is_valid() and form.checked is not None and run_columns(form.checked, 2)["concurrency"] == 2


def test_the_owner_gets_the_totals_by_email_once_when_a_run_ends(run: BatchRun, mailoutbox: list[Any]) -> None:
    from jobs.models import LLMSession
    from jobs.sessions import notify

    assert not notify.batch_ended(str(run.pk))  # no email notices asked for at launch
    LLMSession.objects.filter(pk=run.session_id).update(notify_email=True)
    report = {"state": "finished", "done": 3, "prompt_tokens": 30, "completion_tokens": 12, "started_at": 1795330000.0}
    for run_id in progress.apply([str(run.session_id)], {str(run.pk): report}):
        notify.batch_ended(run_id)
    assert not notify.batch_ended(str(run.pk))  # once
    assert len(mailoutbox) == 1 and "3 of 3 answered" in mailoutbox[0].subject
    assert "30 tokens in, 12 out" in mailoutbox[0].body and f"/batch/{run.pk}/" in mailoutbox[0].body


def test_time_to_go_follows_the_present_pace_and_finished_runs_give_the_next_one_a_pace(run: BatchRun) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from jobs.models import measured_pace

    assert run.eta_s is None  # nothing answered yet
    BatchRun.objects.filter(pk=run.pk).update(done=1, completion_tokens=40, tokens_per_s=20.0, state="running")
    run.refresh_from_db()
    assert run.eta_s == pytest.approx(2 * 40 / 20) and run.eta_min == 1  # 2 left, 40 tokens each, 20 tokens/s
    assert measured_pace(run.session.variant, run.session.gpu_type) is None
    started = timezone.now() - timedelta(seconds=100)
    BatchRun.objects.filter(pk=run.pk).update(
        state="finished",
        done=3,
        completion_tokens=1200,
        started_at=started,
        finished_at=started + timedelta(seconds=60),
    )
    pace = measured_pace(run.session.variant, run.session.gpu_type)
    assert pace is not None and pace.runs == 1 and pace.tokens_per_s == pytest.approx(20.0)
    assert pace.expected_s(prompts=100, tokens_per_prompt=200, replicas=2) == pytest.approx(500.0)
    run.refresh_from_db()
    assert run.eta_s is None and run.gpu_hours == pytest.approx(60 / 3600)  # ended; one GPU for a minute


def test_the_wizard_shows_batch_options_the_pace_their_gpu_type_measured(
    run: BatchRun, owner: Any, settings: Any
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from jobs.sessions import wizard

    settings.PORTAL_WIZARD_ASKS_SLURM = False
    started = timezone.now() - timedelta(seconds=100)
    BatchRun.objects.filter(pk=run.pk).update(
        state="finished", completion_tokens=3000, started_at=started, finished_at=started + timedelta(seconds=100)
    )
    request = {"model": "tiny-llama", "context": "1024", "purpose": "batch"}
    rows = wizard.build(owner, request).fitting
    paces = {row.view.option.node_group.gpu_type.name: row.pace for row in rows}
    assert paces["a100-80g"] is not None and paces["a100-80g"].tokens_per_s == pytest.approx(30.0)
    assert paces.get("h100") is None  # no runs there yet
    assert all(row.pace is None for row in wizard.build(owner, {**request, "purpose": "chat"}).fitting)


def cluster_says(monkeypatch: pytest.MonkeyPatch, *outputs: str) -> list[str]:
    """The cluster answers each SSH command with the next of `outputs` (the last one again after that); returns the
    commands it was sent."""
    from portal import ssh

    sent: list[str] = []

    def run(target: Any, command: str, **kwargs: Any) -> ssh.CommandResult:
        sent.append(command)
        answer = outputs[min(len(sent), len(outputs)) - 1]
        return ssh.CommandResult(0, framed(kwargs.get("stdin"), answer), "")

    monkeypatch.setattr(ssh.pool, "run", run)
    return sent


def test_the_poll_task_records_a_runners_progress_and_tells_the_owner_once_when_it_ends(
    run: BatchRun, monkeypatch: pytest.MonkeyPatch, mailoutbox: list[Any]
) -> None:
    import json

    from jobs import tasks
    from jobs.models import LLMSession
    from jobs.sessions import lifecycle

    transition(run.session_id, State.QUEUED, cause="test", job_id="42")
    LLMSession.objects.filter(pk=run.session_id).update(notify_email=True)
    report = {"state": "finished", "done": 3, "completion_tokens": 12, "started_at": 1795330000.0}
    cluster_says(
        monkeypatch,
        "@@squeue 0\n42|hpcllm-x|RUNNING|None|N/A|node1|1:00|1:00|gpu|1\n"
        f"@@progress {run.session_id} {run.pk}\n{json.dumps(report)}\n@@end\n",
    )
    polled = lifecycle.poll(LLMSession.objects.get(pk=run.session_id).account_id)
    run.refresh_from_db()
    # The sessions' poll read the runner's file and left the run to its caller.
    assert run.state == BatchRun.State.WAITING and polled.session_ids == [str(run.session_id)]
    assert polled.read is not None and str(run.pk) in polled.read.progress

    tasks.poll_account(run.session.account_id)
    tasks.poll_account(run.session.account_id)
    run.refresh_from_db()
    assert (run.state, run.done, run.completion_tokens) == (BatchRun.State.FINISHED, 3, 12)
    assert len(mailoutbox) == 1 and "3 of 3 answered" in mailoutbox[0].subject


def test_a_cancelled_batch_launchs_run_stops_with_the_cancel_tasks_own_poll(
    run: BatchRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs import tasks

    transition(run.session_id, State.QUEUED, cause="test", job_id="42")
    sent = cluster_says(
        monkeypatch,
        "marked\n",
        "@@squeue 0\n\n@@sacct 0\n"
        "42|CANCELLED by 1000|0:0|2026-11-21T12:00:00|2026-11-21T12:05:00|node1|None|hpcllm-x\n@@end\n",
    )
    assert tasks.cancel_session.apply(args=(str(run.session_id),)).get() == State.CANCELLED
    assert len(sent) == 2  # the scancel and one poll
    run.refresh_from_db()
    assert run.state == BatchRun.State.STOPPED and "the session ended before the run did" in run.end_reason


def test_a_poll_that_cannot_reach_the_cluster_changes_no_run(run: BatchRun, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs import tasks
    from portal import ssh

    transition(run.session_id, State.QUEUED, cause="test", job_id="42")

    def refuse(*args: Any, **kwargs: Any) -> ssh.CommandResult:
        raise ssh.ConnectionRefused(None, "connection refused")

    monkeypatch.setattr(ssh.pool, "run", refuse)
    assert tasks.poll_account(run.session.account_id) == {"sessions": 1, "unknown": 1}
    run.refresh_from_db()
    assert run.state == BatchRun.State.WAITING and not run.events.exclude(from_state="").exists()
