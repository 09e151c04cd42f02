"""keyproxy.py, the key check in front of ollama: a real proxy process in front of a real HTTP server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from jobs.cluster.jobscript import SCRIPTS_DIR

KEY = "sk-hpcllm-test-key"


class Upstream(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        Upstream.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        body = json.dumps({"path": self.path, "authorization": self.headers.get("Authorization")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # streams its answer in chunks, as ollama does
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(3):
            chunk = f'{{"part": {i}}}\n'.encode()
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: object) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[str]:
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    key_file = tmp_path / "api_key"
    key_file.write_text(KEY + "\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(SCRIPTS_DIR / "keyproxy.py"), "--listen", "127.0.0.1", "--port", str(port),
         "--upstream-port", str(upstream.server_address[1]), "--key-file", str(key_file)],
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(f"{url}/health", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    Upstream.seen.clear()
    yield url
    process.terminate()
    process.wait(timeout=10)
    upstream.shutdown()


def test_requests_without_the_key_never_reach_the_server(proxy: str) -> None:
    assert httpx.get(f"{proxy}/api/tags", timeout=5).status_code == 401
    assert httpx.get(f"{proxy}/api/tags", headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
    assert httpx.get(f"{proxy}/api/tags", headers={"Authorization": f"Basic {KEY}"}, timeout=5).status_code == 401
    assert Upstream.seen == []


def test_requests_with_the_key_pass_without_it(proxy: str) -> None:
    reply = httpx.get(f"{proxy}/api/tags", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert reply.status_code == 200
    assert reply.json() == {"path": "/api/tags", "authorization": None}
    assert Upstream.seen[0]["connection"] == "close"


def test_streamed_answers_arrive_whole(proxy: str) -> None:
    with httpx.stream(
        "POST", f"{proxy}/api/chat", headers={"Authorization": f"Bearer {KEY}"}, json={"x": 1}, timeout=5
    ) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert lines == ['{"part": 0}', '{"part": 1}', '{"part": 2}']


def test_a_second_request_on_the_same_connection_is_not_let_through_unchecked(proxy: str) -> None:
    host, port = proxy.removeprefix("http://").split(":")
    first = f"GET /one HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"
    second = "GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall((first + second).encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.") == 1
    assert [seen["path"] for seen in Upstream.seen] == ["/one"]


def test_the_health_check_needs_no_key(proxy: str) -> None:
    assert httpx.get(f"{proxy}/health", timeout=5).json() == {"status": "ok"}
