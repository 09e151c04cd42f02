"""A fine-tune run spends its owner's GPU-hour allocation as a session does: its worst case while it may run, what its
job used once it ended (jobs/allocations/spend.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from jobs.allocations import spend
from jobs.models import Allocation, FineTuneRun


def test_a_run_reserves_its_worst_case_and_is_charged_what_its_job_used(
    start: Callable[..., FineTuneRun], owner: Any
) -> None:
    allocation = Allocation.objects.create(user=owner, gpu_hours=Decimal("0.75"), period="month")
    first = start()  # 1 GPU for 30 minutes
    standing = spend.standing(allocation)
    assert standing is not None and standing.gpu_hours == pytest.approx(0.5) and standing.reserved_gpu_hours == 0.5
    with pytest.raises(ValidationError, match=r"allocation of user ada has 0\.25 of 0\.75 GPU-hours left"):
        start()
    began = timezone.now() - timedelta(minutes=12)
    FineTuneRun.objects.filter(pk=first.pk).update(
        state=FineTuneRun.State.COMPLETED, started_at=began, finished_at=began + timedelta(minutes=6)
    )
    standing = spend.standing(allocation)
    assert standing is not None and standing.gpu_hours == pytest.approx(0.1) and standing.reserved_gpu_hours == 0
    assert start().state == FineTuneRun.State.QUEUED  # 0.5 of the 0.65 left


def test_a_requeued_run_may_spend_its_walltime_once_per_start(start: Callable[..., FineTuneRun], owner: Any) -> None:
    allocation = Allocation.objects.create(user=owner, gpu_hours=10, period="month")
    run = start()
    began = timezone.now() - timedelta(hours=2)
    FineTuneRun.objects.filter(pk=run.pk).update(
        state=FineTuneRun.State.COMPLETED, restarts=2, started_at=began, finished_at=began + timedelta(minutes=80)
    )
    standing = spend.standing(allocation)
    assert standing is not None and standing.gpu_hours == pytest.approx(80 / 60)  # under 3 x 30 minutes


def test_another_users_runs_are_not_charged_to_the_allocation(
    start: Callable[..., FineTuneRun], owner: Any, other_user: Any
) -> None:
    allocation = Allocation.objects.create(user=other_user, gpu_hours=1, period="month")
    start()
    standing = spend.standing(allocation)
    assert standing is not None and standing.gpu_hours == 0
