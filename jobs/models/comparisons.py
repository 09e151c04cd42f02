"""A fine-tune run's comparison (docs/finetune.md, comparing): the same prompts through the base model and through the
run's adapter, as two batch runs on one session of the base that loaded the adapter, and what they were asked. A
comparison may launch that session itself: it then waits for it, starts its batch runs once it runs, and ends it once
both have ended."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from jobs.models.batch import BatchRun
from jobs.models.finetune import FineTuneRun
from jobs.models.sessions import LLMSession


def comparison_requests_path(comparison: FineTuneComparison, filename: str) -> str:
    return f"compare/{comparison.pk}/requests.jsonl"


class FineTuneComparison(models.Model):
    class Source(models.TextChoices):
        VALIDATION = "validation", "the run's validation data"
        PROMPTS = "prompts", "a prompts file"

    class State(models.TextChoices):
        WAITING = "waiting", "waiting for its session"
        STARTED = "started", "its batch runs started"
        FAILED = "failed", "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="finetune_comparisons")
    run = models.ForeignKey(FineTuneRun, on_delete=models.CASCADE, related_name="comparisons")
    source = models.CharField(max_length=10, choices=Source.choices)
    name = models.CharField(max_length=200, help_text="the prompts file's name, or the validation data's")
    prompts = models.PositiveIntegerField()
    # The two batch runs over the same requests file on the same session: the base weights and the adapter.
    # None while the comparison waits for the session it launched (or when that ended before it ran).
    base_batch = models.ForeignKey(BatchRun, on_delete=models.CASCADE, related_name="+", null=True, blank=True)
    adapter_batch = models.ForeignKey(BatchRun, on_delete=models.CASCADE, related_name="+", null=True, blank=True)
    state = models.CharField(max_length=10, choices=State.choices, default=State.STARTED)
    reason = models.CharField(max_length=500, blank=True, help_text="why it failed")
    # The session it launched for itself (never one of the owner's own): it ends once both batch runs have.
    launched_session = models.ForeignKey(LLMSession, on_delete=models.SET_NULL, related_name="+", null=True, blank=True)
    session_released_at = models.DateTimeField(null=True, blank=True, help_text="when it asked its session to end")
    # While it waits: the checked requests and the batch form's columns its two runs are made from.
    requests = models.FileField(upload_to=comparison_requests_path, blank=True)
    asked = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "fine-tune comparison"

    def __str__(self) -> str:
        return f"{self.name} on {self.run_id}"

    @property
    def batches(self) -> tuple[BatchRun, ...]:
        """The two batch runs, base first; none before they start."""
        if self.base_batch is None or self.adapter_batch is None:
            return ()
        return self.base_batch, self.adapter_batch

    @property
    def is_ended(self) -> bool:
        if self.state == self.State.FAILED:
            return True
        batches = self.batches
        return bool(batches) and all(batch.is_ended for batch in batches)

    @property
    def has_references(self) -> bool:
        """The validation data's answers stand beside the two (a prompts file has none)."""
        return self.source == self.Source.VALIDATION
