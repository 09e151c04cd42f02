"""OpenAI's fine-tuning API on the portal (docs/finetune.md), so scripts written for the official `openai` client's
fine-tuning calls start fine-tune runs with a personal token: `fine_tuning.jobs.create|retrieve|list|cancel|
list_events` and `fine_tuning.jobs.checkpoints.list`, on training data uploaded with `files.create(purpose="fine-tune")`
(jobs/use/openai_batches.py checks it line by line as the run's page does, and keeps it within the caller's quota).

A job is a fine-tune run (jobs/finetune/): `model` names the catalog model (NAME, or NAME:QUANT for one of its
safetensors variants), or one of the caller's completed runs by its model name (ft:...), whose adapter the run trains
further (the form's `from`: its base, adapter shape and where it ran, unless the metadata says otherwise); where it
runs comes from `metadata` as for a batch launch: the fine-tune form's own fields
(cluster, partition, gpu, gpus, walltime, ... and the portal's hyperparameters such as lora_rank or max_seq_length),
checked by that form, which is the launch form's checks. OpenAI's hyperparameters map onto the run's columns:
n_epochs to its epochs, batch_size (examples per optimizer step) to its batch size and gradient accumulation,
learning_rate_multiplier to a multiple of its default learning rate. Events are the run's history and its loss curve;
checkpoints are the steps it checkpointed at (every N steps, and its end), with their losses.

Everything is the token holder's own: another user's job, its events and checkpoints are a 404, as their files are.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.files import File
from django.db import models
from django.http import HttpRequest, HttpResponseBase, JsonResponse
from django.utils import timezone
from django.utils.datastructures import MultiValueDict
from django.views.decorators.http import require_GET, require_http_methods

from catalog.runtime_rules import OPENAI
from jobs.finetune import actions, placement
from jobs.finetune.forms import PARENT, FineTuneForm, own_run
from jobs.models import BatchFile, FineTuneRun
from jobs.use import targets
from jobs.use.headers import not_allowed, openai_error
from jobs.use.openai_batches import FINE_TUNE, _body, _own_file, _tokened, _uuid_of
from portal.errors import messages_of

JOB, EVENT, CHECKPOINT = "ftjob-", "ftevent-", "ftckpt-"
STATUS = {
    FineTuneRun.State.QUEUED: "validating_files",  # not yet on the cluster, as a batch's "validating"
    FineTuneRun.State.SUBMITTED: "queued",
    FineTuneRun.State.RUNNING: "running",
    FineTuneRun.State.COMPLETED: "succeeded",
    FineTuneRun.State.FAILED: "failed",
    FineTuneRun.State.CANCELLED: "cancelled",
}
# The form's fields that the request's own parameters fill (model, suffix, seed, the files): never the metadata's.
OWN = frozenset({"model", "quant", "suffix", "seed", "training_file", "validation_file", PARENT})
FROM_METADATA = frozenset(FineTuneForm.base_fields) - OWN  # where it runs, and the portal's own hyperparameters
OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
MAX_METADATA_CHARS = 16_000


def _default(column: str) -> Any:
    field = FineTuneRun._meta.get_field(column)
    assert isinstance(field, models.Field)
    return field.get_default()


def _at(value: Any) -> int | None:
    return int(value.timestamp()) if value else None


def hyperparameters_of(run: FineTuneRun) -> dict[str, Any]:
    """The run's hyperparameters as OpenAI names them: batch_size is the examples of one optimizer step."""
    return {
        "n_epochs": run.epochs,
        "batch_size": run.examples_per_step,
        "learning_rate_multiplier": round(run.learning_rate / _default("learning_rate"), 6),
    }


def job_object(run: FineTuneRun) -> dict[str, Any]:
    status = STATUS[FineTuneRun.State(run.state)]
    given = run.openai or {}
    eta = run.eta_s
    hyperparameters = hyperparameters_of(run)
    return {
        "id": f"{JOB}{run.pk.hex}", "object": "fine_tuning.job",
        "model": run.parent.model_name if run.parent is not None else run.variant.model.name,  # as it was asked for
        "created_at": _at(run.created_at), "finished_at": _at(run.finished_at),
        "fine_tuned_model": run.model_name if status == "succeeded" else None,
        "organization_id": f"user-{run.owner_id}", "status": status, "seed": run.seed,
        "training_file": given.get("training_file", ""), "validation_file": given.get("validation_file"),
        "result_files": [], "hyperparameters": hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "trained_tokens": run.result.get("tokens") if status == "succeeded" else None,
        "error": {"code": "run_failed", "message": run.end_reason or "the run failed", "param": None}
        if status == "failed" else None,
        "estimated_finish": int(timezone.now().timestamp() + eta) if eta is not None else None,
        "user_provided_suffix": run.suffix or None, "integrations": [], "metadata": given.get("metadata") or None,
    }  # fmt: skip


