"""What finished batch runs measured, for the next one's expectations: completion tokens per second per server, by
model variant and GPU type."""

from __future__ import annotations

from dataclasses import dataclass

from catalog.models import GPUType, ModelVariant
from jobs.models import BatchRun


@dataclass(frozen=True)
class Measured:
    tokens_per_s: float  # per server (replica)
    runs: int

    def expected_s(self, prompts: int, tokens_per_prompt: int, replicas: int = 1) -> float:
        return prompts * tokens_per_prompt / max(1e-9, self.tokens_per_s * replicas)


def measured(variant: ModelVariant, gpu_type: GPUType, newest: int = 20) -> Measured | None:
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
    return Measured(tokens / seconds, count) if count and seconds > 0 else None
