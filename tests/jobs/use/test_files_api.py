"""The OpenAI Files API's uploads (jobs/use/openai_batches.py, jobs/batch/files.py) through the ASGI application as
uvicorn runs it, with the official `openai` client where it fits: read only from a valid token, streamed to disk,
within each user's quota, deleted on request (not while a batch uses them) and once they expire."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import openai
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile, UploadedFile
from django.utils import timezone
from django.utils.datastructures import MultiValueDict

from catalog.models import ClusterAccount
from jobs import tasks
from jobs.batch.actions import launch
from jobs.batch.forms import BatchForm
from jobs.models import ApiToken, BatchFile, BatchRun, transition_run
from tests.asgi import Portal, bearer, client, run
from tests.conftest import LAUNCH

pytestmark = pytest.mark.django_db(transaction=True)

BOUNDARY = "portal-test-boundary"
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def line(n: int, words: int = 1) -> bytes:
    body = {"model": "tiny", "messages": [{"role": "user", "content": " ".join(["Say"] * words) + f" {n}"}]}
    return json.dumps({"custom_id": f"q{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}).encode()


INPUT = b"".join(line(n) + b"\n" for n in range(3))


class Upload:
    """A multipart upload of `lines` lines of about `words` * 4 bytes each, sent chunked a line at a time, each made
    only when the application reads it; `read` counts the pieces read."""

    def __init__(self, lines: int, words: int = 1) -> None:
        self.lines, self.words, self.read, self.size = lines, words, 0, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--{BOUNDARY}\r\n'
            'Content-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        )
        self.read += 1
        yield head.encode()
        for n in range(self.lines):
            self.read += 1
            piece = line(n, self.words) + b"\n"
            self.size += len(piece)
            yield piece
        self.read += 1
        yield f"\r\n--{BOUNDARY}--\r\n".encode()


@pytest.fixture(autouse=True)
def _files_in(settings: Any, tmp_path: Path) -> None:
    settings.MEDIA_ROOT = tmp_path / "files"
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path)


def token_of(user: Any) -> str:
    return ApiToken.issue(user, "script")[1]


def upload(portal: Portal, content: bytes = INPUT) -> Any:
    return portal.post("/api/v1/files", files={"file": ("batch.jsonl", content)}, data={"purpose": "batch"})


def test_a_caller_without_a_valid_token_never_gets_to_send_an_upload(owner: Any) -> None:
    for headers in ({}, bearer("hpcllm_not-a-token")):
        chunked = Upload(2000, words=200)
        reply = Portal(headers).post("/api/v1/files", content=chunked, headers=MULTIPART)
        assert (reply.status_code, reply.json()["error"]["code"], chunked.read) == (401, "invalid_api_key", 0)
        declared = Upload(2000, words=200)
        big = {**MULTIPART, "content-length": str(200 << 20)}
        reply = Portal(headers).post("/api/v1/files", content=declared, headers=big)
        assert (reply.status_code, declared.read) == (401, 0)  # not a 413: nothing about the body is looked at
    assert not BatchFile.objects.exists()


def test_a_large_upload_is_kept_without_ever_being_held_in_memory(owner: Any, settings: Any) -> None:
    large = Upload(2500, words=2000)  # 20 MB of lines of 8 kB
    portal = Portal(bearer(token_of(owner)))
    assert upload(portal).status_code == 200  # what a first upload imports and caches is not the upload's
    tracemalloc.start()
    try:
        reply = portal.post("/api/v1/files", content=large, headers=MULTIPART)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.status_code == 200, reply.text
    assert reply.json()["bytes"] == large.size > 20_000_000
    assert peak < large.size / 20, f"{peak:,} bytes at the peak for an upload of {large.size:,}"
    stored = BatchFile.objects.get(size_bytes=large.size)
    assert Path(stored.content.path).stat().st_size == large.size
    assert not [p for p in Path(settings.FILE_UPLOAD_TEMP_DIR).iterdir() if p.is_file()]  # no copy left behind


def test_an_upload_past_the_batch_file_limit_stops_being_read(owner: Any, settings: Any) -> None:
    settings.PORTAL_BATCH_MAX_BYTES = settings.PORTAL_FINETUNE_MAX_BYTES = 1024  # the door takes the larger
    chunked = Upload(1000, words=2000)
    reply = Portal(bearer(token_of(owner))).post("/api/v1/files", content=chunked, headers=MULTIPART)
    assert reply.status_code == 413 and chunked.read < 200  # the file's limit and the form's 1 MiB
    assert not BatchFile.objects.exists()


def test_a_users_files_are_held_to_their_quota_of_files_and_bytes(owner: Any, other_user: Any, settings: Any) -> None:
    settings.PORTAL_FILES_MAX_PER_USER = 2
    mine = Portal(bearer(token_of(owner)))
    assert [upload(mine).status_code for _ in range(2)] == [200, 200]
    chunked = Upload(3)
    reply = mine.post("/api/v1/files", content=chunked, headers=MULTIPART)
    assert (reply.status_code, reply.json()["error"]["code"], chunked.read) == (400, "quota_exceeded", 0)
    assert "files.delete" in reply.json()["error"]["message"]
    assert upload(Portal(bearer(token_of(other_user)))).status_code == 200  # per user

    settings.PORTAL_FILES_MAX_PER_USER = 100
    settings.PORTAL_FILES_MAX_BYTES_PER_USER = 2 * len(INPUT) + 10
    reply = upload(mine)
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "quota_exceeded")  # 10 bytes left
    assert "does not fit" in reply.json()["error"]["message"]
    past = Upload(1000, words=2000)  # more than what is left and the form's room: not read to its end
    reply = mine.post("/api/v1/files", content=past, headers=MULTIPART)
    assert (reply.status_code, reply.json()["error"]["code"]) == (413, "quota_exceeded") and past.read < 200
    assert BatchFile.objects.filter(owner=owner).count() == 2
    assert not [p for p in Path(settings.FILE_UPLOAD_TEMP_DIR).iterdir() if p.is_file()]


def test_the_openai_client_uploads_reads_and_deletes_a_file_that_expires(owner: Any, other_user: Any) -> None:
    token, stranger = token_of(owner), token_of(other_user)

    async def calls() -> tuple[Any, Any, Any, Any, list[Any]]:
        # openai types its http_client as httpx2's (a fork with httpx's interface); the portal's ASGI client is httpx's
        async with client() as http, client() as their_http:
            api = openai.AsyncOpenAI(base_url="http://127.0.0.1/api/v1", api_key=token, http_client=cast(Any, http),
                                     max_retries=0)  # fmt: skip
            theirs = openai.AsyncOpenAI(base_url="http://127.0.0.1/api/v1", api_key=stranger,
                                        http_client=cast(Any, their_http), max_retries=0)  # fmt: skip
            created = await api.files.create(file=("batch.jsonl", INPUT), purpose="batch",
                                             expires_after={"anchor": "created_at", "seconds": 3600})  # fmt: skip
            with pytest.raises(openai.NotFoundError):
                await theirs.files.delete(created.id)
            retrieved = await api.files.retrieve(created.id)
            deleted = await api.files.delete(created.id)
            with pytest.raises(openai.NotFoundError):
                await api.files.retrieve(created.id)
            with pytest.raises(openai.BadRequestError, match="expires_after"):
                await api.files.create(file=("batch.jsonl", INPUT), purpose="batch",
                                       expires_after={"anchor": "created_at", "seconds": 60})  # fmt: skip
            kept = await api.files.create(file=("batch.jsonl", INPUT), purpose="batch")
            return created, retrieved, deleted, kept, [f async for f in api.files.list()]

    created, retrieved, deleted, kept, listed = run(calls())
    assert created.expires_at == created.created_at + 3600 and retrieved == created
    assert (deleted.id, deleted.deleted) == (created.id, True)
    assert kept.expires_at == kept.created_at + 30 * 24 * 3600  # the site's retention, OpenAI's default too
    assert [f.id for f in listed] == [kept.id]
    assert [p.name for p in Path(BatchFile.objects.get().content.path).parent.iterdir()] == [
        str(BatchFile.objects.get().pk)
    ]  # the deleted file's content is gone with it


@pytest.fixture
def batch(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> BatchRun:
    """The owner's batch launch of three prompts, waiting for its job, with an uploaded file as its input."""
    files: MultiValueDict[str, UploadedFile] = MultiValueDict({"prompts": [SimpleUploadedFile("p.txt", b"one\n")]})
    form = BatchForm({}, files)
    assert form.is_valid(), form.errors
    assert form.checked is not None
    with django_capture_on_commit_callbacks(execute=False), form.checked.requests:
        session = launch(owner, {**LAUNCH, "purpose": "batch"}, batch=form.checked)
    file_id = upload(Portal(bearer(token_of(owner)))).json()["id"]
    BatchRun.objects.filter(session=session).update(input_file=BatchFile.objects.get(pk=file_id.removeprefix("file-")))
    return BatchRun.objects.get(session=session)


