"""The sessions pages' shared fixture: the owner signed in, with the wizard asking no cluster."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client


@pytest.fixture
def wizard_client(client: Client, owner: Any, settings: Any) -> Client:
    """The owner's browser; the wizard's Slurm estimates are tested in tests/e2e (unit tests never reach a cluster)."""
    settings.PORTAL_WIZARD_ASKS_SLURM = False
    client.force_login(owner)
    return client
