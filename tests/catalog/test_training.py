"""Fine-tuning and RAG memory (catalog/training.py): the seed guide's ranges, and what each setting changes."""

from __future__ import annotations

import pytest

from catalog import confidence
from catalog.architecture import Architecture
from catalog.estimate import GIB, EstimateError, Request, estimate
from catalog.training import PurposeRequest, adapter_params, estimate_purpose

# Published shapes (config.json of each model); no maximum context, so a RAG prompt may grow.
MODELS = {
    "Llama-2-7B": Architecture(6.74, 32, 4096, 32, 32, 128, 32000, ffn_size=11008),
    "Llama-3.1-8B": Architecture(8.03, 32, 4096, 32, 8, 128, 128256, ffn_size=14336),
    "Llama-2-13B": Architecture(13.02, 40, 5120, 40, 40, 128, 32000, ffn_size=13824),
    "Qwen2.5-32B": Architecture(32.76, 64, 5120, 40, 8, 128, 152064, ffn_size=27648),
    "Llama-3.1-70B": Architecture(70.55, 80, 8192, 64, 8, 128, 128256, ffn_size=28672),
}


def gpu_gb(purpose: str, arch: Architecture, context: int = 2048, **options: object) -> float:
    est = estimate_purpose(PurposeRequest(Request(arch, "bf16", "transformers", context), purpose, **options))  # type: ignore[arg-type]
    return est.gpu_total_gib * GIB / 1e9


@pytest.mark.parametrize("name", MODELS)
def test_full_fine_tuning_takes_three_to_five_times_16_bit_inference(name: str) -> None:
    assert 3 <= gpu_gb("full", MODELS[name]) / gpu_gb("inference", MODELS[name]) <= 5


@pytest.mark.parametrize("name", MODELS)
def test_rag_adds_ten_to_thirty_gigabytes(name: str) -> None:
    assert 10 <= gpu_gb("rag", MODELS[name]) - gpu_gb("inference", MODELS[name]) <= 30


@pytest.mark.parametrize("name", MODELS)
def test_qlora_needs_less_than_lora_which_needs_less_than_full(name: str) -> None:
    arch = MODELS[name]
    assert gpu_gb("qlora", arch) < gpu_gb("lora", arch) < gpu_gb("full", arch)
    # QLoRA is the 4-bit model plus adapters, their optimizer and the saved activations: more than serving it.
    four_bit = estimate(Request(arch, "BNB-NF4", "transformers", 2048)).gpu_total_gib * GIB / 1e9
    assert four_bit < gpu_gb("qlora", arch) < 2 * four_bit


def test_lora_adapters_are_rank_times_inputs_plus_outputs() -> None:
    arch = MODELS["Llama-2-7B"]
    # q, k, v, o: 4 x (4096 + 4096); gate, up, down: 3 x (4096 + 11008); 32 layers; rank 8: PEFT prints 19,988,480
    # trainable parameters for Llama-2-7B with r=8 on all linear layers.
    assert adapter_params(arch, 8) == 8 * 32 * (4 * 8192 + 3 * 15104) == 19_988_480
    assert adapter_params(arch, 8, "attention") == 8 * 32 * 4 * 8192


def test_checkpointing_and_an_8_bit_optimizer_each_save_memory() -> None:
    arch = MODELS["Llama-3.1-8B"]
    assert gpu_gb("full", arch, gradient_checkpointing=False) > gpu_gb("full", arch) + 10
    assert gpu_gb("full", arch, optimizer="adamw-8bit") < gpu_gb("full", arch) - 10
    assert gpu_gb("full", arch, mixed_precision=True) > 1.8 * gpu_gb("full", arch)
    assert gpu_gb("qlora", arch, context=8192) > gpu_gb("qlora", arch, context=2048)


def test_full_fine_tuning_over_several_gpus_shards_the_states() -> None:
    arch = MODELS["Llama-3.1-70B"]
    one = estimate_purpose(PurposeRequest(Request(arch, "bf16", "transformers", 2048), "full"))
    eight = estimate_purpose(PurposeRequest(Request(arch, "bf16", "transformers", 2048, gpus_per_node=8), "full"))
    assert len(eight.per_gpu_gib) == 8
    assert eight.max_gpu_gib < one.max_gpu_gib / 6
    parts = dict(eight.extra_gib)
    assert set(parts) == {"gradients", "optimizer states"} and parts["optimizer states"] > parts["gradients"]


@pytest.mark.parametrize(
    "purpose, change, message",
    [
        ("lora", {"runtime": "vllm"}, "transformers runtime"),
        ("full", {"optimizer": "lion"}, "unknown optimizer"),
        ("rag", {"rag_passages": 0}, "must be positive"),
        ("qlora", {"lora_rank": 0}, "must be positive"),
        ("distill", {}, "unknown purpose"),
    ],
)
def test_bad_purpose_settings_are_refused_with_a_reason(purpose: str, change: dict[str, object], message: str) -> None:
    serving = Request(MODELS["Llama-2-7B"], "bf16", str(change.pop("runtime", "transformers")), 2048)
    with pytest.raises(EstimateError, match=message):
        estimate_purpose(PurposeRequest(serving, purpose, **change))  # type: ignore[arg-type]


def test_a_rag_prompt_must_fit_the_models_context() -> None:
    arch = Architecture(6.74, 32, 4096, 32, 32, 128, 32000, 4096)
    with pytest.raises(EstimateError, match="above the model's maximum"):
        estimate_purpose(PurposeRequest(Request(arch, "bf16", "vllm", 4096), "rag"))


@pytest.mark.parametrize("row", confidence.fine_tuning_rows(), ids=lambda r: r["id"])
def test_published_fine_tuning_figures_are_matched_within_fifteen_percent(row: dict[str, str]) -> None:
    est = estimate_purpose(confidence.fine_tuning_request_of(row))
    assert confidence.fine_tuning_figure_of(row, est) == pytest.approx(float(row["figure"]), rel=0.15)


def test_a_fine_tuning_plan_names_the_nearest_published_runs() -> None:
    serving = Request(MODELS["Llama-2-13B"], "bf16", "transformers", 1024)
    sure = confidence.purpose_confidence(PurposeRequest(serving, "qlora"))
    assert sure.kind == "published fine-tuning runs" and {m.what for m in sure.nearest} == {"qlora"}
    assert sure.nearest[0].id.startswith("FT05") and sure.worst_error <= 0.15
    assert "Llama-2-13B qlora r8, 1304 tokens x 1" in sure.summary()
    serving_sure = confidence.purpose_confidence(PurposeRequest(serving, "rag"))
    assert serving_sure.kind == "published measurements"  # RAG is serving: the serving rows
