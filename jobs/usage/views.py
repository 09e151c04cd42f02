"""The usage pages: My usage (what I used, on my sessions and on those shared with me), Site usage for those with the
permission (every user's, grouped and sorted as asked) and its CSV export. The figures are figures.py's; the columns
tables.py's."""

from __future__ import annotations

from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from jobs.allocations import report as allocation_report
from jobs.models import SITE_USAGE_DENIED, sees_site_usage
from jobs.usage import chart, figures, tables
from jobs.usage.forms import PeriodForm, SiteForm
from portal.htmx import HtmxHttpRequest, render_page

MONTH_CHOICES = (1, 3, 6, 12, 24, 36)
WEEKLY_AFTER_DAYS = 92


def usage_chart(days: list[figures.Row]) -> str:
    """Tokens per day as bars (chat and API, batch), GPU-hours as lines (reserved, with traffic); per week over more
    than WEEKLY_AFTER_DAYS days, where a bar a day would be too thin to read."""
    step = "day"
    if len(days) > WEEKLY_AFTER_DAYS:
        step, days = "week", figures.by_week(days)
    return chart.svg(
        [row.key for row in days],
        [
            chart.Series("chat and API tokens", [row.tally.tokens for row in days], "#0b5cad"),
            chart.Series("batch tokens", [row.tally.batch_tokens for row in days], "#2a9d8f"),
        ],
        [
            chart.Series("GPU-hours reserved", [row.tally.gpu_hours for row in days], "#d9822b"),
            chart.Series("GPU-hours with traffic", [row.tally.traffic_gpu_hours for row in days], "#1d2330", True),
        ],
        title=f"Tokens and GPU-hours per {step}",
        bar_unit="tokens",
        line_unit="GPU-hours",
        step=step,
    )


@login_required
@require_GET
def my_usage(request: HtmxHttpRequest) -> HttpResponse:
    form = PeriodForm(request.GET)
    usage = figures.my_usage(request.user.pk, form.period())
    by = {"Month": usage.by_month, "Model": usage.by_model, "Cluster": usage.by_cluster}
    context = {
        "form": form,
        "period": usage.period,
        "columns": tables.COLUMNS,
        "total": tables.cells(usage.total),
        "tables": [(name, [(row.key, tables.cells(row.tally)) for row in rows]) for name, rows in by.items()],
        "routes": figures.by_route(figures.Scope(usage.period, user_id=request.user.pk)),
        "training": figures.training(figures.Scope(usage.period, user_id=request.user.pk)),
        "chart": usage_chart(usage.days),
        "sees_site": sees_site_usage(request.user),
        "month_choices": MONTH_CHOICES,
        "allocations": [allocation_report.shown(s) for s in allocation_report.of_user(request.user)],
    }
    return render_page(request, "jobs/usage.html", context)


def _site_table(form: SiteForm, period: figures.Period) -> tuple[list[figures.Row], figures.Tally | None]:
    """The rows, sorted as asked, and their total; no total when a row may also be another's (groups)."""
    by, sort, descending = form.grouping()
    rows = tables.sort_rows(figures.table(figures.Scope(period), by), sort, descending)
    return rows, figures.table_total(by, rows)


def _headers(form: SiteForm, kept: dict[str, str]) -> list[dict[str, str | bool]]:
    """Each column's header: a link that sorts by it (a second click on the sorted one turns it round; numbers sort
    the largest first), keeping what else was asked."""
    by, sort, descending = form.grouping()
    found: list[dict[str, str | bool]] = []
    named = [(tables.KEY, tables.key_label(by), ""), *((c.name, c.label, c.help) for c in tables.COLUMNS)]
    for name, label, help_text in named:
        current = name == sort
        descending_next = not descending if current else name != tables.KEY
        query = urlencode({**kept, "sort": name, "dir": "desc" if descending_next else "asc"})
        aria = ("descending" if descending else "ascending") if current else "none"
        found.append({"label": label, "help": help_text, "query": query, "aria": aria, "current": current})
    return found


@login_required
@require_GET
def site_usage(request: HtmxHttpRequest) -> HttpResponse:
    if not sees_site_usage(request.user):
        return render(request, "jobs/site_usage.html", {"denied": SITE_USAGE_DENIED}, status=403)
    form = SiteForm(request.GET)
    period = form.period()
    rows, total = _site_table(form, period)
    kept = {name: str(request.GET[name]) for name in ("months", "since", "until", "by") if request.GET.get(name)}
    by = form.grouping()[0]
    context = {
        "form": form,
        "period": period,
        "by_label": tables.key_label(by),
        "overlaps": total is None,
        "headers": _headers(form, kept),
        "rows": [(row.key, tables.cells(row.tally)) for row in rows],
        "total": tables.cells(total) if total is not None else None,
        "routes": figures.by_route(figures.Scope(period)),
        "csv_query": urlencode({**kept, "by": by}),
        "month_choices": MONTH_CHOICES,
        "by": by,
        "groupings": [(name, tables.key_label(name), urlencode({**kept, "by": name})) for name in figures.BY],
        "keep": [(name, value) for name, value in request.GET.items() if name in ("by", "sort", "dir")],
        "allocations": [] if request.htmx else [allocation_report.shown(s) for s in allocation_report.of_site()],
        "training": None if request.htmx else figures.training(figures.Scope(period)),
    }
    return render_page(request, "jobs/site_usage.html", context, "table")


@login_required
@require_GET
def site_usage_csv(request: HtmxHttpRequest) -> HttpResponse:
    if not sees_site_usage(request.user):
        return HttpResponse(SITE_USAGE_DENIED, status=403, content_type="text/plain; charset=utf-8")
    form = SiteForm(request.GET)
    period = form.period()
    rows, total = _site_table(form, period)
    by = form.grouping()[0]
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    name = f"site-usage-by-{by}-{period.first_day}-to-{period.last_day}.csv"
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    tables.write_csv(response, by, rows, total)
    return response
