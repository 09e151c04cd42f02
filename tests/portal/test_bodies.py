"""Every request's body is bounded before Django reads it (portal/bodies.py), through the ASGI application as uvicorn
runs it: pages and forms take PORTAL_MAX_FORM_BYTES from anyone, a signed-in user's prompts file more."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.asgi import Portal, browser

pytestmark = pytest.mark.django_db(transaction=True)

PIECE = 64 * 1024


class Upload:
    """A chunked body of `pieces` pieces of 64 KiB, each made only when the application reads it; `read` counts them."""

    def __init__(self, pieces: int) -> None:
        self.pieces, self.read = pieces, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.pieces):
            self.read += 1
            yield b"x" * PIECE


@pytest.fixture
def disk(settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where every temporary file goes, and stays to be seen: Django's spooled bodies and uploads (TemporaryFile's are
    otherwise nameless on Linux)."""
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def kept(*args: Any, **kwargs: Any) -> Any:
        return tempfile.NamedTemporaryFile(*args, **{**kwargs, "dir": str(tmp_path), "delete": False})

    monkeypatch.setattr(tempfile, "TemporaryFile", kept)
    return tmp_path


def test_a_chunked_upload_to_the_sign_in_page_past_the_limit_gets_413_and_nothing_reaches_the_disk(
    settings: Any, disk: Path
) -> None:
    settings.PORTAL_MAX_FORM_BYTES = PIECE
    flood = Upload(64)  # 4 MiB: past Django's in-memory spool, which would go to disk
    reply = Portal().post("/accounts/login/", content=flood, headers={"content-type": "text/plain"})
    assert reply.status_code == 413 and "larger than 65,536 bytes" in reply.text
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert flood.read == 2  # the piece that passed the limit was the last one read
    assert list(disk.iterdir()) == []


def test_a_body_that_declares_more_than_a_form_takes_is_refused_before_a_byte_is_read(settings: Any) -> None:
    settings.PORTAL_MAX_FORM_BYTES = PIECE
    flood = Upload(64)
    headers = {"content-length": str(64 * PIECE), "content-type": "application/x-www-form-urlencoded"}
    reply = Portal().post("/accounts/login/", content=flood, headers=headers)
    assert (reply.status_code, flood.read) == (413, 0)


def test_a_form_within_the_limit_reaches_its_page(settings: Any, owner: Any) -> None:
    settings.PORTAL_MAX_FORM_BYTES = PIECE
    signed_in = browser(owner)
    reply = Portal(signed_in).post("/tokens/", data={"name": "laptop"})
    assert reply.status_code == 200 and "hpcllm_" in reply.text


def test_only_a_signed_in_user_sends_a_prompts_file_larger_than_a_form(settings: Any, owner: Any) -> None:
    settings.PORTAL_MAX_FORM_BYTES = PIECE
    anonymous = Upload(48)
    reply = Portal().post("/batch/new/", content=anonymous, headers={"content-type": "text/plain"})
    assert (reply.status_code, anonymous.read) == (413, 2)
    signed_in = Upload(48)  # 3 MiB, read whole: the page answers (a form without its file)
    reply = Portal(browser(owner)).post("/batch/new/", content=signed_in, headers={"content-type": "text/plain"})
    assert reply.status_code == 200 and signed_in.read == 48
    settings.PORTAL_BATCH_MAX_BYTES = 1024  # the upload's own limit holds for them
    past = Upload(48)
    reply = Portal(browser(owner)).post("/batch/new/", content=past, headers={"content-type": "text/plain"})
    assert reply.status_code == 413 and past.read < 48


def test_a_page_without_a_body_is_served_as_before() -> None:
    assert Portal().get("/healthz").status_code == 200
