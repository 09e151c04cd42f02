"""An authenticated relay for ggml-rpc-server, which has no authentication of its own and serves one client: whoever
connects first could block the session or allocate GPU memory as the user. Python standard library only (3.8+).

    rpcrelay.py serve --listen ADDR --port P --upstream-port U --key-file K     (on each RPC node)
    rpcrelay.py connect --map LOCAL=HOST:PORT [--map ...] --key-file K          (beside llama-server)

ggml-rpc-server listens on 127.0.0.1 of its node (the job holds its nodes with --exclusive=user); `serve` listens on
the node's address and lets a connection through only after a handshake proves that both ends hold the session's
RPC key (a file in the 0700 session directory). The key itself never crosses the network: each side answers the
other's random challenge with an HMAC-SHA256 of it, so a recorded handshake is worth nothing. Nothing the client
sends before the handshake succeeds reaches ggml-rpc-server. `connect` listens on 127.0.0.1 for llama-server's
--rpc and does the client side of the handshake.

Handshake (one line each, ASCII, fixed sizes):
    server -> client   "HPCLLM-RPC1 <server nonce, 64 hex>"
    client -> server   "<hex HMAC(key, 'client' + server nonce)> <client nonce, 64 hex>"
    server -> client   "<hex HMAC(key, 'server' + client nonce)>"

Until it succeeds a connection holds a place: at most MAX_PENDING at once, MAX_PENDING_PER_ADDRESS of them from one
address (so nobody on the network takes every place from the session's own relay), each for --handshake-timeout
seconds in all, however its bytes are spread (one deadline for the handshake, not one a read).

After it, bytes are copied by two threads per connection, in the kernel with splice(2) where Python has it (3.10+):
the model's weights cross here at load time, and bench/rpc_relay.py measures what the relay costs.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

MAGIC = b"HPCLLM-RPC1"
HANDSHAKE_TIMEOUT_S = 10.0
MAX_PENDING = 16  # connections still in their handshake; more are closed at once
MAX_PENDING_PER_ADDRESS = 4  # of those, from one address (the session's own relay needs one per connection)
CHUNK = 1024 * 1024


class Refused(Exception):
    pass


def _proof(key: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, role + nonce, hashlib.sha256).hexdigest().encode()


def _line(sock: socket.socket, size: int, deadline: float) -> bytes:
    """One handshake line of a known size, whole by the deadline (time.monotonic()): anything else is refused."""
    data = b""
    while len(data) < size + 1:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Refused("the handshake took too long")
        sock.settimeout(left)
        chunk = sock.recv(size + 1 - len(data))
        if not chunk:
            raise Refused("closed during the handshake")
        data += chunk
    if not data.endswith(b"\n"):
        raise Refused("not a handshake")
    return data[:-1]


def _copy(src: socket.socket, dst: socket.socket) -> None:
    """src to dst until src ends; then dst learns there is no more."""
    with contextlib.suppress(OSError):
        if hasattr(os, "splice"):
            read_end, write_end = os.pipe()
            with contextlib.suppress(OSError, AttributeError):  # a larger pipe moves more per call
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, CHUNK)
            try:
                while n := os.splice(src.fileno(), write_end, CHUNK):
                    while n:
                        n -= os.splice(read_end, dst.fileno(), n)
            finally:
                os.close(read_end)
                os.close(write_end)
        else:
            buffer = memoryview(bytearray(CHUNK))
            while n := src.recv_into(buffer):
                dst.sendall(buffer[:n])
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _join(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both directions end, then close both."""
    for sock in (a, b):
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # RPC is many small messages per token
    other = threading.Thread(target=_copy, args=(b, a), daemon=True)
    other.start()
    _copy(a, b)
    other.join()
    a.close()
    b.close()


