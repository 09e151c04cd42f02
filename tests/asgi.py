"""The portal's ASGI application (portal.asgi) as uvicorn serves it, for tests.

The routes to model servers (/api/v1/..., /sessions/<uuid>/v1/...) are served only through their door
(jobs/use/guard.py), which Django's test client skips: their views refuse whatever did not come through it. Tests of
those routes send their requests here instead:

- `Portal(headers)` from a synchronous test: `.get(path)`, `.post(path, json=...)` or `.request(method, path, ...)`
  (httpx's keyword arguments: json, content, files, data, params, headers), each an httpx.Response read to its end;
- `client(headers)` in async code (`run()` runs it from a synchronous test): an httpx.AsyncClient whose replies arrive
  as the application sends them (`client.stream(...)`); leaving a reply before its end is the client going away,
  which the application hears as http.disconnect, as from uvicorn;
- `sdk_client()`: the same for the official `openai` and `anthropic` clients, which speak through httpx2 (their
  `http_client=`);
- `bearer(token)` and `browser(user)`: the headers of a script with a personal token, and of a signed-in browser (its
  session cookie, and the CSRF cookie and header the chat page's script sends).

The door and the proxy look callers and sessions up on threads of their own, with their own database connections,
so a test that sends requests here needs the rows committed: `pytest.mark.django_db(transaction=True)`.

Every request runs on one event loop kept for the test process, as a uvicorn worker runs one: what the proxy keeps
per loop (its pooled connections to model servers) lives as it does in production.
"""

from __future__ import annotations

import asyncio
import atexit
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, MutableMapping
from typing import Any, TypeVar

import httpx
import httpx2
from django.conf import settings
from django.http import HttpRequest
from django.middleware.csrf import get_token
from django.test import Client

from portal.asgi import application

Message = MutableMapping[str, Any]
App = Callable[
    [Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Coroutine[Any, Any, None]
]
T = TypeVar("T")

HOST = "127.0.0.1"
CLIENT = (HOST, 50000)  # the caller's address and port, as uvicorn puts them in the scope
TIMEOUT_S = 60.0  # a request, or a reply's next piece, that takes longer fails the test instead of stalling the run


class Transport(httpx.AsyncBaseTransport):
    """Each request to an ASGI application in this event loop, as uvicorn hands it over: its body in a message (a
    streamed body, e.g. httpx's content=<async iterator>, sent chunked: a message a piece, each taken from the
    iterator only when the application reads it), the reply passed on piece by piece as the application sends it, and
    http.disconnect once the client has closed the reply (read to its end, or left before it)."""

    def __init__(self, app: App = application, client: tuple[str, int] = CLIENT) -> None:
        self.app, self.client = app, client

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        scope: Message = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "server": (request.url.host, request.url.port or 80), "client": self.client,
            "scheme": request.url.scheme, "method": request.method, "root_path": "", "path": request.url.path,
            "raw_path": request.url.raw_path.partition(b"?")[0], "query_string": request.url.query,
            "headers": [(name.lower(), value) for name, value in request.headers.raw],
        }  # fmt: skip
        body = _body(request)
        gone = asyncio.Event()
        sent: asyncio.Queue[Message] = asyncio.Queue()

        async def receive() -> Message:
            message = await anext(body, None)
            if message is not None:
                return message
            await gone.wait()
            return {"type": "http.disconnect"}

        running = asyncio.create_task(self.app(scope, receive, sent.put))
        start = await _next(sent, running)
        if start is None or start["type"] != "http.response.start":
            raise httpx.RemoteProtocolError(f"the application did not start a reply: {start}", request=request)
        reply = _Reply(sent, running, gone)
        return httpx.Response(start["status"], headers=start.get("headers", []), stream=reply, request=request)


async def _body(request: httpx.Request) -> AsyncIterator[Message]:
    """A request's body as uvicorn's messages: whole in one (bytes, a form, JSON), else a message a piece."""
    if isinstance(request.stream, httpx.ByteStream):
        yield {"type": "http.request", "body": await request.aread(), "more_body": False}
        return
    assert isinstance(request.stream, httpx.AsyncByteStream)
    async for piece in request.stream:
        yield {"type": "http.request", "body": piece, "more_body": True}
    yield {"type": "http.request", "body": b"", "more_body": False}


