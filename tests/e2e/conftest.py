"""Fixtures of the e2e tests on the local cluster."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from catalog.models import Cluster, ClusterAccount, ClusterRuntime
from jobs.cluster import backend
from jobs.models import LLMSession, State
from portal import ssh
from tests.e2e.sessions import cancel_all_jobs, drive, local_account
from tests.e2e.test_worker import worker_env
from tests.worker import PortalServer


@pytest.fixture
def account(local_catalog: dict[str, Any], owner: Any) -> Iterator[ClusterAccount]:
    """The owner's account on the local cluster; afterwards no job of the test is left and no connection open."""
    yield local_account(owner, local_catalog)
    cancel_all_jobs()
    ssh.pool.close_all()
    backend.close_forwards()


@pytest.fixture
def smollm2_hf(local_catalog: dict[str, Any], smollm2: str) -> str:
    """The same SmolLM2 as a safetensors directory: a second variant (bf16) of the card the GGUF filled."""
    from catalog.add_model import add, inspect

    path = local_catalog["models"]["smollm2_hf"]
    added = add(inspect(path), path, Cluster.objects.get(slug="local"))
    assert added.card.name == smollm2
    return smollm2


@pytest.fixture
def portal_server(tmp_path: Path) -> Iterator[str]:
    server = PortalServer(worker_env(), tmp_path / "uvicorn.log")
    yield server.start()
    server.stop()


@pytest.fixture
def tool_caller(
    local_catalog: dict[str, Any], smollm2: str, owner: Any, django_capture_on_commit_callbacks: Any
) -> Iterator[LLMSession]:
    """A SmolLM2 session whose job runs tool_model_server.py as the cluster's llama-server."""
    from jobs.sessions.actions import launch
    from jobs.tasks import submit_session
    from tests.conftest import SMOLLM2_LAUNCH

    folder = Path(tempfile.mkdtemp(prefix="tool-caller-", dir="/tmp"))
    folder.chmod(0o755)  # the cluster's user runs it
    server = folder / "llama-server"
    shutil.copy(Path(__file__).with_name("tool_model_server.py"), server)
    server.chmod(0o755)
    ClusterRuntime.objects.filter(cluster__slug="local", runtime__kind="llama.cpp").update(binary=str(server))
    local_account(owner, local_catalog)
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**SMOLLM2_LAUNCH, "alias": "caller"})
    submit_session.apply(args=(str(session.pk),))
    session = drive(LLMSession.objects.get(pk=session.pk), lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    yield session
    cancel_all_jobs()
    ssh.pool.close_all()
    shutil.rmtree(folder, ignore_errors=True)