class Server:
    def __init__(self, key: bytes, upstream_port: int, timeout: float) -> None:
        self.key, self.upstream_port, self.timeout = key, upstream_port, timeout
        self.lock = threading.Lock()
        self.pending: dict[str, int] = {}  # address -> its connections still in their handshake
        self.refused = 0

    def _admit(self, address: str) -> bool:
        with self.lock:
            if sum(self.pending.values()) >= MAX_PENDING or self.pending.get(address, 0) >= MAX_PENDING_PER_ADDRESS:
                return False
            self.pending[address] = self.pending.get(address, 0) + 1
            return True

    def _done(self, address: str) -> None:
        with self.lock:
            self.pending[address] -= 1
            if not self.pending[address]:
                del self.pending[address]

    def handle(self, conn: socket.socket, peer: object) -> None:
        address = str(peer[0] if isinstance(peer, tuple) else peer)
        if not self._admit(address):
            conn.close()
            return
        try:
            deadline = time.monotonic() + self.timeout
            conn.settimeout(self.timeout)
            nonce = secrets.token_hex(32).encode()
            conn.sendall(MAGIC + b" " + nonce + b"\n")
            proof, _, client_nonce = _line(conn, 64 + 1 + 64, deadline).partition(b" ")
            if not hmac.compare_digest(proof, _proof(self.key, b"client", nonce)) or len(client_nonce) != 64:
                raise Refused("wrong key")
            conn.sendall(_proof(self.key, b"server", client_nonce) + b"\n")
        except (Refused, OSError):
            self.refused += 1
            if self.refused <= 10 or self.refused % 1000 == 0:  # the job log says so, without being flooded
                print(f"rpcrelay: refused a connection from {peer} ({self.refused} so far)", flush=True)
            conn.close()
            return
        finally:
            self._done(address)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=self.timeout)
        except OSError:
            conn.close()
            return
        _join(conn, upstream)


class Client:
    def __init__(self, key: bytes, host: str, port: int, timeout: float) -> None:
        self.key, self.host, self.port, self.timeout = key, host, port, timeout

    def handle(self, conn: socket.socket, peer: object) -> None:
        try:
            remote = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError:
            conn.close()
            return
        try:
            deadline = time.monotonic() + self.timeout
            magic, _, nonce = _line(remote, len(MAGIC) + 1 + 64, deadline).partition(b" ")
            if magic != MAGIC or len(nonce) != 64:
                raise Refused("not an RPC relay")
            mine = secrets.token_hex(32).encode()
            remote.sendall(_proof(self.key, b"client", nonce) + b" " + mine + b"\n")
            if not hmac.compare_digest(_line(remote, 64, deadline), _proof(self.key, b"server", mine)):
                raise Refused("the relay does not hold the session's key")
        except (Refused, OSError) as exc:
            print(f"rpcrelay: {self.host}:{self.port}: {exc}", file=sys.stderr, flush=True)
            remote.close()
            conn.close()
            return
        _join(conn, remote)


def _accept_forever(listener: socket.socket, handle: Callable[[socket.socket, object], None]) -> None:
    while True:
        conn, peer = listener.accept()
        threading.Thread(target=handle, args=(conn, peer), daemon=True).start()


def _listen(host: str, port: int) -> socket.socket:
    return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    serving = modes.add_parser("serve", help="in front of ggml-rpc-server on its node")
    serving.add_argument("--listen", required=True)
    serving.add_argument("--port", type=int, required=True)
    serving.add_argument("--upstream-port", type=int, required=True)
    connecting = modes.add_parser("connect", help="beside llama-server, one local port per RPC node")
    connecting.add_argument("--map", action="append", required=True, metavar="LOCAL_PORT=HOST:PORT")
    for mode in (serving, connecting):
        mode.add_argument("--key-file", type=Path, required=True)
        mode.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT_S)
    args = parser.parse_args()
    key = args.key_file.read_bytes().strip()
    if len(key) < 32:
        raise SystemExit("rpcrelay: the key file holds no key")
    if args.mode == "serve":
        server = Server(key, args.upstream_port, args.handshake_timeout)
        _accept_forever(_listen(args.listen, args.port), server.handle)
        return
    threads = []
    for mapping in args.map:
        local, _, remote = mapping.partition("=")
        host, _, port = remote.rpartition(":")
        client = Client(key, host, int(port), args.handshake_timeout)
        listener = _listen("127.0.0.1", int(local))
        threads.append(threading.Thread(target=_accept_forever, args=(listener, client.handle), daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
