"""A key-checking reverse proxy for servers without an API key (ollama). Python standard library only.

Listens on the node's address and forwards a request to 127.0.0.1:UPSTREAM only when it carries
"Authorization: Bearer <key>" with the session's key (compared in constant time). One request per connection:
the upstream is told "Connection: close", so bytes after the first request can never reach it unchecked.
GET /health answers 200 without a key while the upstream accepts connections (the job's readiness check).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
from pathlib import Path

MAX_HEAD_BYTES = 64 * 1024


def _response(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()


class Proxy:
    def __init__(self, upstream_port: int, key: str) -> None:
        self.upstream_port = upstream_port
        self.key = key.encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        request_line, header_lines = lines[0], [line for line in lines[1:] if line]
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            writer.write(_response("400 Bad Request", b'{"error": "bad request"}'))
            return
        method, path = parts[0], parts[1]
        headers: list[tuple[str, str]] = []
        token = b""
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                writer.write(_response("400 Bad Request", b'{"error": "bad header"}'))
                return
            if name.strip().lower() == "authorization":
                scheme, _, credential = value.strip().partition(" ")
                if scheme.lower() == "bearer":
                    token = credential.strip().encode()
                continue  # the key stops here
            if name.strip().lower() in {"connection", "keep-alive", "proxy-connection"}:
                continue
            headers.append((name.strip(), value.strip()))
        if method == "GET" and path == "/health":
            await self._health(writer)
            return
        if not hmac.compare_digest(token, self.key):
            writer.write(_response("401 Unauthorized", b'{"error": "invalid API key"}'))
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        out = [request_line, *(f"{name}: {value}" for name, value in headers), "Connection: close", "", ""]
        up_writer.write("\r\n".join(out).encode("latin-1"))
        await up_writer.drain()
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        up_writer.close()

    async def _health(self, writer: asyncio.StreamWriter) -> None:
        try:
            _, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.write(_response("503 Service Unavailable", b'{"status": "upstream down"}'))
            return
        up_writer.close()
        writer.write(_response("200 OK", b'{"status": "ok"}'))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--key-file", type=Path, required=True)
    args = parser.parse_args()
    key = args.key_file.read_text().strip()
    if not key:
        raise SystemExit("keyproxy: the key file is empty")
    proxy = Proxy(args.upstream_port, key)
    server = await asyncio.start_server(proxy.handle, args.listen, args.port, limit=MAX_HEAD_BYTES)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
