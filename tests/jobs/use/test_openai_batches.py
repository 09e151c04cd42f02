"""OpenAI's Files and Batch API (jobs/use/openai_batches.py) through the ASGI application, as the `openai` client
reaches it: the door reads the body (an upload, a batch's JSON) and the views take it from there; everything is the
token holder's own; files come back streamed, a batch's output as the cluster sends it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile, UploadedFile
from django.utils.datastructures import MultiValueDict

from catalog.models import ClusterAccount
from jobs.batch.actions import launch
from jobs.batch.forms import BatchForm
from jobs.models import ApiToken, BatchFile, BatchRun, LLMSession, SessionShare, State, transition
from jobs.sessions import actions as sessions
from tests.asgi import Portal, bearer, client, run
from tests.conftest import LAUNCH
from tests.jobs.batch.results import Results

pytestmark = pytest.mark.django_db(transaction=True)


def line(n: int, model: str = "tiny") -> dict[str, Any]:
    return {"custom_id": f"q{n}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"Say {n}"}]}}  # fmt: skip


INPUT = b"".join(json.dumps(line(n)).encode() + b"\n" for n in range(3))


@pytest.fixture(autouse=True)
def _files_in(settings: Any, tmp_path: Path) -> None:
    settings.MEDIA_ROOT = tmp_path


def api(user: Any) -> Portal:
    return Portal(bearer(ApiToken.issue(user, "script")[1]))


def upload(portal: Portal, content: bytes) -> Any:
    return portal.post("/api/v1/files", files={"file": ("batch.jsonl", content)}, data={"purpose": "batch"})


@pytest.mark.filterwarnings("error:StreamingHttpResponse must consume")  # Django reads the iterator whole
def test_an_input_file_is_uploaded_listed_and_read_back_by_its_owner_only(owner: Any, other_user: Any) -> None:
    mine = api(owner)
    reply = upload(mine, INPUT)
    assert reply.status_code == 200, reply.text
    uploaded = reply.json()
    assert (uploaded["bytes"], uploaded["filename"], uploaded["purpose"]) == (len(INPUT), "batch.jsonl", "batch")
    assert [f["id"] for f in mine.get("/api/v1/files").json()["data"]] == [uploaded["id"]]
    assert mine.get(f"/api/v1/files/{uploaded['id']}").json() == uploaded
    assert mine.get(f"/api/v1/files/{uploaded['id']}/content").content == INPUT
    theirs = api(other_user)
    assert theirs.get("/api/v1/files").json()["data"] == []
    for path in (f"/api/v1/files/{uploaded['id']}", f"/api/v1/files/{uploaded['id']}/content"):
        reply = theirs.get(path)
        assert (reply.status_code, reply.json()["error"]["code"]) == (404, "file_not_found")


def test_a_file_that_cannot_run_is_refused_with_its_line_numbers_and_kept_nowhere(owner: Any) -> None:
    reply = upload(api(owner), INPUT + b'{"custom_id": "x", "url": "/v1/images", "body": {}}\n{oops\n')
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "invalid_file")
    assert "line 4" in reply.json()["error"]["message"] and "line 5" in reply.json()["error"]["message"]
    assert not BatchFile.objects.exists()


def test_a_batch_needs_a_running_session_that_the_lines_name(owner: Any) -> None:
    mine = api(owner)
    file_id = upload(mine, INPUT).json()["id"]
    asked = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    reply = mine.post("/api/v1/batches", json=asked)
    assert (reply.status_code, reply.json()["error"]["code"]) == (404, "model_not_found")
    assert "tiny" in reply.json()["error"]["message"]  # the model the file's lines name, read from the door's body
    assert mine.post("/api/v1/batches", content=b"{oops").status_code == 400
    assert mine.get("/api/v1/batches").json()["data"] == []
    assert Portal().get("/api/v1/batches").status_code == 401


@pytest.mark.filterwarnings("error:StreamingHttpResponse must consume")
def test_a_large_input_file_comes_back_as_uploaded(owner: Any) -> None:
    large = b"".join(json.dumps(line(n)).encode() + b"\n" for n in range(3000))  # several reads of the file
    mine = api(owner)
    file_id = upload(mine, large).json()["id"]
    assert mine.get(f"/api/v1/files/{file_id}/content").content == large


@pytest.fixture
def batch(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> BatchRun:
    """The owner's batch launch of three prompts, waiting for its job."""
    files: MultiValueDict[str, UploadedFile] = MultiValueDict(
        {"prompts": [SimpleUploadedFile("p.txt", b"one\ntwo\nthree\n")]}
    )
    form = BatchForm({}, files)
    assert form.is_valid(), form.errors
    assert form.checked is not None
    with django_capture_on_commit_callbacks(execute=False), form.checked.requests:
        session = launch(owner, {**LAUNCH, "purpose": "batch"}, batch=form.checked)
    return BatchRun.objects.get(session=session)


