"""OpenAI's Files and Batch API on the portal (docs/batch.md), so scripts written for the official `openai` client's
batch calls work with a personal token: `files.create(purpose="batch")`, `files.list|retrieve|content|delete`,
`batches.create|retrieve|list|cancel`. A batch is a batch run on the caller's running session that the lines' `model`
names (uuid, alias or catalog name, as in the rest of the API); its output file streams from the cluster. Uploads come
from the door in a temporary file and go to storage from disk, never whole into memory; what a user keeps is bounded
by their quota and expires (jobs/batch/files.py).

Everything is the token holder's own: another user's file or batch is a 404, as for sessions, and a batch runs only on
one of the holder's own sessions (one shared with them is answered as one they cannot see: the run would be the
owner's).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.files.uploadhandler import TemporaryFileUploadHandler
from django.http import HttpRequest, HttpResponseBase, JsonResponse
from django.http.multipartparser import MultiPartParser, MultiPartParserError
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.debug import sensitive_variables
from django.views.decorators.http import require_GET, require_http_methods

from catalog.runtime_rules import OPENAI
from jobs.batch import actions, inputs, outputs, staging
from jobs.batch import files as kept
from jobs.batch.forms import BatchForm, Checked, limits
from jobs.finetune import data as training
from jobs.finetune.forms import limits as training_limits
from jobs.models import BatchFile, BatchRun, LLMSession
from jobs.sessions.forms import LaunchForm
from jobs.use import targets
from jobs.use.guard import BODY, HOLDER, UPLOAD, admitted, refused
from jobs.use.headers import not_allowed, openai_error
from portal import ssh, streaming
from portal.errors import messages_of

OUTPUT_PREFIX = "file-output-"
WINDOW = "24h"
BATCH, FINE_TUNE = "batch", "fine-tune"  # the purposes of the files the portal takes


def _body(request: HttpRequest) -> bytes:
    """What the door read (Django's handler got an empty body: guard.py)."""
    door = admitted(request)
    if door is None:  # _tokened lets in nothing else
        raise RuntimeError(f"{request.path} reached its view without the door")
    body: bytes = door[BODY]
    return body


def _no_token() -> JsonResponse:
    return openai_error(401, "a valid personal API token is needed", "authentication_error", "invalid_api_key")


def _tokened(view: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
    """The view gets the token's holder, as the door found it, and user, or the caller a 401; a request that did not
    come through the door is refused. No CSRF (no cookies here)."""

    @functools.wraps(view)
    @sensitive_variables("door")  # the request's headers: its token
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        door = admitted(request)
        if door is None:
            return refused(request)
        holder: targets.Holder = door[HOLDER]  # the door answered a request without a valid token
        user = get_user_model().objects.filter(pk=holder.user_pk, is_active=True).first()
        if user is None:  # made inactive since the door's lookup
            return _no_token()
        return view(request, holder, user, *args, **kwargs)

    return csrf_exempt(wrapped)


def _file_object(upload: BatchFile) -> dict[str, Any]:
    return {"id": f"file-{upload.pk.hex}", "object": "file", "bytes": upload.size_bytes,
            "created_at": int(upload.created_at.timestamp()), "filename": upload.filename, "purpose": upload.purpose,
            "expires_at": int(upload.expires_at.timestamp()) if upload.expires_at else None,
            "status": "processed", "status_details": None}  # fmt: skip


def _output_object(run: BatchRun) -> dict[str, Any]:
    return {"id": f"{OUTPUT_PREFIX}{run.pk.hex}", "object": "file", "bytes": 0,
            "created_at": int((run.finished_at or run.created_at).timestamp()),
            "filename": f"batch_{run.pk.hex}_output.jsonl", "purpose": "batch_output", "status": "processed",
            "status_details": None}  # fmt: skip


def _status(run: BatchRun) -> str:
    if run.state == BatchRun.State.FINISHED:
        return "completed"
    if run.state == BatchRun.State.FAILED:
        return "failed"
    if run.state == BatchRun.State.STOPPED:
        return "cancelled"
    if run.stop_requested_at:
        return "cancelling"
    return "in_progress" if run.staged_at or run.state == BatchRun.State.RUNNING else "validating"


def _batch_object(run: BatchRun) -> dict[str, Any]:
    status = _status(run)

    def at(value: Any) -> int | None:
        return int(value.timestamp()) if value else None

    ended = at(run.finished_at)
    return {
        "id": f"batch_{run.pk.hex}", "object": "batch", "endpoint": run.endpoint,
        "errors": {"object": "list", "data": [{"code": "run_failed", "message": run.end_reason}]}
        if status == "failed" else None,
        "input_file_id": f"file-{run.input_file.pk.hex}" if run.input_file else None,
        "completion_window": WINDOW, "status": status,
        "output_file_id": f"{OUTPUT_PREFIX}{run.pk.hex}" if run.done or run.failed or status == "completed" else None,
        "error_file_id": None, "created_at": at(run.created_at), "in_progress_at": at(run.started_at),
        "expires_at": None, "finalizing_at": None, "completed_at": ended if status == "completed" else None,
        "failed_at": ended if status == "failed" else None, "expired_at": None,
        "cancelling_at": at(run.stop_requested_at), "cancelled_at": ended if status == "cancelled" else None,
        "request_counts": {"total": run.prompts, "completed": run.done, "failed": run.failed},
        "metadata": run.metadata or None,
    }  # fmt: skip


def _uuid_of(text: str, prefix: str) -> uuid.UUID | None:
    if not text.startswith(prefix):
        return None
    try:
        return uuid.UUID(hex=text[len(prefix) :])
    except ValueError:
        return None


def _check(raw: IO[bytes], fmt: str = "openai") -> tuple[IO[bytes], inputs.Summary]:
    requests = tempfile.TemporaryFile()  # noqa: SIM115 -- returned to the caller, who closes it
    try:
        summary = inputs.normalize(raw, requests, inputs.Options(format=fmt), limits())
    except inputs.InputError:
        requests.close()
        raise
    requests.seek(0)
    return requests, summary


def _input_error(exc: inputs.InputError) -> JsonResponse:
    return openai_error(400, f"the file cannot run: {exc}", "invalid_request_error", "invalid_file")


@require_http_methods(["GET", "POST"])
@_tokened
def files(request: HttpRequest, holder: targets.Holder, user: User) -> HttpResponseBase:
    """POST: upload a batch input file or fine-tuning data (multipart `file`, `purpose` and optionally
    `expires_after`), checked line by line at once as a batch's prompts or a fine-tune run's training data, and kept
    within the caller's quota. GET: the caller's files (of one `purpose`, if asked)."""
    if request.method == "GET":
        uploads = BatchFile.objects.filter(owner=user)
        if purpose := request.GET.get("purpose"):
            uploads = uploads.filter(purpose=purpose)
        uploads = uploads[:1000]
        return JsonResponse({"object": "list", "data": [_file_object(u) for u in uploads], "has_more": False})
    door = admitted(request)
    spool = door.get(UPLOAD) if door else None
    if spool is None:  # the door spools every upload it lets in
        raise RuntimeError(f"{request.path} reached its view without the door's upload")
    meta = {**request.META, "CONTENT_LENGTH": str(os.fstat(spool.fileno()).st_size)}
    try:  # the file part straight to a temporary file on disk, whatever its size
        fields, uploaded = MultiPartParser(meta, spool, [TemporaryFileUploadHandler(request)]).parse()
    except MultiPartParserError as exc:
        return openai_error(400, f"send the file as multipart/form-data: {exc}", "invalid_request_error")
    upload = uploaded.get("file")
    try:
        purpose = fields.get("purpose")
        if purpose not in (BATCH, FINE_TUNE):
            return openai_error(400, f"purpose must be {BATCH!r} or {FINE_TUNE!r} (the only files the portal takes)",
                                "invalid_request_error")  # fmt: skip
        if upload is None:
            return openai_error(400, "no file in the request (the multipart field is `file`)", "invalid_request_error")
        try:
            expires_after_s = _expires_after(fields)
        except ValueError as exc:
            return openai_error(400, str(exc), "invalid_request_error")
        try:
            with open(os.devnull, "wb") as nowhere:  # the check only: a batch or a run checks it again when it starts
                if purpose == BATCH:
                    inputs.normalize(upload, nowhere, inputs.Options(format="openai"), limits())
                else:
                    training.check(upload, nowhere, training_limits())
        except inputs.InputError as exc:
            return _input_error(exc)
        upload.seek(0)
        try:
            stored = kept.store(user, upload, upload.name or "input.jsonl", upload.size or 0, expires_after_s, purpose)
        except kept.QuotaExceeded as exc:
            return openai_error(400, str(exc), "invalid_request_error", "quota_exceeded")
    finally:
        for _, parts in uploaded.lists():
            for part in parts:
                part.close()  # a file storage moved is gone already; any other is deleted here
    return JsonResponse(_file_object(stored))


def _expires_after(fields: Any) -> int | None:
    """The seconds after its upload a file asked to expire (OpenAI's `expires_after[anchor]=created_at` and
    `expires_after[seconds]`, from one hour to thirty days), or None; ValueError says what is wrong."""
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    low, high = kept.EXPIRES_AFTER_S
    if anchor != "created_at" or not (seconds or "").isdigit() or not low <= int(seconds) <= high:
        raise ValueError(f"expires_after needs anchor 'created_at' and seconds from {low} to {high}")
    return int(seconds)


def _own_file(user: User, file_id: str) -> BatchFile | None:
    pk = _uuid_of(file_id, "file-")
    return BatchFile.objects.filter(pk=pk, owner=user).first() if pk else None


def _own_run(user: User, text: str, prefix: str) -> BatchRun | None:
    pk = _uuid_of(text, prefix)
    return BatchRun.objects.select_related("session", "input_file").filter(pk=pk, owner=user).first() if pk else None


@require_http_methods(["GET", "DELETE"])
@_tokened
def file_detail(request: HttpRequest, holder: targets.Holder, user: User, file_id: str) -> HttpResponseBase:
    """GET a file; DELETE an uploaded one (refused while a batch that has not ended uses it)."""
    run = _own_run(user, file_id, OUTPUT_PREFIX)
    if run is not None:
        if request.method == "DELETE":
            return openai_error(400, "a batch's output is read from its session's directory on the cluster; there is "
                                "nothing to delete here", "invalid_request_error", "file_not_deletable")  # fmt: skip
        return JsonResponse(_output_object(run))
    upload = _own_file(user, file_id)
    if upload is None:
        return openai_error(404, f"no file {file_id!r}", "invalid_request_error", "file_not_found")
    if request.method == "DELETE":
        try:
            kept.delete(upload)
        except kept.InUse as exc:  # 400, not 409: the openai client would retry a 409 in vain
            return openai_error(400, str(exc), "invalid_request_error", "file_in_use")
        return JsonResponse({"id": file_id, "object": "file", "deleted": True})
    return JsonResponse(_file_object(upload))


@require_GET
@_tokened
def file_content(request: HttpRequest, holder: targets.Holder, user: User, file_id: str) -> HttpResponseBase:
    """An input file as uploaded, or a batch's output in OpenAI's batch output format, streamed from the cluster."""
    run = _own_run(user, file_id, OUTPUT_PREFIX)
    if run is not None:
        return _stream_output(run)
    upload = _own_file(user, file_id)
    if upload is None:
        return openai_error(404, f"no file {file_id!r}", "invalid_request_error", "file_not_found")

    def chunks() -> Iterator[bytes]:
        with upload.content.open("rb") as f:
            while chunk := f.read(1 << 16):
                yield chunk

    return streaming.StreamingResponse(chunks(), content_type="application/jsonl")


def _stream_output(run: BatchRun) -> HttpResponseBase:
    try:
        _, records = staging.results(run)
    except staging.NoResults:
        return openai_error(404, "the batch has no output yet", "invalid_request_error", "file_not_found")
    except ssh.SSHError as exc:
        return openai_error(503, f"{run.session.cluster.name} cannot be reached now: {exc}", "server_error")
    body = outputs.convert(records, "openai", str(run.pk))
    return streaming.StreamingResponse(body, content_type="application/jsonl")


def _models_named(upload: BatchFile) -> set[str]:
    """The `model` every line's body names (the normalised requests drop it: the run names its server)."""
    named: set[str] = set()
    with upload.content.open("rb") as f:
        for raw in f:
            try:
                body = json.loads(raw).get("body") or {}
            except (ValueError, AttributeError):
                continue
            model = body.get("model") if isinstance(body, dict) else None
            named.add(model if isinstance(model, str) else "")
    return named


@require_http_methods(["GET", "POST"])
@_tokened
def batches(request: HttpRequest, holder: targets.Holder, user: User) -> HttpResponseBase:
    """POST: a batch on the running session the file's lines name as their model. GET: the caller's batches."""
    if request.method == "GET":
        runs = BatchRun.objects.filter(owner=user).select_related("input_file")
        after = _uuid_of(request.GET.get("after", ""), "batch_")
        if after:
            anchor = runs.filter(pk=after).first()
            runs = runs.filter(created_at__lt=anchor.created_at) if anchor else runs.none()
        try:
            limit = max(1, min(100, int(request.GET.get("limit", 20))))
        except ValueError:
            limit = 20
        page = list(runs[: limit + 1])
        data = [_batch_object(r) for r in page[:limit]]
        return JsonResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": len(page) > limit})  # fmt: skip
    try:
        payload = json.loads(_body(request) or b"{}")
    except ValueError:
        return openai_error(400, "the body must be JSON", "invalid_request_error")
    if not isinstance(payload, dict):
        return openai_error(400, "the body must be a JSON object", "invalid_request_error")
    upload = _own_file(user, str(payload.get("input_file_id", "")))
    if upload is None:
        return openai_error(404, f"no file {payload.get('input_file_id')!r}", "invalid_request_error", "file_not_found")
    if upload.purpose != BATCH:
        return openai_error(400, f"{payload['input_file_id']} was uploaded for {upload.purpose}, not batch",
                            "invalid_request_error", "invalid_file")  # fmt: skip
    if payload.get("completion_window", WINDOW) != WINDOW:
        return openai_error(400, f"completion_window must be {WINDOW}", "invalid_request_error")
    metadata = payload.get("metadata") or {}
    if not isinstance(metadata, dict) or len(json.dumps(metadata)) > 16_000:
        return openai_error(400, "metadata must be a small JSON object", "invalid_request_error")
    named = _models_named(upload)
    if len(named) != 1 or "" in named:
        return openai_error(400, "every line's body must name the same model: one of your running sessions (its "
                            "uuid or alias, or the model's catalog name)", "invalid_request_error")  # fmt: skip
    model = named.pop()
    if not holder.may_name(model):
        return not_allowed(OPENAI, holder.allowed_models)
    with upload.content.open("rb") as raw:
        try:
            requests, summary = _check(raw)
        except inputs.InputError as exc:
            return _input_error(exc)
    with requests:
        if payload.get("endpoint") != summary.url:
            return openai_error(400, f"endpoint must be {summary.url}, where the file's lines go",
                                "invalid_request_error")  # fmt: skip
        columns = {"name": upload.filename, "input_format": summary.format, "endpoint": summary.url,
                   "prompts": summary.prompts, "system_prompt": "", "defaults": {}, "concurrency": None}  # fmt: skip
        checked = Checked(requests, columns)
        if "cluster" in metadata:
            return _batch_launch(user, model, metadata, checked, upload)
        try:
            target = targets.target(holder, model, note=False)
        except targets.Ambiguous as exc:
            return openai_error(400, str(exc), "invalid_request_error", "model_ambiguous")
        except targets.NotReady:  # a service none of whose replicas is ready: no session to run on now
            target = None
        # Only the owner starts runs here: the model's lookup also finds sessions shared with the caller (and, by
        # uuid, support staff's), whose runs would be the owner's. Those get a stranger's answer.
        session = LLMSession.objects.filter(pk=target.pk, owner=user).first() if target else None
        if target is None or session is None:
            return openai_error(404, f"no running session of yours answers to {model!r}; to start one for this "
                                "batch, put where it runs in the metadata (docs/batch.md)", "invalid_request_error",
                                "model_not_found")  # fmt: skip
        if target.activity_due:
            targets.touch(target.pk)
        try:
            run = actions.start_run(session, checked, input_file=upload, metadata=metadata)
        except ValidationError as exc:
            return openai_error(409, " ".join(messages_of(exc)), "invalid_request_error", "session_not_running")
    return JsonResponse(_batch_object(run))


def _batch_launch(
    user: User, model: str, metadata: dict[str, Any], checked: Checked, upload: BatchFile
) -> HttpResponseBase:
    """A batch launch through the Batch API: the lines name the model as the catalog does (NAME or NAME:QUANT), the
    metadata says where it runs (the launch form's fields: cluster, partition, gpu, gpus, ...; and replicas and
    concurrency for the run). The job works through the file and ends."""
    name, colon, quant = model.rpartition(":")
    data: dict[str, Any] = {"model": name if colon else model, "purpose": "batch"}
    if colon and quant:
        data["quant"] = quant
    data.update({key: value for key, value in metadata.items() if key in LaunchForm.base_fields})
    for key in ("replicas", "concurrency"):
        if key in metadata:
            try:  # the batch form's own field: its limits, its messages
                checked.columns[key] = BatchForm.base_fields[key].clean(metadata[key])
            except ValidationError as exc:
                return openai_error(400, f"metadata {key}: {' '.join(exc.messages)}", "invalid_request_error")
    try:
        session = actions.launch(user, data, batch=checked)
    except ValidationError as exc:
        return openai_error(400, "cannot launch it: " + " ".join(messages_of(exc)), "invalid_request_error")
    run = BatchRun.objects.get(session=session, ends_session=True)
    BatchRun.objects.filter(pk=run.pk).update(input_file=upload, metadata=metadata)
    run.refresh_from_db()
    return JsonResponse(_batch_object(run))


@require_http_methods(["GET", "POST"])
@_tokened
def batch_detail(
    request: HttpRequest, holder: targets.Holder, user: User, batch_id: str, action: str = ""
) -> HttpResponseBase:
    """GET a batch; POST to its /cancel: stop it, keeping what is answered."""
    run = _own_run(user, batch_id, "batch_")
    if run is None:
        return openai_error(404, f"no batch {batch_id!r}", "invalid_request_error", "batch_not_found")
    if (request.method == "POST") != (action == "cancel"):
        return openai_error(405, f"{request.method} is not allowed here", "invalid_request_error")
    if action == "cancel":
        actions.stop_run(run)
        run.refresh_from_db()
    return JsonResponse(_batch_object(run))
