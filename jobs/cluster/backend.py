"""The way from the portal to a session's model server: direct, or a local port forwarded over SSH.

For clusters with node_access=tunnel, a LocalForward listens on 127.0.0.1 (an ephemeral port) in this process and
relays each connection through a direct-tcpip channel of the account's pooled SSH connection to host:port as
the login host sees it. Either way callers get a base URL, and the server still demands the session key.

URLs are built from their parts (httpx.URL), never by formatting a string: a host such as `10.0.0.9:2375/x?y=#`
would bring a port and a path of its own into `http://{host}:{port}/v1/...`. A host that is not a host name or an IP
address gets no URL at all (the poll refuses such an address before it is stored; this holds for any other way in).

Nor does a host outside the cluster's compute-node networks (portal/nodenet.py): the poll stores the address it
resolved and checked (pinned), and each URL and forward is built to that address after checking it again against
the networks as they are now, with no lookup, so a name that resolves elsewhere later (DNS rebinding) changes nothing
and narrowed networks take effect at the next request. A tunnel's login host gets the checked address too, never a
name to resolve by its own lights.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from functools import lru_cache

import httpx
from django.db import close_old_connections

from jobs.models import SERVING_STATES, LLMSession
from portal import nodenet, outbound, shellsafe, ssh

log = logging.getLogger(__name__)


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
            # Closing alone would leave the port listening while the accepting thread still holds the socket.
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()


# Forwards by (SSH target, host, port), with the session each serves; a session's forward closes once the session no
# longer runs, so no local port keeps leading into the cluster for an address some later job may take.
_forwards: dict[tuple[tuple[str, int, str, str], str, int], tuple[LocalForward, str]] = {}
_lock = threading.Lock()
SWEEP_EVERY_S = 30
_sweeper: threading.Thread | None = None


def is_address(host: object, port: object) -> bool:
    """A model server's address: a host name or an IP address, and a port (the poll takes 1024 to 65535 only)."""
    return shellsafe.network_host(host) and isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536


def server_url(host: str, port: int, networks: str) -> httpx.URL | None:
    """http://host:port, built from its parts, for an IP address inside the cluster's compute-node networks (as
    Cluster.node_networks spells them); None for anything else (logged): a name is never looked up here."""
    if not is_address(host, port):
        log.warning("no URL for %r port %r: not a host name or IP address and a port", host, port)
        return None
    if not nodenet.is_pinned(host, nodenet.networks(networks)):
        log.warning("no URL for %r: not an IP address inside the compute-node networks (%s)", host,
                    networks or "none set")  # fmt: skip
        return None
    return http_url(host, port)


@lru_cache(maxsize=4096)
def http_url(host: str, port: int) -> httpx.URL:
    """http://host:port for an address already checked: made once per address (httpx parses the URL it builds from
    its parts again, about 40 µs of every proxied request's lookup), and shared, since an httpx.URL never changes."""
    return httpx.URL(scheme="http", host=host, port=port)


def base_url(session: LLMSession) -> httpx.URL | None:
    """http://host:port where this process reaches the session's server; None until it runs."""
    if not session.host or not session.port:
        return None
    cluster = session.cluster
    if cluster.node_access != cluster.NodeAccess.TUNNEL:
        return server_url(session.host, session.port, cluster.node_networks)
    target = session.account.ssh_target()
    return forwarded_url(target, session.host, session.port, str(session.pk), cluster.node_networks)


def forwarded_url(target: ssh.SSHTarget, host: str, port: int, session_pk: str, networks: str) -> httpx.URL | None:
    """The local end of the forward to host:port through the login host, opened on first use and then kept while
    the session runs; None for an address that is not one inside the networks (server_url's rule)."""
    global _sweeper
    if server_url(host, port, networks) is None:
        return None
    key = (target.pool_key, host, port)
    with _lock:
        known = _forwards.get(key)
        if known is None or known[1] != session_pk:
            if known is not None:
                known[0].close()  # the address now belongs to another session
            known = _forwards[key] = (LocalForward(target, host, port), session_pk)
        if _sweeper is None:
            _sweeper = threading.Thread(target=_sweep_forever, name="forward-sweeper", daemon=True)
            _sweeper.start()
    return http_url("127.0.0.1", known[0].local_port)


HEALTH_MAX_BYTES = 64 * 1024  # a health check answers a few bytes of JSON


def answers(session: LLMSession, timeout_s: float = 3.0) -> bool:
    """Whether the session's server answers its health check now (as the job checked before it said running)."""
    url = base_url(session)
    if url is None:
        return False
    try:
        reply = outbound.request("GET", url.copy_with(path="/health"), timeout=timeout_s, max_bytes=HEALTH_MAX_BYTES,
                                 headers={"Authorization": f"Bearer {session.api_key}"})  # fmt: skip
    except httpx.HTTPError:  # ReplyTooLarge too
        return False
    return reply.status_code == 200


def sweep() -> int:
    """Close the forwards of sessions that no longer run; how many were closed."""
    with _lock:
        serving = {session_pk for _, session_pk in _forwards.values()}
    running = {
        str(pk)
        for pk in LLMSession.objects.filter(pk__in=serving, state__in=SERVING_STATES).values_list("pk", flat=True)
    }
    with _lock:
        gone = [key for key, (_, session_pk) in _forwards.items() if session_pk not in running]
        closing = [_forwards.pop(key)[0] for key in gone]
    for forward in closing:
        forward.close()
    return len(closing)


def _sweep_forever() -> None:
    while True:
        time.sleep(SWEEP_EVERY_S)
        try:
            sweep()
        except Exception:  # a database hiccup: try again at the next sweep
            log.warning("could not sweep the SSH forwards", exc_info=True)
        finally:
            close_old_connections()


def close_forwards() -> None:
    with _lock:
        forwards = [forward for forward, _ in _forwards.values()]
        _forwards.clear()
    for forward in forwards:
        forward.close()
