"""The proxy's HTTP/1.1 transport to model servers (jobs/use/transport.py), against real servers on loopback sockets
that answer as a model server would, or as a broken or hostile one would."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import pytest

from jobs.use import transport as transport_module
from jobs.use.transport import LeanTransport

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
TIMEOUTS = httpx.Timeout(5.0, connect=2.0).as_dict()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """A request's head and body, as the server reads them."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


class Server:
    """A loopback server: `answer` serves each connection; how many connections it accepted."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0

    async def __aenter__(self) -> httpx.URL:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.answer(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return httpx.URL(scheme="http", host="127.0.0.1", port=port, path="/v1/chat/completions")

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def request_to(url: httpx.URL, body: bytes = b'{"stream": true}', **headers: str) -> httpx.Request:
    return httpx.Request("POST", url, content=body, headers={"content-type": "application/json", **headers},
                         extensions={"timeout": TIMEOUTS})  # fmt: skip


async def body_of(response: httpx.Response) -> bytes:
    try:
        return b"".join([piece async for piece in response.aiter_raw()])
    finally:
        await response.aclose()


def streaming(tokens: int = 3, close: bool = False) -> Answer:
    """llama-server's way: an event stream, one HTTP chunk per token, the connection kept alive for the next."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            writer.write(head + (b"Connection: close\r\n" if close else b"") + b"\r\n")
            for i in range(tokens):
                writer.write(chunk(b'data: {"token": %d}\n\n' % i))
                await writer.drain()
            writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
            if close:
                return

    return answer


def run(coroutine: Awaitable[None]) -> None:
    asyncio.run(coroutine)  # type: ignore[arg-type]


def test_a_streamed_answer_arrives_whole_and_its_connection_is_reused() -> None:
    async def check() -> None:
        served = Server(streaming())
        async with served as url:
            transport = LeanTransport()
            for _ in range(3):
                response = await transport.handle_async_request(request_to(url, authorization="Bearer k"))
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
                body = await body_of(response)
                assert body.count(b"data: ") == 4 and body.endswith(b"data: [DONE]\n\n")
            assert served.connections == 1  # kept alive
            await transport.aclose()

    run(check())


def test_the_request_reaches_the_server_as_sent() -> None:
    async def check() -> None:
        got: list[tuple[bytes, bytes]] = []

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.append(await read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()

        async with Server(answer) as url:
            transport = LeanTransport()
            response = await transport.handle_async_request(request_to(url, b'{"a": 1}', authorization="Bearer k"))
            assert await body_of(response) == b"{}"
            head, body = got[0]
            assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
            assert b"\r\nauthorization: Bearer k\r\n" in head
            assert b"\r\ncontent-length: 8\r\n" in head.lower() and body == b'{"a": 1}'
            assert b"accept-encoding" not in head.lower()  # nothing compressed is asked for: the relay passes bytes
            await transport.aclose()

    run(check())


def test_a_server_that_says_close_gets_a_new_connection_next_time() -> None:
    async def check() -> None:
        served = Server(streaming(close=True))
        async with served as url:
            transport = LeanTransport()
            for _ in range(2):
                assert b"[DONE]" in await body_of(await transport.handle_async_request(request_to(url)))
            assert served.connections == 2
            await transport.aclose()

    run(check())


def test_a_body_without_a_length_ends_with_the_connection() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{"ok": true}')
        await writer.drain()

    async def check() -> None:
        async with Server(answer) as url:
            transport = LeanTransport()
            assert await body_of(await transport.handle_async_request(request_to(url))) == b'{"ok": true}'
            assert not transport._idle.get((url.host, url.port or 80))
            await transport.aclose()

    run(check())


def test_an_idle_connection_the_server_closed_is_not_reused() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()  # then closes without saying so, as cpp-httplib does after its keep-alive time

    async def check() -> None:
        served = Server(answer)
        async with served as url:
            transport = LeanTransport()
            for _ in range(2):
                assert await body_of(await transport.handle_async_request(request_to(url))) == b"{}"
                await asyncio.sleep(0.05)  # the close reaches the pooled connection
            assert served.connections == 2
            await transport.aclose()

    run(check())


def test_a_connection_closed_before_any_answer_is_a_remote_protocol_error() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # and closes: the proxy sends such a request once more

    async def check() -> None:
        async with Server(answer) as url:
            with pytest.raises(httpx.RemoteProtocolError):
                await LeanTransport().handle_async_request(request_to(url))

    run(check())


@pytest.mark.parametrize(
    "said",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (transport_module.MAX_HEAD_BYTES + 10) + b"\r\n\r\n",
    ],
    ids=["not-http", "two-lengths", "bad-chunk", "interim", "many-headers", "huge-head"],
)
def test_a_broken_or_hostile_answer_is_a_protocol_error(said: bytes) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(said)
        await writer.drain()
        await asyncio.sleep(1)

    async def check() -> None:
        async with Server(answer) as url:
            with pytest.raises(httpx.RemoteProtocolError):
                response = await LeanTransport().handle_async_request(request_to(url))
                await body_of(response)

    run(check())


