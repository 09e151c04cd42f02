"""Fixtures of the proxy's tests (jobs/use, jobs/services): the session's model server (upstream.Server) and a running
session of the owner's."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from catalog.models import ClusterAccount
from jobs.models import LLMSession, State, transition
from jobs.sessions.actions import launch
from jobs.use import proxy
from tests.conftest import LAUNCH
from tests.jobs.use.upstream import Server


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Server:
    fake = Server()
    upstream = httpx.MockTransport(fake.handle)
    monkeypatch.setattr(proxy, "_transport", lambda: upstream)
    return fake


@pytest.fixture
def running(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> LLMSession:
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, LAUNCH)
    transition(session.pk, State.RUNNING, cause="test", host="127.0.0.1", port=9)
    LLMSession.objects.filter(pk=session.pk).update(alias="tiny")
    return LLMSession.objects.get(pk=session.pk)
