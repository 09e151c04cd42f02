"""rpcrelay.py, the authenticated relay in front of ggml-rpc-server: real relay processes around a stand-in server
that records every byte it gets (the e2e two-node session runs the real ggml-rpc-server behind it)."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.cluster.jobscript import SCRIPTS_DIR

KEY = "7c1f" * 16


class Recorder(socketserver.BaseRequestHandler):
    """Stands in for ggml-rpc-server: echoes what it gets, and remembers it."""

    received: list[bytes] = []

    def handle(self) -> None:
        while data := self.request.recv(65536):
            Recorder.received.append(data)
            self.request.sendall(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def relay(tmp_path: Path, name: str, key: str, *args: str) -> subprocess.Popen[bytes]:
    key_file = tmp_path / name
    key_file.write_text(key + "\n")
    command = [
        sys.executable,
        str(SCRIPTS_DIR / "rpcrelay.py"),
        *args,
        "--key-file",
        str(key_file),
        "--handshake-timeout",
        "1",
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE)


@pytest.fixture
def rpc_server() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Recorder)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    Recorder.received = []
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture
def serving(rpc_server: int, tmp_path: Path) -> Iterator[int]:
    """The relay in front of the server, as on an RPC node; yields its port."""
    port = free_port()
    process = relay(tmp_path, "rpc_key", KEY, "serve", "--listen", "127.0.0.1", "--port", str(port),
                    "--upstream-port", str(rpc_server))  # fmt: skip
    wait_listening(port)
    yield port
    process.terminate()
    process.wait(timeout=10)


def connecting(tmp_path: Path, remote: int, key: str = KEY) -> Iterator[int]:
    port = free_port()
    process = relay(tmp_path, "client_key", key, "connect", "--map", f"{port}=127.0.0.1:{remote}")
    wait_listening(port)
    yield port
    process.terminate()
    process.wait(timeout=10)


def closed(s: socket.socket) -> bool:
    """The other side closed without a word (a reset too: it closes with our bytes unread)."""
    try:
        return s.recv(65536) == b""
    except ConnectionResetError:
        return True


def exchange(port: int, payload: bytes) -> bytes:
    """Send the payload as llama-server would and read what comes back until it is echoed whole or the relay closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        data = b""
        try:
            s.sendall(payload)
            s.settimeout(10)
            while chunk := s.recv(65536):
                data += chunk
                if data.endswith(payload):
                    break
        except (TimeoutError, ConnectionResetError, BrokenPipeError):  # a pause, or closed with our bytes unread
            pass
        return data


def test_the_sessions_llama_server_reaches_the_rpc_server_through_both_relays(serving: int, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 4096  # a megabyte, as weights cross at load time
    for local in connecting(tmp_path, serving):
        assert exchange(local, payload) == payload
    assert b"".join(Recorder.received) == payload


def test_a_connection_without_the_key_never_reaches_the_rpc_server(serving: int) -> None:
    hello = b"\x00" + (0).to_bytes(8, "little")  # a ggml RPC command, straight to the relay's port
    with socket.create_connection(("127.0.0.1", serving), timeout=5) as s:
        challenge = s.recv(200)
        s.sendall(hello)
        s.settimeout(5)
        assert closed(s)  # no answer, and closed once the handshake's time is up
    with socket.create_connection(("127.0.0.1", serving), timeout=5) as s:
        s.recv(200)
        s.sendall(b"x" * 200)  # garbage the length of a handshake: refused at once
        assert closed(s)
    assert challenge.startswith(b"HPCLLM-RPC1 ") and len(challenge.split()[1]) == 64
    assert Recorder.received == []


def test_a_relay_with_another_key_gets_nothing_through(serving: int, tmp_path: Path) -> None:
    for local in connecting(tmp_path, serving, key="0" * 64):
        assert exchange(local, b"weights") == b""
    assert Recorder.received == []


def test_a_recorded_handshake_cannot_be_replayed(serving: int, tmp_path: Path) -> None:
    """The proof answers a fresh challenge each time: the bytes a listener saw once open nothing later."""
    with socket.create_connection(("127.0.0.1", serving), timeout=5) as s:
        first = s.recv(200).split()[1]
    with socket.create_connection(("127.0.0.1", serving), timeout=5) as s:
        second = s.recv(200).split()[1]
    assert first != second


def test_the_client_side_sends_nothing_to_an_impostor_that_lacks_the_key(tmp_path: Path) -> None:
    """Something else listening at the relay's address learns neither the data nor the key."""
    got: list[bytes] = []

    class Impostor(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"HPCLLM-RPC1 " + b"a" * 64 + b"\n")
            self.request.settimeout(2)
            got.append(self.request.recv(65536))
            self.request.sendall(b"f" * 64 + b"\n")  # a made-up proof
            try:
                while data := self.request.recv(65536):
                    got.append(data)
            except OSError:
                pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        for local in connecting(tmp_path, int(server.server_address[1])):
            assert exchange(local, b"secret prompt activations") == b""
    finally:
        server.shutdown()
        server.server_close()
    # Each connection (the readiness probe's too) got one handshake line: a proof of 64 hex digits and a nonce. A
    # connection the client closed before its line arrived reads as empty: nothing was sent on it.
    lines = [line for line in got if line]
    assert lines and all(len(line) == 130 and KEY.encode() not in line for line in lines)
    assert b"secret" not in b"".join(got)


def test_a_handshake_sent_a_byte_at_a_time_is_cut_at_its_deadline(serving: int) -> None:
    # The relay gives the handshake 1 s in all; a byte every 0.3 s never waits that long for one read.
    with socket.create_connection(("127.0.0.1", serving), timeout=10) as s:
        started = time.monotonic()
        s.recv(200)

        def dribble() -> None:
            for _ in range(40):
                try:
                    s.send(b"a")
                except OSError:
                    return
                time.sleep(0.3)

        threading.Thread(target=dribble, daemon=True).start()
        assert closed(s)
        took = time.monotonic() - started
    assert took < 2.5, f"held for {took:.1f} s"
    assert Recorder.received == []


def test_one_address_holding_its_places_does_not_keep_the_sessions_relay_out(serving: int, tmp_path: Path) -> None:
    # Another address on this machine (127.0.0.2) opens every place there is and says nothing.
    held = [
        socket.create_connection(("127.0.0.1", serving), timeout=5, source_address=("127.0.0.2", 0)) for _ in range(16)
    ]
    try:
        time.sleep(0.2)
        challenged = 0
        for s in held:
            s.settimeout(0.5)
            with contextlib.suppress(TimeoutError, ConnectionResetError):  # closed at once, or nothing
                challenged += s.recv(200).startswith(b"HPCLLM-RPC1 ")
        assert challenged == 4  # its own share; the rest closed at once
        for local in connecting(tmp_path, serving):
            assert exchange(local, b"weights") == b"weights"
    finally:
        for s in held:
            s.close()
