"""Batch runs (docs/batch.md): a checked prompts file, the session whose server(s) answer it, and how far the runner
on the compute node has got, as the poll last read its progress file."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

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

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.filename} ({self.owner_id})"
