"""The site's measurements as the catalog keeps and reads them (SiteMeasurement, plans.site_measured) and as the
estimate command shows them: beside an estimate, and `estimate --check-measured` for admins."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone

from catalog.estimate import estimate
from catalog.models import GPUType, ModelVariant, SiteMeasurement
from catalog.plans import check_measured, request_for, site_measured

pytestmark = pytest.mark.django_db
MODEL = "Llama-3.1-8B-Instruct"


def variant(quant: str = "Q4_K_M") -> ModelVariant:
    return ModelVariant.objects.get(model__name=MODEL, quantization=quant)


def keep(source: str, figures: dict[str, Any], **choices: Any) -> None:
    values = {"variant": variant(), "runtime": "llama.cpp", "context": 4096, "parallel": 1,
              "gpu_type": GPUType.objects.get(name="a100-80g"), **choices}  # fmt: skip
    SiteMeasurement.keep(source, figures, timezone.now(), **values)


def gpu_parts(quant: str = "Q4_K_M", context: int = 4096) -> dict[str, float]:
    """What the estimator says a GPU holds for a llama.cpp session of the variant: what a session measuring exactly
    that would report."""
    est = estimate(request_for(variant(quant), "llama.cpp", context))
    return {"weights_gib": est.weights_gib - est.host_gib, "kv_gib": est.kv_cache_gib, "compute_gib": est.compute_gib}


def test_keeping_figures_keeps_only_checked_numbers_and_nothing_forgets_them(example_catalog: Path) -> None:
    keep("session:1", {"weights_gib": 4.3, "kv_gib": "0.5", "compute_gib": float("nan"), "total_from": "x",
                       "devices": {"CUDA0": {}}, "tokens_per_s": 90})  # fmt: skip
    row = SiteMeasurement.objects.get(source="session:1")
    assert row.figures == {"weights_gib": 4.3, "tokens_per_s": 90.0}
    keep("session:1", {"weights_gib": 4.4})  # read again: the same row, the new figures
    assert SiteMeasurement.objects.get().figures == {"weights_gib": 4.4}
    keep("session:1", {"kv_gib": -1})
    assert not SiteMeasurement.objects.exists()


def test_the_median_counts_only_sessions_of_the_same_variant_runtime_and_choices(example_catalog: Path) -> None:
    parts = gpu_parts()
    for i, factor in enumerate((1.0, 1.3, 1.35)):
        keep(f"session:{i}", {**parts, "compute_gib": parts["compute_gib"] * factor, "tokens_per_s": 100.0 + i})
    keep("other-variant", {**parts, "compute_gib": 99.0}, variant=variant("Q8_0"))
    keep("other-runtime", {**parts, "compute_gib": 99.0}, runtime="ollama")
    keep("other-context", {**parts, "compute_gib": 99.0, "tokens_per_s": 200.0}, context=8192)
    keep("other-gpu", {**parts, "tokens_per_s": 50.0}, gpu_type=GPUType.objects.get(name="h100"))
    beside = site_measured(request_for(variant(), "llama.cpp", 4096), variant())
    a100 = beside.for_layout("a100-80g", 1, 1)
    assert a100 is not None and a100.sessions == 3
    compute = next(p for p in a100.parts if p.name == "compute_gib")
    assert compute.measured_gib == pytest.approx(parts["compute_gib"] * 1.3)
    assert compute.error == pytest.approx(1 / 1.3 - 1) and compute.off
    assert [p.name for p in a100.off] == ["compute_gib"]  # the weights and KV cache are as estimated
    assert [(f.gpu_type, f.sessions) for f in beside.figures] == [("a100-80g", 3), ("h100", 1)]
    # speed: whatever the context
    assert beside.speeds["a100-80g"].tokens_per_s == 101.5 and beside.speeds["a100-80g"].sessions == 4
    assert beside.speeds["h100"].tokens_per_s == 50.0


def test_site_measured_is_one_query(example_catalog: Path, django_assert_num_queries: Any) -> None:
    for i in range(5):
        keep(f"session:{i}", gpu_parts(), gpu_type=GPUType.objects.get(name=("a100-80g", "h100")[i % 2]))
    request, chosen = request_for(variant(), "llama.cpp", 4096), variant()
    with django_assert_num_queries(1):
        assert len(site_measured(request, chosen).figures) == 2


def test_the_estimate_command_shows_the_sites_measurements_beside_the_estimate(example_catalog: Path) -> None:
    parts = gpu_parts()
    keep("session:1", {**parts, "kv_gib": parts["kv_gib"] * 2, "tokens_per_s": 88.0, "prompt_tokens_per_s": 1500.0})
    args = ["estimate", "--model", MODEL, "--quant", "Q4_K_M", "--runtime", "llama.cpp", "--context", "4096"]
    out = StringIO()
    call_command(*args, "--gpu", "a100-80g", stdout=out)
    text = out.getvalue()
    assert "measured: 1 x a100-80g, 1 session (median): weights " in text
    assert "KV cache 1.00 GiB (estimate -50%)" in text
    assert "the estimate is off by more than 10% on what was measured here (KV cache -50%)" in text
    assert "speed: a100-80g, 1 session: 88 tokens/s, 1500 prompt tokens/s" in text
    out = StringIO()
    call_command(*args, "--json", stdout=out)
    found = json.loads(out.getvalue())["measured"]
    (memory,) = found["memory"]
    assert memory["gpu_type"] == "a100-80g" and memory["sessions"] == 1 and memory["off"] == ["kv_gib"]
    assert memory["measured"]["kv_gib"] == pytest.approx(1.0) and memory["error"]["kv_gib"] == -0.5
    assert found["speed"] == [{"gpu_type": "a100-80g", "sessions": 1, "tokens_per_s": 88.0,
                               "prompt_tokens_per_s": 1500.0}]  # fmt: skip
    # another GPU type, another context: nothing measured there
    out = StringIO()
    call_command(*args, "--gpu", "h100", "--json", stdout=out)
    assert json.loads(out.getvalue())["measured"] == {"memory": [], "speed": []}
    out = StringIO()
    call_command(*args[:-1], "8192", stdout=out)
    assert "measured:" not in out.getvalue()


def test_check_measured_lists_the_choices_the_estimator_is_off_on(example_catalog: Path) -> None:
    keep("good", gpu_parts())
    parts = gpu_parts(context=2048)
    keep("bad", {**parts, "weights_gib": parts["weights_gib"] * 1.5, "total_gib": 20.0}, context=2048,
         total_from="nvidia-smi")  # fmt: skip
    assert len(check_measured()) == 2
    out = StringIO()
    call_command("estimate", "--check-measured", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"{MODEL} Q4_K_M, llama.cpp, context 2048, 1 x a100-80g, 1 session (median): weights")
    assert "weights -33%" in lines[1] and "plan with the measured total, 20.0 GiB" in lines[1]
    assert lines[-1] == "1 of 2 measured choice(s) off by more than 10%"
    out = StringIO()
    call_command("estimate", "--check-measured", "--json", stdout=out)
    report = json.loads(out.getvalue())
    assert report["threshold"] == 0.1 and report["checked"] == 2
    (case,) = report["off"]
    assert (case["model"], case["quant"], case["runtime"], case["context"], case["parallel"]) == (
        MODEL, "Q4_K_M", "llama.cpp", 2048, 1,
    )  # fmt: skip
    assert case["off"] == ["weights_gib", "total_gib"] and case["error"]["weights_gib"] == pytest.approx(-1 / 3, 1e-3)


def test_check_measured_says_so_when_every_choice_is_within_ten_percent(example_catalog: Path) -> None:
    out = StringIO()
    call_command("estimate", "--check-measured", stdout=out)
    assert out.getvalue().strip() == "the estimate is within 10% of every measured choice (0)"
    keep("good", gpu_parts())
    out = StringIO()
    call_command("estimate", "--check-measured", stdout=out)
    assert out.getvalue().strip() == "the estimate is within 10% of every measured choice (1)"


def test_an_estimate_without_runtime_or_context_is_refused_unless_checking(example_catalog: Path) -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="give --runtime and --context"):
        call_command("estimate", "--model", MODEL, stdout=StringIO())


def test_admins_see_the_sites_measurements_and_may_delete_but_not_write_them(
    example_catalog: Path, admin_client: Any
) -> None:
    keep("session:1", gpu_parts())
    row = SiteMeasurement.objects.get()
    listed = admin_client.get("/admin/catalog/sitemeasurement/")
    assert listed.status_code == 200 and "Llama-3.1-8B-Instruct" in listed.content.decode()
    assert admin_client.get("/admin/catalog/sitemeasurement/add/").status_code == 403
    admin_client.post(f"/admin/catalog/sitemeasurement/{row.pk}/change/", {"context": 1})
    row.refresh_from_db()
    assert row.context == 4096
    admin_client.post(f"/admin/catalog/sitemeasurement/{row.pk}/delete/", {"post": "yes"})
    assert not SiteMeasurement.objects.exists()
