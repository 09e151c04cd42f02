"""The proxy (jobs/use/proxy.py) through the ASGI application, as uvicorn serves it: what reaches a session's server
(its key, never the caller's credentials), what comes back (only data, streamed as it comes, and recorded), and that
its views serve nothing that did not come through the door.

The session's server is a stand-in for the network (httpx's MockTransport in place of the proxy's pooled transport); the
session's address is a loopback port nothing is sent to."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from django.test import AsyncClient, Client
from django.urls import URLPattern, URLResolver, get_resolver

from jobs.models import LLMSession, ProxyRequest
from jobs.use import guard, openai_batches, openai_finetunes, proxy
from tests.asgi import Portal, bearer, browser, client, run
from tests.jobs.use.upstream import ANSWER, Server, answering, recorded, token_of

pytestmark = pytest.mark.django_db(transaction=True)
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


class Events(httpx.AsyncByteStream):
    """A server's event stream: the first event at once, the others once `more` is set; `closed` once the proxy
    closed the stream."""

    def __init__(self, *events: dict[str, Any]) -> None:
        self.events = [f"data: {json.dumps(event)}\n\n".encode() for event in events]
        self.more, self.closed = asyncio.Event(), asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.events[0]
        await self.more.wait()
        for event in self.events[1:]:
            yield event
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        self.closed.set()


def test_the_api_reaches_the_sessions_server_with_its_key_and_none_of_the_callers_credentials(
    server: Server, running: LLMSession, owner: Any
) -> None:
    headers = {**bearer(token_of(owner)), "cookie": "sessionid=abc", "x-forwarded-for": "10.1.2.3"}
    reply = Portal(headers).post("/api/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200 and reply.json() == ANSWER
    assert (
        reply.headers["x-content-type-options"] == "nosniff" and "sandbox" in reply.headers["content-security-policy"]
    )
    [sent] = server.got
    assert sent.url == "http://127.0.0.1:9/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {running.api_key}"
    assert "cookie" not in sent.headers and "x-forwarded-for" not in sent.headers
    assert json.loads(sent.content) == {**CHAT, "model": running.served_model_name}  # the server's own name
    assert running.api_key not in reply.text
    row = recorded(session=running, user=owner)
    assert (row.route, row.endpoint, row.status, row.prompt_tokens, row.completion_tokens) == (
        "api", "chat/completions", 200, 3, 1)  # fmt: skip


def test_the_browsers_route_reaches_the_server_with_its_key_and_none_of_the_browsers_credentials(
    server: Server, running: LLMSession, owner: Any
) -> None:
    reply = Portal(browser(owner)).post(f"/sessions/{running.pk}/v1/chat/completions", json={"messages": []})
    assert reply.status_code == 200 and reply.json() == ANSWER
    [sent] = server.got
    assert sent.headers["authorization"] == f"Bearer {running.api_key}"
    assert "cookie" not in sent.headers and "x-csrftoken" not in sent.headers
    assert json.loads(sent.content)["model"] == running.served_model_name
    assert recorded(session=running, user=owner).route == "chat"


def test_only_json_and_event_streams_are_relayed(server: Server, running: LLMSession, owner: Any) -> None:
    api = Portal(bearer(token_of(owner)))
    server.answer = answering(200, b"<script>alert(1)</script>", "text/html; charset=utf-8")
    reply = api.post("/api/v1/chat/completions", json=CHAT)
    assert (reply.status_code, reply.headers["content-type"]) == (502, "application/json")
    assert "text/html" in reply.json()["error"]["message"] and "alert" not in reply.text
    server.answer = answering(500, b"<script>alert(1)</script>", "text/html; charset=utf-8")
    reply = api.post("/api/v1/chat/completions", json=CHAT)
    assert (reply.status_code, reply.json()["error"]["type"]) == (500, "upstream_error")
    assert "<script>" not in reply.text and "alert(1)" in reply.json()["error"]["message"]  # quoted, inert
    assert "sandbox" in reply.headers["content-security-policy"]


def test_a_kept_alive_connection_the_server_closed_as_it_was_reused_is_sent_again_once(
    server: Server, running: LLMSession, owner: Any
) -> None:
    closes = [True]

    def closed_once(request: httpx.Request) -> httpx.Response:
        if closes:  # as httpcore reports a reused connection the server had just closed
            closes.pop()
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return answering(200, json.dumps(ANSWER).encode(), "application/json")(request)

    server.answer = closed_once
    api = Portal(bearer(token_of(owner)))
    reply = api.post("/api/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200 and reply.json() == ANSWER and len(server.got) == 2
    server.answer = lambda request: (_ for _ in ()).throw(httpx.RemoteProtocolError("gone", request=request))
    refused = api.post("/api/v1/chat/completions", json=CHAT)  # twice in a row: the server's, not the pool's
    assert (refused.status_code, refused.json()["error"]["type"]) == (502, "upstream_error") and len(server.got) == 4


def test_an_error_page_is_quoted_from_its_first_bytes_and_never_read_whole(
    server: Server, running: LLMSession, owner: Any
) -> None:
    pulled = []

    class Endless(httpx.AsyncByteStream):  # 64 MiB of an HTML error page, as a hostile server could send for ever
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for _ in range(1024):
                pulled.append(1)
                yield b"<p>no</p>" * 7282

    server.answer = lambda request: httpx.Response(500, headers={"content-type": "text/html"}, stream=Endless())
    reply = Portal(bearer(token_of(owner))).post("/api/v1/chat/completions", json=CHAT)
    assert (reply.status_code, reply.json()["error"]["type"]) == (500, "upstream_error")
    assert reply.json()["error"]["message"].startswith("the model server answered: <p>no</p>")
    assert len(pulled) <= 2


def test_only_the_openai_routes_are_forwarded(server: Server, running: LLMSession, owner: Any) -> None:
    api = Portal(bearer(token_of(owner)))
    assert api.post("/api/v1/slots/0", json=CHAT).status_code == 404
    assert api.get("/api/v1/chat/completions").status_code == 405
    assert Portal(browser(owner)).post(f"/sessions/{running.pk}/v1/props", json={}).status_code == 404
    assert server.got == []


def test_a_stream_is_relayed_as_it_comes_and_recorded_with_the_servers_token_counts(
    server: Server, running: LLMSession, owner: Any
) -> None:
    events = Events({"choices": [{"delta": {"content": "Hel"}}]}, {"choices": [{"delta": {"content": "lo"}}]},
                    {"choices": [], "timings": {"prompt_n": 5, "predicted_n": 2}})  # fmt: skip
    server.answer = lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=events)

    headers = bearer(token_of(owner))

    async def chat() -> tuple[str, bytes, bytes]:
        async with (
            client(headers) as api,
            api.stream("POST", "/api/v1/chat/completions", json={**CHAT, "stream": True}) as reply,
        ):
            pieces = reply.aiter_raw()
            first = await anext(pieces)  # before the server sends the rest
            events.more.set()
            return reply.headers["content-type"], first, b"".join([piece async for piece in pieces])

    content_type, first, rest = run(chat())
    assert content_type == "text/event-stream" and first == events.events[0]
    assert rest == b"".join(events.events[1:]) + b"data: [DONE]\n\n" and events.closed.is_set()
    row = recorded(session=running, user=owner)
    assert (row.status, row.prompt_tokens, row.completion_tokens, row.tokens_reported) == (200, 5, 2, True)
    assert row.ttft_ms is not None


def test_a_client_that_goes_away_closes_the_servers_stream(server: Server, running: LLMSession, owner: Any) -> None:
    events = Events({"choices": [{"delta": {"content": "Hel"}}]}, {"choices": [{"delta": {"content": "lo"}}]})
    server.answer = lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=events)

    headers = browser(owner)

    async def leave_after_the_first_event() -> None:
        async with (
            client(headers) as page,
            page.stream("POST", f"/sessions/{running.pk}/v1/chat/completions", json={"stream": True}) as reply,
        ):
            await anext(reply.aiter_raw())
        await asyncio.wait_for(events.closed.wait(), 10)

    run(leave_after_the_first_event())
    assert not events.more.is_set() and recorded(session=running, user=owner).route == "chat"


def door_routes() -> list[tuple[str, Any]]:
    """(path, view) of every route in the URL configuration that the door guards (guard.guards): a route added there
    is checked here the moment it exists."""
    found: list[tuple[str, Any]] = []

    def walk(patterns: Any, prefix: str) -> None:
        for p in patterns:
            if isinstance(p, URLResolver):
                walk(p.url_patterns, prefix + str(p.pattern))
            elif isinstance(p, URLPattern):
                found.append((prefix + str(p.pattern), p.callback))

    walk(get_resolver().url_patterns, "/")
    values = {"pk": "00000000-0000-4000-8000-000000000000", "path": "models"}

    def part(match: re.Match[str]) -> str:
        return values.get(match.group(1), "x")

    paths = [(re.sub(r"<(?:\w+:)?(\w+)>", part, pattern), view) for pattern, view in found]
    return [(path, view) for path, view in paths if guard.guards(path)]


def test_no_view_of_the_proxys_routes_serves_a_request_that_did_not_come_through_the_door(
    server: Server, running: LLMSession, owner: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Django's test client reaches the views without the door, as WSGI or any other way around portal.asgi would:
    each refuses, though the caller is signed in and has a valid token (or the method is not one the route takes)."""
    routes = door_routes()
    modules = {proxy.__name__, openai_batches.__name__, openai_finetunes.__name__}
    assert {view.__module__ for _, view in routes} == modules and len(routes) >= 13
    token = token_of(owner)
    wsgi = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    wsgi.force_login(owner)
    asgi = AsyncClient(headers=bearer(token))  # an ASGI request, but not one the door let in
    run(asgi.aforce_login(owner))
    ways: dict[str, Callable[[str, str], Any]] = {
        "wsgi": lambda method, path: wsgi.generic(method, path, b"{}", "application/json"),
        "asgi": lambda method, path: run(asgi.generic(method, path, b"{}", "application/json")),
    }
    for path, _ in routes:
        for way, send in ways.items():
            replies = [send(method, path) for method in ("GET", "POST")]
            statuses = {reply.status_code for reply in replies}
            assert statuses <= {405, 500} and 500 in statuses, (way, path, statuses)
            assert {r.json()["error"]["type"] for r in replies if r.status_code == 500} == {"server_error"}
    assert server.got == [] and not ProxyRequest.objects.exists()
    refusals = [r for r in caplog.records if "reached its view without the door" in r.getMessage()]
    assert refusals and {r.levelno for r in refusals} == {logging.ERROR}
