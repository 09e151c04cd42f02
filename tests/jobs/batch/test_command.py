"""`manage.py batch show` prints a run's history, as `manage.py sessions show` prints a session's."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command

from jobs.models import BatchRun, transition_run

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
