"""What people see of a model service, for its pages, the site dashboard and `manage.py services show --json`: its
settings, and its live replicas with their load (the site's, jobs/services/load.py), requests per minute and time
left. Any number of services in a fixed handful of queries."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count
from django.utils import timezone

from jobs.models import LIVE_STATES, LLMSession, ModelService, ProxyRequest
from jobs.models.services import takes_requests
from jobs.services import load
from jobs.sessions.forms import LaunchForm, values_of

RATE_OVER = timedelta(seconds=60)  # requests per minute: the requests of the last minute


@dataclass(frozen=True)
class Replica:
    uuid: str
    owner_id: int
    state: str
    state_label: str
    job_id: str | None
    node_list: str | None
    inflight: int
    requests_per_min: int
    time_left_s: int | None
    draining: bool
    replaces: str | None
    ready: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid, "state": self.state, "job_id": self.job_id, "node_list": self.node_list,
            "inflight": self.inflight, "time_left_s": self.time_left_s, "requests_per_min": self.requests_per_min,
            "draining": self.draining, "replaces": self.replaces, "ready": self.ready,
        }  # fmt: skip


@dataclass(frozen=True)
class Overview:
    service: ModelService
    replicas: list[Replica] = field(default_factory=list)

    @property
    def ready(self) -> int:
        return sum(r.ready for r in self.replicas)

    @property
    def inflight(self) -> int:
        return sum(r.inflight for r in self.replicas)

    @property
    def requests_per_min(self) -> int:
        return sum(r.requests_per_min for r in self.replicas)


def time_left_s(replica: LLMSession, now: datetime) -> int | None:
    """Seconds before Slurm's time limit stops the replica's job (LLMSession.ends_at)."""
    ends = replica.ends_at
    return None if ends is None else max(0, int((ends - now).total_seconds()))


def overviews(services: Iterable[ModelService]) -> list[Overview]:
    """Each service with its live replicas (oldest first), in three queries whatever their number: the replicas, their
    load and their requests of the last minute."""
    services = list(services)
    if not services:
        return []
    now = timezone.now()
    live = list(
        LLMSession.objects.filter(service__in=services, state__in=LIVE_STATES)
        .only("id", "owner_id", "service_id", "state", "job_id", "node_list", "host", "started_at", "walltime_min",
              "draining_since", "replaces_id", "created_at")
        .order_by("created_at")
    )  # fmt: skip
    pks = [str(r.pk) for r in live]
    inflight = load.site_inflight(pks) if pks else {}
    rates: dict[str, int] = {}
    if pks:
        recent = ProxyRequest.objects.filter(session__in=pks, at__gte=now - RATE_OVER)
        counted = recent.values("session_id").annotate(n=Count("id")).order_by().values_list("session_id", "n")
        rates = {str(pk): n for pk, n in counted}
    by_service: dict[int, list[Replica]] = defaultdict(list)
    for r in live:
        pk = str(r.pk)
        by_service[r.service_id or 0].append(Replica(
            uuid=pk, owner_id=r.owner_id, state=r.state, state_label=r.get_state_display(),
            job_id=r.job_id or None, node_list=r.node_list or None, inflight=inflight.get(pk, 0),
            requests_per_min=rates.get(pk, 0), time_left_s=time_left_s(r, now), draining=r.draining_since is not None,
            replaces=str(r.replaces_id) if r.replaces_id else None, ready=takes_requests(r),
        ))  # fmt: skip
    return [Overview(service, by_service.get(service.pk, [])) for service in services]


def overview(service: ModelService) -> Overview:
    return overviews([service])[0]


def launch_of(service: ModelService) -> dict[str, Any]:
    """The service's launch as its page shows it: what it stores, with what its newest replica was given for the
    fields it leaves to their defaults (the quantisation, the runtime, the walltime)."""
    newest = (
        service.replicas.select_related("variant__model", "runtime", "cluster", "partition", "gpu_type", "account")
        .order_by("-created_at")
        .first()
    )
    return {**(values_of(newest, LaunchForm) if newest else {}), **service.launch}


def describe(service: ModelService) -> dict[str, Any]:
    """A service as `services show --json` prints it: its settings, how many replicas it keeps now and how many are
    ready, and its live replicas with where they are in their lives."""
    seen = overview(service)
    return {
        "name": service.name,
        "owner": service.owner.get_username(),
        "audience": service.audience,
        "groups": sorted(service.groups.values_list("name", flat=True)),
        "min": service.min_replicas,
        "max": service.max_replicas,
        "target_inflight": service.target_inflight,
        "idle_minutes": service.idle_minutes,
        "max_inflight_per_user": service.max_inflight_per_user,  # None: the site's
        "desired": service.desired_replicas,
        "keeps": service.keeps,
        "ready": seen.ready,
        "running": service.running,
        "launch": service.launch,
        "replicas": [r.as_json() for r in seen.replicas],
    }