def _own_job(user: User, job_id: str) -> FineTuneRun | None:
    pk = _uuid_of(job_id, JOB)
    runs = FineTuneRun.objects.select_related("variant__model", "owner", "parent__variant__model", "parent__owner")
    return runs.filter(pk=pk, owner=user).first() if pk else None


def _no_job(job_id: str) -> JsonResponse:
    return openai_error(404, f"no fine-tuning job {job_id!r}", "invalid_request_error", "fine_tuning_job_not_found")


def _limit(request: HttpRequest) -> int:
    try:
        return max(1, min(100, int(request.GET.get("limit", 20))))
    except ValueError:
        return 20


def _page_of(
    request: HttpRequest, user: User, job_id: str, items_of: Callable[[FineTuneRun], list[dict[str, Any]]]
) -> JsonResponse:
    """A page of what items_of() lists of the caller's job (its events, its checkpoints); 404 for anyone else's."""
    run = _own_job(user, job_id)
    return _no_job(job_id) if run is None else _page(items_of(run), request)


def _page(items: Sequence[dict[str, Any]], request: HttpRequest) -> JsonResponse:
    """A list page of `items` (newest first): those after the `after` id, at most `limit` of them."""
    after = request.GET.get("after")
    if after:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    limit = _limit(request)
    return JsonResponse({"object": "list", "data": list(items[:limit]), "has_more": len(items) > limit})


@require_http_methods(["GET", "POST"])
@_tokened
def fine_tuning_jobs(request: HttpRequest, holder: targets.Holder, user: User) -> HttpResponseBase:
    """POST: a fine-tune run from the training file the caller uploaded. GET: the caller's jobs, newest first."""
    if request.method == "POST":
        return _create(request, holder, user)
    runs = FineTuneRun.objects.filter(owner=user).select_related(
        "variant__model", "owner", "parent__variant__model", "parent__owner"
    )
    after = _uuid_of(request.GET.get("after", ""), JOB)
    if after:
        anchor = runs.filter(pk=after).first()
        runs = runs.filter(created_at__lt=anchor.created_at) if anchor else runs.none()
    limit = _limit(request)
    page = list(runs[: limit + 1])
    return JsonResponse(
        {"object": "list", "data": [job_object(r) for r in page[:limit]], "has_more": len(page) > limit}
    )


def _split_batch(examples: int) -> dict[str, int]:
    """OpenAI's batch size (examples per optimizer step) as the run's batch size per GPU, at most its default, times
    its gradient accumulation: exactly that many examples a step, in no larger batches than the default's memory."""
    per_gpu = max(d for d in range(1, min(examples, _default("batch_size")) + 1) if examples % d == 0)
    return {"batch_size": per_gpu, "gradient_accumulation": examples // per_gpu}


def hyperparameters_from(payload: dict[str, Any]) -> dict[str, Any]:
    """The run's columns that OpenAI's hyperparameters ask for (at the top, or in method.supervised; "auto" or left
    out: the run's default); ValueError says what is wrong."""
    given = payload.get("hyperparameters")
    method = payload.get("method")
    if method is not None:
        if not isinstance(method, dict) or method.get("type") != "supervised":
            raise ValueError("method: only supervised fine-tuning (type 'supervised') is offered here")
        inner = (method.get("supervised") or {}).get("hyperparameters")
        if given and inner:
            raise ValueError("give the hyperparameters once: at the top or in method.supervised")
        given = inner or given
    given = given or {}
    if not isinstance(given, dict):
        raise ValueError("hyperparameters must be an object")
    unknown = sorted(set(given) - set(OPENAI_HYPERPARAMETERS))
    if unknown:
        raise ValueError(f"hyperparameters: unknown {', '.join(unknown)} (the portal's own go in metadata)")
    columns: dict[str, Any] = {}
    for key, value in given.items():
        if value is None or value == "auto":
            continue
        if key == "learning_rate_multiplier":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"hyperparameters.{key} must be a positive number or 'auto'")
            columns["learning_rate"] = value * _default("learning_rate")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"hyperparameters.{key} must be a whole number from 1, or 'auto'")
        elif key == "n_epochs":
            columns["epochs"] = value
        else:
            columns.update(_split_batch(value))
    return columns


