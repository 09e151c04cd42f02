"""Fixtures of the e2e tests on the local cluster."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from catalog.models import ClusterAccount
from jobs.cluster import backend
from portal import ssh
from tests.e2e.sessions import cancel_all_jobs, local_account


@pytest.fixture
def account(local_catalog: dict[str, Any], owner: Any) -> Iterator[ClusterAccount]:
    """The owner's account on the local cluster; afterwards no job of the test is left and no connection open."""
    yield local_account(owner, local_catalog)
    cancel_all_jobs()
    ssh.pool.close_all()
    backend.close_forwards()
