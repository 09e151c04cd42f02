"""How long a service's replica takes from its launch to ready (queue wait, staging, model load), from the service's
own history: the keeper starts a successor that long (plus a margin) before a replica's walltime runs out, and a
request to a service with no ready replica is told when to try again (Retry-After)."""

from __future__ import annotations

from datetime import timedelta
from statistics import median

from django.conf import settings
from django.utils import timezone

from jobs.models import LIVE_STATES, LLMSession, ModelService, State

HISTORY = 10  # the service's last replicas that became ready
MARGIN = 0.25  # a replacement is started this much earlier than the median says (queues vary)
MIN_MARGIN = timedelta(seconds=60)


def ready_after(service: ModelService | int) -> timedelta:
    """The median time from launch to ready of the service's last HISTORY replicas that became ready; the site's
    default (PORTAL_SERVICE_READY_S) before it has any."""
    rows = LLMSession.objects.filter(service=service, ready_at__isnull=False).order_by("-ready_at")
    took = [(ready - created).total_seconds() for created, ready in rows.values_list("created_at", "ready_at")[:HISTORY]
            if ready is not None]  # fmt: skip
    return timedelta(seconds=median(took) if took else settings.PORTAL_SERVICE_READY_S)


def lead(service: ModelService) -> timedelta:
    """How long before a replica's walltime ends its successor is launched: the time one takes to be ready, plus a
    margin."""
    took = ready_after(service)
    return took + max(MIN_MARGIN, took * MARGIN)


def ready_in_s(service_pk: int) -> int:
    """Seconds until a replica of the service is expected ready: the youngest live one's launch plus the usual time,
    or the usual time from now when none is live (at least 1)."""
    usual = ready_after(service_pk)
    coming = LLMSession.objects.filter(service_id=service_pk, state__in=LIVE_STATES, cancel_requested_at__isnull=True)
    newest = coming.exclude(state=State.RUNNING).order_by("-created_at").values_list("created_at", flat=True).first()
    left = usual if newest is None else newest + usual - timezone.now()
    return max(1, round(left.total_seconds()))
