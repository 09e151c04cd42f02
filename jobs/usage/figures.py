"""Usage figures: what users (and groups of them, accounts, clusters, models, ...) used, from the proxy's request rows,
the sessions' Slurm run times and the batch runs' token counts. Plain functions over the ORM; the pages, the CSV and
the command line present them (tables.py).

Every figure is built from a *cube*: the tallies of each combination of a few keys (a day, a user, a model, ...),
read in four queries whatever the number of rows (and one for where the summaries stand, and one for each kind of
name the keys join: the users', the sessions'), then rolled up in Python:

1. requests, grouped by the keys and by the buckets (TTFT_BOUNDS_MS, SPEED_BOUNDS) their time to first token and
   tokens/s fall in: counts, errors, tokens, and each bucket's smallest and largest value;
2. the sessions that ran in the period, with their GPUs, Slurm start and end, and keys;
3. per session (and day): how many clock-aligned 15-minute windows had a request start in them (the traffic);
4. batch runs' tokens, grouped by the keys.

Queries 1 and 3 read the summaries of rollups.py for the whole days and months of the period and the raw request rows
for the rest (the last minutes, mostly), both in one query. What they read from the summaries is remembered until the
summaries' next revision (memo.py), and the next views read only the raw rows.

Everything in a tally adds up across rows, percentiles included: bucket counts add, and the percentile is
interpolated from them at the end (never by loading the rows).

Definitions (docs/usage.md):

- reserved GPU-hours: a session's GPUs (per node times nodes) times its run time as Slurm counts it, from Slurm's
  own start to its end (or now, while it runs); the part inside the period, split across days and months by overlap.
  A session its owner deleted still counts.
- GPU-hours with traffic: the same GPUs times the part of the run that falls in clock-aligned 15-minute windows
  (:00, :15, :30, :45) in which at least one request through the portal (chat or API, by anyone) started. A session
  reserved for a day and used for an hour shows 24 reserved and about 1 with traffic: the rest sat idle. Batch runs
  do not go through the proxy, so a batch session's GPU-hours show no traffic.
- requests, errors (status 400 or more), prompt and completion tokens: counted for the user who made the request,
  owner or not (a session shared with a lab counts each member's own requests); GPU-hours for the session's owner.
- batch tokens: the prompt and completion tokens of batch runs, for the run's owner, on the day the run started.
- TTFT and tokens/s percentiles: of successful requests that have them (streams have a time to first token; replies
  of more than one token a speed), interpolated within the bucket between the smallest and largest value seen there.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from functools import cached_property
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import Count, F, Max, Min, Q, QuerySet, Sum, Value
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from jobs.models import (
    SPEED_BOUNDS,
    TTFT_BOUNDS_MS,
    BatchRun,
    FineTuneRun,
    LLMSession,
    ProxyRequest,
    UsageRollup,
    UsageWindow,
)
from jobs.models.summaries import EPOCH, Cover, Mark, midnight
from jobs.usage import memo, rollups
from jobs.usage.rollups import WINDOW, QuarterHour, window_start

WINDOW_HOURS = WINDOW.total_seconds() / 3600

Key = tuple[Any, ...]


@dataclass(frozen=True)
class Period:
    """From `start` up to `end` (exclusive); `end` is never later than now, so a running session ends there."""

    start: datetime
    end: datetime

    @classmethod
    def all_time(cls, now: datetime | None = None) -> Period:
        return cls(EPOCH, now or timezone.now())

    @classmethod
    def months(cls, n: int, now: datetime | None = None) -> Period:
        """This month and the n - 1 before it, up to now (in the portal's time zone)."""
        now = now or timezone.now()
        local = timezone.localtime(now)
        year, month = local.year, local.month - (n - 1)
        while month < 1:
            year, month = year - 1, month + 12
        return cls(midnight(date(year, month, 1)), now)

    @classmethod
    def between(cls, first: date, last: date, now: datetime | None = None) -> Period:
        """The days `first` to `last`, both whole (up to now)."""
        now = now or timezone.now()
        return cls(midnight(first), min(midnight(last + timedelta(days=1)), now))

    @property
    def first_day(self) -> date:
        return timezone.localdate(self.start)

    @property
    def last_day(self) -> date:
        """The local day of the period's last moment (its end is not in it)."""
        return timezone.localdate(self.end - timedelta(microseconds=1))

    def days(self) -> list[date]:
        """Every local day the period touches, in order."""
        first, last = self.first_day, self.last_day
        return [first + timedelta(days=i) for i in range((last - first).days + 1)] if self.end > self.start else []


@dataclass
class Histogram:
    """Values counted per bucket (bucket i holds values below bounds[i] and not below bounds[i - 1]; the last one
    those from the last bound up), with the smallest and largest value seen in each."""

    bounds: tuple[float, ...]
    buckets: dict[int, tuple[int, float, float]] = field(default_factory=dict)  # bucket -> (count, low, high)

    def add(self, bucket: int, count: int, low: float, high: float) -> None:
        n, lo, hi = self.buckets.get(bucket, (0, low, high))
        self.buckets[bucket] = (n + count, min(lo, low), max(hi, high))

    def merge(self, other: Histogram) -> None:
        # add() written out: a page's roll-ups merge thousands of histograms (bench/usage.py).
        mine = self.buckets
        for bucket, (count, low, high) in other.buckets.items():
            found = mine.get(bucket)
            if found is None:
                mine[bucket] = (count, low, high)
            else:
                n, lo, hi = found
                mine[bucket] = (n + count, lo if lo <= low else low, hi if hi >= high else high)

    @property
    def count(self) -> int:
        return sum(n for n, _, _ in self.buckets.values())

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0 < q < 1): the bucket holding it, and a straight line within it from its smallest to its
        largest value (exact when a bucket holds one value; never off by more than the bucket's width)."""
        total = self.count
        if not total:
            return None
        rank = q * total
        below = 0
        for bucket in sorted(self.buckets):
            n, low, high = self.buckets[bucket]
            if below + n >= rank:
                return low + (high - low) * max(0.0, rank - below) / n
            below += n
        return self.buckets[max(self.buckets)][2]


@dataclass
class Tally:
    """What one row of a table adds up to. Each figure is additive (add), so tallies roll up."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0
    gpu_hours: float = 0.0
    traffic_gpu_hours: float = 0.0
    session_ids: set[Any] = field(default_factory=set)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BOUNDS_MS))
    speed: Histogram = field(default_factory=lambda: Histogram(SPEED_BOUNDS))

    def add(self, other: Tally) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.batch_prompt_tokens += other.batch_prompt_tokens
        self.batch_completion_tokens += other.batch_completion_tokens
        self.gpu_hours += other.gpu_hours
        self.traffic_gpu_hours += other.traffic_gpu_hours
        self.session_ids |= other.session_ids
        self.ttft.merge(other.ttft)
        self.speed.merge(other.speed)

    @property
    def sessions(self) -> int:
        return len(self.session_ids)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def batch_tokens(self) -> int:
        return self.batch_prompt_tokens + self.batch_completion_tokens

    @property
    def ttft_p50_ms(self) -> float | None:
        return self.ttft.quantile(0.5)

    @property
    def ttft_p95_ms(self) -> float | None:
        return self.ttft.quantile(0.95)

    @property
    def tokens_per_s_p50(self) -> float | None:
        return self.speed.quantile(0.5)

    @property
    def tokens_per_s_p95(self) -> float | None:
        return self.speed.quantile(0.95)

    @property
    def traffic_pct(self) -> float | None:
        """The share of the reserved GPU-hours that had traffic."""
        return 100 * self.traffic_gpu_hours / self.gpu_hours if self.gpu_hours > 0 else None


def _first(*values: Any) -> Any:
    return values[0]


def _named(*values: Any) -> str:
    return "" if values[0] is None else str(values[0])


@dataclass(frozen=True)
class Dimension:
    """What a table may be grouped by. `paths` lead from a session to the value(s) naming a row, or from a person
    when `person` is set: who made a request, who owns a session or a batch run."""

    name: str
    label: str
    paths: tuple[str, ...]
    person: bool = False
    show: Callable[..., Any] = _named  # the row's key from the values at `paths`
    # A row of one may also be a row of another (a user in two groups counts in both): no total adds them up.
    overlaps: bool = False

    def request_paths(self) -> list[str]:
        return [("user__" if self.person else "session__") + p for p in self.paths]

    def session_paths(self) -> list[str]:
        return [("owner__" + p) if self.person else p for p in self.paths]

    def run_paths(self) -> list[str]:
        return [("owner__" if self.person else "session__") + p for p in self.paths]


def _account(slurm_account: str | None, default: str | None, cluster: str | None) -> str:
    return f"{slurm_account or default or '(default)'} on {cluster}"


def _partition(name: str | None, cluster: str | None) -> str:
    return f"{name} on {cluster}"


def _group(name: str | None) -> str:
    return name or "(no group)"


def _service(name: str | None) -> str:
    return name or "(not a service)"


DIMENSIONS = {
    d.name: d
    for d in (
        Dimension("user", "User", ("username",), person=True),
        Dimension("group", "Group", ("groups__name",), person=True, show=_group, overlaps=True),
        Dimension(
            "account",
            "Slurm account",
            ("account__slurm_account", "account__cluster__default_account", "cluster__slug"),
            show=_account,
        ),
        Dimension("cluster", "Cluster", ("cluster__name",)),
        Dimension("partition", "Partition", ("partition__name", "cluster__slug"), show=_partition),
        Dimension("gpu_type", "GPU type", ("gpu_type__name",)),
        Dimension("model", "Model", ("variant__model__name",)),
        # A model service's replicas: whoever made the requests, the GPU-hours are the service's (its owner's).
        Dimension("service", "Service", ("service__name",), show=_service),
    )
}
SESSION = Dimension("session", "Session", ("id",), show=_first)
DAY = "day"  # the local day: a key of its own (GPU-hours are split across days, not grouped)
MONTH = "month"  # the local month (its first day): requests from the months' summaries where whole, days split alike
TIME = (DAY, MONTH)
BY = (MONTH, *DIMENSIONS)  # what a table may be grouped by


def _dimension(name: str) -> Dimension:
    return SESSION if name == SESSION.name else DIMENSIONS[name]


@dataclass(frozen=True)
class Scope:
    """Whose usage, over which period: one user's (the requests they made; the sessions and batch runs they own), some
    sessions', or the whole site's."""

    period: Period
    user_id: int | None = None
    session_ids: tuple[Any, ...] | None = None

    @cached_property
    def mark(self) -> Mark:
        """Where the summaries stand: read once for all the queries of the figures of this scope."""
        return Mark.read()

    def cover(self, months: bool) -> Cover:
        """How the period splits between summaries (by month where `months` allows) and raw rows."""
        return Cover.of(self.period.start, self.period.end, months, self.mark)

    def requests(self, cover: Cover) -> QuerySet[ProxyRequest]:
        """The raw request rows in the scope that no summary of `cover` holds. On SQLite they are found by their ids
        first, so that the joins a figure's keys add (session, model, cluster) start from those few rows: otherwise
        SQLite may start from the sessions and read every request of each through another index (My usage at a
        million requests: 210 ms for its 400 raw rows, against 14 ms this way; bench/usage.py)."""
        found = cover.raw(ProxyRequest.objects.all(), user_id=self.user_id, session_ids=self.session_ids)
        if connection.vendor != "sqlite":  # PostgreSQL starts from the few rows by itself, and the detour slowed it
            return found
        return ProxyRequest.objects.filter(pk__in=found.values("pk"))

    def rollups(self, cover: Cover, keys: Sequence[str]) -> QuerySet[UsageRollup]:
        """The summaries in the scope that `cover` reads, of the breakdown that has `keys` (the smallest that does:
        per user or per session alone when the keys and the scope ask for no more)."""
        person = self.user_id is not None or any(name in DIMENSIONS and DIMENSIONS[name].person for name in keys)
        sessions = self.session_ids is not None or any(
            name == SESSION.name or (name in DIMENSIONS and not DIMENSIONS[name].person) for name in keys
        )
        breakdown = rollups.Breakdown.SESSION if sessions or not person else rollups.Breakdown.USER
        if person and sessions:
            breakdown = rollups.Breakdown.SESSION_USER
        rows = cover.rollups(UsageRollup.objects.filter(breakdown=breakdown))
        if self.user_id is not None:
            rows = rows.filter(user_id=self.user_id)
        if self.session_ids is not None:
            rows = rows.filter(session_id__in=self.session_ids)
        return rows

    def sessions(self) -> QuerySet[LLMSession]:
        """Sessions whose Slurm run overlaps the period (deleted ones too)."""
        rows = LLMSession.objects.filter(started_at__isnull=False, started_at__lt=self.period.end).filter(
            Q(ended_at__isnull=True) | Q(ended_at__gt=self.period.start)
        )
        if self.user_id is not None:
            rows = rows.filter(owner_id=self.user_id)
        if self.session_ids is not None:
            rows = rows.filter(pk__in=self.session_ids)
        return rows

    def runs(self) -> QuerySet[BatchRun]:
        runs = BatchRun.objects.annotate(on=Coalesce("started_at", "created_at"))
        runs = runs.filter(on__gte=self.period.start, on__lt=self.period.end)
        if self.user_id is not None:
            runs = runs.filter(owner_id=self.user_id)
        if self.session_ids is not None:
            runs = runs.filter(session_id__in=self.session_ids)
        return runs


def _aliases(keys: Sequence[str], paths_of: Callable[[Dimension], list[str]], day: Any) -> dict[str, Any]:
    """values() arguments for the keys: k<i>_<j> for the j-th path of the i-th key, `day` as given."""
    found: dict[str, Any] = {}
    for i, name in enumerate(keys):
        if name in TIME:
            found[f"k{i}_0"] = day
            continue
        for j, path in enumerate(paths_of(_dimension(name))):
            found[f"k{i}_{j}"] = F(path)
    return found


def _key(row: dict[str, Any], keys: Sequence[str]) -> Key:
    parts = []
    for i, name in enumerate(keys):
        if name == DAY:
            parts.append(row[f"k{i}_0"])
        elif name == MONTH:  # a day, or a month's summary (its first day)
            parts.append(row[f"k{i}_0"].replace(day=1))
        else:
            dim = _dimension(name)
            parts.append(dim.show(*(row[f"k{i}_{j}"] for j in range(len(dim.paths)))))
    return tuple(parts)


def _add_requests(cells: dict[Key, Tally], scope: Scope, keys: Sequence[str]) -> None:
    """Query 1: requests by the keys, their tallies and their TTFT and speed buckets, from the summaries and the raw
    rows they do not hold (by month where no key is the day); and one query per kind of name the keys join (users,
    sessions): which users' and sessions' summaries the figures hold, and what they are called.

    What the summaries add up to is remembered while they stay as they are (memo.py) and their users and sessions are
    called as they were: a user put in a group, a model renamed or a session deleted since, and they are read again.
    The raw rows are read each time."""
    cover = scope.cover(months=DAY not in keys)
    sums = ("prompt_tokens", "completion_tokens")
    raw = rollups.raw_rows(scope.requests(cover), _aliases(keys, Dimension.request_paths, cover.local_day("at")), sums)
    read = ("requests", cover.units, tuple(keys), scope.user_id, scope.session_ids)
    kept: _Summarised | None = memo.kept(scope.mark.revision, read)
    if kept is not None and _Names.of_ids(keys, kept.names) != kept.names:
        kept = None
    fresh: Iterable[dict[str, Any]] = raw
    if kept is None:  # the summaries and the raw rows in one query, told apart by their kind (the raw rows' is RAW)
        summarised = scope.rollups(cover, keys)
        summaries = rollups.summed(summarised, _aliases(keys, Dimension.request_paths, F("start")), sums)
        rows = list(rollups.together([summaries, raw]))
        fresh = [row for row in rows if row["x_metric"] == rollups.RAW]
        tallies = _tallies((row for row in rows if row["x_metric"] != rollups.RAW), keys)
        kept = _Summarised(_Names.of_summaries(keys, summarised), tuple(tallies.items()))
        memo.keep(scope.mark.revision, read, kept)
    for key, tally in (*kept.tallies, *_tallies(fresh, keys).items()):
        cells[key].add(tally)


def _tallies(rows: Iterable[dict[str, Any]], keys: Sequence[str]) -> dict[Key, Tally]:
    """Rows of rollups.raw_rows or summed added up by their keys."""
    found: dict[Key, Tally] = defaultdict(Tally)
    for row in rows:
        tally = found[_key(row, keys)]
        for metric, bucket, n, low, high in rollups.buckets_of(row):
            (tally.ttft if metric == rollups.Metric.TTFT else tally.speed).add(bucket, n, low, high)
        if not rollups.counts_tallies(row):
            continue
        tally.requests += row["x_requests"]
        tally.errors += row["x_errors"]
        tally.prompt_tokens += row["x_prompt_tokens"] or 0
        tally.completion_tokens += row["x_completion_tokens"] or 0
    return found


ID_BATCH = 2000  # ids named per query


@dataclass(frozen=True)
class _Names:
    """The users and the sessions whose summaries a figure holds, with the values of its keys each has (several for
    a user in several groups): when they are no longer the same, what was read from the summaries is not either."""

    people: frozenset[tuple[Any, frozenset[tuple[Any, ...]]]] = frozenset()
    sessions: frozenset[tuple[Any, frozenset[tuple[Any, ...]]]] = frozenset()

    @classmethod
    def of_summaries(cls, keys: Sequence[str], summarised: QuerySet[UsageRollup]) -> _Names:
        """Those of the summaries: one query per kind of name the keys join."""
        person, session = _kinds(keys)
        return cls(
            _names_of(get_user_model().objects.filter(pk__in=summarised.values("user_id")), person),
            _names_of(LLMSession.objects.filter(pk__in=summarised.values("session_id")), session),
        )

    @classmethod
    def of_ids(cls, keys: Sequence[str], names: _Names) -> _Names:
        """The same users and sessions as `names`, as they are now: one query per kind (ID_BATCH ids at a time)."""
        person, session = _kinds(keys)
        return cls(
            _names_of(get_user_model().objects.all(), person, [pk for pk, _ in names.people]),
            _names_of(LLMSession.objects.all(), session, [pk for pk, _ in names.sessions]),
        )


def _kinds(keys: Sequence[str]) -> tuple[list[Dimension], list[Dimension]]:
    """The keys' dimensions of a person, and those of a session. A session as a key is its id: nothing names it (and
    one deleted gives the summaries a new revision: rollups.deleted_with_summaries)."""
    dimensions = [_dimension(name) for name in keys if name not in (*TIME, SESSION.name)]
    return [d for d in dimensions if d.person], [d for d in dimensions if not d.person]


def _names_of(
    rows: QuerySet[Any], dimensions: list[Dimension], ids: list[Any] | None = None
) -> frozenset[tuple[Any, frozenset[tuple[Any, ...]]]]:
    """Each row's id with the values of `dimensions` it has (as their `show` makes them); of the rows with `ids` when
    given, in batches."""
    if not dimensions:
        return frozenset()
    paths = [path for dim in dimensions for path in dim.paths]
    found: dict[Any, set[tuple[Any, ...]]] = defaultdict(set)
    batches = (
        [rows] if ids is None else [rows.filter(pk__in=ids[i : i + ID_BATCH]) for i in range(0, len(ids), ID_BATCH)]
    )
    for batch in batches:
        for pk, *values in batch.values_list("pk", *paths).order_by():
            shown, at = [], 0
            for dim in dimensions:
                shown.append(dim.show(*values[at : at + len(dim.paths)]))
                at += len(dim.paths)
            found[pk].add(tuple(shown))
    return frozenset((pk, frozenset(values)) for pk, values in found.items())


@dataclass(frozen=True)
class _Summarised:
    """What a figure read from the summaries (memo.py): the tallies by key, and whose they are."""

    names: _Names
    tallies: tuple[tuple[Key, Tally], ...]


@dataclass
class _Run:
    """One session's run inside the period, and its traffic there."""

    gpus: int
    start: datetime
    end: datetime
    keys: set[Key] = field(default_factory=set)  # several when a key is a person's groups
    windows: dict[date | None, int] = field(default_factory=lambda: defaultdict(int))  # with a request, per day
    first: datetime | None = None  # the first and last request inside the run
    last: datetime | None = None


