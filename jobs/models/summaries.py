"""Reading usage for a period: how it splits between the summaries (UsageRollup, UsageWindow, up to the watermark)
and the raw ProxyRequest rows none of them holds, and the local days and months it is made of.

Here, below every subpackage, because more than the usage pages read usage: jobs.usage's figures and its summariser,
and jobs.allocations (the tokens an allocation's users spent in its period, which may be longer than the raw rows
are kept).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from functools import lru_cache
from typing import Any

from django.db.models import DateField, F, Func, Q, QuerySet
from django.db.models.functions import Coalesce, TruncDate
from django.db.models.lookups import Exact, GreaterThanOrEqual, In, LessThan
from django.utils import timezone

from jobs.models.usage import ProxyRequest, UsageRollup, UsageWatermark, UsageWindow

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # before any row: "all time" starts here, and so does the watermark
Grain = UsageRollup.Grain


def midnight(day: date, zone: tzinfo | None = None) -> datetime:
    """The start of a day in the portal's time zone (or `zone`: a loop over many days reads the current one once;
    reading it costs more than the rest)."""
    return _midnight(day, zone or timezone.get_current_timezone())


@lru_cache(maxsize=4096)
def _midnight(day: date, zone: tzinfo) -> datetime:
    # Cached: the usage figures split every session's run across days, and make_aware was a fifth of a table by
    # month (bench/usage.py).
    return timezone.make_aware(datetime.combine(day, time.min), zone)


def next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


@dataclass(frozen=True)
class Mark:
    """Where the summaries stand (UsageWatermark): they hold every request that started before `until` and whose id
    is at most `last_request_id`. Read once per figure and given to the queries as constants, so that each database
    plans them from its statistics (a bound it cannot see made PostgreSQL plan parallel scans of the whole table)."""

    until: datetime = EPOCH
    last_request_id: int = 0
    revision: str = ""  # UsageWatermark.revision: "" before the first run, when nothing may be remembered

    @classmethod
    def read(cls) -> Mark:
        found = UsageWatermark.objects.filter(pk=1).values_list("until", "last_request_id", "revision").first()
        return cls(*found) if found else cls()


@dataclass(frozen=True)
class Cover:
    """How a period splits between summaries and raw rows: the days and months (`units`, each a grain and its first
    day, in order) that lie inside it whole, and whether the last of them holds the period's end (`cut`: a period
    that ends now), when it counts only if the summaries stop before that end."""

    start: datetime
    end: datetime
    units: tuple[tuple[str, date], ...]
    cut: bool
    mark: Mark

    @classmethod
    def of(cls, start: datetime, end: datetime, months: bool, mark: Mark) -> Cover:
        """The units from the first midnight of the period on; months where a whole one fits (or one ends the period)
        and `months` allows, days elsewhere."""
        day = timezone.localdate(start)
        if midnight(day) < start:
            day += timedelta(days=1)
        last = timezone.localdate(end)
        cut = midnight(last) < end  # else `last` is the day after the period
        units: list[tuple[str, date]] = []
        while day < last or (cut and day == last):
            if months and day.day == 1 and (next_month(day) <= last or cut):
                units.append((Grain.MONTH, day))
                day = next_month(day)
            else:
                units.append((Grain.DAY, day))
                day += timedelta(days=1)
        if cut and units and mark.until > end:  # its summary ran on beyond the period: the raw rows say
            units.pop()
            cut = False
        return cls(start, end, tuple(units), cut and bool(units), mark)

    @property
    def summarised_until(self) -> datetime:
        """Where the units' summaries end: the raw rows from here on are the period's rest."""
        if not self.units:
            return self.start
        if self.cut:
            return min(self.mark.until, self.end)
        grain, first = self.units[-1]
        return min(self.mark.until, midnight(next_month(first) if grain == Grain.MONTH else first + timedelta(days=1)))

    def _ranges(self) -> Iterator[tuple[str, date, date]]:
        """The units as runs of one grain: (grain, first start, last start)."""
        run: list[tuple[str, date]] = []
        for unit in self.units:
            if run and unit[0] != run[0][0]:
                yield run[0][0], run[0][1], run[-1][1]
                run = []
            run.append(unit)
        if run:
            yield run[0][0], run[0][1], run[-1][1]

    def rollups(self, rows: QuerySet[UsageRollup]) -> QuerySet[UsageRollup]:
        """The summaries of the units."""
        found = Q(pk__in=[])  # nothing: the query leaves this part out
        for grain, first, last in self._ranges():
            found |= Q(grain=grain, start__gte=first, start__lte=last)
        return rows.filter(found)

    @property
    def windows_from(self) -> datetime | None:
        """Where the units' traffic windows start (None: no unit)."""
        return midnight(self.units[0][1]) if self.units else None

    def windows(self, rows: QuerySet[UsageWindow]) -> QuerySet[UsageWindow]:
        """The summarised traffic windows of the units."""
        if self.windows_from is None:
            return rows.none()
        return rows.filter(start__gte=self.windows_from, start__lt=self.summarised_until)

    def local_day(self, field: str) -> LocalDay:
        """The local day of a raw row's `field` (a moment), for grouping the raw rows by day: the days from where the
        summaries end to the period's end by their midnights, the rest (late rows, a period's head) as TruncDate."""
        first = timezone.localdate(max(self.start, self.summarised_until))
        last = timezone.localdate(self.end - timedelta(microseconds=1))
        count = min((last - first).days + 1, LocalDay.MAX_DAYS)
        days = [last - timedelta(days=i) for i in range(max(count, 0))]
        return LocalDay(field, tuple((midnight(day), day) for day in days))

    def raw(
        self, rows: QuerySet[ProxyRequest], *, user_id: int | None = None, session_ids: Any = None, late: bool = True
    ) -> QuerySet[ProxyRequest]:
        """The raw rows in the period (of a user, of some sessions) that no unit's summary holds: before the first
        unit, after the summaries' end, and with `late` those recorded since the last run although they started
        before its watermark.

        Each alternative is one range of one index, so that the database reads only those rows, never the whole
        period's, nor every row of a user or a session: a user's ranges come from their (user, moment) index; the
        late rows by id; a session is checked on the rows found (no index has it before the moment)."""
        if session_ids is not None:
            rows = rows.filter(In(unindexed("session_id"), session_ids))
        mine = Q() if user_id is None else Q(user_id=user_id)
        if not self.units:
            return rows.filter(mine, at__gte=self.start, at__lt=self.end)
        outside = mine & Q(at__gte=max(self.start, self.summarised_until), at__lt=self.end)
        if self.start < (first := midnight(self.units[0][1])):
            outside |= mine & Q(at__gte=self.start, at__lt=first)
        if late:
            moment = unindexed("at")
            late_rows = Q(GreaterThanOrEqual(moment, first), LessThan(moment, self.summarised_until))
            late_rows &= Q(pk__gt=self.mark.last_request_id)
            if user_id is not None:
                late_rows &= Q(Exact(unindexed("user_id"), user_id))
            outside |= late_rows
        return rows.filter(outside)


