"""A key-checking reverse proxy in front of a model server that must not be reached without the session's key
(ollama has no key at all; vLLM's key guards only /v1). Python standard library only: compute nodes need nothing else.

Listens on the node's address and forwards a request to the server, which listens only where the user alone can
reach it (a Unix socket in the 0700 session directory, or 127.0.0.1 on a node the job holds with --exclusive=user),
only when it carries "Authorization: Bearer <key>" with the session's key (compared in constant time); the key goes
no further. Exactly one request per connection: its body is forwarded by its Content-Length and nothing after it, so
bytes after the first request can never reach the server unchecked. GET /health answers without a key: 200 when the
server answers 200 on its own health path (the job's readiness check), else 503.

Limits, so nobody on the network can tie it up: the whole request head must arrive within --head-timeout seconds
of the connection (however the client spreads its bytes) and its body without a pause longer than --read-timeout; at
most --max-connections at once, of which one address holds at most --max-per-address before it has shown the key (the
next get 503 at once): someone without the key cannot take every place from the portal, whose connections show it in
their first milliseconds. Bodies above --max-body-bytes get 413. A client that goes away mid-answer closes the
server's connection, so the server stops generating.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
from collections.abc import Callable
from pathlib import Path

MAX_HEAD_BYTES = 64 * 1024
CHUNK = 256 * 1024


def _response(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


class Refused(Exception):
    """The request cannot go on: the answer to send, then close."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.answer = _response(status, b'{"error": "%s"}' % message.encode())


