"""SSH to cluster login hosts with paramiko: pinned host keys, pooled connections, bounded commands, tunnels.

Knows SSH and nothing of Slurm or Django. Every failure becomes an SSHError subclass whose message says what went
wrong in words an admin can act on, and whose `transient` flag tells callers whether a retry can help (a refused or
timed-out connection) or not (a wrong host key, a rejected key).

Pools are per process: Celery's prefork workers each build their own after the fork, since a paramiko transport
must never be shared across processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_COMMAND_TIMEOUT_S = 60.0
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20
KEEPALIVE_S = 30
STREAM_CHUNK_TIMEOUT_S = 300.0  # a streamed standard input: the most one chunk may wait for the command to take it


class SSHError(Exception):
    """A failure to reach or use a cluster over SSH."""

    transient = True

    def __init__(self, target: SSHTarget | None, message: str) -> None:
        where = f"{target.username}@{target.host}:{target.port}: " if target else ""
        super().__init__(f"{where}{message}")


class HostKeyNotPinned(SSHError):
    transient = False


class HostKeyMismatch(SSHError):
    transient = False


class AuthenticationFailed(SSHError):
    transient = False


class ConnectionRefused(SSHError):
    pass


class SSHTimeout(SSHError):
    pass


class SSHUnavailable(SSHError):
    pass


@dataclass(frozen=True)
class SSHTarget:
    """Everything needed to open one SSH connection. The private key stays in memory and out of repr()."""

    host: str
    port: int
    username: str
    host_keys: str = field(repr=False)
    private_key: str = field(repr=False)
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S

    @property
    def pool_key(self) -> tuple[str, int, str, str]:
        digest = hashlib.sha256(f"{self.private_key}\0{self.host_keys}".encode()).hexdigest()
        return (self.host, self.port, self.username, digest)


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def generate_keypair(comment: str) -> tuple[str, str]:
    """A new ed25519 key pair: (private key in OpenSSH format, public key line for authorized_keys)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, f"{public.decode()} {comment}".strip()


def load_private_key(text: str) -> paramiko.PKey:
    """Parse an unencrypted OpenSSH or PEM private key of any type paramiko supports."""
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError):
            continue
    raise ValueError("not an unencrypted ed25519, ECDSA or RSA private key")


def _pinned_client(target: SSHTarget) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    pinned = 0
    for line in target.host_keys.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
        except (paramiko.SSHException, paramiko.hostkeys.InvalidHostKey, ValueError):
            entry = None
        if entry is None:
            raise HostKeyNotPinned(target, f"the pinned host key line {line[:60]!r} cannot be parsed")
        for name in entry.hostnames:
            # Hashed (|1|...) names work here too: paramiko matches them when it looks the host up.
            client.get_host_keys().add(name, entry.key.get_name(), entry.key)
            pinned += 1
    if not pinned:
        raise HostKeyNotPinned(
            target, "no host key is pinned for this cluster; an admin must add its known_hosts line to the catalog"
        )
    # Never trust on first use: an unknown host is refused, and a changed key raises BadHostKeyException.
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


