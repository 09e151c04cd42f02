"""keyproxy.py, the key check in front of ollama and vLLM: a real proxy process in front of a real HTTP server."""

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
    ready = True

    def do_GET(self) -> None:
        if self.path == "/ready":  # the server's own health path: 503 while it loads, as vLLM's /health
            self.send_response(200 if Upstream.ready else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        Upstream.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        body = json.dumps({"path": self.path, "authorization": self.headers.get("Authorization")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # streams its answer in chunks, as ollama does
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        Upstream.seen.append({"path": self.path, "body": body.decode()})
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


class UnixUpstream(ThreadingHTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:  # HTTPServer's would take the path for a host name
        self.socket.bind(self.server_address)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        conn, _ = self.socket.accept()
        return conn, ("local", 0)  # BaseHTTPRequestHandler wants a (host, port) client address


def start_proxy(upstream: list[str], tmp_path: Path, *options: str) -> Iterator[str]:
    key_file = tmp_path / "api_key"
    key_file.write_text(KEY + "\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(SCRIPTS_DIR / "keyproxy.py"), "--listen", "127.0.0.1", "--port", str(port),
         *upstream, "--key-file", str(key_file), "--health-path", "/ready", *options],
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(f"{url}/health", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    Upstream.seen.clear()
    Upstream.ready = True
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def upstream() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture
def proxy(upstream: ThreadingHTTPServer, tmp_path: Path) -> Iterator[str]:
    yield from start_proxy(["--upstream-port", str(upstream.server_address[1])], tmp_path)


@pytest.fixture
def tight_proxy(upstream: ThreadingHTTPServer, tmp_path: Path) -> Iterator[str]:
    """Small limits, so a test can reach them."""
    yield from start_proxy(
        ["--upstream-port", str(upstream.server_address[1])], tmp_path,
        "--head-timeout", "0.5", "--read-timeout", "0.5", "--max-connections", "3", "--max-body-bytes", "1000",
    )  # fmt: skip


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


def test_the_health_check_needs_no_key_and_is_the_servers_own(proxy: str) -> None:
    assert httpx.get(f"{proxy}/health", timeout=5).json() == {"status": "ok"}
    Upstream.ready = False  # loading: the job must not say it is ready yet
    assert httpx.get(f"{proxy}/health", timeout=5).status_code == 503


def test_every_route_needs_the_key_including_those_vllm_leaves_open(proxy: str) -> None:
    for path in ("/invocations", "/pooling", "/score", "/tokenize", "/metrics", "/v1/models", "/ready?x"):
        assert httpx.post(f"{proxy}{path}", json={}, timeout=5).status_code == 401, path
    assert Upstream.seen == []


def test_the_body_is_forwarded_by_its_length_and_nothing_after_it(proxy: str) -> None:
    host, port = proxy.removeprefix("http://").split(":")
    body = '{"a": 1}'
    first = f"POST /one HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    smuggled = "GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall((first + body + smuggled).encode())
        while s.recv(65536):
            pass
    assert Upstream.seen == [{"path": "/one", "body": body}]


def test_a_chunked_body_is_refused_before_it_reaches_the_server(proxy: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"a": 1}'

    reply = httpx.post(f"{proxy}/api/chat", headers={"Authorization": f"Bearer {KEY}"}, content=chunks(), timeout=5)
    assert reply.status_code == 411 and Upstream.seen == []


def test_a_body_above_the_limit_is_refused(tight_proxy: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{tight_proxy}/api/chat", headers=auth, content=b"x" * 1001, timeout=5).status_code == 413
    assert httpx.post(f"{tight_proxy}/api/chat", headers=auth, content=b"x" * 1000, timeout=5).status_code == 200
    assert len(Upstream.seen) == 1


def test_a_slow_client_is_cut_off(tight_proxy: str) -> None:
    host, port = tight_proxy.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:  # a head that never ends
        s.sendall(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 408")
    with socket.create_connection((host, int(port)), timeout=5) as s:  # a body that never comes
        s.sendall(f"POST /api/chat HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 10\r\n\r\nab".encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 408")
    assert Upstream.seen == []


def test_connections_above_the_limit_are_turned_away_at_once(tight_proxy: str) -> None:
    host, port = tight_proxy.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(3)]
    try:
        time.sleep(0.1)  # the proxy has accepted them; none has sent its head
        with socket.create_connection((host, int(port)), timeout=5) as s:
            assert s.recv(65536).startswith(b"HTTP/1.1 503")
    finally:
        for s in held:
            s.close()
    time.sleep(0.7)  # their head timeout frees the places
    assert httpx.get(f"{tight_proxy}/x", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).status_code == 200


def test_a_server_on_a_unix_socket_is_reached_only_through_the_proxy(tmp_path: Path) -> None:
    path = tmp_path / "server.sock"
    server = UnixUpstream(str(path), Upstream)  # type: ignore[arg-type]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        for url in start_proxy(["--upstream-socket", str(path)], tmp_path):
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            assert httpx.get(f"{url}/tokenize", timeout=5).status_code == 401
            reply = httpx.get(f"{url}/tokenize", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
            assert reply.json() == {"path": "/tokenize", "authorization": None}
    finally:
        server.shutdown()


def dribble(s: socket.socket, data: bytes, every_s: float, until_s: float) -> threading.Thread:
    """Send `data` a byte at a time, one every `every_s`, until it is sent, the socket fails or `until_s` passed."""

    def send() -> None:
        end = time.monotonic() + until_s
        for byte in data:
            if time.monotonic() > end:
                return
            try:
                s.send(bytes([byte]))
            except OSError:
                return
            time.sleep(every_s)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_a_head_sent_a_byte_at_a_time_is_cut_at_its_deadline(upstream: ThreadingHTTPServer, tmp_path: Path) -> None:
    # A byte every 0.2 s is well within any wait between reads; the head as a whole still has 1 s.
    for url in start_proxy(["--upstream-port", str(upstream.server_address[1])], tmp_path, "--head-timeout", "1"):
        host, port = url.removeprefix("http://").split(":")
        head = f"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Padding: {'p' * 100}\r\nAuthorization: Bearer {KEY}\r\n\r\n"
        with socket.create_connection((host, int(port)), timeout=10) as s:
            started = time.monotonic()
            dribble(s, head.encode(), 0.2, 10)
            answer = s.recv(65536)
            took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408") and 0.9 < took < 2.5
    assert Upstream.seen == []


def from_address(url: str, source: str) -> socket.socket:
    """A connection to the proxy from another loopback address (127.0.0.2 is this machine too)."""
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0))


def test_one_address_without_the_key_cannot_take_every_place(upstream: ThreadingHTTPServer, tmp_path: Path) -> None:
    options = ("--head-timeout", "5", "--max-connections", "8", "--max-per-address", "2")
    for url in start_proxy(["--upstream-port", str(upstream.server_address[1])], tmp_path, *options):
        held = [from_address(url, "127.0.0.2") for _ in range(8)]  # every place, if it could
        try:
            time.sleep(0.2)
            turned_away = 0
            for s in held[2:]:
                s.settimeout(2)
                turned_away += s.recv(65536).startswith(b"HTTP/1.1 503")
            assert turned_away == 6
            # The portal's address still gets in, while the first two wait for their head's deadline.
            reply = httpx.get(f"{url}/api/tags", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
            assert reply.status_code == 200
        finally:
            for s in held:
                s.close()


def test_connections_that_showed_the_key_do_not_count_against_their_address(
    upstream: ThreadingHTTPServer, tmp_path: Path
) -> None:
    options = ("--max-connections", "8", "--max-per-address", "2", "--read-timeout", "5")
    for url in start_proxy(["--upstream-port", str(upstream.server_address[1])], tmp_path, *options):
        head = f"POST /api/chat HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 10\r\n\r\nab"
        waiting = [from_address(url, "127.0.0.1") for _ in range(3)]  # the portal's long requests, key shown
        try:
            for s in waiting:
                s.sendall(head.encode())
            time.sleep(0.2)
            reply = httpx.get(f"{url}/api/tags", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
            assert reply.status_code == 200
        finally:
            for s in waiting:
                s.close()
