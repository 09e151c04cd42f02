"""`manage.py batch show` prints a run's history, as `manage.py sessions show` prints a session's; a batch launch from
`manage.py sessions launch --prompts` and a stop from `manage.py batch stop` go through the batch actions."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from catalog.models import ClusterAccount
from jobs.models import BatchRun, LLMSession, State, transition_run
from tests.conftest import LAUNCH

pytestmark = pytest.mark.django_db


def test_batch_show_prints_the_runs_history_as_text_and_json(run: BatchRun) -> None:
    transition_run(run.pk, BatchRun.State.RUNNING, reason="the runner is sending the prompts")
    text = io.StringIO()
    call_command("batch", "show", str(run.pk)[:8], stdout=text)
    assert "- -> waiting: a batch launch of 3 prompts from p.txt" in text.getvalue()
    assert "waiting -> running: the runner is sending the prompts" in text.getvalue()
    shown = io.StringIO()
    call_command("batch", "show", str(run.pk), "--json", stdout=shown)
    events = json.loads(shown.getvalue())["events"]
    assert [(e["from"], e["to"]) for e in events] == [("", "waiting"), ("waiting", "running")]


def test_a_batch_launch_from_the_command_line_is_one_session_with_its_run_and_one_submit(
    account: ClusterAccount, owner: Any, tmp_path: Path, django_capture_on_commit_callbacks: Any
) -> None:
    prompts = tmp_path / "questions.txt"
    prompts.write_text("one\ntwo\n")
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in {**LAUNCH, "purpose": "batch"}.items()]
    with django_capture_on_commit_callbacks(execute=False) as enqueued:
        call_command("sessions", "launch", "--user", "ada", *flags, "--prompts", str(prompts), stdout=io.StringIO())
    assert len(enqueued) == 1  # the submit
    run = BatchRun.objects.get(session=LLMSession.objects.get())
    assert (run.name, run.prompts, run.ends_session) == ("questions.txt", 2, True)

    call_command("batch", "stop", str(run.pk), stdout=io.StringIO())
    assert LLMSession.objects.get().state == State.CANCELLED  # its job, not submitted yet, ends at once