def test_a_server_that_never_answers_times_out() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def check() -> None:
        async with Server(answer) as url:
            slow = request_to(url)
            slow.extensions["timeout"] = httpx.Timeout(0.2, connect=2.0).as_dict()
            with pytest.raises(httpx.ReadTimeout):
                await LeanTransport().handle_async_request(slow)

    run(check())


def test_a_stream_that_stalls_times_out_between_chunks() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(chunk(b"data: {}\n\n"))
        await writer.drain()
        await asyncio.sleep(5)

    async def check() -> None:
        async with Server(answer) as url:
            slow = request_to(url)
            slow.extensions["timeout"] = httpx.Timeout(0.3, connect=2.0).as_dict()
            response = await LeanTransport().handle_async_request(slow)
            with pytest.raises(httpx.ReadTimeout):
                await body_of(response)

    run(check())


def test_nothing_listening_is_a_connect_error() -> None:
    async def check() -> None:
        async with Server(streaming()) as url:
            pass  # closed: the port refuses
        with pytest.raises(httpx.ConnectError):
            await LeanTransport().handle_async_request(request_to(url))

    run(check())


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\0b"])
def test_a_header_that_would_split_the_head_is_refused(value: str) -> None:
    async def check() -> None:
        served = Server(streaming())
        async with served as url:
            request = request_to(url)
            request.headers["anthropic-beta"] = value
            with pytest.raises(httpx.LocalProtocolError):
                await LeanTransport().handle_async_request(request)
            assert served.connections == 0  # refused before a connection opened

    run(check())


def test_only_plain_http_is_spoken() -> None:
    async def check() -> None:
        with pytest.raises(httpx.UnsupportedProtocol):
            await LeanTransport().handle_async_request(httpx.Request("GET", "https://127.0.0.1:1/v1/models"))

    run(check())


def test_a_stream_left_early_closes_its_connection() -> None:
    async def check() -> None:
        served = Server(streaming(tokens=50))
        async with served as url:
            transport = LeanTransport()
            response = await transport.handle_async_request(request_to(url))
            async for _ in response.aiter_raw():
                break  # the client went away
            await response.aclose()
            assert not transport._idle.get((url.host, url.port or 80))  # its state is unknown: never reused
            assert b"[DONE]" in await body_of(await transport.handle_async_request(request_to(url)))
            assert served.connections == 2
            await transport.aclose()

    run(check())


def test_a_slow_reader_holds_back_the_server_rather_than_buffering_everything() -> None:
    big = b"x" * (4 * 1024 * 1024)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(big))
        writer.write(big)
        await writer.drain()

    async def check() -> None:
        async with Server(answer) as url:
            transport = LeanTransport()
            response = await transport.handle_async_request(request_to(url))
            got, most = 0, 0
            assert isinstance(response.stream, transport_module._Body)
            conn = response.stream.conn
            async for piece in response.aiter_raw():
                got += len(piece)
                await asyncio.sleep(0.01)  # a slow client
                most = max(most, conn.buffered)
            await response.aclose()
            assert got == len(big)
            # At most the read-ahead plus what one read of the socket brings (uvloop reads up to 256 KiB at once).
            assert most <= transport_module.MAX_BUFFERED + 512 * 1024
            await transport.aclose()

    run(check())