@dataclass(frozen=True)
class _WindowRow:
    """A session's windows with a request (on a day, or in the whole period: day None), and the first and last."""

    session: Any
    day: date | None
    windows: int
    first: datetime
    last: datetime
    summarised: bool  # from the summaries (else from the raw rows)

    @classmethod
    def of(cls, row: dict[str, Any]) -> _WindowRow:
        first, last = rollups.moment(row["first"]), rollups.moment(row["last"])
        assert first is not None and last is not None  # a group has a row
        return cls(row["session"], row.get("day"), row["windows"], first, last, bool(row["summarised"]))


def _add_sessions(cells: dict[Key, Tally], scope: Scope, keys: Sequence[str]) -> None:
    """Queries 2 and 3: the sessions' reserved GPU-hours and those with traffic, split across days when a key is the
    day (the day key is left out of the sessions' own keys and filled in by the split)."""
    period, by_day = scope.period, any(k in TIME for k in keys)
    other = [k for k in keys if k not in TIME]
    sessions = scope.sessions()
    runs: dict[Any, _Run] = {}
    ran = set()  # each session's Slurm start and end, as stored: what the windows read of the sessions
    columns = ["pk", "gpus_per_node", "nodes"]
    moments = {"x_started": rollups.stored(F("started_at")), "x_ended": rollups.stored(F("ended_at"))}
    for row in sessions.values(*columns, **moments, **_aliases(other, Dimension.session_paths, None)).order_by():
        run = runs.get(row["pk"])
        if run is None:
            ran.add((row["pk"], row["x_started"], row["x_ended"]))
            started, ended = rollups.moment(row["x_started"]), rollups.moment(row["x_ended"])
            assert started is not None  # scope.sessions() are those that started
            start = max(started, period.start)
            end = min(ended or period.end, period.end)
            run = runs[row["pk"]] = _Run(row["gpus_per_node"] * row["nodes"], start, end)
        run.keys.add(_key(row, other))
    # The summarised windows in the run (rollups.py: a window at its edge had a request inside it when its last
    # request came after the start, or its first before the end), then those of the raw rows after them. first and
    # last are a window's start for the summaries, a request's moment for the raw rows: _split only asks in which
    # window they fall.
    cover = scope.cover(months=False)
    raw = (
        cover.raw(ProxyRequest.objects.all(), session_ids=sessions.values("pk"), late=False)
        .filter(at__gte=F("session__started_at"))
        .filter(Q(session__ended_at__isnull=True) | Q(at__lt=F("session__ended_at")))
        .values("session", **({"day": cover.local_day("at")} if by_day else {}), summarised=Value(False))
        .annotate(
            windows=Count(QuarterHour("at"), distinct=True),
            first=rollups.stored(Min("at")),
            last=rollups.stored(Max("at")),
        )
        .order_by()
    )
    # The summarised windows are remembered while the summaries and these sessions' runs stay as they are (memo.py):
    # on a table of the site, the largest query of all. The raw rows' are read each time.
    read = ("windows", cover.windows_from, cover.summarised_until, by_day, frozenset(ran))
    windows: tuple[_WindowRow, ...] | None = memo.kept(scope.mark.revision, read)
    if windows is None:  # both in one query, told apart
        summarised = (
            cover.windows(UsageWindow.objects.filter(session__in=sessions.values("pk")))
            .filter(last_at__gte=F("session__started_at"))
            .filter(Q(session__ended_at__isnull=True) | Q(first_at__lt=F("session__ended_at")))
            .values("session", *(["day"] if by_day else []), summarised=Value(True))
            .annotate(windows=Count("id"), first=rollups.stored(Min("start")), last=rollups.stored(Max("start")))
            .order_by()
        )
        rows = [_WindowRow.of(row) for row in rollups.together([summarised, raw])]
        windows = tuple(row for row in rows if row.summarised)
        memo.keep(scope.mark.revision, read, windows)
        fresh = [row for row in rows if not row.summarised]
    else:
        fresh = [_WindowRow.of(row) for row in raw]
    for row in (*windows, *fresh):
        if (run := runs.get(row.session)) is None:
            continue
        run.windows[row.day] += row.windows
        run.first = row.first if run.first is None else min(run.first, row.first)
        run.last = row.last if run.last is None else max(run.last, row.last)
    zone = timezone.get_current_timezone()  # read once: reading it costs more than a run's split
    for pk, run in runs.items():
        if run.end <= run.start:
            continue
        reserved, used = _split(run, by_day, zone)
        for day in reserved.keys() | used.keys():
            for base in run.keys:
                tally = cells[_with_day(base, keys, day)]
                tally.gpu_hours += run.gpus * reserved.get(day, 0.0)
                tally.traffic_gpu_hours += run.gpus * used.get(day, 0.0)
                tally.session_ids.add(pk)


