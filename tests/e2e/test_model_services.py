"""Model services on the local cluster (issue 28): real llama-server sessions of the tiny model as replicas, used by
the service's name through the portal as uvicorn serves it (its load published across processes as in production).

- Slurm killing one replica's job (scancel, as a node failure or preemption would) under a steady client loses no
  request, and the service is brought back to two ready replicas.
- A service whose replicas have two minutes of walltime rolls them over under a steady client: no failed request, and
  never fewer ready replicas than its minimum.
- Under load it scales up to max, and back down to min after its idle time.
- A replica whose server stops answering (hung, the job alive) is replaced after three failed health checks.
- With min 0, the first request is answered 503 with Retry-After and wakes it; a later one is answered. A member of
  the service's group uses it (their usage, on the owner's replica); someone outside gets 404.

The tests run the keeper's rounds and the poll themselves, as beat would (every half second here)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from jobs.models import ApiToken, LLMSession, ModelService, ProxyRequest, State
from jobs.models.services import READY_REPLICA
from jobs.services import actions, health, keep
from jobs.tasks import cancel_session, poll_account, submit_session
from portal import ssh
from tests.conftest import LAUNCH, SMOLLM2_LAUNCH
from tests.e2e.sessions import cancel_all_jobs, drive, local_account

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
CHAT = {"model": "llama-lab", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def keep_up(service: ModelService) -> list[str]:
    """One round of beat's keep_services for this service: the replicas it created submitted, those it let go
    cancelled; returns the created."""
    done = keep.reconcile(service.pk)
    for pk in done.created:
        submit_session.apply(args=(pk,))
    for pk in done.cancel:
        cancel_session.apply(args=(pk,))
    return done.created


def ready_count(service: ModelService) -> int:
    """Replicas that take new requests now (READY_REPLICA: serving, with an address, not draining)."""
    return LLMSession.objects.filter(service=service, **READY_REPLICA).exclude(host="").count()


def beat(service: ModelService, until: Any, timeout_s: float, samples: list[int] | None = None) -> None:
    """Poll the cluster and run the keeper every half second, as beat does, until until() or the timeout; the ready
    count after each round goes into `samples`."""
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, f"gave up after {timeout_s}s: {list(service.replicas.values())}"
        poll_account(service.replicas.first().account_id)  # type: ignore[union-attr]
        keep_up(service)
        if samples is not None:
            samples.append(ready_count(service))
        time.sleep(0.5)


def running(session_pk: str) -> LLMSession:
    return drive(LLMSession.objects.get(pk=session_pk), lambda s: s.state == State.RUNNING or s.is_ended)


@pytest.fixture
def make(local_catalog: dict[str, Any], owner: Any, django_capture_on_commit_callbacks: Any) -> Iterator[Any]:
    """Make a service of the owner's on the local cluster; every job is cancelled afterwards."""
    local_account(owner, local_catalog)

    def made(launch: dict[str, Any] = LAUNCH, **fields: Any) -> ModelService:
        with django_capture_on_commit_callbacks(execute=False):
            return actions.create(owner, "llama-lab", launch, **fields)

    yield made
    cancel_all_jobs()
    ssh.pool.close_all()


@pytest.fixture
def service(make: Any) -> ModelService:
    made: ModelService = make(min_replicas=2, max_replicas=2)
    for pk in keep_up(made):
        assert running(pk).state == State.RUNNING
    return made


class SteadyClient(threading.Thread):
    """Asks the service by name every `every_s` until stopped; keeps every answer's status."""

    def __init__(self, portal: str, token: str, every_s: float = 0.1, ask: dict[str, Any] = CHAT) -> None:
        super().__init__(daemon=True)
        self.portal, self.token, self.every_s, self.ask = portal, token, every_s, ask
        self.statuses: list[int] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.portal, headers={"Authorization": f"Bearer {self.token}"}, timeout=60) as http:
            while not self.stopping.wait(self.every_s):
                try:
                    self.statuses.append(http.post("/api/v1/chat/completions", json=self.ask).status_code)
                except httpx.HTTPError:
                    self.statuses.append(0)

    def __enter__(self) -> SteadyClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.join(60)


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


def test_a_service_rolls_its_replicas_over_before_walltime_with_no_failed_request(
    portal_server: str, make: Any, owner: Any
) -> None:
    service = make({**LAUNCH, "walltime": 2}, min_replicas=1, max_replicas=1)
    (first,) = keep_up(service)
    assert running(first).state == State.RUNNING
    old = LLMSession.objects.get(pk=first)
    samples: list[int] = []
    with SteadyClient(portal_server, ApiToken.issue(owner, "steady")[1]) as client:

        def handed_over() -> bool:
            old.refresh_from_db()
            return old.is_ended and len(client.statuses) > 20

        # Its successor is launched within the lead time (its own time to ready, plus a margin) before the
        # walltime, takes over when ready; the old one drains and is cancelled, well before Slurm's time limit.
        beat(service, handed_over, timeout_s=150, samples=samples)
    assert client.statuses and set(client.statuses) == {200}, client.statuses
    assert samples and min(samples) >= 1, samples  # never fewer ready than min
    assert old.state == State.CANCELLED and "replaced" in old.end_reason, (old.state, old.end_reason)
    (successor,) = LLMSession.objects.filter(service=service, state=State.RUNNING)
    assert successor.replaces_id == old.pk


