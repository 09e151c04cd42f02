"""OpenAI's Files and Batch API (jobs/use/openai_batches.py) through the ASGI application, as the `openai` client
reaches it: the door reads the body (an upload, a batch's JSON) and the views take it from there; everything is the
token holder's own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jobs.models import ApiToken, BatchFile
from tests.asgi import Portal, bearer

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
