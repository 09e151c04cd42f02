"""The job's staging report: what of it the portal keeps, and the line a session's card shows."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from catalog.models import ClusterAccount
from jobs.models import LLMSession, State
from jobs.sessions import staging
from jobs.sessions.actions import launch
from jobs.templatetags.portal_format import staging_line
from tests.conftest import LAUNCH

GIB = 1024**3
REPORT = {"state": "copying", "bytes": 3 * GIB, "total": 8 * GIB, "seconds": 12, "from": "/shared/m.gguf", "to": ""}


def test_a_report_keeps_its_known_fields_only() -> None:
    assert staging.clean({**REPORT, "extra": "<b>x</b>"}) == REPORT
    assert staging.clean({**REPORT, "from": "/p" * 400})["from"] == ("/p" * 400)[:500]  # type: ignore[index]


@pytest.mark.parametrize(
    "bad",
    [{**REPORT, "state": "exploded"}, {**REPORT, "bytes": -1}, {**REPORT, "total": "8"}, {**REPORT, "seconds": True},
     {**REPORT, "to": None}, {"state": "copied"}],
)  # fmt: skip
def test_a_report_that_is_not_one_is_dropped(bad: dict[str, object]) -> None:
    assert staging.clean(bad) is None


def test_each_state_reads_as_one_line() -> None:
    assert staging_line(REPORT) == "copying the model to node-local storage: 3.00 GiB of 8.00 GiB (37 %), 12 s"
    copied = {**REPORT, "state": "copied", "bytes": 8 * GIB, "to": "/tmp/hpc-llm-portal-u/ab12"}
    assert (
        staging_line(copied) == "copied the model (8.00 GiB) to node-local storage in 12 s: /tmp/hpc-llm-portal-u/ab12"
    )
    assert (
        staging_line({**copied, "state": "reused"})
        == "reused the node-local copy of the model in /tmp/hpc-llm-portal-u/ab12"
    )
    assert "loads from where it lives" in staging_line({**REPORT, "state": "skipped"})


def test_the_card_shows_the_copy_while_the_session_starts(
    client: Client, owner: Any, account: ClusterAccount, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, LAUNCH)
    LLMSession.objects.filter(pk=session.pk).update(state=State.STARTING, staging=REPORT)
    client.force_login(owner)
    page = client.get("/sessions/").content.decode()
    assert "Starting: copying the model to node-local storage: 3.00 GiB of 8.00 GiB (37 %), 12 s" in page
    LLMSession.objects.filter(pk=session.pk).update(
        state=State.RUNNING, host="127.0.0.4", port=4000, staging={**REPORT, "state": "reused", "to": "/tmp/x<y"}
    )
    page = client.get("/sessions/").content.decode()
    assert "Weights: reused the node-local copy of the model in /tmp/x&lt;y." in page
    assert "Weights" in client.get(f"/sessions/{session.pk}/").content.decode()
