"""The way to a session's server through the login host: a forward lives while its session runs, and no longer."""

from __future__ import annotations

import ast
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from catalog.models import ClusterAccount
from jobs.cluster import backend
from jobs.models import LLMSession, State, transition
from jobs.sessions.actions import launch
from portal import ssh
from tests.conftest import LAUNCH
from tests.portal.test_outbound import Server, proxy_named_in_env, serving

pytestmark = pytest.mark.django_db


# A login host nothing listens on: a connection to the forward's local end tries it and fails at once.
NOWHERE = ssh.SSHTarget(host="127.0.0.1", port=1, username="x", host_keys="", private_key="")


def accepts(url: httpx.URL | None) -> bool:
    assert url is not None and url.host == "127.0.0.1" and url.port is not None
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", url.port)) == 0


@pytest.fixture
def running(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> Any:
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, LAUNCH)
    transition(session.pk, State.RUNNING, cause="test", host="127.0.0.7", port=8080)
    yield LLMSession.objects.get(pk=session.pk)
    backend.close_forwards()


def test_a_forward_closes_once_its_session_no_longer_runs(running: LLMSession, account: ClusterAccount) -> None:
    url = backend.forwarded_url(NOWHERE, "127.0.0.7", 8080, str(running.pk), "127.0.0.0/8")
    assert accepts(url) and backend.forwarded_url(NOWHERE, "127.0.0.7", 8080, str(running.pk), "127.0.0.0/8") == url
    assert backend.sweep() == 0  # still running: kept
    transition(running.pk, State.CANCELLED, cause="test")
    assert backend.sweep() == 1 and not accepts(url)


def test_an_address_taken_by_another_session_gets_a_new_forward(running: LLMSession, account: ClusterAccount) -> None:
    old = backend.forwarded_url(NOWHERE, "127.0.0.7", 8080, str(running.pk), "127.0.0.0/8")
    new = backend.forwarded_url(NOWHERE, "127.0.0.7", 8080, "another-session", "127.0.0.0/8")
    assert new != old and accepts(new) and not accepts(old)


@pytest.mark.parametrize(
    ("host", "port"),
    [("127.0.0.1:9/heard?x=#", 8080), ("localhost/x", 8080), ("ada@localhost", 8080), ("::1%lo", 8080),
     ("localhost", 0), ("localhost", 70000), ("localhost", True), ("", 8080)],
)  # fmt: skip
def test_a_servers_url_is_built_from_a_host_and_a_port_or_not_at_all(host: str, port: int) -> None:
    assert backend.server_url(host, port, "127.0.0.0/8, ::1/128") is None
    assert backend.forwarded_url(NOWHERE, host, port, "a-session", "127.0.0.0/8, ::1/128") is None  # nor a forward


def test_a_servers_url_takes_only_an_ip_address_inside_the_clusters_networks() -> None:
    assert str(backend.server_url("127.0.0.1", 30123, "127.0.0.0/8")) == "http://127.0.0.1:30123"
    url = backend.server_url("::1", 30123, "::1/128")
    assert url is not None and str(url.copy_with(path="/v1/models")) == "http://[::1]:30123/v1/models"
    # A name is never looked up here: the poll pins the address it checked, and only that is sent to.
    assert backend.server_url("localhost", 30123, "127.0.0.0/8") is None
    assert backend.server_url("127.0.0.2", 30123, "127.0.0.1/32") is None
    assert backend.server_url("::1", 30123, "127.0.0.0/8") is None
    assert backend.server_url("::ffff:127.0.0.2", 30123, "127.0.0.1/32") is None  # IPv4-mapped: its IPv4 address
    assert backend.server_url("127.0.0.1", 30123, "") is None  # no networks set: nothing
    assert backend.forwarded_url(NOWHERE, "127.0.0.2", 30123, "a-session", "127.0.0.1/32") is None


def test_networks_narrowed_by_an_admin_stop_a_running_sessions_requests_at_once(running: LLMSession) -> None:
    assert backend.base_url(running) is not None
    running.cluster.node_networks = "10.0.1.0/24"
    running.cluster.save()
    assert backend.base_url(LLMSession.objects.get(pk=running.pk)) is None


def test_a_session_with_a_stored_host_that_is_no_address_has_no_url(running: LLMSession) -> None:
    # However it got there (the poll refuses it): nothing is ever sent to 127.0.0.1:9/heard.
    LLMSession.objects.filter(pk=running.pk).update(host="127.0.0.1:9/heard?x=#")
    forged = LLMSession.objects.get(pk=running.pk)
    assert backend.base_url(forged) is None and not backend.answers(forged)


def test_no_module_builds_a_url_by_formatting_a_string() -> None:
    """The portal's own code (not the job side, which is given its servers' URLs) and the benchmarks build every URL
    from its parts: an f-string beginning "http" anywhere in them fails this test."""
    repo = Path(__file__).resolve().parents[3]
    scripts = repo / "jobs" / "cluster" / "scripts"
    found = []
    for folder in ("portal", "catalog", "jobs", "bench"):
        for path in sorted((repo / folder).rglob("*.py")):
            if scripts in path.parents:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.JoinedStr) and node.values:
                    first = node.values[0]
                    if isinstance(first, ast.Constant) and str(first.value).lower().startswith(("http:", "https:")):
                        found.append(f"{path.relative_to(repo)}:{node.lineno}")
    assert found == []


def test_the_health_check_goes_straight_to_the_server_and_reads_a_bounded_reply(
    running: LLMSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HTTP_PROXY and the like name a listener on this machine, as a site's outbound proxy: it must hear nothing.
    with serving() as server, proxy_named_in_env(monkeypatch) as proxy:
        LLMSession.objects.filter(pk=running.pk).update(host="127.0.0.1", port=server.port)
        running.refresh_from_db()
        assert backend.answers(running)
        Server.health_bytes = backend.HEALTH_MAX_BYTES + 1
        assert not backend.answers(running)
    assert proxy.heard == 0
