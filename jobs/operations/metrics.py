"""Prometheus metrics: what happens in the processes (proxy requests, polls, SSH errors, submits), counted with the
maintained prometheus_client, and what the database says at scrape time (sessions by state and cluster, batch
progress, queue waits, submits and submit failures).

The portal runs several uvicorn and Celery worker processes. prometheus_client's multiprocess mode adds up what each
process counted: every process writes its values to files in PROMETHEUS_MULTIPROC_DIR (portal/settings.py sets it,
from PORTAL_METRICS_DIR, before anything imports the client), and /metrics, in whichever web worker answers, reads
them all. The directory is per host: a site with web or worker processes on several hosts scrapes each host's
/metrics, or gives them one shared directory. It is emptied when the web processes start (scripts/serve).

A process that exits leaves its files behind, on purpose: its counts stay in the sums, so no counter goes down
while the others run. prometheus_client's mark_process_dead() only removes the files of "live" gauges, and no
process here keeps a gauge (the gauges come from the database, at scrape time), so no exit hook is needed. Files of
exited processes add up over restarts until `manage.py metrics reset` (run by `scripts/serve prepare`) empties the
directory.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from django.db.models import Count, Min, Q, Sum
from django.utils import timezone
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jobs.allocations import report as allocation_report
from jobs.models import (
    LIVE_STATES,
    TTFT_BOUNDS_MS,
    BatchRun,
    LLMSession,
    ProxyRequest,
    ReplicaLoad,
    SessionEvent,
    State,
)


def _process() -> str:
    """This process's name in the directory: host and pid, so that containers sharing the directory (each counting
    its pids from 1) never write to one file. Called when a value is first written, so a forked worker gets its own."""
    return f"{socket.gethostname().replace('_', '-')}-{os.getpid()}"


values.ValueClass = values.MultiProcessValue(_process)  # type: ignore[no-untyped-call]  # before the metrics below
_SECONDS = tuple(bound / 1000 for bound in TTFT_BOUNDS_MS)  # the usage pages' buckets, in seconds

PROXY_REQUESTS = Counter(
    "portal_proxy_requests", "Requests through the proxy to model servers.", ["route", "endpoint", "status"]
)
PROXY_ERRORS = Counter(
    "portal_proxy_errors", "Proxied requests answered with an error (status 400 or more).", ["route", "endpoint"]
)
PROXY_BYTES = Counter("portal_proxy_response_bytes", "Bytes relayed from model servers to clients.", ["route"])
PROXY_TTFT = Histogram(
    "portal_proxy_time_to_first_byte_seconds", "Streams: from the request to the reply's first byte.", ["route"],
    buckets=_SECONDS,
)  # fmt: skip
PROXY_DURATION = Histogram(
    "portal_proxy_request_duration_seconds", "From the request to the reply's last byte.", ["route", "endpoint"],
    buckets=(*_SECONDS, 120, 300, 600),
)  # fmt: skip
POLL_DURATION = Histogram(
    "portal_poll_duration_seconds",
    "One poll of a cluster account's live sessions, or a status account's listing (one SSH command).", ["cluster"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)  # fmt: skip
POLL_FAILURES = Counter(
    "portal_poll_failures", "Polls that learned nothing: SSH failed, or squeue did not answer.", ["cluster", "reason"]
)
SSH_ERRORS = Counter("portal_ssh_errors", "SSH commands to clusters that failed.", ["cluster", "operation"])
SUBMIT_ATTEMPTS = Counter(
    "portal_submit_attempts", "Submit tasks by outcome: submitted, retry, failed, cancelled, not claimed.", ["outcome"]
)
SERVICE_ROUTES = Counter(
    "portal_service_routes", "Requests naming a model service, by how the replica was chosen: affinity (the key's own "
    "replica), spilled (its replica was over the load bound) or least_loaded (no affinity key).",
    ["service", "decision"],
)  # fmt: skip
SERVICE_FAILOVERS = Counter(
    "portal_service_failovers", "Requests a service's replica failed before answering (unreachable, a 5xx, broke off), "
    "by outcome: retried on another replica, or none was left.", ["service", "reason", "outcome"],
)  # fmt: skip
SERVICE_NOT_READY = Counter(
    "portal_service_not_ready", "Requests to a service with no ready replica: held until one was, or answered 503.",
    ["service", "outcome"],
)  # fmt: skip
PROXY_REFUSED = Counter(
    "portal_proxy_refused", "Requests answered 429 before any model server saw them, by reason: rate (a token's or "
    "its user's requests a minute), allocation (an allocation's tokens spent), fair_share (the user's requests in "
    "flight on a shared session or service).", ["reason"],
)  # fmt: skip
SUBMIT_OUTCOMES = frozenset({"retry", "failed", "cancelled", "not claimed"})  # otherwise a job id: "submitted"
# A submit that failed: the session left submitting for failed (lifecycle.submit, and the task giving up). Pending is
# listed too, though nothing fails a session before its claim today, so that such a failure would be counted.
SUBMIT_FAILED_FROM = (State.SUBMITTING, State.PENDING)


def _status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


def observe_request(
    route: str, endpoint: str, status: int, ttft_s: float | None, duration_s: float, bytes_out: int
) -> None:
    """One request through the proxy ended."""
    PROXY_REQUESTS.labels(route, endpoint, _status_class(status)).inc()
    if status >= 400:
        PROXY_ERRORS.labels(route, endpoint).inc()
    PROXY_BYTES.labels(route).inc(bytes_out)
    if ttft_s is not None:
        PROXY_TTFT.labels(route).observe(ttft_s)
    PROXY_DURATION.labels(route, endpoint).observe(duration_s)


def proxy_refused(reason: str) -> None:
    PROXY_REFUSED.labels(reason).inc()


def service_routed(service: str, decision: str) -> None:
    SERVICE_ROUTES.labels(service, decision).inc()


def service_failed_over(service: str, reason: str, retried: bool) -> None:
    SERVICE_FAILOVERS.labels(service, reason, "retried" if retried else "none_left").inc()


def service_not_ready(service: str, outcome: str) -> None:
    SERVICE_NOT_READY.labels(service, outcome).inc()


@contextmanager
def polling(cluster: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        POLL_DURATION.labels(cluster).observe(time.perf_counter() - started)


def poll_failed(cluster: str, reason: str) -> None:
    POLL_FAILURES.labels(cluster, reason).inc()
    if reason == "ssh":
        SSH_ERRORS.labels(cluster, "poll").inc()


def ssh_error(cluster: str, operation: str) -> None:
    SSH_ERRORS.labels(cluster, operation).inc()


def submitted(outcome: str) -> None:
    """One submit task ended: `outcome` is lifecycle.Submitted's (a job id when sbatch accepted the job)."""
    SUBMIT_ATTEMPTS.labels(outcome if outcome in SUBMIT_OUTCOMES else "submitted").inc()


