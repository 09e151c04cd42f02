"""The proxy's door (jobs/use/guard.py), through the ASGI application as uvicorn runs it: who may send a body, and
how much of one."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from jobs.models import ApiToken, counts
from jobs.operations import metrics
from portal.asgi import application
from tests.asgi import browser

pytestmark = pytest.mark.django_db(transaction=True)


class Call:
    """One raw ASGI request: the body comes in chunks, and every chunk the application reads is counted."""

    def __init__(self, path: str, chunks: list[bytes], method: str = "POST", **headers: str) -> None:
        self.scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
            "headers": [(b"host", b"127.0.0.1")] + [(k.replace("_", "-").encode(), v.encode())
                                                    for k, v in headers.items()],
        }  # fmt: skip
        self.chunks, self.read = list(chunks), 0
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if not self.chunks:
            await asyncio.sleep(3600)  # the client keeps the connection open
        self.read += 1
        chunk = self.chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def run(self) -> tuple[int, dict[str, str], Any]:
        asyncio.run(asyncio.wait_for(application(self.scope, self.receive, self.send), 30))
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
        is_json = headers.get("content-type", "").startswith("application/json")
        return start["status"], headers, json.loads(body) if is_json else body


def token_of(user: Any) -> str:
    return ApiToken.issue(user, "script")[1]


def test_no_body_is_read_from_a_caller_without_a_valid_token(owner: Any) -> None:
    for authorization in ("", "Bearer hpcllm_not-a-token", "Basic YTpi"):
        headers = {"authorization": authorization} if authorization else {}
        call = Call("/api/v1/chat/completions", [b"x" * 65536] * 100, **headers)
        status, reply_headers, body = call.run()
        assert (status, body["error"]["code"], call.read) == (401, "invalid_api_key", 0)
        assert reply_headers["x-content-type-options"] == "nosniff"


def test_no_body_is_read_from_a_browser_that_is_not_signed_in() -> None:
    call = Call("/sessions/00000000-0000-4000-8000-000000000000/v1/chat/completions", [b"{}"] * 5)
    status, _, body = call.run()
    assert (status, call.read) == (401, 0) and body["error"]["type"] == "authentication_error"


def test_a_body_declared_too_large_is_refused_unread(owner: Any, settings: Any) -> None:
    settings.PORTAL_MAX_REQUEST_BYTES = 4096
    call = Call("/api/v1/chat/completions", [b"{}"], authorization=f"Bearer {token_of(owner)}", content_length="5000")
    status, _, body = call.run()
    assert (status, call.read, body["error"]["type"]) == (413, 0, "request_too_large")


def test_a_chunked_body_stops_being_read_at_the_limit(owner: Any, settings: Any) -> None:
    settings.PORTAL_MAX_REQUEST_BYTES = 4096
    call = Call("/api/v1/chat/completions", [b"x" * 1024] * 1000, authorization=f"Bearer {token_of(owner)}")
    status, _, _ = call.run()
    assert status == 413 and call.read == 5  # the fifth kilobyte crossed the limit; the rest was never read


def test_an_accepted_body_reaches_the_view(owner: Any) -> None:
    chunks = [b'{"model": "no-such', b'-session", "messages": []}']
    call = Call("/api/v1/chat/completions", chunks, authorization=f"Bearer {token_of(owner)}")
    status, headers, body = call.run()
    assert status == 404 and "no-such-session" in body["error"]["message"]  # the view parsed the whole body
    assert "sandbox" in headers["content-security-policy"]


def test_a_signed_in_browser_is_let_through(owner: Any) -> None:
    cookie = browser(owner)["cookie"]
    call = Call("/sessions/00000000-0000-4000-8000-000000000000/v1/chat/completions", [b"{}"], cookie=cookie)
    status, _, body = call.run()
    assert call.read == 1 and status in (403, 404), body  # past the door: CSRF or the session lookup answers


def test_a_token_is_held_to_its_requests_a_minute(
    owner: Any, other_user: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.PORTAL_API_REQUESTS_PER_MINUTE = 3
    monkeypatch.setattr(counts, "clock", lambda: 1_800_000_015.0)  # one minute's window, 45 s left in it
    token, other = token_of(owner), token_of(other_user)
    refused_before = metrics.PROXY_REFUSED.labels("rate")._value.get()
    statuses = [Call("/api/v1/models", [b""], "GET", authorization=f"Bearer {token}").run() for _ in range(4)]
    assert [status for status, _, _ in statuses] == [200, 200, 200, 429]
    assert metrics.PROXY_REFUSED.labels("rate")._value.get() == refused_before + 1  # /metrics counts it
    _, headers, body = statuses[-1]
    assert body["error"]["code"] == "rate_limit_exceeded" and headers["retry-after"] == "45"
    assert Call("/api/v1/models", [b""], "GET", authorization=f"Bearer {other}").run()[0] == 200  # per token


def test_a_users_tokens_together_are_held_to_the_users_requests_a_minute(
    owner: Any, other_user: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.PORTAL_API_REQUESTS_PER_MINUTE, settings.PORTAL_API_USER_REQUESTS_PER_MINUTE = 3, 4
    monkeypatch.setattr(counts, "clock", lambda: 1_800_000_075.0)  # another minute than the test above
    tokens = [token_of(owner) for _ in range(3)]
    statuses = [Call("/api/v1/models", [b""], "GET", authorization=f"Bearer {tokens[n % 3]}").run() for n in range(5)]
    assert [status for status, _, _ in statuses] == [200, 200, 200, 200, 429]  # no token made more than two
    assert "your tokens together made more than 4 requests a minute" in statuses[-1][2]["error"]["message"]
    assert Call("/api/v1/models", [b""], "GET", authorization=f"Bearer {token_of(other_user)}").run()[0] == 200
