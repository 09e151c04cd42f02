"""A launch refused before anything reaches Slurm when its worst case (GPUs times walltime) does not fit in what is left
of an allocation it is charged to. Called by the launch form (the wizard, the launch page, the CLI and the Batch API
validate through it) and again under the launch's lock (jobs/sessions/launching.py), where the allocations' rows are
locked too, so that two launches charged to one allocation cannot both take its last hours."""

from __future__ import annotations

from datetime import datetime

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.utils import timezone

from catalog.models import Cluster, ClusterAccount
from jobs.allocations import spend
from jobs.models import Allocation


def check_launch(
    user: User,
    account: ClusterAccount,
    cluster: Cluster,
    gpus: int,
    walltime_min: int,
    *,
    lock: bool = False,
    now: datetime | None = None,
) -> None:
    """Raise a ValidationError naming the allocation, what is left and when it resets, when a launch of `gpus` for
    `walltime_min` would overspend an allocation whose action is to refuse."""
    need = gpus * walltime_min / 60
    rows = spend.for_launch(user, account, cluster).filter(action=Allocation.Action.REFUSE)
    if lock:  # FOR UPDATE takes no DISTINCT: the rows by their keys, in one order (no deadlock between launches)
        keys = list(rows.values_list("pk", flat=True))
        rows = Allocation.objects.filter(pk__in=keys).select_related("user", "group", "cluster")
        rows = rows.select_for_update(of=("self",)).order_by("pk")
    for allocation in rows:
        standing = spend.standing(allocation, now)
        if standing is None or standing.gpu_hours_left is None:
            continue
        if need > standing.gpu_hours_left + 0.005:  # the hundredth of an hour the allocation is set in
            raise ValidationError(refusal(standing, gpus, walltime_min))


def refusal(standing: spend.Standing, gpus: int, walltime_min: int) -> str:
    allocation = standing.allocation
    where = f" on {allocation.cluster}" if allocation.cluster_id else ""
    need = f"{hours(gpus * walltime_min / 60)} GPU-hours ({gpus} GPU{'s' if gpus != 1 else ''} for {walltime_min} min)"
    left = f"{hours(standing.gpu_hours_left or 0.0)} of {hours(float(allocation.gpu_hours or 0))} GPU-hours left"
    return (
        f"This launch reserves up to {need}, but the allocation of {allocation.holder_label}{where} has {left} "
        f"{period_phrase(allocation)}; it resets {resets(standing)}. Ask for fewer GPUs or a shorter walltime, or "
        "ask your admin for more."
    )


def hours(value: float) -> str:
    return f"{value:,.2f}".rstrip("0").rstrip(".")


def period_phrase(allocation: Allocation) -> str:
    return {"day": "today", "week": "this week", "month": "this month"}.get(allocation.period, "this term")


def resets(standing: spend.Standing) -> str:
    """When: "on 2027-01-01 at 00:00 (Europe/Berlin)", or for a term "when the term ends, after 2027-03-31"."""
    if standing.allocation.period == Allocation.Period.TERM:
        return f"when the term ends, after {standing.allocation.ends_on}"
    local = timezone.localtime(standing.window.resets_at)
    return f"on {local:%Y-%m-%d at %H:%M} ({timezone.get_current_timezone_name()})"
