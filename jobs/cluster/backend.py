"""The way from the portal to a session's model server: direct, or a local port forwarded over SSH.

For clusters with node_access=tunnel, a LocalForward listens on 127.0.0.1 (an ephemeral port) in this process and
relays each connection through a direct-tcpip channel of the account's pooled SSH connection to host:port as
the login host sees it. Either way callers get a plain base URL, and the server still demands the session key.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from typing import TYPE_CHECKING

from portal import ssh

if TYPE_CHECKING:
    from jobs.models import LLMSession


class LocalForward:
    def __init__(self, target: ssh.SSHTarget, host: str, port: int, pool: ssh.SSHPool = ssh.pool) -> None:
        self.target, self.host, self.port, self.pool = target, host, port, pool
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.local_port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name=f"forward-{host}:{port}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            channel = self.pool.open_tunnel(self.target, self.host, self.port)
        except ssh.SSHError:
            client.close()
            return
        try:
            while True:
                readable, _, _ = select.select([client, channel], [], [], 60)
                if not readable:
                    continue
                for source, sink in ((client, channel), (channel, client)):
                    if source in readable:
                        data = source.recv(65536)
                        if not data:
                            return
                        sink.sendall(data)
        except OSError:
            return
        finally:
            channel.close()
            client.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()


_forwards: dict[tuple[tuple[str, int, str, str], str, int], LocalForward] = {}
_lock = threading.Lock()


def base_url(session: LLMSession) -> str:
    """http://host:port where this process reaches the session's server; empty until it runs."""
    if not session.host or not session.port:
        return ""
    if session.cluster.node_access != session.cluster.NodeAccess.TUNNEL:
        return f"http://{session.host}:{session.port}"
    return forwarded_url(session.account.ssh_target(), session.host, session.port)


def forwarded_url(target: ssh.SSHTarget, host: str, port: int) -> str:
    """The local end of the forward to host:port through the login host, opened on first use and then kept."""
    key = (target.pool_key, host, port)
    with _lock:
        forward = _forwards.get(key)
        if forward is None:
            forward = _forwards[key] = LocalForward(target, host, port)
    return f"http://127.0.0.1:{forward.local_port}"


def close_forwards() -> None:
    with _lock:
        forwards = list(_forwards.values())
        _forwards.clear()
    for forward in forwards:
        forward.close()