def _with_day(base: Key, keys: Sequence[str], day: date | None) -> Key:
    for i, name in enumerate(keys):
        if name in TIME:
            assert day is not None  # split by day when a key is the time
            return (*base[:i], day if name == DAY else day.replace(day=1), *base[i:])
    return base


def _split(run: _Run, by_day: bool, zone: tzinfo) -> tuple[dict[date | None, float], dict[date | None, float]]:
    """A run's reserved hours and hours with traffic, per local day (or all under None). The hours with traffic are a
    quarter hour per window with a request, less the parts of the first and last windows outside the run when they
    had one."""
    reserved: dict[date | None, float] = {}
    if by_day:
        each = run.start.astimezone(zone).date()
        while (start := midnight(each, zone)) < run.end:
            each += timedelta(days=1)
            overlap = min(run.end, midnight(each, zone)) - max(run.start, start)
            if overlap > timedelta(0):
                reserved[each - timedelta(days=1)] = overlap.total_seconds() / 3600
    else:
        reserved[None] = (run.end - run.start).total_seconds() / 3600
    used: dict[date | None, float] = {day: windows * WINDOW_HOURS for day, windows in run.windows.items()}
    if run.first is not None and run.last is not None:
        first_window = window_start(run.start)
        if run.first < first_window + WINDOW:
            day: date | None = first_window.astimezone(zone).date() if by_day else None
            used[day] = used.get(day, 0.0) - (run.start - first_window).total_seconds() / 3600
        last_window = window_start(run.end)
        if run.last >= last_window and run.end > last_window:
            day = last_window.astimezone(zone).date() if by_day else None
            used[day] = used.get(day, 0.0) - (last_window + WINDOW - run.end).total_seconds() / 3600
    return reserved, {day: max(0.0, hours) for day, hours in used.items()}


