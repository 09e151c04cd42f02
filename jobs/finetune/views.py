"""The pages of fine-tune runs (docs/finetune.md): the list, a new run with its data, and a run's page with its live
progress, loss curve and history. A run is its owner's alone (404 to anyone else), and support staff's with the
explicit permission, as sessions are (jobs.sessions.access.sees_all)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, HttpResponseRedirect
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from jobs.finetune import actions, download
from jobs.finetune.chart import loss_svg
from jobs.finetune.forms import DATA, HYPERPARAMETERS, WHERE, FineTuneForm, steps_text
from jobs.models import FineTuneRun
from jobs.sessions.access import sees_all
from portal import ssh, streaming
from portal.bodies import takes_uploads
from portal.errors import messages_of
from portal.htmx import HtmxHttpRequest, render_page


def runs_for(request: HttpRequest) -> QuerySet[FineTuneRun]:
    runs = FineTuneRun.objects.select_related("variant__model", "gpu_type", "cluster", "owner")
    return runs if sees_all(request.user) else runs.filter(owner_id=request.user.pk)


def get_run_for(request: HttpRequest, pk: UUID | str, *, owner_only: bool = False) -> FineTuneRun:
    """The run if it is the request's user's (or they are support staff, unless `owner_only`); 404 otherwise, as
    for a run that is not."""
    runs = runs_for(request)
    run = (runs.filter(owner_id=request.user.pk) if owner_only else runs).filter(pk=pk).first()
    if run is None:
        raise Http404("no such fine-tune run")
    return run


@login_required
@require_GET
def finetune_list(request: HtmxHttpRequest) -> HttpResponse:
    runs = list(FineTuneRun.objects.filter(owner_id=request.user.pk).select_related("variant__model", "owner")[:200])
    return render_page(request, "jobs/finetune_list.html", {"runs": runs})


@takes_uploads("PORTAL_FINETUNE_MAX_BYTES")  # the training data (portal/bodies.py)
@login_required
@require_http_methods(["GET", "POST"])
def finetune_new(request: HtmxHttpRequest) -> HttpResponse:
    """A new run: where it runs (a launch's fields, e.g. from the wizard's option), how, and the data."""
    if request.method == "POST":
        try:
            run = actions.create(request.user, request.POST, request.FILES, request.POST.get("token", ""))
        except ValidationError as exc:
            form = FineTuneForm(request.POST, user=request.user)
            return render_page(request, "jobs/finetune_new.html", _new_context(form, messages_of(exc)))
        messages.success(request, f"Fine-tune run of {run.planned_steps} steps created: submitting its job to Slurm.")
        return HttpResponseRedirect(reverse("jobs:finetune", args=[run.pk]))
    form = FineTuneForm(initial=request.GET.dict(), user=request.user)
    return render_page(request, "jobs/finetune_new.html", _new_context(form, []))


def _new_context(form: FineTuneForm, errors: list[str]) -> dict[str, Any]:
    """The form in groups: where it runs (the launch's fields), how, on what data, and the notices."""
    groups = [
        ("Where it runs", WHERE),
        ("Method and hyperparameters", (*HYPERPARAMETERS, "suffix")),
        ("Training data", DATA),
        ("Notices", ("notify",)),
    ]
    return {"form": form, "errors": errors, "groups": [(legend, [form[n] for n in names]) for legend, names in groups]}


@login_required
@require_GET
def finetune_detail(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    run = get_run_for(request, pk)
    context = {
        "run": run,
        "chart": loss_svg(run.losses, run.planned_steps),
        "steps_text": steps_text(run.train_examples, run.examples_per_step, run.epochs),
        "versions": sorted((run.result.get("versions") or {}).items()),
    }
    return render_page(request, "jobs/finetune_run.html", context, "progress")


@login_required
@require_GET
def finetune_adapter(request: HtmxHttpRequest, pk: UUID) -> HttpResponseBase:
    """The adapter as a .tar.gz download, streamed from the cluster: its owner's alone (not support staff's: it is
    what the owner's data trained), never shown as a page."""
    run = get_run_for(request, pk, owner_only=True)
    try:
        archive = download.adapter_archive(run)
    except download.NoAdapter as exc:
        return HttpResponse(f"No adapter to download: {exc}.", status=409, content_type="text/plain")
    except ssh.SSHError as exc:
        why = f"{run.cluster.name} cannot be reached now: {exc}"
        return HttpResponse(why, status=503, content_type="text/plain")
    response = streaming.StreamingResponse(archive, content_type="application/gzip")
    name = f"{run.variant.model.name}-{run.suffix or 'adapter'}-{str(run.pk)[:8]}.tar.gz"
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


@login_required
@require_POST
def finetune_cancel(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    run = get_run_for(request, pk)
    try:
        actions.cancel(run)
    except ValidationError as exc:
        messages.error(request, " ".join(messages_of(exc)))
    else:
        messages.success(request, "Cancelling the run; its checkpoints stay on the cluster.")
    return HttpResponseRedirect(reverse("jobs:finetune", args=[run.pk]))
