"""The pages of batch runs (docs/batch.md): a batch launch with its prompts file, a run's page with live progress and
its history, and its results, streamed from the cluster as they are downloaded.

A batch launch is a launch (the sessions' form, with actions.launch adding its run) and a run is seen by those who may
see its session (the sessions' access rule): jobs.batch sits above jobs.sessions (tests/test_layout.py)."""

from __future__ import annotations

from collections.abc import Iterator
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpResponse, HttpResponseBase, HttpResponseRedirect
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from catalog.models import GPUType
from jobs.batch import actions, outputs, staging
from jobs.batch.forms import BatchForm
from jobs.models import BatchRun, measured_pace
from jobs.sessions.access import get_session_for
from jobs.sessions.forms import LaunchForm, form_errors
from portal import ssh, streaming
from portal.bodies import takes_uploads
from portal.errors import messages_of
from portal.htmx import HtmxHttpRequest, render_page, render_partial

CONTENT_TYPES = {"jsonl": "application/jsonl", "openai": "application/jsonl", "csv": "text/csv"}


def get_run_for(request: HtmxHttpRequest, pk: UUID) -> BatchRun:
    """The run if its session is the request's user's to see (the sessions' rules); 404 otherwise."""
    run = BatchRun.objects.select_related("session").filter(pk=pk).first()
    if run is None:
        raise Http404("no such batch run")
    get_session_for(request, run.session_id)
    return run


@takes_uploads("PORTAL_BATCH_MAX_BYTES")  # a prompts file (portal/bodies.py)
@login_required
@require_http_methods(["GET", "POST"])
def new_batch_launch(request: HtmxHttpRequest) -> HttpResponse:
    """A batch launch: the wizard's chosen option (its launch fields, carried along) with a prompts file."""
    data = request.POST if request.method == "POST" else request.GET
    launch_form = LaunchForm(data, user=request.user)
    batch_form = BatchForm(request.POST, request.FILES) if request.method == "POST" else BatchForm()
    errors: list[str] = []
    if request.method == "POST" and launch_form.is_valid() and batch_form.is_valid():
        assert batch_form.checked is not None
        try:
            session = actions.launch(request.user, data, data.get("token", ""), batch=batch_form.checked)
        except ValidationError as exc:
            errors = messages_of(exc)
        else:
            run = BatchRun.objects.get(session=session, ends_session=True)
            messages.success(request, f"Batch run of {run.prompts} prompts created: submitting its job to Slurm.")
            return HttpResponseRedirect(reverse("jobs:batch", args=[run.pk]))
    elif not launch_form.is_valid():
        errors = messages_of(form_errors(launch_form))
    pace = None
    gpu = launch_form.objects.get("gpu_type") if launch_form.is_valid() else None
    if isinstance(gpu, GPUType):
        pace = measured_pace(launch_form.variant, gpu)
    context = {"launch": launch_form, "form": batch_form, "errors": errors, "fields": data, "pace": pace}
    return render_page(request, "jobs/batch_new.html", context)


@takes_uploads("PORTAL_BATCH_MAX_BYTES")
@login_required
@require_http_methods(["GET", "POST"])
def new_session_run(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    """A batch run on a running session, which stays up for chat and the API meanwhile."""
    session = get_session_for(request, pk)
    form = BatchForm(request.POST, request.FILES) if request.method == "POST" else BatchForm()
    errors: list[str] = []
    if request.method == "POST" and form.is_valid():
        assert form.checked is not None
        try:
            run = actions.start_run(session, form.checked)
        except ValidationError as exc:
            errors = messages_of(exc)
        else:
            messages.success(request, f"Batch run of {run.prompts} prompts created: sending it to the cluster.")
            return HttpResponseRedirect(reverse("jobs:batch", args=[run.pk]))
    return render_page(request, "jobs/batch_new.html", {"session": session, "form": form, "errors": errors})


@login_required
@require_POST
def stop_run(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    run = get_run_for(request, pk)
    actions.stop_run(run)
    messages.success(request, "Stopping the run; what it answered is kept.")
    return HttpResponseRedirect(reverse("jobs:batch", args=[run.pk]))


@login_required
@require_GET
def batch_run(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    run = get_run_for(request, pk)
    if request.htmx:
        return render_partial(request, "jobs/batch_run.html", "progress", {"run": run})
    expected_min = None
    max_tokens = run.defaults.get("max_tokens") if isinstance(run.defaults, dict) else None
    if not run.done and isinstance(max_tokens, int):
        pace = measured_pace(run.session.variant, run.session.gpu_type)
        if pace is not None:  # every answer as long as max_tokens allows: an upper bound
            expected_min = max(1, round(pace.expected_s(run.prompts, max_tokens, run.replicas) / 60))
    context = {"run": run, "formats": outputs.FORMATS, "expected_min": expected_min}
    return render_page(request, "jobs/batch_run.html", context)


@login_required
@require_GET
def batch_list(request: HtmxHttpRequest) -> HttpResponse:
    runs = BatchRun.objects.filter(owner_id=request.user.pk).select_related("session__variant__model")[:200]
    return render_page(request, "jobs/batch_list.html", {"runs": runs})


@login_required
@require_GET
def batch_output(request: HtmxHttpRequest, pk: UUID, fmt: str) -> HttpResponseBase:
    """The results in a format (outputs.py), streamed from the cluster: in input order once the run has finished,
    else what is answered so far, in the order it was answered."""
    run = get_run_for(request, pk)
    if fmt not in outputs.FORMATS:
        raise Http404("no such format")
    try:
        in_order, records = staging.results(run)
    except staging.NoResults as exc:
        return HttpResponse(f"No results yet: {exc}.", status=404, content_type="text/plain")
    except ssh.SSHError as exc:
        why = f"{run.session.cluster.name} cannot be reached now: {exc}"
        return HttpResponse(why, status=503, content_type="text/plain")
    prompts: Iterator[str] = iter(())
    if fmt == "csv" and in_order:
        prompts = outputs.prompts_of(outputs.lines(_local_chunks(run)))
    body = outputs.convert(records, fmt, str(run.pk), prompts)
    response = streaming.StreamingResponse(body, content_type=CONTENT_TYPES[fmt])
    extension = "csv" if fmt == "csv" else "jsonl"
    stem = run.name.rsplit(".", 1)[0] or "batch"
    response["Content-Disposition"] = f'attachment; filename="{stem}-{fmt}-results.{extension}"'
    return response


def _local_chunks(run: BatchRun) -> Iterator[bytes]:
    with run.requests.open("rb") as f:
        while chunk := f.read(1 << 16):
            yield chunk
