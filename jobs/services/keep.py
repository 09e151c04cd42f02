"""Keeping a model service's replicas up: run by the keep_services task every poll interval, and after a service is
created or scaled. A replica is an ordinary session created from the service's stored launch through the launch form
(jobs/sessions/launching.py: the owner's limits, cluster account and job script, as for a session of their own),
marked with its service; the task submits it. Whatever ends a replica (Slurm killing its job, a failed start, its
walltime), the next round creates another."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from jobs.models import LIVE_STATES, LLMSession, ModelService, State
from jobs.sessions import launching

log = logging.getLogger(__name__)

# A launch that keeps failing (a broken model path, a node that refuses the job) must not become a job a minute: after
# this many replicas failed within the window, the service launches no more until the window has passed.
FAILURES_TO_PAUSE = 3
FAILURE_WINDOW = timedelta(minutes=10)


def reconcile(service_pk: int) -> list[str]:
    """Create replicas until `min_replicas` are live (pending, queued, starting or running, no cancel asked); returns
    the new sessions' ids, for the caller to submit once this has committed. Under a lock on the service's row, so
    two workers never both fill the same gap."""
    created: list[str] = []
    with transaction.atomic():
        service = ModelService.objects.select_for_update().filter(pk=service_pk, stopped_at__isnull=True).first()
        if service is None:
            return []
        live = LLMSession.objects.filter(service=service, state__in=LIVE_STATES, cancel_requested_at__isnull=True)
        missing = service.min_replicas - live.count()
        if missing > 0 and failing(service):
            log.warning("service %s: %d replicas failed in %s; no new one until then", service.name,
                        FAILURES_TO_PAUSE, FAILURE_WINDOW)  # fmt: skip
            return []
        for _ in range(max(0, missing)):
            try:
                session, _new = launching.create(service.owner, service.launch, with_session=_member_of(service))
            except ValidationError as exc:  # the owner's limits, a catalog change: in the log, tried again next round
                log.warning("service %s could not launch a replica: %s", service.name, exc)
                break
            created.append(str(session.pk))
    return created


def failing(service: ModelService) -> bool:
    """Whether enough of its replicas failed lately that launching another would likely fail too."""
    since = timezone.now() - FAILURE_WINDOW
    failed = LLMSession.objects.filter(service=service, state=State.FAILED, ended_at__gte=since)
    return failed.count() >= FAILURES_TO_PAUSE


def _member_of(service: ModelService) -> Callable[[LLMSession], None]:
    def mark(session: LLMSession) -> None:
        session.service = service
        session.save(update_fields=["service"])

    return mark


def reconcile_all() -> list[str]:
    """Every running service once; the replicas created, to submit."""
    running = ModelService.objects.filter(stopped_at__isnull=True).values_list("pk", flat=True)
    return [session for pk in running for session in reconcile(pk)]