def test_a_service_scales_up_under_load_and_back_down_after_its_idle_time(
    portal_server: str, make: Any, owner: Any, smollm2: str
) -> None:
    # SmolLM2 on these CPUs answers 64 tokens in about a second, so four clients keep more than one request in flight
    # (the target) within the token's rate limit; the tiny test model answers too fast to load a replica.
    service = make(SMOLLM2_LAUNCH, min_replicas=1, max_replicas=2, target_inflight=1, idle_minutes=0.2)
    (first,) = keep_up(service)
    assert running(first).state == State.RUNNING
    token = ApiToken.issue(owner, "load")[1]
    longer = {**CHAT, "max_tokens": 64, "ignore_eos": True}  # llama-server's own field: always 64 tokens
    load = [SteadyClient(portal_server, token, every_s=0.2, ask=longer) for _ in range(4)]
    for client in load:
        client.start()
    try:
        beat(service, lambda: ready_count(service) == 2, timeout_s=120)  # above target for 15 s: a second replica
    finally:
        for client in load:
            client.stopping.set()
        for client in load:
            client.join(60)
    assert all(set(client.statuses) == {200} for client in load)
    service.refresh_from_db()
    assert service.keeps == 2

    def back_to_one() -> bool:
        return LLMSession.objects.filter(service=service, state__in=[State.RUNNING, State.STARTING]).count() == 1

    beat(service, back_to_one, timeout_s=90)  # quiet for the idle time (12 s): one drains and is cancelled
    service.refresh_from_db()
    assert service.keeps == 1


def test_a_service_with_min_0_wakes_on_its_first_request_for_its_group_only(
    portal_server: str, make: Any, owner: Any, shared_user: Any, other_user: Any, lab: Any
) -> None:
    service = make(min_replicas=0, max_replicas=1, audience="groups", groups=[lab])
    assert keep_up(service) == []  # nothing kept until asked
    # The member's token is scoped to the service (issue 29's scoped tokens, through the real parts too).
    scoped = ApiToken.issue(shared_user, "member", allowed_models=["llama-lab"])[1]
    member = httpx.Client(base_url=portal_server, headers={"Authorization": f"Bearer {scoped}"}, timeout=60)
    outsider = httpx.Client(base_url=portal_server, headers={"Authorization": f"Bearer "
                            f"{ApiToken.issue(other_user, 'outsider')[1]}"}, timeout=60)  # fmt: skip
    with member, outsider:
        first = member.post("/api/v1/chat/completions", json=CHAT)
        assert first.status_code == 503 and int(first.headers["retry-after"]) >= 1, first.text
        assert outsider.post("/api/v1/chat/completions", json=CHAT).status_code == 404
        (replica,) = keep_up(service)  # the request woke it: the keeper launches one
        beat(service, lambda: ready_count(service) == 1, timeout_s=120)
        answered = member.post("/api/v1/chat/completions", json=CHAT)
        assert answered.status_code == 200, answered.text
        assert [m["id"] for m in member.get("/api/v1/models").json()["data"]] == ["llama-lab"]
        elsewhere = member.post("/api/v1/chat/completions", json={**CHAT, "model": "tiny-llama"})
        assert (elsewhere.status_code, elsewhere.json()["error"]["code"]) == (403, "model_not_allowed")
        assert outsider.post("/api/v1/chat/completions", json=CHAT).status_code == 404
    # The member's request is theirs in the usage records, on the owner's replica (whose GPU-hours are the owner's).
    deadline = time.monotonic() + 10
    while not ProxyRequest.objects.filter(user=shared_user, status=200).exists():
        assert time.monotonic() < deadline, "no usage row"
        time.sleep(0.2)
    row = ProxyRequest.objects.get(user=shared_user, status=200)
    assert str(row.session_id) == replica and row.session.owner == owner
    assert not ProxyRequest.objects.filter(user=other_user).exists()


def test_a_replica_whose_server_stops_answering_is_replaced(
    portal_server: str, make: Any, owner: Any, monkeypatch: Any
) -> None:
    """Slurm still says running, but the server is hung (SIGSTOP: a wedged GPU, a deadlock): its health checks fail,
    three in a row replace it, and the service answers by its name again."""
    monkeypatch.setattr(health, "CHECK_EVERY", timedelta(seconds=1))
    monkeypatch.setattr(health, "CHECK_TIMEOUT_S", 2.0)
    service = make(min_replicas=1, max_replicas=1)
    (first,) = keep_up(service)
    hung = running(first)
    assert hung.state == State.RUNNING
    listening = subprocess.run(["ss", "-ltnpH", f"sport = :{hung.port}"], capture_output=True, text=True, check=True)
    pids = {int(pid) for pid in re.findall(r"pid=(\d+)", listening.stdout)}
    assert pids, listening.stdout
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:

        def replaced() -> bool:
            for pk in health.check_all():
                cancel_session.apply(args=(pk,))
            hung.refresh_from_db()
            return hung.is_ended and ready_count(service) == 1

        beat(service, replaced, timeout_s=120)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert hung.state == State.CANCELLED and "stopped answering" in hung.end_reason, (hung.state, hung.end_reason)
    token = ApiToken.issue(owner, "after")[1]
    answered = httpx.post(f"{portal_server}/api/v1/chat/completions", json=CHAT, timeout=60,
                          headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    assert answered.status_code == 200, answered.text
