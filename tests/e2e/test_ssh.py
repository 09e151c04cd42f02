"""portal/ssh.py against the real sshd of the local cluster: pinning, pooling, errors, bounded output, tunnels."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

from portal import ssh
from portal.ssh import SSHPool, SSHTarget

pytestmark = pytest.mark.e2e


@pytest.fixture
def target(local_cluster: dict[str, Any]) -> SSHTarget:
    return SSHTarget(
        host=local_cluster["host"],
        port=local_cluster["port"],
        username=local_cluster["user"],
        host_keys=local_cluster["host_key_line"],
        private_key=Path(local_cluster["private_key"]).read_text(),
        connect_timeout_s=5,
    )


@pytest.fixture
def pool() -> Iterator[SSHPool]:
    p = SSHPool()
    yield p
    p.close_all()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never says anything (a hung login host)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_command_returns_exit_code_stdout_and_stderr(pool: SSHPool, target: SSHTarget) -> None:
    result = pool.run(target, "echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr, result.truncated) == (3, "out\n", "err\n", False)
    assert not result.ok


def test_stdin_reaches_the_command_without_touching_the_command_line(pool: SSHPool, target: SSHTarget) -> None:
    secret = b"key-material; $(rm -rf ~)\n"
    assert pool.run(target, "cat", stdin=secret).stdout.encode() == secret


def test_connections_are_pooled_and_reopened_after_they_break(pool: SSHPool, target: SSHTarget) -> None:
    for _ in range(5):
        assert pool.run(target, "true").ok
    assert pool.connects == 1
    transport = pool.client(target).get_transport()
    assert transport is not None
    transport.close()
    assert pool.run(target, "echo again").stdout == "again\n"
    assert pool.connects == 2


def test_output_is_bounded_but_the_command_still_completes(pool: SSHPool, target: SSHTarget) -> None:
    result = pool.run(target, "head -c 300000 /dev/zero | tr '\\0' x; echo done >&2", max_output_bytes=1000)
    assert result.ok
    assert result.truncated
    assert len(result.stdout) == 1000
    assert result.stderr == "done\n"


def test_a_slow_command_times_out_with_a_clear_error(pool: SSHPool, target: SSHTarget) -> None:
    with pytest.raises(ssh.SSHTimeout, match="did not finish within 1 s") as exc:
        pool.run(target, "sleep 10", timeout_s=1)
    assert exc.value.transient
    assert pool.run(target, "echo fine").ok  # the pool recovers with a fresh connection


def test_an_unpinned_host_is_refused_before_connecting(pool: SSHPool, target: SSHTarget) -> None:
    with pytest.raises(ssh.HostKeyNotPinned, match="no host key is pinned") as exc:
        pool.run(SSHTarget(**{**target.__dict__, "host_keys": ""}), "true")
    assert not exc.value.transient


def test_a_different_host_key_is_refused(pool: SSHPool, target: SSHTarget) -> None:
    _, public_line = ssh.generate_keypair("impostor")
    wrong = f"[{target.host}]:{target.port} {public_line}"
    with pytest.raises(ssh.HostKeyMismatch, match="not the pinned one") as exc:
        pool.run(SSHTarget(**{**target.__dict__, "host_keys": wrong}), "true")
    assert not exc.value.transient


def test_a_key_of_another_type_pinned_is_refused(pool: SSHPool, target: SSHTarget) -> None:
    rsa = paramiko.RSAKey.generate(2048)
    wrong = f"[{target.host}]:{target.port} {rsa.get_name()} {rsa.get_base64()}"
    with pytest.raises(ssh.HostKeyMismatch):
        pool.run(SSHTarget(**{**target.__dict__, "host_keys": wrong}), "true")


def test_a_key_not_in_authorized_keys_fails_authentication(pool: SSHPool, target: SSHTarget) -> None:
    private, _ = ssh.generate_keypair("stranger")
    with pytest.raises(ssh.AuthenticationFailed, match="authorized_keys") as exc:
        pool.run(SSHTarget(**{**target.__dict__, "private_key": private}), "true")
    assert not exc.value.transient


def test_a_garbled_private_key_is_an_authentication_error(pool: SSHPool, target: SSHTarget) -> None:
    with pytest.raises(ssh.AuthenticationFailed, match="cannot be used"):
        pool.run(SSHTarget(**{**target.__dict__, "private_key": "not a key"}), "true")


def test_a_closed_port_is_a_transient_refusal(pool: SSHPool, target: SSHTarget) -> None:
    with pytest.raises(ssh.ConnectionRefused, match="connection refused") as exc:
        pool.run(SSHTarget(**{**target.__dict__, "port": free_port()}), "true")
    assert exc.value.transient


def test_a_host_that_never_answers_times_out(pool: SSHPool, target: SSHTarget, silent_server: int) -> None:
    hung = SSHTarget(**{**target.__dict__, "port": silent_server, "connect_timeout_s": 1})
    with pytest.raises(ssh.SSHTimeout) as exc:
        pool.run(hung, "true")
    assert exc.value.transient


def test_a_tunnel_reaches_a_port_through_the_login_host(pool: SSHPool, target: SSHTarget) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def echo_once() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(conn.recv(1024).upper())

    thread = threading.Thread(target=echo_once, daemon=True)
    thread.start()
    channel = pool.open_tunnel(target, "127.0.0.1", server.getsockname()[1])
    channel.sendall(b"through the tunnel")
    assert channel.recv(1024) == b"THROUGH THE TUNNEL"
    channel.close()
    thread.join(5)
    server.close()
    with pytest.raises(ssh.SSHUnavailable, match="cannot reach"):
        pool.open_tunnel(target, "127.0.0.1", free_port())


def test_generated_keys_load_and_the_public_line_is_authorized_keys_format() -> None:
    private, public = ssh.generate_keypair("ada@portal")
    key = ssh.load_private_key(private)
    assert public == f"ssh-ed25519 {key.get_base64()} ada@portal"
    assert "PRIVATE" not in repr(SSHTarget("h", 22, "u", "k", private))
