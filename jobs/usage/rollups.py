"""Proxy requests summarised, so that the usage figures never read every request row: what is kept, how a period
splits between the summaries and the raw rows, and `summarise`, which beat runs (jobs.summarise_usage).

What is kept (jobs.models.UsageRollup, UsageWindow):

- per local day and per local month, each API route's tallies (requests, errors, tokens, bytes) and the buckets of the
  times to first token and of the speeds (count, smallest and largest value): per session and user (any key, any
  scope), per user alone (the site's tables by user or by group read these) and per session alone (the site's tables
  by model, cluster, ..., month);
- per session, each clock-aligned 15-minute window in which a request started, with its first and last request (the
  GPU-hours with traffic; whether a window at the edge of a run had a request inside the run).

`summarise` rebuilds whole days from the raw rows up to a watermark (a window's start: none is ever cut), then the
months those days are in from the days, then deletes the raw rows older than PORTAL_USAGE_RAW_DAYS, which the
summaries now hold. A day is rebuilt whole, never added to, so running it twice, or again after downtime, gives the
same rows.

A figure reads, for its period, the summaries of the whole days and months inside it (the last one up to the
watermark), and the raw rows none of them holds: those after the watermark, those recorded since the last run that
started before it (a long stream is recorded when it ends; its GPU-hours with traffic wait for the next run), and
the edges of a period that does not start at midnight. Both come back in one query (UNION ALL), with the same
columns, so the figures add them up alike and recording a request costs what it always did.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import (
    CharField,
    Count,
    ExpressionWrapper,
    F,
    Func,
    IntegerField,
    Max,
    Min,
    Q,
    QuerySet,
    Sum,
    Value,
)
from django.utils import timezone

from jobs.models import SPEED_BOUNDS, TTFT_BOUNDS_MS, ProxyRequest, UsageRollup, UsageWatermark, UsageWindow
from jobs.models.summaries import EPOCH, midnight, next_month

log = logging.getLogger(__name__)

WINDOW = timedelta(minutes=15)  # the traffic windows' length; clock-aligned
UNIX = datetime(1970, 1, 1, tzinfo=UTC)  # where QuarterHour counts windows from
# Days rebuilt in one transaction while catching up: a run cut short by its time limit keeps what it did, and the
# proxy's own writes never wait long on SQLite's one writer.
CHUNK_DAYS = 7
# Each run also rebuilds the day of the watermark less this: a row PostgreSQL committed after a later one (its id is
# below the last run's highest) is taken at the next run.
SETTLE = timedelta(minutes=15)
DELETE_BATCH = 5000

Grain = UsageRollup.Grain
Breakdown = UsageRollup.Breakdown
Metric = UsageRollup.Metric
# Figures that add up, named alike on ProxyRequest and UsageRollup; `requests` and `errors` are counted.
SUMMED = ("prompt_tokens", "completion_tokens", "cached_tokens", "bytes_in", "bytes_out")
HISTOGRAMS = ((Metric.TTFT, "ttft_ms", TTFT_BOUNDS_MS), (Metric.SPEED, "tokens_per_s", SPEED_BOUNDS))
RAW = "raw"  # a row of raw_rows: the tallies, and a bucket of each histogram (where the requests had the values)
# Which of a breakdown's keys a row has: the summaries are grouped by them.
BREAKDOWN_KEYS: dict[str, tuple[str, ...]] = {
    Breakdown.SESSION_USER: ("session", "user"),
    Breakdown.USER: ("user",),
    Breakdown.SESSION: ("session",),
}


def window_start(moment: datetime) -> datetime:
    """The clock-aligned 15-minute window holding `moment` (as QuarterHour counts them)."""
    moment = moment.astimezone(UTC)
    return moment.replace(minute=moment.minute - moment.minute % 15, second=0, microsecond=0)


class QuarterHour(Func):
    """The clock-aligned 15-minute window a moment falls in, counted in windows since 1970. The same windows in UTC as
    in any time zone (they all differ from UTC by whole quarters of an hour), so no time zone is needed, and the SQL
    is native on both databases (Django's own date functions are Python functions called per row on SQLite)."""

    output_field = IntegerField()
    template = "CAST(FLOOR(EXTRACT(EPOCH FROM %(expressions)s) / 900) AS bigint)"

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        # The format goes as a parameter: a literal '%s' would be taken for one.
        seconds = Func(Value("%s"), *self.get_source_expressions(), function="strftime")
        sql, params = compiler.compile(seconds)
        return f"(CAST({sql} AS INTEGER) / 900)", list(params)


def stored(expression: Any) -> ExpressionWrapper[Any]:
    """A moment as the database returns it, without Django's conversion (moment() reads it): on SQLite the
    conversion (text to an aware datetime) cost more than reading the rows for the usage figures' thousands of
    session and window moments (bench/usage.py)."""
    return ExpressionWrapper(expression, output_field=CharField())


def moment(value: datetime | str | None) -> datetime | None:
    """A moment from stored(): PostgreSQL's driver returns an aware datetime; SQLite the UTC text Django wrote, or for
    a column itself (not an aggregate of it) the naive datetime its driver parsed that text into."""
    if value is None:
        return None
    found = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return found if found.tzinfo is not None else found.replace(tzinfo=UTC)


class Bucket(Func):
    """The bucket a successful request's value falls in (bucket i holds values below bounds[i] and not below
    bounds[i - 1]); NULL for failed requests and missing values. One CASE written from the two compiled columns:
    built as Case(When(Q...)) it resolved a filter per bound, which cost the usage pages more than their queries
    (bench/usage.py)."""

    output_field = IntegerField()

    def __init__(self, name: str, bounds: tuple[float, ...]) -> None:
        super().__init__(F(name), F("status"))
        self.bounds = bounds

    def as_sql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:  # type: ignore[override]
        value, status = (compiler.compile(expression) for expression in self.get_source_expressions())
        (value_sql, value_params), (status_sql, status_params) = value, status
        sql = [f"CASE WHEN ({status_sql} >= 400 OR {value_sql} IS NULL) THEN NULL"]
        params = [*status_params, *value_params]
        for i, bound in enumerate(self.bounds):
            sql.append(f"WHEN {value_sql} < %s THEN {i}")
            params += [*value_params, bound]
        sql.append(f"ELSE {len(self.bounds)} END")
        return " ".join(sql), params


# What every row of raw_rows and summed has after its keys, in this order (their UNION ALL lines them up): the kind
# of row (RAW or a Metric), the TTFT and speed buckets, the tallies, and each histogram's smallest and largest value.
def raw_rows(rows: QuerySet[ProxyRequest], keys: Mapping[str, Any], sums: Sequence[str] = SUMMED) -> QuerySet[Any]:
    """Raw request rows grouped by `keys` and by the buckets of their TTFT and speed, in one pass; of the SUMMED
    figures, those in `sums` (a figure that shows fewer reads fewer)."""
    (_, ttft, ttft_bounds), (_, speed, speed_bounds) = HISTOGRAMS
    return (
        rows.values(**keys, x_metric=Value(RAW), x_tb=Bucket(ttft, ttft_bounds), x_sb=Bucket(speed, speed_bounds))
        .annotate(
            x_requests=Count("id"),
            x_errors=Count("id", filter=Q(status__gte=400)),
            **{f"x_{name}": Sum(name) for name in sums},
            x_ttft_low=Min(ttft),
            x_ttft_high=Max(ttft),
            x_speed_low=Min(speed),
            x_speed_high=Max(speed),
        )
        .order_by()  # the model's ordering would otherwise join the GROUP BY
    )


def summed(rollups: QuerySet[UsageRollup], keys: Mapping[str, Any], sums: Sequence[str] = SUMMED) -> QuerySet[Any]:
    """Summaries added up by `keys`, with the columns of raw_rows (a histogram row's bucket and values in both)."""
    return (
        rollups.values(**keys, x_metric=F("metric"), x_tb=F("bucket"), x_sb=F("bucket"))
        .annotate(
            x_requests=Sum("requests"),
            x_errors=Sum("errors"),
            **{f"x_{name}": Sum(name) for name in sums},
            x_ttft_low=Min("low"),
            x_ttft_high=Max("high"),
            x_speed_low=Min("low"),
            x_speed_high=Max("high"),
        )
        .order_by()
    )


def together(parts: list[QuerySet[Any]]) -> QuerySet[Any]:
    """The parts' rows in one query (UNION ALL): they have the same columns."""
    return parts[0].union(*parts[1:], all=True)


def counts_tallies(row: Mapping[str, Any]) -> bool:
    """Whether a row of raw_rows or summed carries tallies (requests, errors, tokens, bytes)."""
    return bool(row["x_metric"] in (RAW, Metric.TALLIES))


def buckets_of(row: Mapping[str, Any]) -> list[tuple[str, int, int, float, float]]:
    """The histogram buckets a row of raw_rows or summed adds to: (metric, bucket, requests, smallest, largest)."""
    found: list[tuple[str, int, int, float, float]] = []
    for metric, column in ((Metric.TTFT, "tb"), (Metric.SPEED, "sb")):
        if row["x_metric"] in (RAW, metric) and row[f"x_{column}"] is not None:
            found.append((metric, row[f"x_{column}"], row["x_requests"], row[f"x_{metric}_low"],
                          row[f"x_{metric}_high"]))  # fmt: skip
    return found


# Summarising


def _rollups(rows: Iterable[Mapping[str, Any]], breakdown: str, grain: str, start: date) -> list[UsageRollup]:
    """Rows of raw_rows or summed, keyed by k_session, k_user and k_endpoint, as summaries to save: one row of tallies
    per key, one per histogram bucket (without the route)."""
    keys = BREAKDOWN_KEYS[breakdown]
    found: dict[tuple[Any, ...], UsageRollup] = {}
    for row in rows:
        owner = {f"{key}_id": row[f"k_{key}"] for key in keys}
        if counts_tallies(row):
            key = (*owner.values(), row["k_endpoint"])
            tallies = found.get(key)
            if tallies is None:
                tallies = found[key] = UsageRollup(endpoint=row["k_endpoint"], **owner)
            for name in ("requests", "errors", *SUMMED):
                setattr(tallies, name, getattr(tallies, name) + (row[f"x_{name}"] or 0))
        for metric, bucket, n, low, high in buckets_of(row):
            key = (*owner.values(), metric, bucket)
            one = found.get(key)
            if one is None:
                found[key] = UsageRollup(metric=metric, bucket=bucket, requests=n, low=low, high=high, **owner)
            else:
                one.requests += n
                one.low = low if one.low is None else min(one.low, low)
                one.high = high if one.high is None else max(one.high, high)
    for one in found.values():
        one.breakdown, one.grain, one.start = breakdown, grain, start
    return list(found.values())


def _key_values(breakdown: str) -> dict[str, Any]:
    return {f"k_{key}": F(key) for key in BREAKDOWN_KEYS[breakdown]} | {"k_endpoint": F("endpoint")}


def _derived(
    source: QuerySet[UsageRollup], grain: str, start: date, breakdowns: Iterable[str] = tuple(Breakdown)
) -> list[UsageRollup]:
    """Breakdowns of one unit, from the per-session-and-user summaries in `source`."""
    found = []
    for breakdown in breakdowns:
        found += _rollups(summed(source, _key_values(breakdown)), breakdown, grain, start)
    return found


def _rebuild_day(day: date, until: datetime, last_id: int) -> None:
    """A day's summaries and traffic windows from its raw rows that started before `until`, ids up to `last_id`."""
    rows = ProxyRequest.objects.filter(
        at__gte=midnight(day), at__lt=min(midnight(day + timedelta(days=1)), until), pk__lte=last_id
    )
    UsageRollup.objects.filter(grain=Grain.DAY, start=day).delete()
    UsageWindow.objects.filter(day=day).delete()
    keys = {"k_session": F("session_id"), "k_user": F("user_id"), "k_endpoint": F("endpoint")}
    per_pair = raw_rows(rows, keys)
    UsageRollup.objects.bulk_create(_rollups(per_pair, Breakdown.SESSION_USER, Grain.DAY, day), batch_size=1000)
    pairs = UsageRollup.objects.filter(breakdown=Breakdown.SESSION_USER, grain=Grain.DAY, start=day)
    others = _derived(pairs, Grain.DAY, day, (Breakdown.USER, Breakdown.SESSION))
    UsageRollup.objects.bulk_create(others, batch_size=1000)
    windows = rows.values("session_id", n=QuarterHour("at")).annotate(first=Min("at"), last=Max("at")).order_by()
    UsageWindow.objects.bulk_create(
        [
            UsageWindow(
                session_id=w["session_id"],
                start=UNIX + w["n"] * WINDOW,
                day=day,
                first_at=w["first"],
                last_at=w["last"],
            )
            for w in windows
        ],
        batch_size=1000,
    )


def _rebuild_month(first: date) -> None:
    """A month's summaries from its days'."""
    UsageRollup.objects.filter(grain=Grain.MONTH, start=first).delete()
    days = UsageRollup.objects.filter(
        breakdown=Breakdown.SESSION_USER, grain=Grain.DAY, start__gte=first, start__lt=next_month(first)
    )
    UsageRollup.objects.bulk_create(_derived(days, Grain.MONTH, first), batch_size=1000)


def _step(target: datetime, now: datetime) -> bool:
    """Move the watermark towards `target`, CHUNK_DAYS at most, in one transaction; False when there was nothing to
    do. The watermark's row is locked (PostgreSQL) and SQLite has one writer, so two runs never interleave."""
    with transaction.atomic():
        UsageWatermark.objects.get_or_create(pk=1, defaults={"until": EPOCH})
        mark = UsageWatermark.objects.select_for_update().get(pk=1)
        last_id = ProxyRequest.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
        late = ProxyRequest.objects.filter(pk__gt=mark.last_request_id, at__lt=mark.until)
        late_days = {timezone.localdate(at) for at in late.values_list("at", flat=True)}
        if mark.until >= target and not late_days:
            return False
        # From the watermark's day on (the first run, and one after downtime: from the first row since, so that no
        # empty day is gone through).
        rest = ProxyRequest.objects.filter(at__gte=mark.until - SETTLE, at__lt=target)
        since = rest.order_by("at").values_list("at", flat=True).first() or target
        from_day = timezone.localdate(since)
        until = min(target, max(mark.until, midnight(from_day + timedelta(days=CHUNK_DAYS))))
        last_day = timezone.localdate(until - timedelta(microseconds=1))
        days = {from_day + timedelta(days=i) for i in range((last_day - from_day).days + 1)}
        oldest = _retention_cutoff(now)
        for day in sorted(days | late_days):
            if midnight(day) < oldest and day in late_days:
                log.warning("requests of %s recorded after their raw rows were deleted: left out of the usage", day)
                continue
            _rebuild_day(day, until, last_id)
        for month in sorted({day.replace(day=1) for day in days | late_days}):
            _rebuild_month(month)
        mark.until, mark.last_request_id, mark.revision = until, last_id, new_revision()
        mark.save()
        return True


def new_revision() -> str:
    """A new UsageWatermark.revision: random, so that none ever comes back (jobs/usage/memo.py)."""
    return uuid.uuid4().hex


def deleted_with_summaries(sender: Any, **kwargs: Any) -> None:
    """A session or a user was deleted, and their summaries with them: what was remembered of the summaries is not
    right anymore (post_delete, jobs/apps.py)."""
    UsageWatermark.objects.filter(pk=1).update(revision=new_revision())


def _retention_cutoff(now: datetime | None = None) -> datetime:
    return midnight(timezone.localdate(now) - timedelta(days=settings.PORTAL_USAGE_RAW_DAYS))


def _delete_old(now: datetime) -> int:
    """Delete the raw rows older than PORTAL_USAGE_RAW_DAYS that the summaries hold, in batches."""
    mark = UsageWatermark.objects.filter(pk=1).first()
    if mark is None:
        return 0
    old = ProxyRequest.objects.filter(at__lt=min(_retention_cutoff(now), mark.until), pk__lte=mark.last_request_id)
    deleted = 0
    while ids := list(old.order_by().values_list("pk", flat=True)[:DELETE_BATCH]):
        deleted += ProxyRequest.objects.filter(pk__in=ids).delete()[0]
    return deleted


def summarise(now: datetime | None = None) -> int:
    """Summarise the requests up to the last window's start before `now` and delete the raw rows past their keep;
    the days rebuilt. Steps:

    1. until the watermark reaches the target: rebuild the days from the watermark's (or the first row's) on, CHUNK_DAYS
       at a time, and those a request arrived for since the last run; then their months; then move the watermark;
    2. delete the raw rows older than PORTAL_USAGE_RAW_DAYS that the summaries hold.
    """
    now = now or timezone.now()
    target = window_start(now)
    steps = 0
    while _step(target, now):
        steps += 1
    deleted = _delete_old(now)
    if steps or deleted:
        log.info("usage summarised up to %s in %d steps; %d raw rows deleted", target, steps, deleted)
    return steps
