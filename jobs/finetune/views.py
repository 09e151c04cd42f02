"""The pages of fine-tune runs (docs/finetune.md): the list, a new run with its data, and a run's page with its live
progress, loss curve and history. A run is its owner's alone (404 to anyone else), and support staff's with the
explicit permission, as sessions are (jobs.sessions.access.sees_all)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, HttpResponseRedirect
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from jobs.finetune import actions, comparisons, download, sharing
from jobs.finetune.chart import loss_svg
from jobs.finetune.comparisons import CompareForm
from jobs.finetune.forms import (
    DATA,
    HYPERPARAMETERS,
    PARENT,
    WHERE,
    FineTuneForm,
    continuable,
    own_run,
    parent_values,
    steps_text,
)
from jobs.models import FineTuneRun
from jobs.sessions.access import sees_all
from portal import ssh, streaming
from portal.bodies import takes_uploads
from portal.errors import messages_of
from portal.htmx import HtmxHttpRequest, render_page


def runs_for(request: HttpRequest) -> QuerySet[FineTuneRun]:
    runs = FineTuneRun.objects.select_related("variant__model", "gpu_type", "cluster", "owner")
    return runs if sees_all(request.user) else runs.filter(owner_id=request.user.pk)


def get_run_for(request: HttpRequest, pk: UUID | str, *, owner_only: bool = False, shared: bool = False) -> FineTuneRun:
    """The run if it is the request's user's (or they are support staff, unless `owner_only`; or, with `shared`, it
    is shared with them in a grant in force: jobs/finetune/sharing.py); 404 otherwise, as for a run that is not."""
    runs = runs_for(request)
    run = (runs.filter(owner_id=request.user.pk) if owner_only else runs).filter(pk=pk).first()
    if run is None and shared:
        run = sharing.granted_runs(request.user).select_related("gpu_type").filter(pk=pk).first()
    if run is None:
        raise Http404("no such fine-tune run")
    return run


@login_required
@require_GET
def finetune_list(request: HtmxHttpRequest) -> HttpResponse:
    runs = list(FineTuneRun.objects.filter(owner_id=request.user.pk).select_related("variant__model", "owner")[:200])
    shared = sharing.shared_with_me(request.user)
    return render_page(request, "jobs/finetune_list.html", {"runs": runs, "shared": shared})


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
    initial = request.GET.dict()
    parent = own_run(request.user, initial.get(PARENT, "")) if initial.get(PARENT) else None
    if parent is not None:  # ?from=: the parent's base, shape and where it ran, as the form would take them
        initial = {**parent_values(parent), **initial}
    form = FineTuneForm(initial=initial, user=request.user)
    return render_page(request, "jobs/finetune_new.html", _new_context(form, [], parent))


def _new_context(form: FineTuneForm, errors: list[str], parent: FineTuneRun | None = None) -> dict[str, Any]:
    """The form in groups: where it runs (the launch's fields), how, on what data, and the notices; the run it
    trains further (its `from`, a hidden field), or the user's adapters it could (a choice that reloads the page)."""
    groups = [
        ("Where it runs", WHERE),
        ("Method and hyperparameters", (*HYPERPARAMETERS, "suffix")),
        ("Training data", DATA),
        ("Notices", ("notify",)),
    ]
    parent = parent or form.parent
    model = str(form["model"].value() or "")
    return {
        "form": form,
        "errors": errors,
        "groups": [(legend, [form[n] for n in names]) for legend, names in groups],
        "parent": parent,
        "parent_field": form[PARENT],
        "continuable": [] if parent else list(continuable(form.user, model)[:100]),
    }


@login_required
@require_GET
def finetune_detail(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    """The run's page: its owner's, support staff's (who may cancel it), and read-only for those it is shared with
    (who may download the adapter)."""
    run = get_run_for(request, pk, shared=True)
    owns = run.owner_id == request.user.pk
    context = {
        "run": run,
        "owns": owns,
        "manages": owns or sees_all(request.user),
        "downloads": run.state == FineTuneRun.State.COMPLETED and (owns or _granted(request, run)),
        "chart": loss_svg(run.losses, run.planned_steps),
        "steps_text": steps_text(run.train_examples, run.examples_per_step, run.epochs),
        "versions": sorted((run.result.get("versions") or {}).items()),
        # The run it trained further from: linked for those who may see it (its owner's runs are theirs).
        "parent_visible": run.parent_id is not None and (owns or sees_all(request.user)),
    }
    if owns and not request.htmx:
        context["shares"], context["past_shares"] = sharing.grants_of(run)
        context["share_form"] = sharing.AdapterShareForm(request.user)
    return render_page(request, "jobs/finetune_run.html", context, "progress")


def _granted(request: HttpRequest, run: FineTuneRun) -> bool:
    return sharing.granted_runs(request.user).filter(pk=run.pk).exists()


@login_required
@require_GET
def finetune_adapter(request: HtmxHttpRequest, pk: UUID) -> HttpResponseBase:
    """The adapter as a .tar.gz download, streamed from the cluster: its owner's and those they shared it with (not
    support staff's: it is what the owner's data trained), never shown as a page."""
    run = get_run_for(request, pk, owner_only=True, shared=True)
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


@login_required
@require_POST
def finetune_share(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    """Only the owner shares a run's adapter (support staff may look, not hand it on)."""
    run = get_run_for(request, pk, owner_only=True)
    form = sharing.AdapterShareForm(request.user, request.POST)
    if form.is_valid():
        try:
            granted = sharing.share(run, request.user, form.cleaned_data)
        except ValidationError as exc:
            messages.error(request, " ".join(messages_of(exc)))
        else:
            messages.success(request, "Shared with " + ", ".join(g.grantee for g in granted) + ".")
    else:
        for errors in form.errors.values():
            for error in errors:
                messages.error(request, str(error))
    return HttpResponseRedirect(reverse("jobs:finetune", args=[run.pk]) + "#sharing")


@login_required
@require_POST
def finetune_unshare(request: HtmxHttpRequest, pk: UUID, share_pk: int) -> HttpResponse:
    run = get_run_for(request, pk, owner_only=True)
    if sharing.revoke(run, share_pk):
        messages.info(request, "No longer shared: they can no longer download it or launch sessions with it.")
    return HttpResponseRedirect(reverse("jobs:finetune", args=[run.pk]) + "#sharing")


@takes_uploads("PORTAL_BATCH_MAX_BYTES")  # a prompts file (portal/bodies.py)
@login_required
@require_http_methods(["GET", "POST"])
def finetune_compare(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    """The compare page: the base's and the adapter's validation loss, the run's comparisons, and a new one (its
    owner's: the prompts through the base and the adapter as two batch runs on a session that loaded it)."""
    run = get_run_for(request, pk, owner_only=request.method == "POST")
    errors: list[str] = []
    if request.method == "POST":
        try:
            comparison = comparisons.start(request.user, run, request.POST, request.FILES)
        except ValidationError as exc:
            errors = messages_of(exc)
        else:
            if comparison.state == comparison.State.WAITING:
                where = "it starts its two batch runs once the session it launched runs, and ends that session after"
                messages.success(request, f"Comparing on {comparison.prompts} prompts: {where}.")
            else:
                messages.success(request, f"Comparing on {comparison.prompts} prompts: two batch runs on the session.")
            return HttpResponseRedirect(reverse("jobs:finetune-comparison", args=[run.pk, comparison.pk]))
    # Unbound, with what was sent: a refusal's reasons are in `errors`, and checking the prompts again is not needed.
    initial = request.POST.dict() if request.method == "POST" else request.GET.dict()
    form = CompareForm(initial={k: v for k, v in initial.items() if k != "csrfmiddlewaretoken"}, run=run)
    launch = urlencode({"model": run.variant.model.name, "cluster": run.cluster.slug, "adapter": run.model_name})
    context = {
        "run": run,
        "form": form,
        "errors": errors,
        "why_not": comparisons.why_not(run),
        "comparisons": list(comparisons.of_run(run)[:50]),
        "launch_url": f"{reverse('jobs:launch')}?{launch}",
    }
    return render_page(request, "jobs/finetune_compare.html", context)


@login_required
@require_GET
def finetune_comparison(request: HtmxHttpRequest, pk: UUID, comparison: UUID) -> HttpResponse:
    """One comparison side by side, a page at a time (?page=N); its two batch runs' progress while they run."""
    run = get_run_for(request, pk)
    found = comparisons.of_run(run).filter(pk=comparison).first()
    if found is None:
        raise Http404("no such comparison")
    context: dict[str, Any] = {"run": run, "comparison": found, "batches": comparisons.states(found)}
    if request.htmx:
        return render_page(request, "jobs/finetune_comparison.html", context, "progress")
    number = request.GET.get("page", "1")
    page = comparisons.rows(found, int(number) if number.isdigit() else 1)
    return render_page(request, "jobs/finetune_comparison.html", {**context, "page": page})
