"""Which model services a user may use, as a query: ModelService.may_use's rule in SQL, for the pages that list
services (My sessions here, the services' own pages in jobs/services/). It sits below both, since My sessions may not
import jobs.services; the rule's home is the model, and may_use stays the one a single service is checked by (the
tests hold the two to the same answers)."""

from __future__ import annotations

from django.contrib.auth.models import AnonymousUser, User
from django.db.models import Count, Q, QuerySet

from jobs.models import ModelService, State


def usable_by(user: User | AnonymousUser) -> QuerySet[ModelService]:
    """The services `user` may send requests to, stopped ones included: their own, site services, and those of a group
    they are in."""
    if not user.is_authenticated or not user.is_active:
        return ModelService.objects.none()
    in_groups = ModelService.groups.through.objects.filter(group__user=user).values("modelservice_id")
    audience = ModelService.Audience
    return ModelService.objects.filter(
        Q(owner=user) | Q(audience=audience.SITE) | Q(audience=audience.GROUPS, pk__in=in_groups)
    )


def ready_q(prefix: str = "") -> Q:
    """A replica that takes requests now: running, with an address, and not draining."""
    return Q(**{f"{prefix}state": State.RUNNING, f"{prefix}draining_since__isnull": True}) & ~Q(**{f"{prefix}host": ""})


def with_ready(services: QuerySet[ModelService]) -> QuerySet[ModelService]:
    """The services with `ready`, their number of ready replicas, and their owner, in one query."""
    return services.select_related("owner").annotate(ready=Count("replicas", filter=ready_q("replicas__")))
