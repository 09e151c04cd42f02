"""What people do to model services, for the admin, pages and `manage.py services`: create, scale and stop one. Each
writes the database and, once that commits, has the keep_services task bring the replicas to the new minimum
(jobs/services/keep.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from types import EllipsisType
from typing import Any

from django.contrib.auth.models import Group, User
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from catalog.models import ModelCard
from jobs import tasks
from jobs.models import LIVE_STATES, RUN_SITE_SERVICE, LLMSession, ModelService
from jobs.sessions import actions as sessions
from jobs.sessions.forms import LaunchForm, form_errors

log = logging.getLogger(__name__)


def create(
    owner: User,
    name: str,
    launch: Mapping[str, Any],
    *,
    min_replicas: int = 1,
    max_replicas: int | None = None,
    audience: str = ModelService.Audience.OWNER,
    groups: Iterable[Group] = (),
    target_inflight: int | None = None,
    idle_minutes: float | None = None,
    max_inflight_per_user: int | None = None,
) -> ModelService:
    """A new service; its replicas are launched once it is committed. The launch is checked now, by the launch form,
    as the replicas will be launched."""
    form = LaunchForm(dict(launch), user=owner)
    if not form.is_valid():
        raise form_errors(form)
    if audience == ModelService.Audience.SITE and not owner.has_perm(".".join(reversed(RUN_SITE_SERVICE))):
        raise ValidationError({"audience": "A site service needs the permission to run one (an admin grants it)."})
    if ModelCard.objects.filter(name=name).exists():
        raise ValidationError(
            {"name": f"{name!r} is a model's catalog name, which callers use for their own sessions."}
        )
    groups = list(groups)
    if audience == ModelService.Audience.GROUPS and not groups:
        raise ValidationError({"groups": "Name the groups whose members may use it."})
    if any(not owner.groups.filter(pk=group.pk).exists() for group in groups) and not owner.is_superuser:
        raise ValidationError({"groups": "Only groups you are a member of."})
    service = ModelService(name=name, owner=owner, launch=_stored(form), min_replicas=min_replicas,
                           max_replicas=max(min_replicas, 1) if max_replicas is None else max_replicas,
                           audience=audience, max_inflight_per_user=max_inflight_per_user)  # fmt: skip
    if target_inflight is not None:
        service.target_inflight = target_inflight
    if idle_minutes is not None:
        service.idle_minutes = idle_minutes
    service.full_clean()
    with transaction.atomic():
        service.save()
        service.groups.set(groups)
        transaction.on_commit(tasks.keep_services.delay)
    return service


def _stored(form: LaunchForm) -> dict[str, Any]:
    """The launch as LaunchForm takes it again: its cleaned values by field name, model rows by their keys."""
    stored: dict[str, Any] = {}
    for name in form.fields:
        value = form.data.get(name)
        if value not in (None, "") and name not in PER_SESSION:
            stored[name] = value
    return stored


# A session's own, not its launch: replicas share no alias (callers name the service).
PER_SESSION = ("alias",)


def scale(
    service: ModelService, min_replicas: int, max_replicas: int, *, target_inflight: int | None = None,
    idle_minutes: float | None = None, max_inflight_per_user: int | EllipsisType | None = ...,
) -> None:  # fmt: skip
    """New bounds (and optionally a new target, idle time and fair-share cap: None for the site's, ... to keep it);
    the keeper moves the replicas within them."""
    service.min_replicas, service.max_replicas = min_replicas, max_replicas
    if target_inflight is not None:
        service.target_inflight = target_inflight
    if idle_minutes is not None:
        service.idle_minutes = idle_minutes
    if not isinstance(max_inflight_per_user, EllipsisType):
        service.max_inflight_per_user = max_inflight_per_user
    service.full_clean()
    service.save(update_fields=["min_replicas", "max_replicas", "target_inflight", "idle_minutes",
                                "max_inflight_per_user"])  # fmt: skip
    transaction.on_commit(tasks.keep_services.delay)


def wake(service_pk: int) -> bool:
    """A request came for a service that keeps no replica now (min 0, scaled down to none): keep one again. Returns
    whether this call woke it (a conditional update: of many such requests, one enqueues the keeper)."""
    woken = ModelService.objects.filter(pk=service_pk, stopped_at__isnull=True, desired_replicas=0,
                                        max_replicas__gte=1).update(desired_replicas=1, quiet_since=None)  # fmt: skip
    if woken:  # robust: beat's round would wake it anyway, so a broker away must not fail the request
        transaction.on_commit(tasks.keep_services.delay, robust=True)
    return bool(woken)


def stop(service: ModelService, cause: str) -> int:
    """No replica is kept up any more; every live one is cancelled. Returns how many were."""
    ModelService.objects.filter(pk=service.pk, stopped_at__isnull=True).update(stopped_at=timezone.now())
    live = list(LLMSession.objects.filter(service=service, state__in=LIVE_STATES))
    for replica in live:
        sessions.request_cancel(replica, cause, f"its service {service.name} was stopped")
    return len(live)
