"""portal/outbound.py: the portal's own HTTP requests go straight to the address, whatever proxy the environment
names, and read a bounded reply. A real server and a real listener standing in for a site's proxy, both on loopback.
The callers (a session's health check, the chat's plain-form ask) are tested with these in their own test files."""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from portal import outbound

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class Server(BaseHTTPRequestHandler):
    """/health: a little JSON (or Server.health_bytes of it); /size/N: N bytes with their length; /stream/N: N bytes
    chunked, no length; /gzip/N: N zeros gzipped (a few KiB on the wire); POST /v1/chat/completions: a completion,
    padded to Server.pad bytes."""

    pad = health_bytes = 0

    def do_GET(self) -> None:
        kind, _, n = self.path.strip("/").partition("/")
        if kind == "health":
            self.answer(b'{"status": "ok"}'.ljust(Server.health_bytes))
        elif kind == "size":
            self.answer(b"x" * int(n))
        elif kind == "gzip":
            self.answer(gzip.compress(bytes(int(n))), {"Content-Encoding": "gzip"})
        elif kind == "stream":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            left = int(n)
            while left:
                piece = min(left, 1 << 20)
                self.wfile.write(f"{piece:x}\r\n".encode() + b"x" * piece + b"\r\n")
                left -= piece
            self.wfile.write(b"0\r\n\r\n")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        reply = {"choices": [{"message": {"content": "hello back"}}], "usage": {"prompt_tokens": 3}, "pad": ""}
        reply["pad"] = "x" * max(0, Server.pad - len(json.dumps(reply)))
        self.answer(json.dumps(reply).encode())

    def answer(self, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(OSError):  # the client stopped reading: what the bound is for
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving() -> Iterator[httpx.URL]:
    """The model server, on loopback; its base URL."""
    Server.pad = Server.health_bytes = 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Server)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield httpx.URL(scheme="http", host="127.0.0.1", port=httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server() -> Iterator[httpx.URL]:
    with serving() as url:
        yield url


class Listener:
    """What the environment names as the proxy: a loopback port that counts the connections it gets."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.heard = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.heard += 1
            conn.close()


@contextlib.contextmanager
def proxy_named_in_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    """Every proxy variable names a listener that must hear nothing; nothing is exempt (NO_PROXY unset)."""
    listener = Listener()
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, f"http://127.0.0.1:{listener.port}")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield listener
    finally:
        listener.sock.close()


@pytest.fixture
def proxy_in_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    with proxy_named_in_env(monkeypatch) as listener:
        yield listener


def test_httpx_itself_would_send_the_request_to_the_environments_proxy(
    server: httpx.URL, proxy_in_env: Listener
) -> None:
    """The hazard the module exists for, shown on this machine: httpx's defaults trust the environment."""
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.copy_with(path="/health"), timeout=5)
    assert proxy_in_env.heard == 1


def test_a_request_goes_straight_to_the_server_whatever_proxy_the_environment_names(
    server: httpx.URL, proxy_in_env: Listener
) -> None:
    reply = outbound.request("GET", server.copy_with(path="/health"), timeout=5)
    assert reply.status_code == 200 and reply.json() == {"status": "ok"}
    assert proxy_in_env.heard == 0


@pytest.mark.parametrize("path", ["/size/5000", "/stream/5000", "/gzip/5000"], ids=["declared", "chunked", "gzip"])
def test_a_reply_larger_than_the_bound_is_refused(server: httpx.URL, path: str) -> None:
    with pytest.raises(outbound.ReplyTooLarge, match="larger than 4,096 bytes"):
        outbound.request("GET", server.copy_with(path=path), timeout=5, max_bytes=4096)
    assert len(outbound.request("GET", server.copy_with(path=path), timeout=5, max_bytes=5000).content) == 5000


def test_a_reply_that_inflates_far_past_the_bound_is_refused_without_being_inflated_whole(server: httpx.URL) -> None:
    # 64 MiB of zeros are about 64 KiB gzipped; refused at the first chunk past 1 MiB.
    with pytest.raises(outbound.ReplyTooLarge):
        outbound.request("GET", server.copy_with(path=f"/gzip/{64 << 20}"), timeout=30, max_bytes=1 << 20)


def test_the_default_bound_is_the_modules(server: httpx.URL) -> None:
    with pytest.raises(outbound.ReplyTooLarge):
        outbound.request("GET", server.copy_with(path=f"/stream/{outbound.MAX_REPLY_BYTES + 1}"), timeout=30)