class DatabaseCollector(Collector):
    """What the database says now, read at each scrape with a fixed handful of aggregate queries (one per family or
    pair of families, however many sessions and clusters; and a few per allocation, of which a site has tens). Every
    host reports the same figures: add up one host's."""

    def collect(self) -> Iterator[Metric]:
        sessions = GaugeMetricFamily("portal_sessions", "Sessions by state and cluster.", labels=["state", "cluster"])
        for row in LLMSession.objects.values("state", "cluster__slug").annotate(n=Count("id")).order_by():
            sessions.add_metric([row["state"], row["cluster__slug"]], row["n"])
        yield sessions
        waiting = GaugeMetricFamily(
            "portal_queue_wait_longest_seconds", "How long the longest-waiting queued session has waited, by "
            "partition.", labels=["cluster", "partition"],
        )  # fmt: skip
        queued = LLMSession.objects.filter(state=State.QUEUED, submitted_at__isnull=False)
        now = timezone.now()
        for row in queued.values("cluster__slug", "partition__name").order_by().annotate(first=Min("submitted_at")):
            waiting.add_metric([row["cluster__slug"], row["partition__name"]], (now - row["first"]).total_seconds())
        yield waiting
        runs = GaugeMetricFamily("portal_batch_runs", "Batch runs by state.", labels=["state"])
        lines = GaugeMetricFamily(
            "portal_batch_lines", "Lines of batch runs by the run's state: all, done, failed.", labels=["state", "kind"]
        )  # fmt: skip
        by_state = BatchRun.objects.values("state").annotate(
            n=Count("id"), prompts=Sum("prompts"), done=Sum("done"), failed=Sum("failed")
        )
        for row in by_state.order_by():
            runs.add_metric([row["state"]], row["n"])
            for kind in ("prompts", "done", "failed"):
                lines.add_metric([row["state"], kind], row[kind] or 0)
        yield runs
        yield lines
        # Counters from the sessions' histories: site-wide and kept across restarts, unlike the processes' counters.
        submits = CounterMetricFamily(
            "portal_sessions_submitted", "Sessions whose job sbatch accepted (submitting to queued).",
            labels=["cluster"],
        )  # fmt: skip
        submit_failures = CounterMetricFamily(
            "portal_sessions_submit_failed", "Sessions that failed before Slurm had their job (bad script, login "
            "refused, Slurm refused it, retries given up).", labels=["cluster"],
        )  # fmt: skip
        events = SessionEvent.objects.filter(
            Q(from_state=State.SUBMITTING, to_state=State.QUEUED)
            | Q(from_state__in=SUBMIT_FAILED_FROM, to_state=State.FAILED)
        )
        for row in (
            events.values("session__cluster__slug")
            .annotate(
                ok=Count("id", filter=Q(to_state=State.QUEUED)), failed=Count("id", filter=Q(to_state=State.FAILED))
            )
            .order_by()
        ):
            submits.add_metric([row["session__cluster__slug"]], row["ok"])
            submit_failures.add_metric([row["session__cluster__slug"]], row["failed"])
        yield submits
        yield submit_failures
        recent = GaugeMetricFamily(
            "portal_proxy_requests_last_hour", "Requests recorded in the last hour (all web hosts).", labels=["failed"]
        )  # fmt: skip
        hour = ProxyRequest.objects.filter(at__gte=now - timedelta(hours=1)).aggregate(
            all=Count("id"), failed=Count("id", filter=Q(status__gte=400))
        )
        recent.add_metric(["false"], hour["all"] - hour["failed"])
        recent.add_metric(["true"], hour["failed"])
        yield recent
        yield from _services(now)
        yield from _allocations(now)