def _placed(user: User, model: str, where: dict[str, Any]) -> dict[str, Any] | None:
    """Where the wizard would train this run (placement.recommended), at the method and sequence length the metadata
    gives (else the run's defaults); None when no plan fits or the metadata's are not valid values."""
    method = str(where.get("method") or _default("method"))
    if method not in FineTuneRun.Method.values:
        return None
    try:
        length = int(where.get("max_seq_length") or _default("max_seq_length"))
    except (TypeError, ValueError):
        return None
    return placement.recommended(user, model, method, length)


def _training_file(user: User, file_id: Any, param: str) -> BatchFile | JsonResponse:
    upload = _own_file(user, str(file_id or ""))
    if upload is None:
        return openai_error(404, f"no file {file_id!r} ({param})", "invalid_request_error", "file_not_found")
    if upload.purpose != FINE_TUNE:
        return openai_error(400, f"{param} {file_id} was uploaded for {upload.purpose}, not {FINE_TUNE}",
                            "invalid_request_error", "invalid_file")  # fmt: skip
    return upload


def _create(request: HttpRequest, holder: targets.Holder, user: User) -> HttpResponseBase:
    """A fine-tune run: the model, the files, OpenAI's hyperparameters, and from the metadata where it runs and the
    portal's own hyperparameters, all checked by the fine-tune form (the page's and the command line's)."""
    try:
        payload = json.loads(_body(request) or b"{}")
    except ValueError:
        return openai_error(400, "the body must be JSON", "invalid_request_error")
    if not isinstance(payload, dict):
        return openai_error(400, "the body must be a JSON object", "invalid_request_error")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return openai_error(400, "model must name a catalog model (NAME or NAME:QUANT)", "invalid_request_error")
    parent = own_run(user, model) if model.startswith(targets.ADAPTER_PREFIX) else None
    if model.startswith(targets.ADAPTER_PREFIX) and parent is None:  # another user's run is as one nobody has
        return openai_error(404, f"The model {model!r} does not exist or you do not have access to it: a job trains "
                            "further only from one of your own fine-tuned models.", "invalid_request_error",
                            "model_not_found")  # fmt: skip
    if not holder.may_name(parent.variant.model.name if parent else model):
        return not_allowed(OPENAI, holder.allowed_models)
    uploads: dict[str, BatchFile] = {}
    for param in ("training_file", "validation_file"):
        if param == "validation_file" and not payload.get(param):
            continue
        found = _training_file(user, payload.get(param), param)
        if isinstance(found, JsonResponse):
            return found
        uploads[param] = found
    metadata = payload.get("metadata") or {}
    if not isinstance(metadata, dict) or len(json.dumps(metadata)) > MAX_METADATA_CHARS:
        return openai_error(400, "metadata must be a small JSON object", "invalid_request_error")
    try:
        columns = hyperparameters_from(payload)
    except ValueError as exc:
        return openai_error(400, str(exc), "invalid_request_error")
    where = {key: value for key, value in metadata.items() if key in FROM_METADATA}
    twice = sorted(set(columns) & set(where))
    if twice:
        return openai_error(400, f"{', '.join(twice)} both in hyperparameters and in metadata: give each once",
                            "invalid_request_error")  # fmt: skip
    name, colon, quant = model.rpartition(":")
    if parent is not None:  # the form takes the base, the adapter's shape and where it ran from the parent
        where[PARENT] = str(parent.pk)
        name, colon, quant = "", ":", ""
    elif "cluster" not in where:  # the wizard's first plan for the method that fits, as a researcher would pick it
        placed = _placed(user, name if colon else model, where)
        if placed is None:
            return openai_error(400, f"no partition you may use fits a {where.get('method') or 'lora'} run of "
                                f"{model} on one GPU now; say where it trains in metadata: cluster, partition, gpu, "
                                "gpus and walltime (the launch form's fields; docs/finetune.md)",
                                "invalid_request_error")  # fmt: skip
        where = {**placed, **where}
    data: dict[str, Any] = {**where, **columns, "model": name if colon else model, "quant": quant if colon else ""}
    data.update({"suffix": payload.get("suffix") or "", "seed": payload.get("seed")})
    opened: dict[str, File[bytes]] = {}
    try:
        for param, upload in uploads.items():
            opened[param] = File(upload.content.storage.open(upload.content.name, "rb"), name=upload.filename)
        run = actions.create(user, data, MultiValueDict({param: [f] for param, f in opened.items()}))
    except ValidationError as exc:
        return openai_error(400, "cannot start it: " + " ".join(messages_of(exc)), "invalid_request_error")
    finally:
        for f in opened.values():
            f.close()
    given = {"training_file": payload["training_file"], "validation_file": payload.get("validation_file") or None}
    run.openai = {**given, "metadata": metadata}
    FineTuneRun.objects.filter(pk=run.pk).update(openai=run.openai)
    return JsonResponse(job_object(run))


