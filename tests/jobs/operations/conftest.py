"""Scraping /metrics in tests, and a metrics directory that holds only this run's counts."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import pytest
from django.conf import settings
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from jobs.models import ScrapeToken

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@pytest.fixture(scope="session", autouse=True)
def _no_counts_from_earlier_runs() -> None:
    """The tests run with a var directory that outlives them (PORTAL_VAR_DIR), so the counter files of earlier runs'
    processes would add up into every scrape. Those of this host's processes that have exited are removed; those of
    processes still running (this one, a portal serving from the same directory) stay, since a process keeps writing
    to its open file and its later counts would be lost. The tests compare before and after all the same."""
    host = socket.gethostname().replace("_", "-")  # as jobs.operations.metrics names its files
    for path in settings.PORTAL_METRICS_DIR.glob("*.db"):
        owner_host, _, pid = path.stem.rpartition("_")[2].rpartition("-")
        if owner_host == host and pid.isdigit() and not _running(int(pid)):
            path.unlink(missing_ok=True)


def parse(text: str) -> Samples:
    """Each sample by name and labels, as Prometheus's own parser reads the text."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def scrape_token(db: None) -> str:
    return ScrapeToken.issue("prometheus")[1]


@pytest.fixture
def scrape(client: Client, scrape_token: str) -> Callable[[], Samples]:
    """Scrape /metrics as Prometheus does, and parse it."""

    def scraped() -> Samples:
        reply: Any = client.get("/metrics", headers={"authorization": f"Bearer {scrape_token}"})
        assert reply.status_code == 200, reply.content
        return parse(reply.content.decode())

    return scraped