class LocalDay(Func):
    """The local day of a moment, as TruncDate(field) gives it, written as one CASE over the midnights of a few known
    days (newest first) and TruncDate for a moment before them. On SQLite TruncDate is a Python function called per
    row, with the time zone looked up each time: it was 40 % of My usage's time over the raw rows of a busy quarter
    hour (bench/usage.py), where a comparison of the stored text costs next to nothing."""

    MAX_DAYS = 32  # midnights written out; the summaries are hours behind at most, unless beat has stopped for long
    output_field = DateField()

    def __init__(self, field: str, midnights: tuple[tuple[datetime, date], ...]) -> None:
        super().__init__(F(field), TruncDate(field))
        self.midnights = midnights

    def as_sql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:  # type: ignore[override]
        (moment_sql, moment_params), (fallback_sql, fallback_params) = (
            compiler.compile(expression) for expression in self.get_source_expressions()
        )
        if not self.midnights:  # the summaries hold the period's end: only late rows, if any
            return fallback_sql, list(fallback_params)
        sql, params = ["CASE"], []
        for start, day in self.midnights:
            sql.append(f"WHEN {moment_sql} >= %s THEN %s")
            params += [*moment_params, connection.ops.adapt_datetimefield_value(start)]
            params.append(connection.ops.adapt_datefield_value(day))
        sql.append(f"ELSE {fallback_sql} END")
        return " ".join(sql), [*params, *fallback_params]


def unindexed(field: str) -> Coalesce:
    """A column compared through an expression, which no index serves: where SQLite would otherwise read a whole
    period or a whole user's rows by their index to find the few rows another condition (an id's range) picks."""
    return Coalesce(field, field)
