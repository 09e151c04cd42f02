"""Where a session's server is, the owner's account does not decide: the poll's nodes and their addresses may be
forged (the owner's ~/.bashrc can wrap scontrol), so an address is taken only inside the cluster's compute-node
networks, pinned as the portal resolved it, and, where a status account lists the job, on the nodes it lists.
Every address here is this machine's; nothing is sent anywhere."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pytest

from catalog.models import Cluster, ClusterAccount
from jobs.cluster import backend, remote
from jobs.models import LLMSession, State, transition
from jobs.sessions import lifecycle, listed_nodes, listing
from jobs.sessions.actions import launch
from portal import nodenet
from portal.slurm.squeue import QueuedJob
from tests.conftest import LAUNCH
from tests.jobs.sessions.test_listing import LoginHost, line

PORT = 30123


@pytest.fixture
def session(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> LLMSession:
    with django_capture_on_commit_callbacks(execute=False):
        started = launch(owner, LAUNCH)
    transition(started.pk, State.QUEUED, cause="test", job_id="42")
    return LLMSession.objects.get(pk=started.pk)


def networks(text: str) -> None:
    Cluster.objects.filter(slug="local").update(node_networks=text)


@pytest.fixture
def resolves(monkeypatch: pytest.MonkeyPatch) -> dict[str, Sequence[str]]:
    """What the portal host's resolver answers for each name (fill it in); any other name does not resolve."""
    answers: dict[str, Sequence[str]] = {}

    def resolve(host: str) -> Sequence[str]:
        if host not in answers:
            raise OSError(f"[Errno -2] Name or service not known: {host!r}")
        return answers[host]

    monkeypatch.setattr(nodenet, "system_resolver", resolve)
    return answers


def running(session: LLMSession, host: str, node_names: set[str], nodes: str = "node1") -> remote.PollResult:
    """A poll as the owner's account answers it: the job runs on `nodes`, whose names scontrol gives as
    `node_names`, and its connection.json names `host`."""
    job = QueuedJob("42", "hpcllm-x", "RUNNING", "", datetime(2026, 12, 7, 12, 0), nodes, 0, 60, "gpu", 1)
    return remote.PollResult(
        squeue_ok=True, complete=True, queued={"42": job}, node_names={nodes: {nodes, *node_names}},
        connections={str(session.pk): {"host": host, "port": PORT, "node": nodes}},
    )  # fmt: skip


def apply(session: LLMSession, polled: remote.PollResult) -> LLMSession:
    lifecycle.apply_poll(LLMSession.objects.select_related("cluster").get(pk=session.pk), polled)
    return LLMSession.objects.get(pk=session.pk)


def causes(session: LLMSession) -> list[str]:
    return [event.cause for event in session.events.all()]


def test_a_node_address_outside_the_networks_is_refused_even_when_the_polls_nodes_section_names_it(
    session: LLMSession,
) -> None:
    networks("127.0.0.1/32")
    # The owner's scontrol says their node's NodeAddr is 127.0.0.2, and their connection.json says the same.
    s = apply(session, running(session, "127.0.0.2", {"127.0.0.2"}))
    assert not s.serving and backend.base_url(s) is None
    assert any("'127.0.0.2'" in cause and "127.0.0.2 is outside the cluster's compute-node networks (127.0.0.1/32)"
               in cause for cause in causes(s))  # fmt: skip


def test_an_address_inside_the_networks_is_served_at_that_address(session: LLMSession) -> None:
    networks("127.0.0.1/32")
    s = apply(session, running(session, "127.0.0.1", {"127.0.0.1"}))
    assert (s.state, s.host, s.port) == (State.RUNNING, "127.0.0.1", PORT)
    assert str(backend.base_url(s)) == f"http://127.0.0.1:{PORT}"


def test_a_host_name_is_pinned_to_the_address_the_portal_resolved_and_checked(
    session: LLMSession, resolves: dict[str, Sequence[str]]
) -> None:
    networks("127.0.0.1/32")
    resolves["node1"] = ["127.0.0.1"]
    s = apply(session, running(session, "node1", set()))
    assert (s.state, s.host) == (State.RUNNING, "127.0.0.1")
    assert f"the server answers its health check on node1:{PORT} (127.0.0.1)" in causes(s)
    # The name now resolves elsewhere (DNS rebinding): requests still go to the address that was checked...
    resolves["node1"] = ["127.0.0.2"]
    assert str(backend.base_url(s)) == f"http://127.0.0.1:{PORT}"
    # ...and the next poll, which resolves it again, stops sending them at all.
    s = apply(s, running(s, "node1", set()))
    assert not s.serving and any("127.0.0.2 is outside" in cause for cause in causes(s))


def test_a_host_name_that_resolves_outside_the_networks_is_refused(
    session: LLMSession, resolves: dict[str, Sequence[str]]
) -> None:
    networks("127.0.0.1/32")
    resolves["node1"] = ["127.0.0.2"]
    s = apply(session, running(session, "node1", set()))
    assert not s.serving and any("'node1'" in c and "127.0.0.2 is outside" in c for c in causes(s))


