"""Fixtures for session tests that need no cluster: the example catalog's local cluster with a pinned (fake) key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from catalog.models import Cluster
from jobs.models import ClusterAccount

HOST_KEY = "[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


@pytest.fixture
def account(example_catalog: Path, owner: Any) -> ClusterAccount:
    """The owner's personal account on the example catalog's local cluster."""
    Cluster.objects.filter(slug="local").update(host_key=HOST_KEY)
    account = ClusterAccount(cluster=Cluster.objects.get(slug="local"), user=owner, username="ada")
    account.save()
    return account
