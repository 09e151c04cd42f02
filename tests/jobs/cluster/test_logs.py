"""Job logs: the worker fetches them into the cache; pages read the cache and never run an SSH command themselves."""

from __future__ import annotations

import shlex
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client

from catalog.models import ClusterAccount
from jobs.cluster import logs
from jobs.models import LLMSession, State, transition
from jobs.sessions.actions import launch
from portal import ssh
from tests.conftest import LAUNCH


@pytest.fixture
def session(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> LLMSession:
    with django_capture_on_commit_callbacks(execute=False):
        return launch(owner, LAUNCH)


@pytest.fixture
def no_ssh(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> ssh.CommandResult:
        raise AssertionError("a page ran an SSH command")

    monkeypatch.setattr(ssh.pool, "run", refuse)


def cluster_says(monkeypatch: pytest.MonkeyPatch, text: str) -> list[str]:
    commands: list[str] = []

    def run(target: ssh.SSHTarget, command: str, **kwargs: Any) -> ssh.CommandResult:
        commands.append(command)
        return ssh.CommandResult(0, text, "")

    monkeypatch.setattr(ssh.pool, "run", run)
    return commands


def test_open_log_pages_ask_the_worker_at_most_once_per_interval(
    client: Client, owner: Any, session: LLMSession, no_ssh: None, django_capture_on_commit_callbacks: Any
) -> None:
    client.force_login(owner)
    with django_capture_on_commit_callbacks(execute=False) as asked:
        first = client.get(f"/sessions/{session.pk}/log")
        for _ in range(5):  # five more tabs, or five htmx polls
            client.get(f"/sessions/{session.pk}/log", headers={"HX-Request": "true"})
    assert len(asked) == 1
    text = first.content.decode()
    assert "Reading the log from the cluster" in text and 'hx-trigger="every 5s"' in text


def test_the_page_shows_what_the_worker_fetched(
    client: Client, owner: Any, session: LLMSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = cluster_says(monkeypatch, "llama-server listening on node1\n")
    logs.refresh(session)
    assert len(commands) == 1 and shlex.split(commands[0])[3:] == ["log", str(session.pk), "65536"]
    monkeypatch.setattr(ssh.pool, "run", None)  # the page must not need it
    client.force_login(owner)
    page = client.get(f"/sessions/{session.pk}/log").content.decode()
    assert "llama-server listening on node1" in page


def test_an_unreachable_cluster_keeps_the_last_log_and_says_why(
    session: LLMSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster_says(monkeypatch, "line one\n")
    logs.refresh(session)

    def down(*args: Any, **kwargs: Any) -> ssh.CommandResult:
        raise ssh.ConnectionRefused(None, "connection refused")

    monkeypatch.setattr(ssh.pool, "run", down)
    tail = logs.refresh(session)
    assert tail.text == "line one\n" and "connection refused" in tail.error


def test_a_log_read_after_the_job_ended_is_final(session: LLMSession) -> None:
    transition(session.pk, State.CANCELLED, cause="test")
    session.refresh_from_db()
    assert session.ended_at is not None
    stale = logs.LogTail("starting", "", session.ended_at - timedelta(minutes=1))
    assert logs.claim_refresh(session, stale)  # read while it ran: read it once more
    final = logs.LogTail("stopped (exit 143)", "", session.ended_at + timedelta(seconds=1))
    assert not logs.claim_refresh(session, final)  # however old it gets