def _services(now: datetime) -> Iterator[Metric]:
    """Each running model service's live replicas by state (a draining one as "draining") and the requests open on
    them, summed over the portal processes' fresh published counts: two queries."""
    replicas = GaugeMetricFamily("portal_service_replicas", "Live replicas of each running model service by state "
                                 "(draining: ready, taking no new requests).", labels=["service", "state"])  # fmt: skip
    live = LLMSession.objects.filter(service__stopped_at__isnull=True, service__isnull=False, state__in=LIVE_STATES)
    for row in live.values("service__name", "state", "draining_since").annotate(n=Count("id")).order_by():
        state = "draining" if row["draining_since"] is not None else row["state"]
        replicas.add_metric([row["service__name"], state], row["n"])
    yield replicas
    inflight = GaugeMetricFamily("portal_service_inflight", "Requests open on each running model service's replicas, "
                                 "through every portal process.", labels=["service"])  # fmt: skip
    running = ReplicaLoad.objects.filter(session__service__stopped_at__isnull=True)
    fresh = running.filter(updated_at__gt=now - ReplicaLoad.FRESH)
    for row in fresh.values("session__service__name").annotate(n=Sum("inflight")).order_by():
        inflight.add_metric([row["session__service__name"]], row["n"] or 0)
    yield inflight


def _allocations(now: datetime) -> Iterator[Metric]:
    """Each allocation in force: its limit, what is spent and what is left in its current period, by unit (gpu_hours,
    tokens). A few queries per allocation: a site has tens of them, not thousands."""
    labels = ["allocation", "unit"]
    limit = GaugeMetricFamily("portal_allocation_limit", "What an allocation allows per period.", labels=labels)
    spent = GaugeMetricFamily("portal_allocation_spent", "What an allocation has spent in its current period "
                              "(GPU-hours: used, and reserved by live sessions).", labels=labels)  # fmt: skip
    left = GaugeMetricFamily("portal_allocation_remaining", "What is left of an allocation until it resets.",
                             labels=labels)  # fmt: skip
    for standing in allocation_report.of_site(now):
        name = standing.allocation.holder_key
        if standing.allocation.gpu_hours is not None:
            limit.add_metric([name, "gpu_hours"], float(standing.allocation.gpu_hours))
            spent.add_metric([name, "gpu_hours"], standing.gpu_hours)
            left.add_metric([name, "gpu_hours"], standing.gpu_hours_left or 0.0)
        if standing.allocation.tokens is not None:
            limit.add_metric([name, "tokens"], standing.allocation.tokens)
            spent.add_metric([name, "tokens"], standing.tokens)
            left.add_metric([name, "tokens"], standing.tokens_left or 0)
    yield from (limit, spent, left)


def exposition() -> tuple[bytes, str]:
    """The text /metrics serves: every process's counters on this host, and the database's gauges."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(DatabaseCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
