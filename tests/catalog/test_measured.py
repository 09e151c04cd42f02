"""The site's measurements beside an estimate (catalog/measured.py): medians of the sessions of the same choices, the
estimator's error on each part it measures the same way, and the speeds per GPU type."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from catalog import measured
from catalog.estimate import Request, estimate
from catalog.measured import Run, compare
from tests.catalog.factories import LLAMA_31_8B

REQUEST = Request(LLAMA_31_8B, "Q4_K_M", "llama.cpp", 4096, file_size_gib=4.58)
EST = estimate(REQUEST)
GPU_WEIGHTS = EST.weights_gib - EST.host_gib  # on a GPU, llama.cpp keeps the input embedding in host memory


def run(gpu: str = "a100-80g", context: int = 4096, parallel: int = 1, **figures: Any) -> Run:
    options = {k: figures.pop(k) for k in ("gpus_per_node", "nodes", "on_host", "total_from") if k in figures}
    return Run(gpu, context, parallel, figures, **options)


def test_each_part_is_the_median_of_the_sessions_that_measured_it() -> None:
    runs = [
        run(weights_gib=GPU_WEIGHTS, kv_gib=0.5),
        run(weights_gib=GPU_WEIGHTS * 1.02, kv_gib=0.6, compute_gib=0.3),
        run(weights_gib=GPU_WEIGHTS * 3, kv_gib=9.0),  # one odd session does not move a median of three
    ]
    (figures,) = compare(REQUEST, runs).figures
    parts = {p.name: p for p in figures.parts}
    assert figures.sessions == 3 and figures.where == "1 x a100-80g"
    assert parts["weights_gib"].measured_gib == pytest.approx(GPU_WEIGHTS * 1.02)
    assert parts["weights_gib"].sessions == 3 and parts["compute_gib"].sessions == 1
    assert parts["kv_gib"].measured_gib == 0.6
    assert parts["weights_gib"].error == pytest.approx(1 / 1.02 - 1)
    assert "total_gib" not in parts  # no session measured one


def test_an_estimator_off_by_more_than_ten_percent_says_so_and_offers_the_measured_total() -> None:
    kv = EST.kv_cache_gib
    runs = [run(weights_gib=GPU_WEIGHTS, kv_gib=kv * 1.25, total_gib=9.5, total_from="nvidia-smi") for _ in range(2)]
    (figures,) = compare(REQUEST, runs).figures
    assert [p.name for p in figures.off] == ["kv_gib", "total_gib"]  # nvidia-smi's 9.5 GiB against 5.5 estimated
    kv_part = next(p for p in figures.parts if p.name == "kv_gib")
    assert kv_part.error == pytest.approx(1 / 1.25 - 1) and kv_part.error_text == "-20%"
    advice = figures.advice()
    assert "off by more than 10%" in advice and "KV cache -20%" in advice
    assert "plan with the measured total, 9.50 GiB" in advice
    # within ten percent: nothing to say
    close = compare(REQUEST, [run(weights_gib=GPU_WEIGHTS * 1.05, kv_gib=kv * 0.95)]).figures[0]
    assert close.off == () and close.advice() == ""


def test_sessions_of_another_context_parallel_count_or_gpu_type_are_not_counted_with_these() -> None:
    runs = [
        run(weights_gib=1.0),
        run(context=8192, weights_gib=50.0),
        run(parallel=4, weights_gib=50.0),
        run(gpu="l40s", weights_gib=2.0),
        run(gpus_per_node=2, weights_gib=3.0),
    ]
    found = {(f.gpu_type, f.gpus_per_node): f for f in compare(REQUEST, runs).figures}
    assert set(found) == {("a100-80g", 1), ("a100-80g", 2), ("l40s", 1)}
    assert [(f.sessions, f.parts[0].measured_gib) for f in found.values()] == [(1, 1.0), (1, 3.0), (1, 2.0)]
    beside = compare(REQUEST, runs)
    assert beside.for_layout("a100-80g", 2, 1) == found[("a100-80g", 2)] and beside.for_layout("h100", 1, 1) is None
    assert [f.gpu_type for f in beside.on("l40s").figures] == ["l40s"]


@pytest.mark.parametrize(
    "value", ["1.0", None, True, float("nan"), float("inf"), -1.0, 1e9, [1], {"gib": 1}, "<script>"]
)
def test_garbage_figures_are_ignored(value: object) -> None:
    runs = [run(weights_gib=value, kv_gib=value, tokens_per_s=value), run(weights_gib=GPU_WEIGHTS, kv_gib=value)]
    (figures,) = compare(REQUEST, runs).figures
    assert [(p.name, p.sessions) for p in figures.parts] == [("weights_gib", 1)] and figures.sessions == 1
    assert compare(REQUEST, runs).speeds == {}
    assert compare(REQUEST, [run(kv_gib=value)]).figures == ()


def test_vllms_kv_cache_and_total_are_shown_but_not_compared() -> None:
    """vLLM's KV figure is what --gpu-memory-utilization left, not what the context needs; so is its total."""
    vllm = Request(LLAMA_31_8B, "bf16", "vllm", 4096)
    est = estimate(vllm)
    (figures,) = compare(vllm, [run(weights_gib=est.weights_gib, kv_gib=60.0, total_gib=72.0)]).figures
    errors = {p.name: p.error for p in figures.parts}
    assert errors == {"weights_gib": pytest.approx(0), "kv_gib": None, "total_gib": None}
    assert figures.off == ()


