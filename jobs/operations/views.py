"""For operators: /metrics for Prometheus (a scrape token an admin issued, nothing else), and the site dashboard for
sites without Prometheus (the "Site usage" permission)."""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables
from django.views.decorators.http import require_GET

from jobs.models import SITE_USAGE_DENIED, ScrapeToken, sees_site_usage
from jobs.operations import dashboard, metrics
from portal.htmx import HtmxHttpRequest, render_page

TOKEN_USED_EVERY = timedelta(minutes=1)


@require_GET
@sensitive_variables("token", "scheme")
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus text; 401 without a scrape token in force (a cookie or an API token are not one)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    holder = ScrapeToken.holder(token.strip()) if scheme.lower() == "bearer" else None
    if holder is None:
        refused = HttpResponse("a scrape token is needed: Authorization: Bearer hpcllm_scrape_…\n", status=401,
                               content_type="text/plain")  # fmt: skip
        refused["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return refused
    now = timezone.now()
    if holder.last_used_at is None or now - holder.last_used_at > TOKEN_USED_EVERY:
        ScrapeToken.objects.filter(pk=holder.pk).update(last_used_at=now)
    body, content_type = metrics.exposition()
    return HttpResponse(body, content_type=content_type)


@login_required
@require_GET
def dashboard_view(request: HtmxHttpRequest) -> HttpResponse:
    if not sees_site_usage(request.user):
        return render(request, "jobs/dashboard.html", {"denied": SITE_USAGE_DENIED}, status=403)
    return render_page(request, "jobs/dashboard.html", {"d": dashboard.now()}, "figures")
