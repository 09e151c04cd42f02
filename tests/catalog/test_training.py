"""Fine-tuning and RAG memory (catalog/training.py): the seed guide's ranges, and what each setting changes."""

from __future__ import annotations

from typing import Any

import pytest

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


LITGPT_A100 = (
    "Lightning-AI/litgpt tutorials/resource-tables.md @0cc02af (1x A100-40GB, bf16-true, Alpaca: longest 1304)"
)
LITGPT_A10G = "Lightning-AI/litgpt config_hub/finetune/README.md @5895df1 (1x A10G, Alpaca2k, max_seq_length 512)"
ANSWERAI = "AnswerDotAI/fsdp_qlora benchmarks_03_2024.md (DDP: a whole copy per GPU; peak reserved, GiB)"
GB, GIB_ = 1e9, float(GIB)
# Published peak memory of fine-tuning runs, with the settings each source states (docs/estimator.md cites them).
# (id, model, purpose, sequence, micro-batch, settings, figure, unit, source). litgpt's single-GPU runs have no
# activation checkpointing and target q and v only; Answer.AI's target every linear layer with checkpointing.
FINE_TUNING = [
    ("FT01", "Llama-2-7B", "lora", 1304, 1, {"lora_rank": 8, "lora_targets": "qv"}, 21.30, GB, LITGPT_A100),
    ("FT02", "Llama-2-7B", "qlora", 1304, 1, {"lora_rank": 8, "lora_targets": "qv", "double_quant": False}, 14.14,
     GB, LITGPT_A100),
    ("FT02-dq", "Llama-2-7B", "qlora", 1304, 1, {"lora_rank": 8, "lora_targets": "qv"}, 13.84, GB, LITGPT_A100),
    ("FT03", "Llama-2-7B", "lora", 1304, 2, {"lora_rank": 8, "lora_targets": "qv"}, 29.07, GB, LITGPT_A100),
    ("FT04", "Llama-2-13B", "lora", 1304, 1, {"lora_rank": 8, "lora_targets": "qv"}, 38.12, GB, LITGPT_A100),
    ("FT05", "Llama-2-13B", "qlora", 1304, 1, {"lora_rank": 8, "lora_targets": "qv", "double_quant": False}, 23.14,
     GB, LITGPT_A100),
    ("FT05-dq", "Llama-2-13B", "qlora", 1304, 1, {"lora_rank": 8, "lora_targets": "qv"}, 22.55, GB, LITGPT_A100),
    ("FT06", "Llama-3-8B", "lora", 512, 1, {"lora_rank": 32, "lora_targets": "qv"}, 19.73, GB, LITGPT_A10G),
    ("FT07", "Llama-3-8B", "qlora", 512, 2, {"lora_rank": 32, "lora_targets": "qv", "double_quant": False}, 17.41,
     GB, LITGPT_A10G),
    ("FT08", "Llama-2-7B", "lora", 512, 2, {"lora_rank": 32, "lora_targets": "qv"}, 19.77, GB, LITGPT_A10G),
    ("FT08-q", "Llama-2-7B", "qlora", 512, 2, {"lora_rank": 32, "lora_targets": "qv", "double_quant": False}, 13.68,
     GB, LITGPT_A10G),
    ("FT21-q", "Llama-2-7B", "qlora", 2048, 8, {"lora_rank": 64, "gradient_checkpointing": True}, 20.94, GIB_,
     ANSWERAI),
    ("FT21-l", "Llama-2-7B", "lora", 2048, 4, {"lora_rank": 64, "gradient_checkpointing": True}, 22.04, GIB_,
     ANSWERAI),
]  # fmt: skip
SHAPES = {
    "Llama-2-7B": MODELS["Llama-2-7B"],
    "Llama-2-13B": MODELS["Llama-2-13B"],
    "Llama-3-8B": MODELS["Llama-3.1-8B"],
}


@pytest.mark.parametrize("figure", FINE_TUNING, ids=lambda f: f[0])
def test_published_fine_tuning_figures_are_matched_within_fifteen_percent(figure: tuple[Any, ...]) -> None:
    _, model, purpose, sequence, micro_batch, settings, published, unit, _ = figure
    serving = Request(SHAPES[model], "bf16", "transformers", sequence, parallel=micro_batch)
    est = estimate_purpose(PurposeRequest(serving, purpose, **{"gradient_checkpointing": False, **settings}))
    peak = (est.gpu_total_gib - est.context_gib) * GIB / unit  # PyTorch's peak: no CUDA context
    assert peak == pytest.approx(published, rel=0.15)
