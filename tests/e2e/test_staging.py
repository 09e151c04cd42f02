"""Staging weights on node-local storage, end to end: real Slurm over SSH, the job's own copy, a real llama-server."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from catalog.models import Cluster, ClusterAccount, VariantLocation
from jobs.cluster import backend, layout
from jobs.models import LLMSession, State
from jobs.sessions.actions import request_cancel
from jobs.tasks import cancel_session
from tests.conftest import LAUNCH
from tests.e2e.sessions import drive, shell, start

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]


@pytest.fixture
def stage_dir(local_catalog: dict[str, Any]) -> Iterator[str]:
    """A node-local directory for this test (every local node is this host), removed afterwards."""
    path = f"/tmp/portal-stage-e2e-{uuid.uuid4().hex[:8]}"
    Cluster.objects.filter(slug="local").update(stage_to=path, stage_keep=True)
    yield path
    shell(local_catalog, f"rm -rf {path}")


def run_until_served(owner: Any, capture: Any, **changes: Any) -> LLMSession:
    session = drive(start(owner, capture, **changes), lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    headers = {"Authorization": f"Bearer {session.api_key}"}
    assert httpx.get(f"{backend.base_url(session)}/v1/models", headers=headers, timeout=10).status_code == 200
    return session


def stop(session: LLMSession) -> None:
    request_cancel(session, "test")
    cancel_session.apply(args=(str(session.pk),))
    drive(session, lambda s: s.is_ended)


def job_log(local: dict[str, Any], session: LLMSession) -> str:
    return shell(local, f"cat ~/{layout.session_dir(str(session.pk))}/job.log").stdout


def test_a_staged_session_runs_from_its_copy_and_the_next_launch_reuses_it(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any],
    stage_dir: str,
) -> None:  # fmt: skip
    source = VariantLocation.objects.get(variant__model__name=LAUNCH["model"], cluster__slug="local").path

    first = run_until_served(owner, django_capture_on_commit_callbacks)
    assert first.staging["state"] == "copied", first.staging
    assert first.staging["from"] == source and str(first.staging["to"]).startswith(f"{stage_dir}/hpc-llm-portal-")
    assert first.staging["bytes"] == first.staging["total"] > 0
    log = job_log(local_catalog, first)
    assert "staging: copying" in log and f"from {source} to {first.staging['to']}" in log
    # The server was given the copy, not the shared file.
    assert f"(model {first.staging['to']}/" in log
    stop(first)

    second = run_until_served(owner, django_capture_on_commit_callbacks)
    assert second.staging["state"] == "reused" and second.staging["to"] == first.staging["to"]
    assert "staging: reusing the copy" in job_log(local_catalog, second)
    stop(second)

    # A launch that asks to load from the shared path does; the copy stays for later.
    third = run_until_served(owner, django_capture_on_commit_callbacks, no_staging=True)
    assert third.staging == {} and "staging:" not in job_log(local_catalog, third)
    assert f"(model {source}," in job_log(local_catalog, third)
    stop(third)
    kept = shell(local_catalog, f"ls {first.staging['to']}").stdout.split()
    assert kept == [source.rsplit("/", 1)[1]]


def test_without_keep_the_copy_goes_with_the_session(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any],
    stage_dir: str,
) -> None:  # fmt: skip
    Cluster.objects.filter(slug="local").update(stage_keep=False)
    session = run_until_served(owner, django_capture_on_commit_callbacks)
    copy = str(session.staging["to"])
    assert shell(local_catalog, f"test -d {copy}; echo $?").stdout.strip() == "0"
    stop(session)
    # scancel's TERM runs the job's clean-up, which may still be going as the portal marks the session cancelled.
    deadline = time.monotonic() + 30
    while "staging: removed the copy" not in job_log(local_catalog, session) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "staging: removed the copy" in job_log(local_catalog, session)
    assert shell(local_catalog, f"test -e {copy}; echo $?").stdout.strip() == "1"