class _Reply(httpx.AsyncByteStream):
    def __init__(self, sent: asyncio.Queue[Message], running: asyncio.Task[None], gone: asyncio.Event) -> None:
        self.sent, self.running, self.gone = sent, running, gone

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (message := await _next(self.sent, self.running)) is not None:
            if message["type"] != "http.response.body":
                continue
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body", False):
                return
        raise httpx.RemoteProtocolError("the application ended before its reply did")

    async def aclose(self) -> None:
        """The client is done with the reply: the application hears http.disconnect (a view still streaming is
        cancelled), and whatever it raised is raised here."""
        self.gone.set()
        await asyncio.wait_for(self.running, TIMEOUT_S)


async def _next(sent: asyncio.Queue[Message], running: asyncio.Task[None]) -> Message | None:
    """The application's next message; None once it has returned without sending more (what it raised, raised)."""
    if sent.empty() and not running.done():
        getting = asyncio.ensure_future(sent.get())
        await asyncio.wait({getting, running}, timeout=TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if getting.done():
            return getting.result()
        getting.cancel()
        if not running.done():
            raise TimeoutError(f"the application sent nothing for {TIMEOUT_S} s")
    if not sent.empty():
        return sent.get_nowait()
    running.result()
    return None


def client(
    headers: Mapping[str, str] | None = None, host: str = HOST, address: tuple[str, int] = CLIENT
) -> httpx.AsyncClient:
    """An httpx client of the portal as uvicorn serves it, for async code; replies stream."""
    return httpx.AsyncClient(transport=Transport(client=address), base_url=f"http://{host}", headers=headers)


_runner: asyncio.Runner | None = None


def run(awaitable: Awaitable[T]) -> T:
    """Run async code that uses `client()` from a synchronous test, on the test process's one event loop."""
    global _runner
    if _runner is None:
        _runner = asyncio.Runner()
        atexit.register(_runner.close)
    return _runner.run(asyncio.wait_for(awaitable, TIMEOUT_S))


class Portal:
    """Requests to the portal from a synchronous test, with these headers on each; every reply is read to its end."""

    def __init__(
        self, headers: Mapping[str, str] | None = None, host: str = HOST, address: tuple[str, int] = CLIENT
    ) -> None:
        self.headers, self.host, self.address = dict(headers or {}), host, address

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def send() -> httpx.Response:
            async with client(self.headers, self.host, self.address) as portal:
                return await portal.request(method, path, **kwargs)

        return run(send())

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)


def bearer(token: str) -> dict[str, str]:
    """A script's headers: its personal API token."""
    return {"authorization": f"Bearer {token}"}


def browser(user: Any) -> dict[str, str]:
    """A signed-in browser's headers: its session cookie, and the CSRF cookie and header the chat page's script sends
    (as a page that carries the token has set the cookie)."""
    signed_in = Client()
    signed_in.force_login(user)
    page = HttpRequest()
    token = get_token(page)
    session = signed_in.cookies[settings.SESSION_COOKIE_NAME].value
    cookie = f"{settings.SESSION_COOKIE_NAME}={session}; {settings.CSRF_COOKIE_NAME}={page.META['CSRF_COOKIE']}"
    return {"cookie": cookie, "x-csrftoken": token}


class _Httpx2Reply(httpx2.AsyncByteStream):
    def __init__(self, reply: httpx.Response) -> None:
        self.reply = reply

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for piece in self.reply.aiter_raw():
            yield piece

    async def aclose(self) -> None:
        await self.reply.aclose()


class _Httpx2Bridge(httpx2.AsyncBaseTransport):
    """Transport's requests for clients built on httpx2 (the official openai and anthropic packages): each request
    handed to Transport, its reply streamed back as the application sends it."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        sent = httpx.Request(
            request.method, str(request.url), headers=request.headers.raw, content=await request.aread()
        )
        reply = await self.inner.handle_async_request(sent)
        return httpx2.Response(reply.status_code, headers=reply.headers.raw, stream=_Httpx2Reply(reply))


def sdk_client(address: tuple[str, int] = CLIENT) -> httpx2.AsyncClient:
    """An http_client for openai.AsyncOpenAI and anthropic.AsyncAnthropic that reaches the portal as uvicorn serves
    it (their base_url names HOST)."""
    return httpx2.AsyncClient(transport=_Httpx2Bridge(Transport(client=address)))
