"""Fixtures of the e2e tests on the local cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from catalog.models import Cluster, ClusterAccount
from jobs.cluster import backend
from portal import ssh
from tests.e2e.sessions import cancel_all_jobs, local_account
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