def _add_runs(cells: dict[Key, Tally], scope: Scope, keys: Sequence[str]) -> None:
    """Query 4: batch runs' tokens by the keys."""
    aliases = _aliases(keys, Dimension.run_paths, TruncDate("on"))
    rows = (
        scope.runs()
        .values(**aliases)
        .annotate(prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
        .order_by()
    )
    for row in rows:
        tally = cells[_key(row, keys)]
        tally.batch_prompt_tokens += row["prompt"] or 0
        tally.batch_completion_tokens += row["completion"] or 0


def cube(scope: Scope, keys: Sequence[str]) -> dict[Key, Tally]:
    """The tallies of each combination of `keys` (names of DIMENSIONS, "session", "day" or "month") in the scope: four
    queries (the module's docstring lists them), whatever the number of rows."""
    cells: dict[Key, Tally] = defaultdict(Tally)
    _add_requests(cells, scope, keys)
    _add_sessions(cells, scope, keys)
    _add_runs(cells, scope, keys)
    return dict(cells)


def rollup(cells: dict[Key, Tally], pick: Callable[[Key], Hashable]) -> dict[Any, Tally]:
    """The cells added up by what `pick` makes of their key."""
    found: dict[Any, Tally] = defaultdict(Tally)
    for key, tally in cells.items():
        found[pick(key)].add(tally)
    return dict(found)


def total(tallies: Iterable[Tally]) -> Tally:
    found = Tally()
    for tally in tallies:
        found.add(tally)
    return found


@dataclass
class Row:
    """One row of a table: what it is (a user name, a model, "2025-03", ...) and its tally."""

    key: Any
    tally: Tally


def table(scope: Scope, by: str) -> list[Row]:
    """The scope's usage grouped `by` a dimension or by month, in the order of the keys."""
    if by == MONTH:
        months = rollup(cube(scope, [MONTH]), lambda key: f"{key[0]:%Y-%m}")
        return [Row(month, tally) for month, tally in sorted(months.items())]
    cells = cube(scope, [by])
    return [Row(key[0], cells[key]) for key in sorted(cells, key=lambda k: (k[0] is None, str(k[0])))]


def table_total(by: str, rows: list[Row]) -> Tally | None:
    """The rows of a table added up; None when a row may also be another's (a user in two groups), so that no sum
    counts anything twice."""
    if by != MONTH and DIMENSIONS[by].overlaps:
        return None
    return total(row.tally for row in rows)


@dataclass(frozen=True)
class Training:
    """Fine-tune runs in a scope: how many ran in the period and their GPU-hours there."""

    runs: int = 0
    gpu_hours: float = 0.0


def training(scope: Scope) -> Training:
    """The fine-tune runs (of the scope's user, or the site's) whose job ran in the period: their GPUs times the part
    of their run inside it, from their first start to their end (or now), as a run's page counts it. One query over
    the runs, none over the requests; a scope of sessions has none."""
    if scope.session_ids is not None:
        return Training()
    period = scope.period
    rows = FineTuneRun.objects.filter(started_at__isnull=False, started_at__lt=period.end).filter(
        Q(finished_at__isnull=True) | Q(finished_at__gt=period.start)
    )
    if scope.user_id is not None:
        rows = rows.filter(owner_id=scope.user_id)
    runs, gpu_hours = 0, 0.0
    for gpus, started, finished in rows.values_list("gpus_per_node", "started_at", "finished_at").order_by():
        assert started is not None  # those that started
        start, end = max(started, period.start), min(finished or period.end, period.end)
        if end > start:
            runs += 1
            gpu_hours += gpus * (end - start).total_seconds() / 3600
    return Training(runs, gpu_hours)


@dataclass
class MyUsage:
    """A user's usage over a period: the requests they made on any session (theirs or shared with them), the
    GPU-hours of the sessions they own and their batch runs' tokens."""

    period: Period
    total: Tally
    by_month: list[Row]
    by_model: list[Row]
    by_cluster: list[Row]
    days: list[Row]  # every day of the period, in order, for the chart


def my_usage(user_id: int, period: Period) -> MyUsage:
    """Four queries: one cube by (day, model, cluster), rolled up every way the page shows."""
    cells = cube(Scope(period, user_id=user_id), [DAY, "model", "cluster"])
    models = rollup(cells, lambda key: key[1])
    clusters = rollup(cells, lambda key: key[2])
    days = rollup(cells, lambda key: key[0])
    # Months and the total from the days (every cell is in one day): fewer tallies to add than from the cells.
    months = rollup({(day,): tally for day, tally in days.items()}, lambda key: f"{key[0]:%Y-%m}")
    return MyUsage(
        period=period,
        total=total(months.values()),
        by_month=[Row(month, months[month]) for month in sorted(months)],
        by_model=[Row(name, models[name]) for name in sorted(models)],
        by_cluster=[Row(name, clusters[name]) for name in sorted(clusters)],
        days=[Row(day, days.get(day) or Tally()) for day in period.days()],
    )


@dataclass(frozen=True)
class RouteUse:
    """One API route's requests in a scope (ProxyRequest.endpoint: catalog.runtime_rules.API_ROUTES' names)."""

    endpoint: str
    requests: int
    errors: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    @property
    def cells(self) -> list[str]:
        """The figures as the usage tables write them."""
        figures = (self.requests, self.errors, self.prompt_tokens, self.cached_tokens, self.completion_tokens)
        return [f"{figure:,}" for figure in figures]


def by_route(scope: Scope) -> list[RouteUse]:
    """The scope's requests by the API route they used (chat completions, Anthropic's messages, responses, ...),
    most used first; one query (and one for where the summaries stand, unless the scope has read it). What the
    summaries hold is remembered while they stay as they are (memo.py); the raw rows are read each time."""
    cover = scope.cover(months=True)
    keys = {"k_endpoint": F("endpoint")}
    read = ("prompt_tokens", "cached_tokens", "completion_tokens")
    figures = ("x_requests", "x_errors", *(f"x_{name}" for name in read))
    raw = rollups.raw_rows(scope.requests(cover), keys, read)
    remembered = ("routes", cover.units, scope.user_id, scope.session_ids)
    summarised: tuple[tuple[str, tuple[int, ...]], ...] | None = memo.kept(scope.mark.revision, remembered)
    fresh: Iterable[dict[str, Any]] = raw
    if summarised is None:  # both in one query, told apart by their kind (the raw rows' is RAW)
        summaries = scope.rollups(cover, []).filter(metric=rollups.Metric.TALLIES)
        rows = list(rollups.together([rollups.summed(summaries, keys, read), raw]))
        fresh = [row for row in rows if row["x_metric"] == rollups.RAW]
        summarised = tuple(
            (row["k_endpoint"], tuple(row[name] or 0 for name in figures))
            for row in rows
            if row["x_metric"] != rollups.RAW
        )
        memo.keep(scope.mark.revision, remembered, summarised)
    found: dict[str, list[int]] = {}
    for endpoint, values in (*summarised, *((row["k_endpoint"], [row[name] for name in figures]) for row in fresh)):
        sums = found.setdefault(endpoint, [0] * len(figures))
        for i, value in enumerate(values):
            sums[i] += value or 0
    uses = [RouteUse(endpoint, *sums) for endpoint, sums in found.items()]
    return sorted(uses, key=lambda use: (-use.requests, use.endpoint))


def by_week(days: list[Row]) -> list[Row]:
    """Days (Row.key a date) added up by the week they fall in, each keyed by its Monday."""
    weeks = rollup({(row.key,): row.tally for row in days}, lambda key: key[0] - timedelta(days=key[0].weekday()))
    return [Row(monday, weeks[monday]) for monday in sorted(weeks)]


def for_sessions(session_ids: Iterable[Any], period: Period | None = None) -> dict[Any, Tally]:
    """Per session: its requests (by anyone), tokens, percentiles, reserved GPU-hours and those with traffic, its
    batch runs' tokens; five queries for any number of sessions."""
    scope = Scope(period or Period.all_time(), session_ids=tuple(session_ids))
    return {key[0]: tally for key, tally in cube(scope, [SESSION.name]).items()}


def by_user_on_session(session_ids: Iterable[Any]) -> dict[Any, list[Row]]:
    """Per session: who made how many requests on it (Row.key is their user name), with their tokens, errors and
    percentiles, most requests first; three queries (where the summaries stand, the requests, then those users'
    names) for any number of sessions."""
    cells: dict[Key, Tally] = defaultdict(Tally)
    _add_requests(cells, Scope(Period.all_time(), session_ids=tuple(session_ids)), [SESSION.name, "user"])
    found: dict[Any, list[Row]] = {}
    for (session, username), tally in sorted(cells.items(), key=lambda c: (-c[1].requests, c[0][1])):
        found.setdefault(session, []).append(Row(username, tally))
    return found
