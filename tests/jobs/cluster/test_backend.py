"""The way to a session's server through the login host: a forward lives while its session runs, and no longer."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from catalog.models import ClusterAccount
from jobs.cluster import backend
from jobs.models import LLMSession, State, transition
from jobs.sessions.actions import launch
from portal import ssh
from tests.conftest import LAUNCH

pytestmark = pytest.mark.django_db


# A login host nothing listens on: a connection to the forward's local end tries it and fails at once.
NOWHERE = ssh.SSHTarget(host="127.0.0.1", port=1, username="x", host_keys="", private_key="")


def accepts(url: str) -> bool:
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def running(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> Any:
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, LAUNCH)
    transition(session.pk, State.RUNNING, cause="test", host="10.0.0.7", port=8080)
    yield LLMSession.objects.get(pk=session.pk)
    backend.close_forwards()


def test_a_forward_closes_once_its_session_no_longer_runs(running: LLMSession, account: ClusterAccount) -> None:
    url = backend.forwarded_url(NOWHERE, "10.0.0.7", 8080, str(running.pk))
    assert accepts(url) and backend.forwarded_url(NOWHERE, "10.0.0.7", 8080, str(running.pk)) == url
    assert backend.sweep() == 0  # still running: kept
    transition(running.pk, State.CANCELLED, cause="test")
    assert backend.sweep() == 1 and not accepts(url)


def test_an_address_taken_by_another_session_gets_a_new_forward(running: LLMSession, account: ClusterAccount) -> None:
    old = backend.forwarded_url(NOWHERE, "10.0.0.7", 8080, str(running.pk))
    new = backend.forwarded_url(NOWHERE, "10.0.0.7", 8080, "another-session")
    assert new != old and accepts(new) and not accepts(old)
