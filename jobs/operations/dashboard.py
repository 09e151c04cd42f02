"""The site dashboard's live figures, for sites without Prometheus: sessions by state and cluster, queue waits per
partition, the proxy's request and error counts, batch runs in progress. A fixed handful of queries."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from statistics import median
from typing import Any

from django.db.models import Count, Q
from django.utils import timezone

from jobs.models import LIVE_STATES, BatchRun, LLMSession, ProxyRequest, State

WAITS_OVER = timedelta(hours=24)


@dataclass
class Waits:
    """Queue waits on one partition: of the sessions that started in the last day, and of those queued now."""

    cluster: str
    partition: str
    started: list[float] = field(default_factory=list)  # minutes from submit to start
    queued_now: int = 0
    longest_now_min: float = 0.0

    @property
    def median_min(self) -> float | None:
        return median(self.started) if self.started else None

    @property
    def max_min(self) -> float | None:
        return max(self.started) if self.started else None


@dataclass
class Traffic:
    label: str
    requests: int
    errors: int

    @property
    def error_pct(self) -> float | None:
        return 100 * self.errors / self.requests if self.requests else None


@dataclass
class Dashboard:
    at: datetime
    states: list[tuple[str, int]]  # live states, with their counts over all clusters
    by_cluster: list[tuple[str, list[int]]]  # cluster, and its count in each of `states`' states
    waits: list[Waits]
    traffic: list[Traffic]
    batch_runs: list[BatchRun]


def now() -> Dashboard:
    moment = timezone.now()
    live = (
        LLMSession.objects.filter(state__in=LIVE_STATES)
        .values("state", "cluster__name")
        .annotate(n=Count("id"))
        .order_by()
    )
    totals: dict[str, int] = defaultdict(int)
    clusters: dict[str, dict[str, int]] = defaultdict(dict)
    for row in live:
        totals[row["state"]] += row["n"]
        clusters[row["cluster__name"]][row["state"]] = row["n"]
    shown = [(value, label) for value, label in State.choices if value in LIVE_STATES]
    return Dashboard(
        at=moment,
        states=[(label, totals.get(value, 0)) for value, label in shown],
        by_cluster=[(name, [counts.get(value, 0) for value, _ in shown]) for name, counts in sorted(clusters.items())],
        waits=_waits(moment),
        traffic=_traffic(moment),
        batch_runs=list(
            BatchRun.objects.exclude(state__in=BatchRun.END_STATES)
            .select_related("owner", "session__cluster")
            .order_by("created_at")[:50]
        ),
    )


def _waits(moment: datetime) -> list[Waits]:
    found: dict[tuple[str, str], Waits] = {}
    rows: Any = (
        LLMSession.objects.filter(submitted_at__isnull=False)
        .filter(Q(started_at__gte=moment - WAITS_OVER) | Q(state=State.QUEUED))
        .values_list("cluster__name", "partition__name", "state", "submitted_at", "started_at")
    )
    for cluster, partition, state, submitted, started in rows:
        waits = found.setdefault((cluster, partition), Waits(cluster, partition))
        if state == State.QUEUED:
            waits.queued_now += 1
            waits.longest_now_min = max(waits.longest_now_min, (moment - submitted).total_seconds() / 60)
        elif started is not None:
            waits.started.append(max(0.0, (started - submitted).total_seconds() / 60))
    return [found[key] for key in sorted(found)]


def _traffic(moment: datetime) -> list[Traffic]:
    spans = {"last hour": timedelta(hours=1), "last day": timedelta(days=1)}
    counts = ProxyRequest.objects.filter(at__gte=moment - spans["last day"]).aggregate(
        hour=Count("id", filter=Q(at__gte=moment - spans["last hour"])),
        hour_errors=Count("id", filter=Q(at__gte=moment - spans["last hour"], status__gte=400)),
        day=Count("id"),
        day_errors=Count("id", filter=Q(status__gte=400)),
    )
    return [
        Traffic("last hour", counts["hour"], counts["hour_errors"]),
        Traffic("last day", counts["day"], counts["day_errors"]),
    ]
