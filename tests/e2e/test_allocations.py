"""Allocations on the local cluster (issue 29), through the real parts: Slurm over SSH, llama-server, the portal as
uvicorn serves it.

- A launch over a GPU-hour allocation is refused with its reason (through the command line, as through the launch
  form, which both validate with LaunchForm) and no job reaches Slurm; one that fits runs.
- A token allocation stops the user's API calls with 429 once spent, and lets them through once its period has
  reset. The clock is not moved: the requests that spent it are moved back into the day before, which is what a new
  day looks like to the allocation.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from catalog.models import ClusterAccount
from jobs.models import Allocation, ApiToken, LLMSession, ProxyRequest, State
from tests.conftest import LAUNCH
from tests.e2e.sessions import drive, start
from tests.e2e.test_worker import worker_env
from tests.worker import PortalServer

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def portal_jobs() -> list[str]:
    listed = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, check=True)
    return [name for name in listed.stdout.split() if name.startswith("hpcllm-")]


def test_a_launch_over_a_gpu_hour_allocation_is_refused_and_no_job_reaches_slurm(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    Allocation.objects.create(user=owner, gpu_hours=1, period="week")
    flags = [f"--{name}={value}" for name, value in {**LAUNCH, "gpus": 2, "walltime": 45}.items()]
    with pytest.raises(CommandError) as refused:
        call_command("sessions", "launch", "--user", owner.username, *flags)
    said = str(refused.value)
    assert "reserves up to 1.5 GPU-hours (2 GPUs for 45 min)" in said
    assert "allocation of user ada has 1 of 1 GPU-hours left this week; it resets on" in said
    assert not LLMSession.objects.exists() and portal_jobs() == []
    session = start(owner, django_capture_on_commit_callbacks, walltime=30)  # half of it fits
    session = drive(session, lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    with pytest.raises(CommandError, match=r"has 0\.5 of 1 GPU-hours left this week"):
        call_command("sessions", "launch", "--user", owner.username, *flags)
    assert len(portal_jobs()) == 1


@pytest.fixture
def portal(tmp_path: Path) -> Iterator[str]:
    """The portal asking the database about token allocations on every request (PORTAL_ALLOCATION_CHECK_S=0)."""
    server = PortalServer({**worker_env(), "PORTAL_ALLOCATION_CHECK_S": "0"}, tmp_path / "uvicorn.log")
    yield server.start()
    server.stop()


def recorded(user: Any, n: int) -> None:
    deadline = time.monotonic() + 10
    while ProxyRequest.objects.filter(user=user).count() < n:
        assert time.monotonic() < deadline, "the usage rows were not written"
        time.sleep(0.1)


def test_spent_tokens_stop_the_users_api_calls_with_429_until_the_period_resets(
    portal: str, account: ClusterAccount, owner: Any, other_user: Any, django_capture_on_commit_callbacks: Any
) -> None:
    session = start(owner, django_capture_on_commit_callbacks, alias="tiny")
    session = drive(session, lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    Allocation.objects.create(user=owner, tokens=60, period="day")
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    api = httpx.Client(base_url=portal, timeout=60,
                       headers={"Authorization": f"Bearer {ApiToken.issue(owner, 'script')[1]}"})  # fmt: skip
    with api:
        answered = 0
        while True:
            reply = api.post("/api/v1/chat/completions", json=ask)
            if reply.status_code != 200:
                break
            answered += 1
            recorded(owner, answered)
            assert answered < 20, "the allocation never ran out"
        assert reply.status_code == 429, reply.text
        error = reply.json()["error"]
        assert error["code"] == "insufficient_quota"
        assert "allocation of user ada has spent its 60 tokens today" in error["message"]
        assert int(reply.headers["retry-after"]) <= 86400
        spent = sum(r.prompt_tokens + r.completion_tokens for r in ProxyRequest.objects.filter(user=owner))
        assert spent >= 60 and answered >= 1
        # A new day: the requests that spent it now lie in yesterday.
        ProxyRequest.objects.filter(user=owner).update(at=timezone.now() - timedelta(days=1))
        again = api.post("/api/v1/chat/completions", json=ask)
        assert again.status_code == 200, again.text
