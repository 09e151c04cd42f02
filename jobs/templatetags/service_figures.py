"""The site dashboard's model services, as a tag its template asks for: jobs.operations (the dashboard's view) sits
below the sessions and so below the services, and may not import them; the page may show them."""

from __future__ import annotations

from django import template

from jobs.models import ModelService
from jobs.services import overview

register = template.Library()


@register.simple_tag
def running_services() -> list[overview.Overview]:
    """Each running service with its replicas' load and requests of the last minute (overview.overviews: a fixed
    handful of queries)."""
    return overview.overviews(ModelService.objects.filter(stopped_at__isnull=True).select_related("owner"))
