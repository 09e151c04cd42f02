"""The watch (lifecycle.watch, the watch_sessions task): a session is polled the moment its server answers its health
check or its job stops, not at the next beat. Real Slurm over SSH and a real llama-server; how soon is measured in
bench/readiness.py, never here."""

from __future__ import annotations

import subprocess
import threading
from typing import Any

import pytest

from catalog.models import ClusterAccount
from jobs.batch import progress
from jobs.cluster import layout
from jobs.models import LLMSession, State
from jobs.sessions import lifecycle
from tests.e2e.sessions import drive, shell, start

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_the_watch_polls_when_the_server_is_ready_and_when_the_job_stops(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any]
) -> None:
    session = drive(start(owner, django_capture_on_commit_callbacks), lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    directory = f"~/{layout.session_dir(str(session.pk))}"

    # As if the poll had seen the session before its server was ready: the connection file is not there yet.
    shell(local_catalog, f"mv {directory}/connection.json {directory}/connection.held")
    LLMSession.objects.filter(pk=session.pk).update(state=State.STARTING, host="", port=None)
    polls: list[int] = []
    watcher = threading.Thread(
        target=lambda: polls.append(lifecycle.watch(account.pk, 25, after_poll=progress.after_poll))
    )
    watcher.start()
    shell(local_catalog, f"sleep 1; mv {directory}/connection.held {directory}/connection.json")
    session = drive(session, lambda s: s.state == State.RUNNING, timeout_s=30, poll=False)
    assert session.host and session.port

    # The server dies: the job writes why and stops; the watch polls until Slurm says it ended.
    key_file = f"{local_catalog['home']}/{layout.session_dir(str(session.pk))}/api_key"
    subprocess.run(["pkill", "-KILL", "-f", f"api-key-file {key_file}"], check=True)
    session = drive(session, lambda s: s.is_ended, timeout_s=40, poll=False)
    watcher.join(timeout=40)
    assert session.state == State.FAILED and "the server stopped" in session.end_reason
    assert polls and polls[0] >= 2