@require_http_methods(["GET", "POST"])
@_tokened
def job_detail(
    request: HttpRequest, holder: targets.Holder, user: User, job_id: str, action: str = ""
) -> HttpResponseBase:
    """GET a job; POST to its /cancel: end it (its checkpoints stay on the cluster). A job that has ended stays as
    it is."""
    run = _own_job(user, job_id)
    if run is None:
        return _no_job(job_id)
    if (request.method == "POST") != (action == "cancel"):
        return openai_error(405, f"{request.method} is not allowed here", "invalid_request_error")
    if action == "cancel" and not run.is_ended:
        actions.cancel(run)
        run.refresh_from_db()
    return JsonResponse(job_object(run))


def _step_times(run: FineTuneRun) -> dict[int, float]:
    """When each step of the loss curve was reached, as far as the portal knows: the run's pace from its start to
    the newest report (the progress file has no time per step)."""
    steps = [point[0] for point in run.losses]
    if not steps:
        return {}
    began = run.started_at or run.submitted_at or run.created_at
    start = began.timestamp()
    end = (run.progress_at or run.finished_at or began).timestamp()
    last = max(run.step, steps[-1], 1)
    return {step: start + (end - start) * step / last for step in steps}


def _events(run: FineTuneRun) -> list[dict[str, Any]]:
    """The run's history (each change of state, with why) and its progress (a metrics event per point of the loss
    curve), newest first."""
    items: list[tuple[float, int, int, dict[str, Any]]] = []  # (when, a change after a step at once, order, event)
    for event in run.events.all():
        status = STATUS[FineTuneRun.State(event.to_state)]
        level = {"failed": "error", "cancelled": "warn"}.get(status, "info")
        items.append((event.at.timestamp(), 1, event.pk, {
            "id": f"{EVENT}{run.pk.hex}-e{event.pk}", "object": "fine_tuning.job.event",
            "created_at": _at(event.at), "level": level, "message": f"{status}: {event.reason}",
            "type": "message", "data": {"status": status},
        }))  # fmt: skip
    times = _step_times(run)
    for step, train_loss, valid_loss in run.losses:
        losses = [f"training loss {train_loss:.4f}"] if train_loss is not None else []
        losses += [f"validation loss {valid_loss:.4f}"] if valid_loss is not None else []
        when = times.get(step, 0.0)
        items.append((when, 0, step, {
            "id": f"{EVENT}{run.pk.hex}-s{step}", "object": "fine_tuning.job.event", "created_at": int(when),
            "level": "info", "message": f"Step {step}/{run.planned_steps}: {', '.join(losses)}", "type": "metrics",
            "data": {"step": step, "total_steps": run.planned_steps, "train_loss": train_loss,
                     "valid_loss": valid_loss},
        }))  # fmt: skip
    items.sort(key=lambda item: item[:3], reverse=True)
    return [item[3] for item in items]


@require_GET
@_tokened
def job_events(request: HttpRequest, holder: targets.Holder, user: User, job_id: str) -> HttpResponseBase:
    return _page_of(request, user, job_id, _events)


def _checkpoints(run: FineTuneRun) -> list[dict[str, Any]]:
    """The steps the trainer checkpointed at (every checkpoint_every steps, and the adapter at the end) that the loss
    curve holds, with their losses, newest first. The cluster keeps the newest two; the adapter is the run's model."""
    times = _step_times(run)
    done = run.state == FineTuneRun.State.COMPLETED
    found = []
    for step, train_loss, valid_loss in reversed(run.losses):
        if step % run.checkpoint_every and not (done and step == run.planned_steps):
            continue
        found.append({
            "id": f"{CHECKPOINT}{run.pk.hex}-{step}", "object": "fine_tuning.job.checkpoint",
            "created_at": int(times.get(step, 0.0)), "fine_tuning_job_id": f"{JOB}{run.pk.hex}", "step_number": step,
            "fine_tuned_model_checkpoint": f"{run.model_name}:ckpt-step-{step}",
            "metrics": {"step": step, "train_loss": train_loss, "valid_loss": valid_loss,
                        "full_valid_loss": valid_loss if done and step == run.planned_steps else None},
        })  # fmt: skip
    return found


@require_GET
@_tokened
def job_checkpoints(request: HttpRequest, holder: targets.Holder, user: User, job_id: str) -> HttpResponseBase:
    return _page_of(request, user, job_id, _checkpoints)
