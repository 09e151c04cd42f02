"""The proxy's connections to model servers: HTTP/1.1 on asyncio with uvicorn's parser (httptools, that is llhttp),
behind httpx's transport interface.

httpx's own transport (httpcore's pool, h11's pure-Python parser, anyio's cancel scopes around every read) took
about 1 ms of a request's time to the first token (bench/proxy.py, docs/chat.md), most of what the proxy added on top
of the lookups it must make. The proxy talks to one kind of peer: a model server, or the node's key proxy in front of
it, over plain HTTP at an address built from its parts and checked (jobs/cluster/backend.py). So this transport does
only that: no TLS, no proxies from the environment, no compression asked for, HTTP/1.1 with keep-alive. The server
is the session owner's and may send anything: the parser is llhttp (what uvicorn parses every request to the portal
with), the head is bounded, the body is read ahead at most MAX_BUFFERED bytes before reading pauses, every wait has
the request's read timeout, and every failure is the httpx error the proxy already handles (a reused connection the
server closed before answering is httpx.RemoteProtocolError, which the proxy sends once more).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools
import httpx

MAX_HEAD_BYTES = 64 * 1024  # a model server's head is a few hundred bytes
MAX_HEADERS = 100
MAX_BUFFERED = 256 * 1024  # read ahead of the relay; past this the socket is not read until the relay catches up
# Idle connections are reused for at most this long: cpp-httplib (llama-server) closes them after 5 s, and a reuse
# that crosses the close costs a resend. httpcore's default expiry is the same 5 s.
KEEPALIVE_S = 4.0
MAX_IDLE_PER_SERVER = 100
FORBIDDEN_IN_HEADERS = (b"\r", b"\n", b"\0")


class _Connection(asyncio.Protocol):
    """One TCP connection to a server and the response it is reading (one at a time: no pipelining)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.head: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0  # of a head still arriving, as read
        self.header_bytes = 0  # of the headers parsed
        self.head_done = False
        self.sized = False  # Content-Length or chunked: else the body ends when the server closes
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.active = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if not self.active:  # bytes nobody asked for: the connection is not fit to reuse
            self._close()
            return
        heading = not self.head_done
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"the server's response is not valid HTTP/1.1: {exc}"))
            return
        if heading and not self.head_done:  # a head that never ends: bounded by what arrived of it
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._fail(httpx.RemoteProtocolError(f"the server's response head is over {MAX_HEAD_BYTES} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.active or self.complete:
            return
        if self.head_done and not self.sized:
            self.complete = True  # a body without a length ends with the connection
            self._wake()
        else:
            # Before any byte of a response: the request did not reach a server that answers (a kept-alive
            # connection closed as it was reused, a server that died); the proxy may send it again.
            self._fail(httpx.RemoteProtocolError("the server closed the connection before its response ended"))

    def pause_writing(self) -> None:  # a request body bigger than the socket's buffer: the kernel sends it on
        pass

    def resume_writing(self) -> None:
        pass

    # httptools' callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        # A head that arrives whole in one read is counted here (feed_data raises these as HttpParserCallbackError).
        self.header_bytes += len(name) + len(value) + 4
        if len(self.headers) >= MAX_HEADERS or self.header_bytes > MAX_HEAD_BYTES:
            raise ValueError(f"more than {MAX_HEADERS} headers or {MAX_HEAD_BYTES} bytes of them")
        lowered = name.lower()
        if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
            self.sized = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            raise ValueError(f"an interim response ({status}) to a request that asked for none")
        self.status, self.head_done = status, True
        if status in (204, 304):
            self.sized = True
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(bytes(body))
        self.buffered += len(body)
        if self.buffered > MAX_BUFFERED and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # the request's side

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        self._wake()
        self._close()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def response_head(self, loop: asyncio.AbstractEventLoop, wire: bytes, timeout: float | None) -> None:
        """Send the request and wait for the response's head."""
        self.active = True
        self.head = loop.create_future()
        assert self.transport is not None
        self.transport.write(wire)
        await _within(loop, self.head, timeout, "the server did not answer in time")

    async def body(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> AsyncIterator[bytes]:
        while True:
            if self.chunks:
                data = b"".join(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
                self.chunks.clear()
                self.buffered = 0
                if self.paused and self.transport is not None and not self.closed:
                    self.paused = False
                    self.transport.resume_reading()
                yield data
            elif self.complete:
                return
            elif self.error is not None:
                raise self.error
            else:
                self.waiter = loop.create_future()
                await _within(loop, self.waiter, timeout, "the server sent nothing in time")
                self.waiter = None


async def _within(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], timeout: float | None,
                  message: str) -> None:  # fmt: skip
    """Wait for the future for at most `timeout` seconds (httpx.ReadTimeout after them): a timer on the loop rather
    than asyncio.wait_for's task per wait, which each token of a stream would pay."""
    if timeout is None:
        await future
        return

    def expire() -> None:
        if not future.done():
            future.set_exception(httpx.ReadTimeout(message))

    timer = loop.call_later(timeout, expire)
    try:
        await future
    finally:
        timer.cancel()


class _Body(httpx.AsyncByteStream):
    """A response's body as it arrives; closing it returns a finished connection to the pool, else closes it."""

    def __init__(self, pool: LeanTransport, key: tuple[str, int], conn: _Connection, timeout: float | None) -> None:
        self.pool, self.key, self.conn, self.timeout = pool, key, conn, timeout
        self.done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for data in self.conn.body(asyncio.get_running_loop(), self.timeout):
            yield data

    async def aclose(self) -> None:
        if self.done:
            return
        self.done = True
        self.pool.give_back(self.key, self.conn)


def _wire(request: httpx.Request, body: bytes) -> bytes:
    """The request as bytes: its line, its headers (httpx.Request adds Host and Content-Length), its body. A header
    that would end the head early or start another (CR, LF, NUL) is refused rather than sent."""
    target = request.url.raw_path
    parts = [request.method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        if any(c in name or c in value for c in FORBIDDEN_IN_HEADERS) or not name:
            raise httpx.LocalProtocolError(f"header {name!r} is not valid in HTTP/1.1")
        parts += [name, b": ", value, b"\r\n"]
    if any(c in target for c in (b" ", *FORBIDDEN_IN_HEADERS)):
        raise httpx.LocalProtocolError("the request's path is not valid in HTTP/1.1")
    parts += [b"\r\n", body]
    return b"".join(parts)


class LeanTransport(httpx.AsyncBaseTransport):
    """Pooled HTTP/1.1 connections to plain-HTTP servers, one pool per event loop (the proxy keeps one per loop)."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"the proxy speaks plain HTTP to model servers, not {url.scheme!r}")
        if isinstance(request.stream, httpx.ByteStream):
            body = request.content
        else:
            body = await request.aread()
        wire = _wire(request, body)
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        loop = asyncio.get_running_loop()
        key = (url.host, url.port or 80)
        conn = self._reused(key) or await self._opened(loop, key, timeouts.get("connect"))
        try:
            await conn.response_head(loop, wire, timeouts.get("read"))
        except BaseException:
            conn._close()
            raise
        stream = _Body(self, key, conn, timeouts.get("read"))
        return httpx.Response(conn.status, headers=conn.headers, stream=stream, request=request,
                              extensions={"http_version": b"HTTP/1.1"})  # fmt: skip

    def _reused(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn._close()
        return None

    async def _opened(
        self, loop: asyncio.AbstractEventLoop, key: tuple[str, int], timeout: float | None
    ) -> _Connection:
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(_Connection, key[0], key[1]), timeout)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"no connection to {key[0]}:{key[1]} in time") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {key[0]}:{key[1]}: {exc}") from exc
        return conn

    def give_back(self, key: tuple[str, int], conn: _Connection) -> None:
        """A connection whose response was read to its end goes back to the pool if both sides keep it alive; any
        other (the relay stopped early, the server said close, an error) is closed: its state is not known."""
        if conn.complete and conn.keep_alive and not conn.closed and conn.error is None:
            idle = self._idle.setdefault(key, [])
            if len(idle) < MAX_IDLE_PER_SERVER:
                conn._reset()
                conn.idle_since = time.monotonic()
                idle.append(conn)
                return
        conn._close()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn._close()
        self._idle.clear()
