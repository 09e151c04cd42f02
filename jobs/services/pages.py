"""The model services' pages: the list of those a user may use, one service with its replicas (refreshed while it
runs), creating one from the web (the launch's fields are LaunchForm's), and its owner's scale and stop."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db.models import F
from django.http import Http404, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect

from catalog.models import ClusterAccount
from jobs.models import ModelService
from jobs.models.services import ServiceQuerySet
from jobs.services import actions, overview
from jobs.services.forms import ScaleForm, ServiceForm, add_errors, launch_values, may_run_site_service
from jobs.sessions.access import sees_all
from jobs.sessions.forms import LaunchForm
from portal.htmx import HtmxHttpRequest, render_page


def visible_to(request: HtmxHttpRequest) -> ServiceQuerySet:
    """The services whose pages the user sees: those they may use, and every one for support staff."""
    return ModelService.objects.all() if sees_all(request.user) else ModelService.objects.usable_by(request.user)


def get_service_for(request: HtmxHttpRequest, name: str) -> ModelService:
    """The service if the user may use it or is support staff; 404 otherwise, as the API answers for it."""
    service = visible_to(request).filter(name=name).select_related("owner").first()
    if service is None:
        raise Http404("no such service")
    return service


def manages(request: HtmxHttpRequest, service: ModelService) -> bool:
    return service.owner_id == request.user.pk or request.user.is_superuser


def _managed(request: HtmxHttpRequest, name: str) -> ModelService:
    """Scale and stop: its owner's (and superusers'); 404 to everyone else, as a session's sharing is its owner's
    (those who use the service, and support staff, look but do not change it)."""
    service = get_service_for(request, name)
    if not manages(request, service):
        raise Http404("no such service")
    return service


@login_required
@require_GET
def service_list(request: HtmxHttpRequest) -> HttpResponse:
    services = visible_to(request).with_ready().order_by(F("stopped_at").desc(nulls_first=True), "name")
    return render_page(request, "services/service_list.html", {"services": services})


@login_required
@require_GET
def service_detail(request: HtmxHttpRequest, name: str) -> HttpResponse:
    service = get_service_for(request, name)
    return render_page(request, "services/service_detail.html", _detail(request, service), "replicas")


def _detail(request: HtmxHttpRequest, service: ModelService, form: ScaleForm | None = None) -> dict[str, Any]:
    seen = overview.overview(service)
    return {
        "service": service,
        "o": seen,
        "launch": overview.launch_of(service),
        "groups": sorted(service.groups.values_list("name", flat=True)),
        "manages": manages(request, service),
        "sees_all": sees_all(request.user),
        "chats": service.may_use(request.user),  # support staff see the page, but chat only with what they may use
        "form": form or ScaleForm(instance=service),
        "polling": service.running or bool(seen.replicas),
    }


@login_required
@require_POST
def service_scale(request: HtmxHttpRequest, name: str) -> HttpResponse:
    service = _managed(request, name)
    form = ScaleForm(request.POST, instance=ModelService.objects.get(pk=service.pk))  # a copy: ours stays as it is
    if form.is_valid():
        data = form.cleaned_data
        try:
            actions.scale(service, data["min_replicas"], data["max_replicas"], target_inflight=data["target_inflight"],
                          idle_minutes=data["idle_minutes"],
                          max_inflight_per_user=data["max_inflight_per_user"])  # fmt: skip
        except ValidationError as exc:
            service.refresh_from_db()
            add_errors([form], exc)
        else:
            messages.success(request, f"{service.name} now keeps {service.min_replicas} to {service.max_replicas} "
                                      "replicas.")  # fmt: skip
            return HttpResponseRedirect(reverse("jobs:service", args=[service.name]))
    return render_page(request, "services/service_detail.html", _detail(request, service, form))


@login_required
@require_POST
def service_stop(request: HtmxHttpRequest, name: str) -> HttpResponse:
    service = _managed(request, name)
    if service.running:
        count = actions.stop(service, f"its service was stopped by {request.user.get_username()} in the browser")
        messages.info(request, f"{service.name} stopped: {count} replica(s) are being cancelled.")
    where = reverse("jobs:service", args=[service.name])
    return HttpResponseClientRedirect(where) if request.htmx else HttpResponseRedirect(where)


@login_required
@require_http_methods(["GET", "POST"])
def service_new(request: HtmxHttpRequest) -> HttpResponse:
    """A new service: ServiceForm's fields beside the launch's, which come prefilled from the wizard's option (its
    query string) and are checked again by actions.create() through LaunchForm."""
    user = request.user
    if request.method == "POST":
        launch = LaunchForm(request.POST, user=user)
        form = ServiceForm(request.POST, user=user)
        if all([launch.is_valid(), form.is_valid()]):
            try:
                service = actions.create(user, form.cleaned_data["name"], launch_values(request.POST),
                                         **form.create_args())  # fmt: skip
            except ValidationError as exc:
                add_errors([form, launch], exc)
            else:
                messages.success(request, f"Service {service.name} created: its replicas are being launched.")
                return HttpResponseRedirect(reverse("jobs:service", args=[service.name]))
    else:
        prefilled = launch_values(request.GET)
        launch = LaunchForm(prefilled or None, user=user)
        form = ServiceForm(user=user)
    accounts = ClusterAccount.objects.filter(user=user) | ClusterAccount.objects.filter(members=user)
    launch.fields["account"].widget.attrs["list"] = "service-accounts"
    context = {
        "launch": launch,
        "launch_fields": [launch[name] for name in launch.fields if name not in actions.PER_SESSION],
        "form": form,
        "accounts": accounts.distinct().select_related("cluster").order_by("cluster__name", "pk"),
        "site_allowed": may_run_site_service(user),
    }
    return render_page(request, "services/service_new.html", context)