class Proxy:
    def __init__(self, upstream: str, key: str, args: argparse.Namespace) -> None:
        self.upstream = upstream  # "unix:/path" or "127.0.0.1:port"
        self.key = key.encode()
        self.health_path = args.health_path
        self.head_timeout = args.head_timeout
        self.read_timeout = args.read_timeout
        self.max_body = args.max_body_bytes
        self.max_connections = args.max_connections
        self.max_per_address = args.max_per_address
        self.active = 0
        self.unproven: dict[str, int] = {}  # address -> its connections that have not shown the key yet

    async def open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.upstream.startswith("unix:"):
            return await asyncio.open_unix_connection(self.upstream[5:], limit=CHUNK)
        host, _, port = self.upstream.rpartition(":")
        return await asyncio.open_connection(host, int(port), limit=CHUNK)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = str(peer[0] if isinstance(peer, tuple) else peer)
        if self.active >= self.max_connections or self.unproven.get(address, 0) >= self.max_per_address:
            writer.write(_response("503 Service Unavailable", b'{"error": "too many connections"}'))
            with contextlib.suppress(OSError):
                writer.close()
            return
        self.active += 1
        self.unproven[address] = self.unproven.get(address, 0) + 1
        counted = True

        def proven() -> None:
            """The connection showed the key (or ended): it no longer counts against its address."""
            nonlocal counted
            if counted:
                counted = False
                self.unproven[address] -= 1
                if not self.unproven[address]:
                    del self.unproven[address]

        try:
            await self._handle(reader, writer, proven)
        except Refused as refused:
            writer.write(refused.answer)
        except asyncio.TimeoutError:  # before OSError, of which it is a kind
            writer.write(_response("408 Request Timeout", b'{"error": "request too slow"}'))
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            proven()
            self.active -= 1
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()

    async def _head(self, reader: asyncio.StreamReader) -> tuple[str, str, list[tuple[str, str]], bytes, int]:
        """The request line's method and target, the headers to forward, the bearer token, the body's length."""
        # One deadline for the whole head, not one a read: a client sending a byte a second never gets past it.
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.head_timeout)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise Refused("400 Bad Request", "bad request line")
        headers: list[tuple[str, str]] = []
        token, length = b"", 0
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            name, value = name.strip(), value.strip()
            lower = name.lower()
            if not sep or not name or any(c in name for c in " \t"):
                raise Refused("400 Bad Request", "bad header")
            if lower == "authorization":
                scheme, _, credential = value.partition(" ")
                if scheme.lower() == "bearer":
                    token = credential.strip().encode()
                continue  # the key stops here
            if lower == "transfer-encoding":
                # Only a Content-Length says where one request ends; the portal always sends one.
                raise Refused("411 Length Required", "send the body with a Content-Length")
            if lower == "content-length":
                if not value.isdigit() or (length and int(value) != length):
                    raise Refused("400 Bad Request", "bad Content-Length")
                length = int(value)
            if lower in {"connection", "keep-alive", "proxy-connection", "upgrade"}:
                continue
            headers.append((name, value))
        return parts[0], parts[1], headers, token, length

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proven: Callable[[], None]
    ) -> None:
        method, target, headers, token, length = await self._head(reader)
        if method == "GET" and target == "/health":
            await self._health(writer)
            return
        if not hmac.compare_digest(token, self.key):
            raise Refused("401 Unauthorized", "invalid API key")
        proven()
        if length > self.max_body:
            raise Refused("413 Content Too Large", "request body too large")
        # The whole body first (only a key holder gets this far, so only the portal can make it hold memory): the
        # server never sees half a request, and a slow client never ties it up.
        body = bytearray()
        while len(body) < length:
            chunk = await asyncio.wait_for(reader.read(min(length - len(body), CHUNK)), self.read_timeout)
            if not chunk:
                return  # the client went away before its body was whole: the server gets no request
            body += chunk
        try:
            up_reader, up_writer = await self.open_upstream()
        except OSError as exc:
            raise Refused("502 Bad Gateway", "the model server does not accept connections") from exc
        try:
            out = [f"{method} {target} HTTP/1.1", *(f"{n}: {v}" for n, v in headers), "Connection: close", "", ""]
            up_writer.write("\r\n".join(out).encode("latin-1") + body)
            await up_writer.drain()
            # The answer goes back as it comes. Whatever the client sends now is not forwarded; its end (it went
            # away) ends the answer, and closing the server's connection makes it stop generating.
            relay = asyncio.ensure_future(_copy(up_reader, writer))
            gone = asyncio.ensure_future(_until_closed(reader))
            await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
            for task in (relay, gone):
                task.cancel()
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                up_writer.close()

    async def _health(self, writer: asyncio.StreamWriter) -> None:
        status = "503 Service Unavailable"
        with contextlib.suppress(OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            up_reader, up_writer = await asyncio.wait_for(self.open_upstream(), 5)
            try:
                request = f"GET {self.health_path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                up_writer.write(request.encode())
                line = await asyncio.wait_for(up_reader.readline(), 10)
                if line.split(b" ")[1:2] == [b"200"]:
                    status = "200 OK"
            finally:
                up_writer.close()
        body = b'{"status": "ok"}' if status == "200 OK" else b'{"status": "not ready"}'
        writer.write(_response(status, body))


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while chunk := await reader.read(CHUNK):
            writer.write(chunk)
            await writer.drain()


async def _until_closed(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while await reader.read(CHUNK):
            pass


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--port", type=int, required=True)
    upstream = parser.add_mutually_exclusive_group(required=True)
    upstream.add_argument("--upstream-port", type=int, help="the server listens on 127.0.0.1:PORT")
    upstream.add_argument("--upstream-socket", type=Path, help="the server listens on this Unix socket")
    parser.add_argument("--key-file", type=Path, required=True)
    parser.add_argument("--health-path", default="/health", help="the server's own readiness path")
    parser.add_argument("--head-timeout", type=float, default=30.0)
    parser.add_argument("--read-timeout", type=float, default=60.0)
    parser.add_argument("--max-connections", type=int, default=128)
    parser.add_argument("--max-per-address", type=int, default=16, help="of those without the key yet")
    parser.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024)
    return parser.parse_args()


async def main() -> None:
    args = parse_args()
    key = args.key_file.read_text().strip()
    if not key:
        raise SystemExit("keyproxy: the key file is empty")
    upstream = f"unix:{args.upstream_socket}" if args.upstream_socket else f"127.0.0.1:{args.upstream_port}"
    proxy = Proxy(upstream, key, args)
    server = await asyncio.start_server(proxy.handle, args.listen, args.port, limit=MAX_HEAD_BYTES)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
