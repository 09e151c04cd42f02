"""A replica whose server stops answering is replaced. Slurm only knows the job is running: a server hung (a wedged
GPU, a deadlock, a node out of memory swapping) or gone with the job alive fails no Slurm check, and the proxy only
sets it aside for a while after each failed request. So the keep_services task asks each ready replica's health check
(the one the job passed before it said running: backend.answers), at most every CHECK_EVERY, in parallel and outside
the keeper's row lock; after UNHEALTHY_AFTER failed checks in a row the replica stops taking requests and is
cancelled, and the keeper's next round launches its replacement. One failed check (a moment of load, a restart by the
job's own supervisor) costs nothing.

The checks' memory is the cache (shared by the workers: Redis where configured), so any worker's round continues
another's count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

from django.core.cache import cache
from django.db import connection
from django.utils import timezone

from jobs.cluster import backend
from jobs.models import LLMSession
from jobs.models.services import READY_REPLICA
from jobs.sessions import lifecycle

log = logging.getLogger(__name__)

CHECK_EVERY = timedelta(seconds=15)
UNHEALTHY_AFTER = 3  # failed checks in a row
CHECK_TIMEOUT_S = 5.0
THREADS = 8


def _key(replica: LLMSession) -> str:
    return f"service-health:{replica.pk}"


def check_all(answers: Callable[[LLMSession], bool] | None = None) -> list[str]:
    """Check every running service's ready replicas that are due; returns those given up on (marked for cancel), for
    the caller to scancel. `answers` stands in for the health check in tests."""
    ask = answers or (lambda replica: backend.answers(replica, timeout_s=CHECK_TIMEOUT_S))
    now = timezone.now()
    ready = LLMSession.objects.filter(
        service__stopped_at__isnull=True, **READY_REPLICA, cancel_requested_at__isnull=True,
        ready_at__lte=now - CHECK_EVERY,  # just ready: it answered its check moments ago
    ).exclude(host="").select_related("cluster", "account", "service")  # fmt: skip
    due = [r for r in ready if _due(r, now)]
    if not due:
        return []
    with ThreadPoolExecutor(max_workers=min(THREADS, len(due))) as threads:
        results = list(threads.map(lambda replica: _asked(ask, replica), due))
    given_up = []
    for replica, ok in zip(due, results, strict=True):
        failures = 0 if ok else _failures(replica) + 1
        cache.set(_key(replica), {"at": now.timestamp(), "failures": failures}, timeout=3600)
        if failures >= UNHEALTHY_AFTER:
            assert replica.service is not None
            log.warning("replica %s of %s failed %d health checks in a row: replaced", replica.pk,
                        replica.service.name, failures)  # fmt: skip
            cause = f"its server failed {failures} health checks in a row; its service replaces it"
            LLMSession.objects.filter(pk=replica.pk).update(draining_since=now)
            if lifecycle.mark_cancel(replica.pk, cause, f"stopped answering; replaced in {replica.service.name}"):
                given_up.append(str(replica.pk))
    return given_up


def _asked(ask: Callable[[LLMSession], bool], replica: LLMSession) -> bool:
    try:
        return ask(replica)
    finally:
        connection.close()  # a thread of the pool: its database connection, if it opened one, goes with it


def _due(replica: LLMSession, now: datetime) -> bool:
    seen = cache.get(_key(replica))
    return not isinstance(seen, dict) or now.timestamp() - float(seen.get("at", 0)) >= CHECK_EVERY.total_seconds()


def _failures(replica: LLMSession) -> int:
    seen = cache.get(_key(replica))
    return int(seen.get("failures", 0)) if isinstance(seen, dict) else 0
