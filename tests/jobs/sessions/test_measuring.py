"""The worker's read of a session's measured figures (jobs/sessions/measuring.py): which sessions are due, what is
kept, the proxy's speeds where the log has none, and a cluster that cannot be asked."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from catalog.measured import FIELDS
from catalog.models import ClusterAccount, SiteMeasurement
from jobs.models import LLMSession, ProxyRequest, Purpose, State
from jobs.sessions import measuring
from jobs.sessions.actions import launch
from portal import ssh
from tests.conftest import LAUNCH
from tests.jobs.cluster.test_logs import cluster_says

pytestmark = pytest.mark.django_db
DATA = Path(__file__).parents[1] / "cluster" / "data" / "measured"


@pytest.fixture
def session(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> LLMSession:
    with django_capture_on_commit_callbacks(execute=False):
        made = launch(owner, LAUNCH)
    now = timezone.now()
    LLMSession.objects.filter(pk=made.pk).update(state=State.RUNNING, job_id="4242", ready_at=now, started_at=now)
    return LLMSession.objects.select_related("account__cluster").get(pk=made.pk)


def test_a_ready_session_is_due_once_then_after_a_while_and_once_after_its_end(
    session: LLMSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = cluster_says(monkeypatch, (DATA / "llama-server-0.3.36-cpu.log").read_text())
    assert measuring.due() == [session]
    assert measuring.measure_due() == 1
    session.refresh_from_db()
    assert session.measured["kv_gib"] == round(90 / 1024, 6) and session.measured_at
    assert len(commands) == 1 and str(session.pk) in commands[0]
    assert measuring.due() == []
    LLMSession.objects.filter(pk=session.pk).update(measured_at=timezone.now() - measuring.MEASURE_EVERY * 2)
    assert measuring.due() == [session]
    LLMSession.objects.filter(pk=session.pk).update(state=State.COMPLETED, ended_at=timezone.now())
    assert measuring.due() == [session]  # its last requests
    measuring.measure_due()
    assert measuring.due() == []
    LLMSession.objects.filter(pk=session.pk).update(measured_at=None, ended_at=timezone.now() - timedelta(days=2))
    assert measuring.due() == []  # long over: left as it was


def test_without_timings_in_the_log_the_proxys_records_give_the_speeds(
    session: LLMSession, owner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster_says(monkeypatch, (DATA / "vllm-0.32.0-cpu.log").read_text())
    row = {"session": session, "user": owner, "route": "api", "endpoint": "chat", "status": 200, "duration_ms": 1}
    ProxyRequest.objects.create(**row, prompt_tokens=120, cached_tokens=20, completion_tokens=50, ttft_ms=500,
                                tokens_per_s=25.0)  # fmt: skip
    ProxyRequest.objects.create(**row, prompt_tokens=10, completion_tokens=150, tokens_per_s=50.0)  # not streamed
    ProxyRequest.objects.create(**{**row, "status": 500}, prompt_tokens=999, completion_tokens=999, ttft_ms=1,
                                tokens_per_s=1.0)  # fmt: skip
    figures = measuring.measure(session)
    # generation: 200 tokens over 50/25 + 150/50 = 5 s; the prompt: 100 computed tokens over 0.5 s (streams only)
    speeds = {"prompt_tokens_per_s": 200.0, "tokens_per_s": 40.0}
    assert figures == {"weights_gib": 0.25, "kv_gib": 0.06, "total_gib": 0.31, "total_from": "buffers", **speeds}


def test_a_cluster_that_cannot_be_asked_leaves_the_figures_as_they_were(
    session: LLMSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    LLMSession.objects.filter(pk=session.pk).update(measured={"kv_gib": 1.0})

    def away(*args: Any, **kwargs: Any) -> ssh.CommandResult:
        raise ssh.SSHError(None, "no route to host")

    monkeypatch.setattr(ssh.pool, "run", away)
    assert measuring.measure(session) is None
    session.refresh_from_db()
    assert session.measured == {"kv_gib": 1.0} and session.measured_at is None


def test_hostile_output_keeps_nothing_but_checked_numbers(session: LLMSession, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster_says(monkeypatch, "load_tensors: <img src=x> model buffer size = 1 MiB\nCUDA0 KV buffer size = nan MiB\n")
    assert measuring.measure(session) == {}
    session.refresh_from_db()
    assert session.measured == {} and session.measured_at is not None


def test_the_page_and_the_command_line_show_the_measured_figures(session: LLMSession, owner: Any) -> None:
    import json
    from io import StringIO

    from django.core.management import call_command
    from django.test import Client
    from django.urls import reverse

    figures = {"weights_gib": 4.300283, "kv_gib": 1.0, "tokens_per_s": 114.6, "devices": {"CUDA0": {"kv_gib": 1.0}}}
    LLMSession.objects.filter(pk=session.pk).update(
        measured={**figures, "evil": "<script>"}, measured_at=timezone.now()
    )
    out = StringIO()
    call_command("sessions", "show", str(session.pk), "--json", stdout=out)
    assert json.loads(out.getvalue())["measured"] == figures
    client = Client()
    client.force_login(owner)
    page = client.get(reverse("jobs:session", args=[session.pk])).content.decode()
    assert "weights 4.300 GiB, KV cache 1.000 GiB" in page and "generation 114.6 tokens/s" in page
    assert "<code>CUDA0</code>: kv 1.000 GiB" in page and "<script>" not in page


def test_a_sessions_figures_are_kept_as_the_sites_measurement_of_its_choices(
    session: LLMSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster_says(monkeypatch, (DATA / "llama-server-0.3.36-cpu.log").read_text())
    figures = measuring.measure(session)
    assert figures is not None
    row = SiteMeasurement.objects.get(source=f"session:{session.pk}")
    choices = (row.variant_id, row.runtime, row.context, row.parallel, row.gpu_type_id, row.gpus_per_node, row.nodes)
    assert choices == (session.variant_id, "llama.cpp", 1024, 1, session.gpu_type_id, 1, 1)
    # CPU buffers only: a session in host memory, its total the sum of the server's buffers
    assert row.on_host and row.total_from == "buffers"
    assert row.figures == {name: figures[name] for name in FIELDS if name in figures} and "devices" not in row.figures
    # read again with nothing in the log: the site forgets it as the session does
    cluster_says(monkeypatch, "nothing here\n")
    assert measuring.measure(session) == {}
    assert not SiteMeasurement.objects.exists()


def test_a_gpu_sessions_buffers_are_not_host_memory(session: LLMSession, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster_says(monkeypatch, (DATA / "llama-server-b3600-2gpu.log").read_text())
    measuring.measure(session)
    row = SiteMeasurement.objects.get()
    assert not row.on_host and row.total_from == "nvidia-smi"


def test_an_embeddings_session_is_no_measurement_of_serving(
    session: LLMSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    LLMSession.objects.filter(pk=session.pk).update(purpose=Purpose.EMBEDDINGS)
    session.refresh_from_db()
    cluster_says(monkeypatch, (DATA / "llama-server-0.3.36-cpu.log").read_text())
    assert measuring.measure(session)
    assert not SiteMeasurement.objects.exists()
