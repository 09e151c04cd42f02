"""A session's model server as the proxy's tests stand it in (httpx's MockTransport in place of the proxy's pooled
transport), and what those tests ask of the portal's records."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from jobs.models import ApiToken, ProxyRequest

ANSWER = {"choices": [{"message": {"role": "assistant", "content": "hello"}}],
          "usage": {"prompt_tokens": 3, "completion_tokens": 1}}  # fmt: skip


class Sent(httpx.AsyncByteStream):
    """A body as the network delivers one (a response built from bytes is already read, which the proxy never gets)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body


def answering(status: int, body: bytes, content_type: str) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, headers={"content-type": content_type}, stream=Sent(body))


class Server:
    """The session's model server: every request it got, and the answer it gives (JSON, unless told otherwise)."""

    def __init__(self) -> None:
        self.got: list[httpx.Request] = []
        self.answer = answering(200, json.dumps(ANSWER).encode(), "application/json")

    async def handle(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.got.append(request)
        return self.answer(request)


def token_of(user: Any) -> str:
    return ApiToken.issue(user, "script")[1]


def recorded(**fields: Any) -> ProxyRequest:
    """The request's usage row, written on the proxy's threads after its reply's last byte."""
    deadline = time.monotonic() + 10
    while (row := ProxyRequest.objects.filter(**fields).first()) is None:
        assert time.monotonic() < deadline, f"no usage row {fields}"
        time.sleep(0.05)
    return row