@pytest.mark.filterwarnings("error:StreamingHttpResponse must consume")
def test_a_batchs_output_streams_from_the_cluster_as_it_comes(
    batch: BatchRun, owner: Any, other_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = Results(monkeypatch, count=3)
    headers = bearer(ApiToken.issue(owner, "script")[1])
    path = f"/api/v1/files/file-output-{batch.pk.hex}/content"

    async def download() -> tuple[int, bytes, bytes]:
        async with client(headers) as api_client, api_client.stream("GET", path) as reply:
            pieces = reply.aiter_raw()
            first = await anext(pieces)  # while the cluster's stream waits for it
            results.seen.set()
            return reply.status_code, first, b"".join([p async for p in pieces])

    status, first, rest = run(download())
    assert status == 200 and [json.loads(o)["custom_id"] for o in first.splitlines()] == ["line-1"]
    outputs = [json.loads(o) for o in (first + rest).splitlines()]
    assert [o["custom_id"] for o in outputs] == ["line-1", "line-2", "line-3"]
    assert outputs[2]["response"]["body"]["choices"][0]["message"]["content"] == "answer 3"
    assert results.closed.is_set()
    assert api(other_user).get(path).status_code == 404


@pytest.fixture
def shared(account: ClusterAccount, owner: Any, shared_user: Any, django_capture_on_commit_callbacks: Any) -> Any:
    """The owner's running session `lab-model`, shared with a lab member for the API."""
    with django_capture_on_commit_callbacks(execute=False):
        session = sessions.launch(owner, LAUNCH)
    transition(session.pk, State.RUNNING, cause="test", host="127.0.0.1", port=8080, alias="lab-model")
    SessionShare.objects.create(session=session, user=shared_user, created_by=owner, chat=False, api=True)
    return LLMSession.objects.get(pk=session.pk)


def test_only_the_owner_starts_a_batch_on_a_session_and_others_get_a_strangers_answer(
    shared: LLMSession, owner: Any, shared_user: Any, support_user: Any, other_user: Any
) -> None:
    def create(user: Any, model: str) -> Any:
        portal = api(user)
        lines = b"".join(json.dumps(line(n, model)).encode() + b"\n" for n in range(3))
        asked = {"input_file_id": upload(portal, lines).json()["id"], "endpoint": "/v1/chat/completions"}
        return portal.post("/api/v1/batches", json=asked)

    for model in (str(shared.pk), "ada/lab-model", "lab-model"):
        stranger = create(other_user, model)
        assert (stranger.status_code, stranger.json()["error"]["code"]) == (404, "model_not_found")
        for user in (shared_user, support_user):  # support staff start runs from the session's page
            reply = create(user, model)
            assert (reply.status_code, reply.json()) == (404, stranger.json()), (user, model)
    assert not BatchRun.objects.exists()
    reply = create(owner, "ada/lab-model")
    assert reply.status_code == 200, reply.text
    assert BatchRun.objects.get().owner == owner


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"concurrency": "-1"}, "concurrency: Ensure this value is greater than or equal to 1."),
        ({"concurrency": "0"}, "concurrency: Ensure this value is greater than or equal to 1."),
        ({"concurrency": "a lot"}, "concurrency: Enter a whole number."),
        ({"replicas": "17"}, "replicas: Ensure this value is less than or equal to 16."),
        ({"alias": "tiny-llama"}, "is a model in the catalog"),
    ],
)
def test_a_batch_launchs_metadata_out_of_bounds_is_a_clear_400(
    account: ClusterAccount, owner: Any, metadata: dict[str, str], message: str
) -> None:
    portal = api(owner)
    lines = b"".join(json.dumps(line(n, "tiny-llama:F16")).encode() + b"\n" for n in range(3))
    where = {"cluster": "local", "partition": "gpu", "gpu": "a100-80g", "gpus": "1"}
    asked = {"input_file_id": upload(portal, lines).json()["id"], "endpoint": "/v1/chat/completions",
             "metadata": {**where, **metadata}}  # fmt: skip
    reply = portal.post("/api/v1/batches", json=asked)
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]["message"]
    assert not LLMSession.objects.exists() and not BatchRun.objects.exists()
