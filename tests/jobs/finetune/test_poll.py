"""What a poll read, applied to a run: Slurm's state and the trainer's checked report move it; it completes only
when Slurm and the report both say every planned step is done; a requeue sends it back to the queue; its owner is
mailed once when it ends."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.core import mail

from jobs.cluster.remote import PollResult
from jobs.finetune import lifecycle
from jobs.models import FineTuneRun, transition_finetune
from portal.slurm.squeue import QueuedJob

Start = Callable[..., FineTuneRun]


def job(state: str, reason: str = "") -> QueuedJob:
    return QueuedJob("77", "hpcllm-x", state, reason, datetime(2026, 1, 1, 12, 0), "node1", 60, 600, "gpu", 1)


def report(state: str, step: int, planned: int, **more: Any) -> dict[str, Any]:
    return {"state": state, "step": step, "planned_steps": planned, "train_loss": 1.5, "points": [[1, 2.0, None]],
            **more}  # fmt: skip


def submitted(start: Start) -> FineTuneRun:
    run = start(notify=True, batch_size=1, gradient_accumulation=1)
    assert transition_finetune(run.pk, FineTuneRun.State.SUBMITTED, reason="test", job_id="77")
    run.refresh_from_db()
    return run


def test_a_run_trains_is_requeued_and_completes_with_its_record_and_one_mail(start: Start) -> None:
    run = submitted(start)
    planned = run.planned_steps
    polled = PollResult(squeue_ok=True, complete=True, queued={"77": job("RUNNING")})
    polled.training[str(run.pk)] = report("running", 2, planned)
    assert lifecycle.apply_poll(run, polled) == 1
    run.refresh_from_db()
    assert (run.state, run.step, run.train_loss, run.node_list) == ("running", 2, 1.5, "node1")
    assert run.started_at is not None

    requeued = PollResult(squeue_ok=True, complete=True, queued={"77": job("PENDING", "BeginTime")})
    lifecycle.apply_poll(run, requeued)
    run.refresh_from_db()
    assert run.state == "submitted" and "requeued" in run.events.last().reason  # type: ignore[union-attr]

    ended = PollResult(squeue_ok=True, complete=True, finished={"77": {"JobState": "COMPLETED", "ExitCode": "0:0"}})
    ended.training[str(run.pk)] = report("completed", planned, planned, result={"steps": planned, "device": "cpu"})
    assert lifecycle.apply_poll(run, ended) == 1
    run.refresh_from_db()
    assert (run.state, run.step, run.result["steps"]) == ("completed", planned, planned)
    assert len(mail.outbox) == 1 and "completed" in mail.outbox[0].subject
    lifecycle.notify_ended(str(run.pk))
    assert len(mail.outbox) == 1  # once


def test_a_job_that_completed_short_of_its_steps_fails_and_a_timeout_says_where_it_stopped(start: Start) -> None:
    run = submitted(start)
    ended = PollResult(squeue_ok=True, complete=True, finished={"77": {"JobState": "COMPLETED", "ExitCode": "0:0"}})
    ended.training[str(run.pk)] = report("running", 1, run.planned_steps)
    lifecycle.apply_poll(run, ended)
    run.refresh_from_db()
    assert run.state == "failed" and "without the trainer's final report" in run.end_reason
    other = submitted(start)
    timed_out = PollResult(squeue_ok=True, complete=True, finished={"77": {"JobState": "TIMEOUT"}})
    lifecycle.apply_poll(other, timed_out)
    other.refresh_from_db()
    assert other.state == "failed" and "time limit of 30 min at step 0" in other.end_reason


def test_the_trainers_reason_is_the_runs_and_garbage_progress_moves_nothing(start: Start) -> None:
    run = submitted(start)
    garbage = PollResult(squeue_ok=True, complete=True, queued={"77": job("RUNNING")})
    garbage.training[str(run.pk)] = {"state": "completed", "step": 10**9}
    lifecycle.apply_poll(run, garbage)
    run.refresh_from_db()
    assert run.state == "running" and run.step == 0
    failed = PollResult(squeue_ok=True, complete=True, finished={"77": {"JobState": "FAILED", "ExitCode": "1:0"}},
                        errors={str(run.pk): "QLoRA needs a CUDA GPU for bitsandbytes' 4-bit base model"})  # fmt: skip
    lifecycle.apply_poll(run, failed)
    run.refresh_from_db()
    assert run.state == "failed" and run.end_reason.startswith("QLoRA needs a CUDA GPU")
