"""Measured figures end to end: SmolLM2-135M on the local cluster, in llama-server and in vLLM's CPU build, asked real
questions through the portal's API; the worker's read of the job's log (jobs/sessions/measuring.py) then holds the
weights, KV and compute figures the server logged (CPU buffers here) and the speeds of those requests, shown on the
session's page and by `sessions show --json`; and the wizard for the same choices shows them beside its estimate,
with the estimator's error on each part it estimates the same way."""

from __future__ import annotations

import html
import json
import re
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from catalog.estimate import estimate
from catalog.plans import request_for
from jobs.cluster import backend, layout
from jobs.models import ApiToken, LLMSession
from jobs.sessions import measuring
from jobs.tasks import measure_sessions
from portal import ssh
from portal.units import gib_text
from tests.e2e.sessions import cancel_all_jobs, drive, shell
from tests.e2e.test_real_model import QUESTION, RUNTIMES, launch_smollm2

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def mib(log: str, pattern: str) -> float:
    """The sum of the MiB figures of the log's lines that match `pattern` (the test's own reading of the log)."""
    return sum(float(m) for m in re.findall(pattern + r" =\s*([0-9.]+) MiB", log))


@pytest.mark.parametrize("runtime", ["llama.cpp", "vllm"])
def test_a_sessions_measured_figures_are_what_its_server_logged(
    runtime: str, portal_server: str, local_catalog: dict[str, Any], smollm2_hf: str, owner: Any,
    django_capture_on_commit_callbacks: Any, settings: Any,
) -> None:  # fmt: skip
    import openai

    settings.PORTAL_WIZARD_ASKS_SLURM = False  # the wizard's part here is the estimate, not the queue

    session = launch_smollm2(
        owner, django_capture_on_commit_callbacks, local_catalog, runtime=runtime, quant=RUNTIMES[runtime][0]
    )
    try:
        _, token = ApiToken.issue(owner, "script")
        client = openai.OpenAI(base_url=f"{portal_server}/api/v1", api_key=token, max_retries=0, timeout=120)
        for stream in (False, True, True):
            # a stream's prompt tokens are known where the client asks for its usage, as clients mostly do
            usage: Any = {"stream_options": {"include_usage": True}} if stream else {}
            reply = client.chat.completions.create(
                model=smollm2_hf, messages=QUESTION, max_tokens=24, temperature=0, stream=stream, **usage
            )
            if stream:
                assert "".join(c.choices[0].delta.content or "" for c in reply if c.choices)  # type: ignore[union-attr]
        assert measure_sessions.apply().get() >= 1  # the beat's task: a ready session never measured is due
        session.refresh_from_db()
        figures = session.measured
        log = shell(local_catalog, f"cat ~/{layout.session_dir(str(session.pk))}/{layout.NAMES.job_log}").stdout

        if runtime == "llama.cpp":
            assert figures["weights_gib"] == round(mib(log, r"CPU_Mapped model buffer size") / 1024, 6)
            assert figures["kv_gib"] == round(mib(log, r"CPU KV buffer size") / 1024, 6)
            assert figures["compute_gib"] == round(mib(log, r"CPU compute buffer size") / 1024, 6)
            assert figures["weights_gib"] > 0.05 and figures["kv_gib"] > 0 and figures["compute_gib"] > 0
            # the server's own timings of the three requests, as it printed them
            printed = [float(x) for x in re.findall(r"(?<!prompt) eval time = .*?([0-9.]+) tokens per second\)", log)]
            assert len(printed) == 3 and min(printed) * 0.99 <= figures["tokens_per_s"] <= max(printed) * 1.01
            assert figures["prompt_tokens_per_s"] > 0
        else:
            kv = re.search(r"Explicitly set \(([0-9.]+)/[0-9.]+\) GiB for KV cache", log)
            weights = re.search(r"Checkpoint size: ([0-9.]+) GiB", log)
            assert kv and weights, log[-2000:]
            assert figures["kv_gib"] == float(kv.group(1)) and figures["weights_gib"] == float(weights.group(1))
            # vLLM logs no per-request timings: the proxy's records of the requests give the speeds
            assert figures["tokens_per_s"] > 0 and figures["prompt_tokens_per_s"] > 0
        assert figures["total_gib"] >= figures["weights_gib"] + figures["kv_gib"]

        out = StringIO()
        call_command("sessions", "show", str(session.pk), "--json", stdout=out)
        assert json.loads(out.getvalue())["measured"] == figures
        web = Client()
        web.force_login(owner)
        page = web.get(reverse("jobs:session", args=[session.pk])).content.decode()
        assert 'id="measured"' in page and f"KV cache {figures['kv_gib']:.3f} GiB" in page

        # The wizard for the same choices: the measured figures beside the estimate, and the estimator's error
        variant = session.variant
        choices = {"model": variant.model.name, "quant": variant.quantization, "runtime": runtime,
                   "context": str(session.context_length)}  # fmt: skip
        wizard = html.unescape(web.get(reverse("jobs:launch"), choices).content.decode())
        assert 'id="measured-here"' in wizard, wizard[-3000:]
        line = wizard.split(f'data-gpu="{session.gpu_type.name}">', 1)[1].split("</li>", 1)[0]
        assert "1 session:" in line, line
        est = estimate(request_for(session.variant, runtime, session.context_length))
        # in host memory llama-server maps the GGUF file's tensors once: the estimate's weights are the file's size
        file_weights = session.variant.size_gib if runtime == "llama.cpp" else est.weights_gib
        error = file_weights / figures["weights_gib"] - 1
        assert f"weights <strong>{gib_text(figures['weights_gib'])}</strong> (estimate {error:+.0%})" in line, line
        if runtime == "llama.cpp":
            assert "(host memory: no GPU used)" in line, line  # llama-server's buffers said CPU
            error = est.kv_cache_gib / figures["kv_gib"] - 1
            assert f"KV cache <strong>{gib_text(figures['kv_gib'])}</strong> (estimate {error:+.0%})" in line, line
            error = est.compute_gib / figures["compute_gib"] - 1
            assert f"compute <strong>{gib_text(figures['compute_gib'])}</strong> (estimate {error:+.0%})" in line
        else:  # vLLM's KV cache is what it was given, not what the context needs: shown, not compared
            assert f"KV cache <strong>{gib_text(figures['kv_gib'])}</strong>," in line, line

        assert measuring.due() == []  # read: not again before MEASURE_EVERY
    finally:
        cancel_all_jobs()
        drive(LLMSession.objects.get(pk=session.pk), lambda s: s.is_ended)
        ssh.pool.close_all()
        backend.close_forwards()
