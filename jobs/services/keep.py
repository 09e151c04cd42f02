"""Keeping a model service's replicas up: run by the keep_services task every poll interval, and after a service is
created, scaled or woken. A replica is an ordinary session created from the service's stored launch through the launch
form (jobs/sessions/launching.py: the owner's limits, cluster account and job script, as for a session of their own),
marked with its service; the task submits it.

Each round, under a lock on the service's row (two workers never both fill the same gap):
1. Scaling (scaling.py) sets how many replicas the service keeps now, within min..max, from the requests in flight.
2. Rollover: a ready replica whose walltime ends within the time a replacement needs to become ready (timing.lead:
   this service's own history plus a margin) gets a successor; once the successor is ready the old one drains (takes
   no new requests), and a draining replica with no request open on it through any portal process is cancelled.
3. Replacement: whatever ended a replica (Slurm killing its job, a failed start, its walltime), replicas are created
   until the count kept is live again. A replica and its successor count once.
4. Scaling down: replicas beyond the count kept drain, the least loaded first (one not yet ready is simply cancelled).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from jobs.models import LIVE_STATES, LLMSession, ModelService, State
from jobs.models.services import takes_requests
from jobs.services import load, scaling, timing
from jobs.sessions import launching, lifecycle

log = logging.getLogger(__name__)

# A launch that keeps failing (a broken model path, a node that refuses the job) must not become a job a minute: after
# this many replicas failed within the window, the service launches no more until the window has passed.
FAILURES_TO_PAUSE = 3
FAILURE_WINDOW = timedelta(minutes=10)
# A draining replica is cancelled once no portal process has published a request open on it, counted from when every
# process has published at least once since it began draining; and at the latest after DRAIN_AT_MOST (a stream that
# long is cut, as the walltime would cut it).
DRAIN_AT_MOST = timedelta(minutes=10)


@dataclass
class Round:
    """What a round did that the caller (the keep_services task) carries on with once it has committed: the new
    replicas to submit, and those whose jobs are to be cancelled with scancel."""

    created: list[str] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)


def reconcile(service_pk: int) -> Round:
    """One round for the service (the module's steps)."""
    done = Round()
    created = done.created
    with transaction.atomic():
        service = ModelService.objects.select_for_update().filter(pk=service_pk, stopped_at__isnull=True).first()
        if service is None:
            return done
        now = timezone.now()
        live = list(LLMSession.objects.filter(service=service, state__in=LIVE_STATES, cancel_requested_at__isnull=True))
        inflight = load.site_inflight(str(r.pk) for r in live)
        _drain_done(service, live, inflight, now, done)
        live = [r for r in live if r.cancel_requested_at is None]
        _hand_over(live, now)
        scaling.decide(service, [r for r in live if takes_requests(r)], inflight, now)
        _roll_over(service, live, now, created)
        serving = [r for r in live if r.draining_since is None]
        succeeded = {r.replaces_id for r in serving if r.replaces_id is not None}
        counted = [r for r in serving if r.pk not in succeeded]  # a replica and its successor count once
        missing = service.keeps - len(counted)
        if missing > 0:
            _fill(service, missing, created)
        elif missing < 0:
            _scale_down(service, counted, inflight, -missing, now, done)
    return done


def _drain_done(
    service: ModelService, live: list[LLMSession], inflight: dict[str, int], now: datetime, done: Round
) -> None:  # fmt: skip
    """Cancel draining replicas that have no request open any more (or have drained for DRAIN_AT_MOST)."""
    for replica in live:
        if replica.draining_since is None:
            continue
        drained_for = now - replica.draining_since
        quiet = inflight.get(str(replica.pk), 0) == 0 and drained_for >= load.STALE
        if quiet or drained_for >= DRAIN_AT_MOST or replica.state != State.RUNNING:
            why = "its requests have ended" if quiet else "it drained for too long"
            _cancel(replica, f"drained ({why}): the service {service.name} no longer needs it",
                    f"replaced in its service {service.name}", done)  # fmt: skip
            replica.cancel_requested_at = now


def _hand_over(live: list[LLMSession], now: datetime) -> None:
    """A successor that is ready: its predecessor drains."""
    by_pk = {r.pk: r for r in live}
    for replica in live:
        old = by_pk.get(replica.replaces_id) if replica.replaces_id else None
        if old is not None and old.draining_since is None and takes_requests(replica):
            LLMSession.objects.filter(pk=old.pk, draining_since__isnull=True).update(draining_since=now)
            old.draining_since = now
            log.info("replica %s is ready: %s drains", replica.pk, old.pk)


def _roll_over(service: ModelService, live: list[LLMSession], now: datetime, created: list[str]) -> None:
    """Launch a successor for each ready replica whose walltime ends within the lead time, once."""
    lead = timing.lead(service)
    followed = {r.replaces_id for r in live if r.replaces_id is not None}
    for replica in live:
        ends = replica.ends_at
        if not takes_requests(replica) or replica.pk in followed or ends is None or ends - now > lead:
            continue
        if failing(service):
            return
        session = _launch(service, replaces=replica)
        if session is None:
            return
        log.info("service %s: %s ends at %s, within %s: successor %s", service.name, replica.pk, ends, lead,
                 session.pk)  # fmt: skip
        created.append(str(session.pk))


def _fill(service: ModelService, missing: int, created: list[str]) -> None:
    if failing(service):
        log.warning("service %s: %d replicas failed in %s; no new one until then", service.name, FAILURES_TO_PAUSE,
                    FAILURE_WINDOW)  # fmt: skip
        return
    for _ in range(missing):
        session = _launch(service)
        if session is None:
            return
        created.append(str(session.pk))


def _scale_down(
    service: ModelService, counted: list[LLMSession], inflight: dict[str, int], extra: int, now: datetime, done: Round
) -> None:  # fmt: skip
    """Fewer replicas are kept: those not ready yet are cancelled first, then the least loaded ready ones drain."""
    order = sorted(counted, key=lambda r: (takes_requests(r), inflight.get(str(r.pk), 0), -r.created_at.timestamp()))
    for replica in order[:extra]:
        if takes_requests(replica):
            LLMSession.objects.filter(pk=replica.pk, draining_since__isnull=True).update(draining_since=now)
        else:
            _cancel(replica, f"the service {service.name} scaled down", f"not needed by its service {service.name}",
                    done)  # fmt: skip


def _cancel(replica: LLMSession, cause: str, end_reason: str, done: Round) -> None:
    if lifecycle.mark_cancel(replica.pk, cause, end_reason):
        done.cancel.append(str(replica.pk))


def _launch(service: ModelService, replaces: LLMSession | None = None) -> LLMSession | None:
    try:
        session, _new = launching.create(service.owner, service.launch, with_session=_member_of(service, replaces))
    except ValidationError as exc:  # the owner's allocation or limits, a catalog change: tried again next round
        reason = " ".join(exc.messages)
        log.warning("service %s could not launch a replica: %s", service.name, reason)
        ModelService.objects.filter(pk=service.pk).exclude(launch_refused=reason).update(launch_refused=reason)
        return None
    ModelService.objects.filter(pk=service.pk).exclude(launch_refused="").update(launch_refused="")
    return session


def failing(service: ModelService) -> bool:
    """Whether enough of its replicas failed lately that launching another would likely fail too."""
    since = timezone.now() - FAILURE_WINDOW
    failed = LLMSession.objects.filter(service=service, state=State.FAILED, ended_at__gte=since)
    return failed.count() >= FAILURES_TO_PAUSE


def _member_of(service: ModelService, replaces: LLMSession | None) -> Callable[[LLMSession], None]:
    def mark(session: LLMSession) -> None:
        session.service, session.replaces = service, replaces
        session.save(update_fields=["service", "replaces"])

    return mark


def reconcile_all() -> Round:
    """Every running service once; what the rounds did, together."""
    together = Round()
    for pk in ModelService.objects.filter(stopped_at__isnull=True).values_list("pk", flat=True):
        one = reconcile(pk)
        together.created += one.created
        together.cancel += one.cancel
    return together