def connect(target: SSHTarget) -> paramiko.SSHClient:
    """Open a connection that trusts only the pinned host key; raise an SSHError saying why it failed."""
    client = _pinned_client(target)
    try:
        pkey = load_private_key(target.private_key)
    except ValueError as exc:
        raise AuthenticationFailed(target, f"the account's private key cannot be used: {exc}") from None
    timeout = target.connect_timeout_s
    try:
        client.connect(
            target.host,
            port=target.port,
            username=target.username,
            pkey=pkey,
            look_for_keys=False,
            allow_agent=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
        )
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostKeyMismatch(
            target,
            f"the server's host key ({exc.key.get_name()} {exc.key.fingerprint}) is not the pinned one "
            f"({exc.expected_key.get_name()} {exc.expected_key.fingerprint}); refusing to connect. If the cluster "
            "really changed its key, an admin must check the new fingerprint with the site and pin it.",
        ) from None
    except paramiko.AuthenticationException as exc:
        client.close()
        raise AuthenticationFailed(
            target, f"the server rejected the key ({exc}); is the public key in ~/.ssh/authorized_keys?"
        ) from None
    except paramiko.ssh_exception.NoValidConnectionsError as exc:
        client.close()
        refused = all(isinstance(e, ConnectionRefusedError) for e in exc.errors.values())
        if refused:
            raise ConnectionRefused(target, "connection refused (is sshd running on that port?)") from None
        raise SSHUnavailable(target, f"cannot connect: {exc}") from None
    except TimeoutError:
        client.close()
        raise SSHTimeout(target, f"no SSH answer within {timeout:g} s") from None
    except socket.gaierror as exc:
        client.close()
        raise SSHUnavailable(target, f"cannot resolve the host name: {exc.strerror}") from None
    except paramiko.SSHException as exc:
        # The first failure (e.g. no banner in time) is saved on the transport; what is raised can be a later one
        # ("No existing session"), so classify on both.
        transport = client.get_transport()
        saved = getattr(transport, "saved_exception", None) if transport else None
        client.close()
        text = f"{exc}; {saved}" if saved and str(saved) not in str(exc) else str(exc)
        if "not found in known_hosts" in text or "no acceptable host key" in text.lower():
            raise HostKeyMismatch(
                target, f"the server offers no host key matching the pinned one ({text}); refusing to connect"
            ) from None
        # paramiko's start_client() returns silently when its timeout passes mid-handshake; authentication then
        # fails with "No existing session". Both mean the server did not complete SSH in time.
        if any(sign in text.lower() for sign in ("banner", "timed out", "no existing session")):
            raise SSHTimeout(target, f"no SSH answer within {timeout:g} s ({text})") from None
        raise SSHUnavailable(target, f"SSH failed: {text}") from None
    except (EOFError, OSError) as exc:
        client.close()
        raise SSHUnavailable(target, f"connection failed: {exc}") from None
    transport = client.get_transport()
    assert transport is not None
    transport.set_keepalive(KEEPALIVE_S)
    return client


def _run_on(
    client: paramiko.SSHClient,
    target: SSHTarget,
    command: str,
    timeout_s: float,
    stdin: bytes | Iterable[bytes] | None,
    max_output_bytes: int,
) -> CommandResult:
    """Run one command on an open connection, draining stdout and stderr together so neither can block."""
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise SSHUnavailable(target, "the connection was closed")
    try:
        channel = transport.open_session(timeout=timeout_s)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise SSHUnavailable(target, f"cannot open a session: {exc}") from None
    out, err = bytearray(), bytearray()
    truncated = False
    deadline = time.monotonic() + timeout_s
    try:
        channel.exec_command(command)
        if isinstance(stdin, bytes):
            channel.sendall(stdin)
        elif stdin is not None:
            _send_stream(channel, stdin, timeout_s)
        channel.shutdown_write()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SSHTimeout(target, f"the command did not finish within {timeout_s:g} s")
            select.select([channel], [], [], min(remaining, 1.0))
            while channel.recv_ready():
                truncated |= _take(out, channel.recv(65536), max_output_bytes)
            while channel.recv_stderr_ready():
                truncated |= _take(err, channel.recv_stderr(65536), max_output_bytes)
            # Done only at the end of the output (EOF), not at the exit status: sshd may send the status while
            # output still waits for window space, and stopping then would cut it (seen with 150 KB outputs).
            drained = not channel.recv_ready() and not channel.recv_stderr_ready()
            if channel.exit_status_ready() and channel.eof_received and drained:
                break
        code = channel.recv_exit_status()
    except TimeoutError:
        raise SSHTimeout(target, f"the command did not finish within {timeout_s:g} s") from None
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise SSHUnavailable(target, f"the connection broke during a command: {exc}") from None
    finally:
        channel.close()
    return CommandResult(
        exit_code=code,
        stdout=out.decode("utf-8", errors="replace"),
        stderr=err.decode("utf-8", errors="replace"),
        truncated=truncated,
    )


