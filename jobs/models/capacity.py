"""What the clusters' schedulers said about their partitions at the last refresh (a cache for the wizard)."""

from __future__ import annotations

from django.db import models

from catalog.models import Partition


class PartitionState(models.Model):
    """What a cluster's scheduler said about one partition and GPU type at the last refresh (a cache)."""

    partition = models.ForeignKey(Partition, on_delete=models.CASCADE, related_name="states")
    gres_type = models.CharField(max_length=50, help_text="The GPU type as Slurm names it in GRES.")
    total_gpus = models.PositiveIntegerField(default=0)
    idle_gpus = models.PositiveIntegerField(default=0, help_text="On nodes that take jobs, not allocated.")
    idle_nodes_with_all_gpus = models.PositiveIntegerField(default=0)
    unavailable_gpus = models.PositiveIntegerField(default=0, help_text="On nodes down, drained or in maintenance.")
    pending_jobs = models.PositiveIntegerField(default=0, help_text="In the partition, of any GPU type.")
    pending_gpus = models.PositiveIntegerField(default=0, help_text="Asked for by pending jobs, of this type.")
    refreshed_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["partition", "gres_type"], name="one_state_per_partition_gpu")]

    def __str__(self) -> str:
        return f"{self.partition} {self.gres_type}: {self.idle_gpus}/{self.total_gpus} idle"
