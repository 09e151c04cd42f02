"""A fine-tune run's comparison (docs/finetune.md, comparing): the same prompts through the base model and through the
run's adapter, as two batch runs on one session of the base that loaded the adapter, and what they were asked."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from jobs.models.batch import BatchRun
from jobs.models.finetune import FineTuneRun


class FineTuneComparison(models.Model):
    class Source(models.TextChoices):
        VALIDATION = "validation", "the run's validation data"
        PROMPTS = "prompts", "a prompts file"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="finetune_comparisons")
    run = models.ForeignKey(FineTuneRun, on_delete=models.CASCADE, related_name="comparisons")
    source = models.CharField(max_length=10, choices=Source.choices)
    name = models.CharField(max_length=200, help_text="the prompts file's name, or the validation data's")
    prompts = models.PositiveIntegerField()
    # The two batch runs over the same requests file on the same session: the base weights and the adapter.
    base_batch = models.ForeignKey(BatchRun, on_delete=models.CASCADE, related_name="+")
    adapter_batch = models.ForeignKey(BatchRun, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "fine-tune comparison"

    def __str__(self) -> str:
        return f"{self.name} on {self.run_id}"

    @property
    def batches(self) -> tuple[BatchRun, BatchRun]:
        return self.base_batch, self.adapter_batch

    @property
    def is_ended(self) -> bool:
        return all(batch.is_ended for batch in self.batches)

    @property
    def has_references(self) -> bool:
        """The validation data's answers stand beside the two (a prompts file has none)."""
        return self.source == self.Source.VALIDATION