def test_a_session_in_host_memory_compares_all_the_weights_and_its_buffers_total() -> None:
    """On a node without GPUs llama.cpp's buffers hold the input embedding too, and the total is their sum."""
    parts: dict[str, Any] = {"weights_gib": EST.weights_gib, "kv_gib": EST.kv_cache_gib, "compute_gib": EST.compute_gib}
    total = sum(parts.values())
    (figures,) = compare(REQUEST, [run(**parts, total_gib=total, on_host=True, total_from="buffers")]).figures
    assert all(p.error == pytest.approx(0, abs=1e-9) for p in figures.parts), figures.summary()
    assert "host memory" in figures.where


def test_in_host_memory_a_tied_embedding_is_one_table_as_in_the_file() -> None:
    """On GPUs llama.cpp loads a tied table twice (host and the last GPU); a CPU session maps the file once."""
    tied = Request(replace(LLAMA_31_8B, tied_embeddings=True), "Q4_K_M", "llama.cpp", 4096, file_size_gib=4.0)
    assert estimate(tied).weights_gib > 4.0
    (figures,) = compare(tied, [run(weights_gib=4.0, on_host=True)]).figures
    assert figures.parts[0].error == pytest.approx(0)


@pytest.mark.parametrize(
    ("total_from", "estimated"),
    [
        ("nvidia-smi", EST.gpu_total_gib),
        ("torch", EST.gpu_total_gib - EST.context_gib),
        ("buffers", GPU_WEIGHTS + EST.kv_cache_gib + EST.compute_gib),
        ("", None),
    ],
)
def test_a_total_is_compared_with_the_estimates_figure_for_what_took_it(
    total_from: str, estimated: float | None
) -> None:
    (figures,) = compare(REQUEST, [run(total_gib=5.0, total_from=total_from)]).figures
    assert figures.parts[0].estimated_gib == (pytest.approx(estimated) if estimated is not None else None)


def test_speeds_are_per_gpu_type_whatever_the_context() -> None:
    runs = [
        run(tokens_per_s=100.0, prompt_tokens_per_s=2000.0),
        run(context=8192, tokens_per_s=80.0),
        run(context=2048, parallel=4, tokens_per_s=120.0, prompt_tokens_per_s=3000.0),
        run(gpu="l40s", tokens_per_s=60.0),
        run(gpu="v100", weights_gib=1.0),
    ]
    speeds = compare(REQUEST, runs).speeds
    assert set(speeds) == {"a100-80g", "l40s"}
    a100 = speeds["a100-80g"]
    assert (a100.sessions, a100.tokens_per_s, a100.prompt_tokens_per_s) == (3, 100.0, 2500.0)
    assert a100.summary() == "a100-80g, 3 sessions: 100 tokens/s, 2500 prompt tokens/s"
    assert speeds["l40s"].as_dict() == {"gpu_type": "l40s", "sessions": 1, "tokens_per_s": 60.0}


def test_an_impossible_estimate_leaves_the_measured_figures_without_an_error() -> None:
    too_long = Request(LLAMA_31_8B, "Q4_K_M", "llama.cpp", 10**7)
    (figures,) = compare(too_long, [run(context=10**7, weights_gib=4.0)]).figures
    assert figures.parts[0].measured_gib == 4.0 and figures.parts[0].error is None


def test_the_figures_names_are_the_ones_the_jobs_app_reports() -> None:
    from jobs.cluster import measured as log_reader

    assert log_reader.FIELDS is measured.FIELDS
    assert set(measured.LABELS) == set(measured.FIELDS)
