"""Model services on the local cluster (issue 28, first part): a service of two replicas, real llama-server sessions
of the tiny model, answers by its name through the portal as uvicorn serves it; Slurm killing one replica's job
(scancel, as a node failure or preemption would) under a steady client loses no request, and the service is brought
back to two ready replicas (the keeper launches a new one, as beat's keep_services does)."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from jobs.models import ApiToken, LLMSession, ModelService, State
from jobs.services import actions, keep
from jobs.tasks import submit_session
from portal import ssh
from tests.conftest import LAUNCH
from tests.e2e.sessions import cancel_all_jobs, drive, local_account

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
CHAT = {"model": "llama-lab", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def keep_up(service: ModelService) -> list[str]:
    """One round of beat's keep_services for this service: the replicas it created, submitted."""
    created = keep.reconcile(service.pk).created
    for pk in created:
        submit_session.apply(args=(pk,))
    return created


def running(session_pk: str) -> LLMSession:
    return drive(LLMSession.objects.get(pk=session_pk), lambda s: s.state == State.RUNNING or s.is_ended)


@pytest.fixture
def service(
    local_catalog: dict[str, Any], owner: Any, django_capture_on_commit_callbacks: Any
) -> Iterator[ModelService]:
    local_account(owner, local_catalog)
    with django_capture_on_commit_callbacks(execute=False):
        made = actions.create(owner, "llama-lab", LAUNCH, min_replicas=2, max_replicas=2)
    for pk in keep_up(made):
        assert running(pk).state == State.RUNNING
    yield made
    cancel_all_jobs()
    ssh.pool.close_all()


class SteadyClient(threading.Thread):
    """Asks the service by name every 0.1 s until stopped; keeps every answer's status."""

    def __init__(self, portal: str, token: str) -> None:
        super().__init__(daemon=True)
        self.portal, self.token = portal, token
        self.statuses: list[int] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.portal, headers={"Authorization": f"Bearer {self.token}"}, timeout=60) as http:
            while not self.stopping.wait(0.1):
                try:
                    self.statuses.append(http.post("/api/v1/chat/completions", json=CHAT).status_code)
                except httpx.HTTPError:
                    self.statuses.append(0)


def test_a_replica_killed_by_slurm_under_a_steady_client_loses_no_request(
    portal_server: str, service: ModelService, owner: Any
) -> None:
    first, second = LLMSession.objects.filter(service=service).order_by("created_at")
    client = SteadyClient(portal_server, ApiToken.issue(owner, "steady")[1])
    client.start()
    try:
        while len(client.statuses) < 10:  # both replicas answer by the service's name
            threading.Event().wait(0.1)
        subprocess.run(["scancel", first.job_id], check=True, timeout=30)
        drive(first, lambda s: s.is_ended)  # the poll learns the job ended
        while len(client.statuses) < 30:  # the requests in the meantime went to the other replica
            threading.Event().wait(0.1)
        (replacement,) = keep_up(service)
        assert running(replacement).state == State.RUNNING
        settled = len(client.statuses)
        while len(client.statuses) < settled + 10:
            threading.Event().wait(0.1)
    finally:
        client.stopping.set()
        client.join(60)
    assert client.statuses and set(client.statuses) == {200}, client.statuses
    live = LLMSession.objects.filter(service=service, state=State.RUNNING).values_list("pk", flat=True)
    assert {str(pk) for pk in live} == {str(second.pk), replacement}
