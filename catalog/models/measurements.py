"""What sessions measured on this site: one row a session, written by the jobs app when it reads the session's figures
(jobs/sessions/measuring.py), read by the catalog beside every estimate (catalog.plans.site_measured, compared in
catalog/measured.py). The catalog knows nothing of sessions: `source` is the writer's key for the row."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.validators import MinValueValidator
from django.db import models

from catalog import measured, runtime_rules
from catalog.models.cards import ModelVariant
from catalog.models.clusters import GPUType


class SiteMeasurement(models.Model):
    source = models.CharField(
        max_length=80, unique=True, help_text="Whose figures these are (the jobs app's key: its session)."
    )
    variant = models.ForeignKey(ModelVariant, on_delete=models.CASCADE, related_name="site_measurements")
    runtime = models.CharField(max_length=20, choices=runtime_rules.CHOICES)
    context = models.PositiveIntegerField(validators=[MinValueValidator(1)], help_text="Tokens per request.")
    parallel = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    gpu_type = models.ForeignKey(GPUType, on_delete=models.CASCADE, related_name="site_measurements")
    gpus_per_node = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    nodes = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    on_host = models.BooleanField(
        default=False, help_text="The server's buffers were all in host memory (a node without GPUs)."
    )
    total_from = models.CharField(
        max_length=12, blank=True, choices=[(name, name) for name in measured.TOTAL_FROM],
        help_text="What the total is: nvidia-smi's used memory, PyTorch's peak, or the sum of the server's buffers.",
    )  # fmt: skip
    # catalog.measured.FIELDS -> a number, as the server reported them (its owner's word: read through
    # measured.figure(), which ignores anything else).
    figures = models.JSONField(default=dict)
    measured_at = models.DateTimeField()

    class Meta:
        ordering = ["-measured_at"]
        indexes = [models.Index(fields=["variant", "runtime", "-measured_at"], name="site_measured_idx")]

    def __str__(self) -> str:
        return f"{self.variant} on {self.runtime}, {self.context} tokens x {self.parallel}, {self.gpu_type}"

    @classmethod
    def keep(cls, source: str, figures: dict[str, Any], measured_at: datetime, **choices: Any) -> None:
        """Keep a session's figures (the known FIELDS) under its key, or forget them when it has none."""
        checked = {name: measured.figure(name, figures.get(name)) for name in measured.FIELDS}
        numbers = {name: value for name, value in checked.items() if value is not None}
        if not numbers:
            cls.objects.filter(source=source).delete()
            return
        cls.objects.update_or_create(
            source=source, defaults={**choices, "figures": numbers, "measured_at": measured_at}
        )

    def run(self) -> measured.Run:
        figures = self.figures if isinstance(self.figures, dict) else {}
        return measured.Run(
            gpu_type=self.gpu_type.name, context=self.context, parallel=self.parallel, figures=figures,
            gpus_per_node=self.gpus_per_node, nodes=self.nodes, on_host=self.on_host, total_from=self.total_from,
        )  # fmt: skip
