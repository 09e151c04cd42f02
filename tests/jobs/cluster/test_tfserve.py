"""tfserve.py's fixes to `transformers serve` (the e2e test runs the real server): its ASGI middleware in front of a
small ASGI app that answers as `transformers serve` does."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from types import ModuleType
from typing import Any

import httpx

from jobs.cluster.jobscript import SCRIPTS_DIR

PINNED = "/models/SmolLM2-135M-Instruct"


def load_tfserve() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tfserve", SCRIPTS_DIR / "tfserve.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def like_transformers_serve(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Refuses any model but the path it was started with; streams without [DONE]; /v1/models fails."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/v1/models":
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"no hub cache"})
        return
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        payload = {}
    if payload.get("model") != PINNED:
        await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"detail": "Server is pinned"}'})
        return
    if payload.get("stream"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for word in ("Par", "is"):
            chunk = {"choices": [{"delta": {"content": word}}]}
            await send(
                {"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    reply = json.dumps({"choices": [{"message": {"content": "Paris"}}], "length_seen": len(body)}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": reply})


def call(method: str, path: str, **options: Any) -> httpx.Response:
    app = load_tfserve().OpenAIShape(like_transformers_serve, "SmolLM2-135M-Instruct-bf16", PINNED)

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as client:
            return await client.request(method, path, **options)

    return asyncio.run(go())


def test_the_model_a_request_names_becomes_the_one_the_server_was_started_with() -> None:
    reply = call("POST", "/v1/chat/completions", json={"model": "SmolLM2-135M-Instruct-bf16", "messages": []})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "Paris"
    assert reply.json()["length_seen"] == len(json.dumps({"model": PINNED, "messages": []}))


def test_a_stream_ends_with_done_once() -> None:
    reply = call("POST", "/v1/chat/completions", json={"model": "x", "stream": True, "messages": []})
    assert reply.text.endswith("data: [DONE]\n\n") and reply.text.count("[DONE]") == 1
    assert '"content": "Par"' in reply.text


def test_a_responses_stream_ends_with_its_own_event_not_done() -> None:
    """OpenAI ends only chat and completion streams with [DONE]; a Responses stream ends with response.completed."""
    reply = call("POST", "/v1/responses", json={"model": "x", "stream": True, "input": "hi"})
    assert reply.status_code == 200 and '"content": "Par"' in reply.text and "[DONE]" not in reply.text


def test_the_model_list_names_the_sessions_model() -> None:
    reply = call("GET", "/v1/models")
    assert reply.status_code == 200
    assert [m["id"] for m in reply.json()["data"]] == ["SmolLM2-135M-Instruct-bf16"]


def test_a_body_that_is_not_json_passes_untouched() -> None:
    reply = call("POST", "/v1/chat/completions", content=b"not json")
    assert reply.status_code >= 400  # the server's own answer, not a crash in the middleware


def test_the_server_may_not_be_put_on_a_port() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(SCRIPTS_DIR / "tfserve.py"), "--socket", "/tmp/x.sock", "--served-name", "m", "--",
         PINNED, "--port", "8000"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0 and "leave out --host and --port" in result.stderr