def test_a_host_name_that_resolves_to_several_addresses_is_refused_when_one_is_outside(
    session: LLMSession, resolves: dict[str, Sequence[str]]
) -> None:
    networks("127.0.0.1/32")
    resolves["node1"] = ["127.0.0.1", "127.0.0.2"]
    s = apply(session, running(session, "node1", set()))
    assert not s.serving and any("127.0.0.2 is outside" in cause for cause in causes(s))


def test_a_host_name_that_does_not_resolve_on_the_portal_host_is_refused(
    session: LLMSession, resolves: dict[str, Sequence[str]]
) -> None:
    networks("127.0.0.0/8")
    s = apply(session, running(session, "node1", set()))
    assert not s.serving and any("does not resolve on the portal host" in cause for cause in causes(s))


def test_ipv6_addresses_are_checked_against_ipv6_networks(session: LLMSession) -> None:
    networks("127.0.0.0/8")
    s = apply(session, running(session, "::1", {"::1"}))
    assert not s.serving and any("::1 is outside" in cause for cause in causes(s))
    networks("127.0.0.0/8, ::1/128")
    s = apply(s, running(s, "::1", {"::1"}))
    assert (s.state, s.host) == (State.RUNNING, "::1")
    assert str(backend.base_url(s)) == f"http://[::1]:{PORT}"


def test_a_cluster_without_networks_sends_nothing_until_an_admin_sets_them(session: LLMSession) -> None:
    networks("")
    s = apply(session, running(session, "127.0.0.1", {"127.0.0.1"}))
    assert not s.serving and any("no compute-node networks are set" in cause for cause in causes(s))
    s = apply(s, running(s, "127.0.0.1", {"127.0.0.1"}))
    assert sum("no compute-node networks" in cause for cause in causes(s)) == 1  # recorded once
    networks("127.0.0.1/32")
    s = apply(s, running(s, "127.0.0.1", {"127.0.0.1"}))
    assert (s.state, s.host) == (State.RUNNING, "127.0.0.1")


def test_a_running_sessions_address_that_leaves_the_networks_is_sent_nothing_more(session: LLMSession) -> None:
    networks("127.0.0.0/8")
    s = apply(session, running(session, "127.0.0.2", {"127.0.0.2"}))
    assert s.serving
    networks("127.0.0.1/32")
    assert backend.base_url(LLMSession.objects.get(pk=s.pk)) is None  # at the next request, before any poll
    s = apply(s, running(s, "127.0.0.2", {"127.0.0.2"}))
    assert s.state == State.STARTING and not s.host


def test_nodes_that_disagree_with_the_status_accounts_listing_are_refused(session: LLMSession) -> None:
    networks("127.0.0.0/8")
    listed_nodes.publish(session.cluster_id, {"42": "node2"})
    # The owner's squeue puts the job on node1 and scontrol gives node1 the address it reports.
    s = apply(session, running(session, "127.0.0.1", {"127.0.0.1"}, nodes="node1"))
    assert not s.serving
    assert "refused the nodes node1 the job's poll reported: the cluster's status account lists the job on node2" in (
        causes(s)
    )
    s = apply(s, running(s, "127.0.0.1", {"127.0.0.1"}, nodes="node2"))
    assert (s.state, s.host, s.node_list) == (State.RUNNING, "127.0.0.1", "node2")


def test_a_serving_session_whose_nodes_the_listing_later_contradicts_is_sent_nothing_more(
    session: LLMSession,
) -> None:
    networks("127.0.0.0/8")
    s = apply(session, running(session, "127.0.0.1", {"127.0.0.1"}))
    assert s.serving  # no listing yet (no status account, or the job started since): the networks decide
    listed_nodes.publish(session.cluster_id, {"42": "node[2-3]"})
    s = apply(s, running(s, "127.0.0.1", {"127.0.0.1"}))
    assert s.state == State.STARTING and not s.serving


def test_the_listing_keeps_the_nodes_of_the_portals_running_jobs_only(
    session: LLMSession, account: ClusterAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    operator = ClusterAccount(cluster=account.cluster, kind="service", username="portalmon")
    operator.save()
    Cluster.objects.filter(pk=account.cluster_id).update(status_account=operator)
    LoginHost(monkeypatch, [line("ada", session, state="RUNNING", reason="None")])
    listing.cycle(session.cluster_id)
    assert listed_nodes.listed(session.cluster_id, "42") == "node1"
    # A job under another owner's name is not the session's: nothing is kept for it.
    LoginHost(monkeypatch, [line("grace", session, state="RUNNING", reason="None")])
    listing.cycle(session.cluster_id)
    assert listed_nodes.listed(session.cluster_id, "42") is None


def test_hostlists_are_compared_by_the_nodes_they_name() -> None:
    assert listed_nodes.same_nodes("node[1-2]", "node1,node2")
    assert not listed_nodes.same_nodes("node[1-2]", "node1")
    assert not listed_nodes.same_nodes("node[1-", "node[1-")  # what does not parse agrees with nothing
