"""Batch runs (docs/batch.md): a checked prompts file, the session whose server(s) answer it, how far the runner
on the compute node has got, as the poll last read its progress file, and every change of the run's state; and the
pace finished runs measured, which the wizard shows before a launch (a plain query, here below the sessions)."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models, transaction
from django.utils import timezone

from catalog.models import GPUType, ModelVariant
from jobs.models.sessions import LLMSession


def requests_path(run: BatchRun, filename: str) -> str:
    return f"batch/{run.pk}/requests.jsonl"


class BatchRun(models.Model):
    class State(models.TextChoices):
        WAITING = "waiting", "waiting for the server"
        RUNNING = "running", "running"
        FINISHED = "finished", "finished"
        STOPPED = "stopped", "stopped"
        FAILED = "failed", "failed"

    END_STATES = frozenset({State.FINISHED, State.STOPPED, State.FAILED})
    LIVE_STATES = frozenset({State.WAITING, State.RUNNING})

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="batch_runs")
    session = models.ForeignKey(LLMSession, on_delete=models.CASCADE, related_name="batch_runs")
    # The session's job ends itself once this run is done (a batch launch), instead of staying up for chat.
    ends_session = models.BooleanField(default=False)
    name = models.CharField(max_length=200, help_text="the uploaded file's name")
    input_format = models.CharField(max_length=10)
    endpoint = models.CharField(max_length=40)
    prompts = models.PositiveIntegerField()
    system_prompt = models.TextField(blank=True)
    defaults = models.JSONField(default=dict, blank=True)
    concurrency = models.PositiveIntegerField(default=4, validators=[MinValueValidator(1), MaxValueValidator(256)])
    # A batch launch's servers: one per node, each with the session's GPUs per node, sharing the prompts.
    replicas = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1), MaxValueValidator(16)])
    # The checked requests JSONL (jobs/batch/inputs.py); private storage, never served as a page.
    requests = models.FileField(upload_to=requests_path)
    # What the OpenAI Batch API was given: its input file and metadata (jobs/use/openai_batches.py).
    input_file = models.ForeignKey("BatchFile", null=True, blank=True, on_delete=models.SET_NULL, related_name="runs")
    metadata = models.JSONField(default=dict, blank=True)

    # Changed through transition_run() alone, which records each change as a BatchEvent (tests/jobs/batch checks).
    state = models.CharField(max_length=10, choices=State.choices, default=State.WAITING)
    done = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    tokens_per_s = models.FloatField(default=0.0)
    end_reason = models.TextField(blank=True)
    # A run on a running session: when its files reached the cluster (the job starts its runner then), and when a
    # stop was asked for (the job stops the runner; what is done is kept).
    staged_at = models.DateTimeField(null=True, blank=True)
    notified_at = models.DateTimeField(null=True, blank=True)  # the email that it ended went out
    stop_requested_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} on {self.session_id} ({self.state})"

    @property
    def remaining(self) -> int:
        return max(0, self.prompts - self.done - self.failed)

    @property
    def is_ended(self) -> bool:
        return self.state in self.END_STATES

    @property
    def eta_s(self) -> float | None:
        """Seconds to go at the present pace: the tokens its answers have taken so far, per answer, for those left,
        at the tokens/s of this start. None until there is a pace to go by."""
        if self.is_ended or not self.done or self.tokens_per_s <= 0:
            return None
        per_answer = self.completion_tokens / self.done
        return self.remaining * per_answer / self.tokens_per_s

    @property
    def eta_min(self) -> int | None:
        eta = self.eta_s
        return None if eta is None else max(1, round(eta / 60))

    @property
    def gpu_hours(self) -> float:
        """The GPU-hours its servers held while it ran (its wall time times their GPUs)."""
        if not self.started_at:
            return 0.0
        end = self.finished_at or self.started_at
        gpus = self.session.gpus_per_node * self.session.nodes * self.replicas
        return (end - self.started_at).total_seconds() / 3600 * gpus


class BatchEvent(models.Model):
    """A change of a run's state: from what, to what, when and why. The run's page and the admin show them."""

    run = models.ForeignKey(BatchRun, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now)
    from_state = models.CharField(max_length=10, choices=BatchRun.State.choices, blank=True)  # blank: created
    to_state = models.CharField(max_length=10, choices=BatchRun.State.choices)
    reason = models.CharField(max_length=500)

    class Meta:
        ordering = ["at", "pk"]

    def __str__(self) -> str:
        return f"{self.from_state or '-'} -> {self.to_state}: {self.reason}"


def _state_of(run_id: uuid.UUID | str) -> str | None:
    return BatchRun.objects.filter(pk=run_id).values_list("state", flat=True).first()


def transition_run(
    run_id: uuid.UUID | str,
    to: BatchRun.State,
    *,
    reason: str,
    allowed_from: Collection[BatchRun.State] | None = None,
    at: datetime | None = None,
    **fields: Any,
) -> bool:
    """Move a run to `to` if it is in one of `allowed_from` (default: waiting or running), with `fields`, recording
    the change as a BatchEvent; False when the run is not there or not in such a state. The one way a run's state
    is written (the poll's progress, a failed staging, a session that ended first).

    An ended run stays ended: `allowed_from` may name live states only. The UPDATE is conditional on the state read,
    so of two writers racing on one run (two polls, a poll and a failed staging) only one moves it; the other gets
    False and records nothing. A move to the state it is in updates `fields` (the poll's counts) without an event.
    An end state sets finished_at, unless `fields` does.
    """
    allowed = BatchRun.LIVE_STATES if allowed_from is None else frozenset(allowed_from)
    if not allowed <= BatchRun.LIVE_STATES:
        raise ValueError(f"an ended run stays ended: cannot move from {sorted(allowed - BatchRun.LIVE_STATES)}")
    if "state" in fields:
        raise TypeError("the state is `to`, not one of the fields")
    now = at or timezone.now()
    with transaction.atomic():
        current = _state_of(run_id)
        if current is None or current not in allowed:
            return False
        updates: dict[str, Any] = {"state": to, **fields}
        if to in BatchRun.END_STATES:
            updates.setdefault("finished_at", now)
        if not BatchRun.objects.filter(pk=run_id, state=current).update(**updates):
            return False  # another writer moved it between the read and this UPDATE
        if current != to:
            BatchEvent.objects.create(run_id=run_id, at=now, from_state=current, to_state=to, reason=reason[:500])
    return True


@dataclass(frozen=True)
class Pace:
    """What finished runs measured, for the next one's expectations (the wizard's options, a run's page)."""

    tokens_per_s: float  # completion tokens per second per server (replica)
    runs: int

    def expected_s(self, prompts: int, tokens_per_prompt: int, replicas: int = 1) -> float:
        return prompts * tokens_per_prompt / max(1e-9, self.tokens_per_s * replicas)


def measured_pace(variant: ModelVariant, gpu_type: GPUType, newest: int = 20) -> Pace | None:
    """The pace of the newest finished runs of this variant on this GPU type (their tokens over their wall time,
    per replica); None when there are none to go by."""
    runs = (
        BatchRun.objects.filter(
            state=BatchRun.State.FINISHED, session__variant=variant, session__gpu_type=gpu_type,
            started_at__isnull=False, finished_at__isnull=False, completion_tokens__gt=0,
        )
        .select_related("session")
        .order_by("-finished_at")[:newest]
    )  # fmt: skip
    tokens = seconds = 0.0
    count = 0
    for run in runs:
        assert run.started_at is not None and run.finished_at is not None
        wall = (run.finished_at - run.started_at).total_seconds()
        if wall <= 0:
            continue
        tokens += run.completion_tokens
        seconds += wall * run.replicas
        count += 1
    return Pace(tokens / seconds, count) if count and seconds > 0 else None


def upload_path(upload: BatchFile, filename: str) -> str:
    return f"files/{upload.pk}"


class BatchFile(models.Model):
    """A file uploaded through the OpenAI Files API (`files.create(purpose="batch")`), checked when it came in; its
    owner's alone."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="batch_files")
    filename = models.CharField(max_length=200)
    purpose = models.CharField(max_length=20, default="batch")
    size_bytes = models.PositiveBigIntegerField()
    content = models.FileField(upload_to=upload_path)
    created_at = models.DateTimeField(auto_now_add=True)
    # When the retention sweep deletes it (jobs/batch/files.py): PORTAL_FILES_RETENTION_DAYS after its upload, or the
    # sooner time its upload asked for (expires_after); null: kept until deleted.
    expires_at = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.filename} ({self.owner_id})"