def test_a_file_a_batch_still_uses_is_not_deleted_until_the_batch_ends(batch: BatchRun, owner: Any) -> None:
    assert batch.input_file is not None
    file_id, portal = f"file-{batch.input_file.pk.hex}", Portal(bearer(token_of(owner)))
    reply = portal.request("DELETE", f"/api/v1/files/{file_id}")
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "file_in_use")
    assert f"batch_{batch.pk.hex}" in reply.json()["error"]["message"]
    output = portal.request("DELETE", f"/api/v1/files/file-output-{batch.pk.hex}")
    assert (output.status_code, output.json()["error"]["code"]) == (400, "file_not_deletable")
    transition_run(batch.pk, BatchRun.State.STOPPED, reason="test")
    reply = portal.request("DELETE", f"/api/v1/files/{file_id}")
    assert reply.json() == {"id": file_id, "object": "file", "deleted": True}
    batch.refresh_from_db()
    assert batch.input_file is None and portal.get(f"/api/v1/batches/batch_{batch.pk.hex}").status_code == 200


def test_the_sweep_deletes_expired_files_but_not_those_a_running_batch_uses(batch: BatchRun, owner: Any) -> None:
    portal = Portal(bearer(token_of(owner)))
    due, fresh = (BatchFile.objects.get(pk=upload(portal).json()["id"].removeprefix("file-")) for _ in range(2))
    past = timezone.now() - timedelta(seconds=1)
    BatchFile.objects.filter(pk__in=[due.pk, batch.input_file_id]).update(expires_at=past)
    assert tasks.expire_files() == 1
    assert set(BatchFile.objects.values_list("pk", flat=True)) == {fresh.pk, batch.input_file_id}
    assert not Path(due.content.path).exists() and Path(fresh.content.path).exists()
    transition_run(batch.pk, BatchRun.State.FINISHED, reason="test")
    assert tasks.expire_files() == 1  # the batch has ended: its file goes at the next sweep
    assert list(BatchFile.objects.values_list("pk", flat=True)) == [fresh.pk]
