"""An allocation's current period: from its start (local midnight of the day, the week's Monday, the month's first,
the term's first day) up to when it resets (the next one's start; a term's day after its last)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

from jobs.models import Allocation
from jobs.models.summaries import midnight


@dataclass(frozen=True)
class Window:
    start: datetime
    resets_at: datetime


def current(allocation: Allocation, now: datetime | None = None) -> Window | None:
    """The period `now` falls in; None for a term not in force (before its first day or after its last)."""
    now = now or timezone.now()
    today = timezone.localdate(now)
    if not allocation.in_force(today):
        return None
    period = allocation.period
    if period == Allocation.Period.DAY:
        first, after = today, today + timedelta(days=1)
    elif period == Allocation.Period.WEEK:
        first = today - timedelta(days=today.weekday())
        after = first + timedelta(days=7)
    elif period == Allocation.Period.MONTH:
        first = today.replace(day=1)
        after = (first + timedelta(days=32)).replace(day=1)
    else:
        assert allocation.starts_on is not None and allocation.ends_on is not None
        first, after = allocation.starts_on, allocation.ends_on + timedelta(days=1)
    return Window(midnight(first), midnight(after))