def _send_stream(channel: paramiko.Channel, chunks: Iterable[bytes], timeout_s: float) -> None:
    """Send chunks as they come (another command's output, too large to hold), each within timeout_s; stop early,
    without an error, once the command has exited or closed its input (it says why: its exit status and output)."""
    channel.settimeout(min(timeout_s, STREAM_CHUNK_TIMEOUT_S))
    for chunk in chunks:
        if channel.exit_status_ready() or channel.closed:
            break
        try:
            channel.sendall(chunk)
        except OSError:
            if channel.exit_status_ready() or channel.closed or channel.eof_received:
                break
            raise
    channel.settimeout(None)


def _take(buffer: bytearray, chunk: bytes, limit: int) -> bool:
    """Append what fits under the limit and report whether anything was dropped (the rest is still drained)."""
    room = limit - len(buffer)
    buffer.extend(chunk[: max(room, 0)])
    return len(chunk) > room


class SSHPool:
    """One live connection per (host, port, user, key), reused across commands and threads of a process."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str, int, str, str], paramiko.SSHClient] = {}
        self._lock = threading.Lock()
        self.connects = 0  # how many connections were opened; benchmarks and tests read it

    def client(self, target: SSHTarget) -> paramiko.SSHClient:
        key = target.pool_key
        with self._lock:
            client = self._clients.get(key)
            transport = client.get_transport() if client else None
            if client is not None and transport is not None and transport.is_active():
                return client
            if client is not None:
                client.close()
                del self._clients[key]
        # Connect outside the lock so one unreachable cluster does not hold up the others.
        client = connect(target)
        with self._lock:
            existing = self._clients.get(key)
            if existing is not None:
                client.close()
                return existing
            self._clients[key] = client
            self.connects += 1
            return client

    def run(
        self,
        target: SSHTarget,
        command: str,
        *,
        timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
        stdin: bytes | Iterable[bytes] | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> CommandResult:
        client = self.client(target)
        try:
            return _run_on(client, target, command, timeout_s, stdin, max_output_bytes)
        except SSHError:
            # The connection may be what broke: drop it so the next call opens a fresh one.
            self.discard(target)
            raise

    def read(self, target: SSHTarget, command: str, *, idle_timeout_s: float = 60) -> Iterator[bytes]:
        """A command's standard output as it comes, for files too large to hold (a batch run's output). Raises
        SSHError when the command fails (its standard error says why) or stays silent for idle_timeout_s."""
        transport = self.client(target).get_transport()
        if transport is None or not transport.is_active():
            self.discard(target)
            raise SSHUnavailable(target, "the connection was closed")
        try:
            channel = transport.open_session(timeout=idle_timeout_s)
            channel.settimeout(idle_timeout_s)
            channel.exec_command(command)
            channel.shutdown_write()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self.discard(target)
            raise SSHUnavailable(target, f"cannot open a session: {exc}") from None
        err = bytearray()
        try:
            while chunk := channel.recv(1 << 16):
                yield chunk
                while channel.recv_stderr_ready():
                    _take(err, channel.recv_stderr(65536), 4096)
            while channel.recv_stderr_ready():
                _take(err, channel.recv_stderr(65536), 4096)
            code = channel.recv_exit_status()
        except TimeoutError:
            raise SSHTimeout(target, f"no output for {idle_timeout_s:g} s") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self.discard(target)
            raise SSHUnavailable(target, f"the connection broke while reading: {exc}") from None
        finally:
            channel.close()
        if code != 0:
            raise SSHError(target, err.decode("utf-8", errors="replace").strip() or f"exit code {code}")

    def open_tunnel(self, target: SSHTarget, host: str, port: int, timeout_s: float = 10) -> paramiko.Channel:
        """A socket-like channel to host:port as seen from the login host (direct-tcpip), on the pooled connection."""
        transport = self.client(target).get_transport()
        assert transport is not None
        try:
            return transport.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=timeout_s)
        except paramiko.ChannelException as exc:
            raise SSHUnavailable(target, f"the login host cannot reach {host}:{port} ({exc.text})") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self.discard(target)
            raise SSHUnavailable(target, f"cannot open a tunnel to {host}:{port}: {exc}") from None

    def discard(self, target: SSHTarget) -> None:
        with self._lock:
            client = self._clients.pop(target.pool_key, None)
        if client is not None:
            client.close()

    def close_all(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()


pool = SSHPool()
