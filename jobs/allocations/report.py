"""An allocation's standing as the CLI, the usage pages and /metrics show it: one definition of what is reported."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.contrib.auth.models import User
from django.utils import timezone

from jobs.allocations import spend
from jobs.allocations.check import hours, period_phrase, resets
from jobs.models import Allocation


def entry(allocation: Allocation, now: datetime | None = None) -> dict[str, Any]:
    """What the allocation sets and, while in force, what is spent and left and when it resets (JSON-ready)."""
    standing = spend.standing(allocation, now)
    row: dict[str, Any] = {
        "id": allocation.pk,
        "holder": allocation.holder_key,
        "cluster": allocation.cluster.slug if allocation.cluster_id else None,  # type: ignore[union-attr]
        "period": allocation.period,
        "from": allocation.starts_on.isoformat() if allocation.starts_on else None,
        "to": allocation.ends_on.isoformat() if allocation.ends_on else None,
        "gpu_hours": float(allocation.gpu_hours) if allocation.gpu_hours is not None else None,
        "tokens": allocation.tokens,
        "soft_percent": allocation.soft_percent,
        "action": allocation.action,
        "managers": sorted(m.get_username() for m in allocation.managers.all()),
        "in_force": standing is not None,
    }
    if standing is not None:
        row |= {
            "period_start": standing.window.start.isoformat(),
            "resets_at": standing.window.resets_at.isoformat(),
            "gpu_hours_spent": round(standing.gpu_hours, 4),
            "gpu_hours_reserved": round(standing.reserved_gpu_hours, 4),
            "gpu_hours_left": None if standing.gpu_hours_left is None else round(standing.gpu_hours_left, 4),
            "tokens_spent": standing.tokens,
            "tokens_left": standing.tokens_left,
            "percent": round(standing.percent, 1),
        }
    return row


def line(standing: spend.Standing) -> str:
    """One sentence: "12.5 of 100 GPU-hours (2 reserved) and 1,200 of 50,000 tokens spent this month; resets …"."""
    allocation, parts = standing.allocation, []
    if allocation.gpu_hours is not None:
        reserved = f" ({hours(standing.reserved_gpu_hours)} reserved)" if standing.reserved_gpu_hours else ""
        parts.append(f"{hours(standing.gpu_hours)} of {hours(float(allocation.gpu_hours))} GPU-hours{reserved}")
    if allocation.tokens is not None:
        parts.append(f"{standing.tokens:,} of {allocation.tokens:,} tokens")
    return f"{' and '.join(parts)} spent {period_phrase(allocation)}; resets {resets(standing)}"


def of_user(user: User, now: datetime | None = None) -> list[spend.Standing]:
    """The standings of every allocation that applies to `user` and is in force (My usage)."""
    found = (spend.standing(a, now) for a in spend.applying(user))
    return [s for s in found if s is not None]


def of_site(now: datetime | None = None) -> list[spend.Standing]:
    """Every allocation in force, the nearest to its end first (Site usage)."""
    now = now or timezone.now()
    rows = Allocation.objects.select_related("user", "group", "cluster")
    found = [s for s in (spend.standing(a, now) for a in rows) if s is not None]
    return sorted(found, key=lambda s: -s.percent)


def shown(standing: spend.Standing) -> dict[str, Any]:
    """What the usage pages show of one standing (templates/jobs/_allocations.html)."""
    allocation = standing.allocation
    gpu = tokens = "—"
    if allocation.gpu_hours is not None:
        reserved = f" ({hours(standing.reserved_gpu_hours)} reserved)" if standing.reserved_gpu_hours else ""
        gpu = f"{hours(standing.gpu_hours)} of {hours(float(allocation.gpu_hours))}{reserved}"
    if allocation.tokens is not None:
        tokens = f"{standing.tokens:,} of {allocation.tokens:,}"
    return {
        "holder": allocation.holder_label,
        "where": allocation.cluster.name if allocation.cluster_id else "every cluster",  # type: ignore[union-attr]
        "period": allocation.get_period_display(),
        "gpu_hours": gpu,
        "tokens": tokens,
        "percent": min(100, round(standing.percent)),
        "resets": resets(standing),
        "action": allocation.get_action_display(),
        "state": "spent" if standing.spent else "near its end" if standing.soft else "",
    }
