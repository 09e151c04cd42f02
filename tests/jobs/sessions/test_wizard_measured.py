"""The wizard beside its estimate: what sessions of the same choices measured on this site (the median, how many),
the estimator's error on each part, a warning with the measured figure where it is off by more than 10 %, and the
speed measured on each option's GPU type."""

from __future__ import annotations

import html
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from catalog.estimate import estimate
from catalog.models import GPUType, ModelVariant, SiteMeasurement
from catalog.plans import request_for

pytestmark = pytest.mark.django_db
CHOICES = {"model": "tiny-llama", "quant": "F16", "runtime": "llama.cpp", "context": "1024"}


@pytest.fixture(autouse=True)
def _no_ssh(settings: Any) -> None:
    settings.PORTAL_WIZARD_ASKS_SLURM = False


@pytest.fixture
def owner_client(client: Client, owner: Any, account: Any) -> Client:
    client.force_login(owner)
    return client


def page(client: Client, **choices: str) -> str:
    reply = client.get("/launch/", {**CHOICES, **choices})
    assert reply.status_code == 200
    return html.unescape(reply.content.decode())


def keep(source: str, figures: dict[str, Any], **choices: Any) -> None:
    values = {"variant": ModelVariant.objects.get(model__name="tiny-llama"), "runtime": "llama.cpp", "context": 1024,
              "parallel": 1, "gpu_type": GPUType.objects.get(name="a100-80g"), "on_host": True,
              "total_from": "buffers", **choices}  # fmt: skip
    SiteMeasurement.keep(source, figures, timezone.now(), **values)


def host_parts(context: int = 1024, parallel: int = 1) -> dict[str, float]:
    """What a tiny-llama session in host memory would report were the estimator exact."""
    est = estimate(request_for(ModelVariant.objects.get(model__name="tiny-llama"), "llama.cpp", context, parallel))
    parts = {"weights_gib": est.weights_gib, "kv_gib": est.kv_cache_gib, "compute_gib": est.compute_gib}
    return {**parts, "total_gib": sum(parts.values())}


def test_the_wizard_shows_the_median_of_the_sites_sessions_and_the_estimates_error(owner_client: Client) -> None:
    parts = host_parts()
    for i, factor in enumerate((0.98, 1.0, 1.5)):
        keep(f"s{i}", {**parts, "kv_gib": parts["kv_gib"] * factor, "tokens_per_s": 40.0 + 10 * i})
    text = page(owner_client)
    assert 'id="measured-here"' in text
    line = text.split('data-gpu="a100-80g">', 1)[1].split("</li>", 1)[0]
    assert line.startswith("1 x a100-80g (host memory: no GPU used), 3 sessions:")
    assert "KV cache <strong>" in line and "(estimate +0%)" in line  # the median of three is the exact one
    assert "off by more than 10%" not in line
    assert "measured here per request: 50 tokens/s generated (3 sessions)" in text


def test_an_estimate_off_by_more_than_ten_percent_is_said_with_the_measured_figure(owner_client: Client) -> None:
    parts = host_parts()
    off = {**parts, "compute_gib": parts["compute_gib"] * 2, "total_gib": 0.25}
    keep("s1", off)
    keep("s2", off)
    text = page(owner_client)
    line = text.split('data-gpu="a100-80g">', 1)[1].split("</li>", 1)[0]
    assert "compute <strong>" in line and "(estimate -50%)" in line
    assert "The estimate is off by more than 10% on what was measured here (compute -50%, total" in line
    assert "plan with the measured total, 256.0 MiB" in line
    assert "measured here: 256.0 MiB in all (2 sessions)" in text  # beside the option, too


def test_sessions_of_other_choices_are_not_shown_as_these(owner_client: Client) -> None:
    keep("longer", {**host_parts(2048), "tokens_per_s": 30.0}, context=2048)
    keep("batch", host_parts(1024, 4), parallel=4)
    keep("vllm", {"weights_gib": 1.0}, runtime="vllm")
    text = page(owner_client)
    assert 'id="measured-here"' not in text
    # speed is per GPU type whatever the context
    assert "measured here per request: 30 tokens/s generated (1 session)" in text
    shown = page(owner_client, context="2048")
    assert 'id="measured-here"' in shown and "1 x a100-80g (host memory: no GPU used), 1 session:" in shown
    # a plan (fine-tuning) is not what sessions served: nothing measured beside it
    assert 'id="measured-here"' not in page(owner_client, context="2048", purpose="lora")


def test_garbage_in_a_kept_measurement_is_not_shown(owner_client: Client) -> None:
    keep("s1", host_parts())
    SiteMeasurement.objects.update(figures={"weights_gib": "<b>1</b>", "kv_gib": 1e12, "total_gib": -1})
    text = page(owner_client)
    assert 'id="measured-here"' not in text and "<b>1</b>" not in text
    SiteMeasurement.objects.update(figures=["weights_gib", 1.0])
    assert 'id="measured-here"' not in page(owner_client)
