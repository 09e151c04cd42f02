"""What the estimator needs beyond the basic shape, read from GGUF headers and config.json: the FFN width, experts,
sliding-window layers, tied embeddings; and the quantisation names config.json's quantization_config gives."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf as gguf_pkg
import numpy as np
import pytest
import yaml

from catalog import gguf, hfconfig
from catalog.models import ModelCard
from catalog.yaml_io import CatalogImportError, export_catalog, import_catalog

Extra = Callable[[gguf_pkg.GGUFWriter], None]


def header_of(path: Path, arch: str = "llama", extra: Extra | None = None, output: bool = True) -> gguf.GGUFInfo:
    writer = gguf_pkg.GGUFWriter(str(path), arch)
    writer.add_context_length(8192)
    writer.add_embedding_length(64)
    writer.add_block_count(12)
    writer.add_head_count(8)
    writer.add_head_count_kv(2)
    writer.add_token_list([f"t{i}".encode() for i in range(300)])
    if extra:
        extra(writer)
    writer.add_tensor("token_embd.weight", np.zeros((300, 64), dtype=np.float16))
    if output:
        writer.add_tensor("output.weight", np.zeros((300, 64), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.read_header(path.read_bytes())


def test_a_gguf_mixture_of_experts_gives_each_experts_ffn_and_the_routing(tmp_path: Path) -> None:
    def mixtral(w: gguf_pkg.GGUFWriter) -> None:
        w.add_expert_count(8)
        w.add_expert_used_count(2)
        w.add_feed_forward_length(14336)

    arch = header_of(tmp_path / "moe.gguf", extra=mixtral).arch
    assert (arch.experts, arch.experts_used, arch.ffn_size) == (8, 2, 14336)

    def qwen_moe(w: gguf_pkg.GGUFWriter) -> None:
        w.add_expert_count(60)
        w.add_expert_used_count(4)
        w.add_expert_feed_forward_length(1408)
        w.add_feed_forward_length(5632)

    arch = header_of(tmp_path / "qwen.gguf", extra=qwen_moe).arch
    assert (arch.experts, arch.experts_used, arch.ffn_size) == (60, 4, 1408)  # each expert's, not the dense one


def test_a_dense_gguf_gives_its_ffn_and_the_largest_of_a_per_layer_list(tmp_path: Path) -> None:
    dense = header_of(tmp_path / "d.gguf", extra=lambda w: w.add_feed_forward_length(256)).arch
    assert (dense.ffn_size, dense.experts, dense.experts_used) == (256, None, None)
    per_layer = header_of(tmp_path / "p.gguf", extra=lambda w: w.add_array("llama.feed_forward_length", [128, 512]))
    assert per_layer.arch.ffn_size == 512


@pytest.mark.parametrize("arch_name, layers", [("gemma3", 10), ("gemma2", 6), ("cohere2", 9), ("llama", None)])
def test_sliding_window_layers_follow_llama_cpps_pattern_per_architecture(
    tmp_path: Path, arch_name: str, layers: int | None
) -> None:
    found = header_of(tmp_path / "w.gguf", arch_name, extra=lambda w: w.add_sliding_window(1024)).arch
    assert (found.sliding_window, found.sliding_window_layers) == (1024, layers)


def test_a_per_layer_window_pattern_counts_the_flagged_layers(tmp_path: Path) -> None:
    flags = [True, True, False] * 4

    def pattern(w: gguf_pkg.GGUFWriter) -> None:
        w.add_sliding_window(512)
        w.add_array("gemma3.attention.sliding_window_pattern", flags)

    assert header_of(tmp_path / "f.gguf", "gemma3", extra=pattern).arch.sliding_window_layers == 8


def test_a_gguf_without_an_output_head_is_tied(tmp_path: Path) -> None:
    assert header_of(tmp_path / "tied.gguf", output=False).arch.tied_embeddings is True
    assert header_of(tmp_path / "untied.gguf").arch.tied_embeddings is False


# Published config.json values (Hugging Face model pages).
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None, "vocab_size": 32000,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
}  # fmt: skip
QWEN15_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 2048, "intermediate_size": 5632,
    "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts": 60,
    "num_experts_per_tok": 4, "max_position_embeddings": 8192, "num_attention_heads": 16, "num_hidden_layers": 24,
    "num_key_value_heads": 16, "use_sliding_window": False, "sliding_window": 32768, "vocab_size": 151936,
    "tie_word_embeddings": False,
}  # fmt: skip
MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "sliding_window": 4096, "vocab_size": 32000, "tie_word_embeddings": False,
}  # fmt: skip


def config(values: dict[str, Any]) -> hfconfig.HFInfo:
    return hfconfig.read_config(json.dumps(values))


def test_config_json_gives_the_experts_and_each_experts_ffn() -> None:
    mixtral = config(MIXTRAL_8X7B).arch
    assert (mixtral.experts, mixtral.experts_used, mixtral.ffn_size, mixtral.sliding_window) == (8, 2, 14336, None)
    qwen = config(QWEN15_MOE).arch
    assert (qwen.experts, qwen.experts_used, qwen.ffn_size) == (60, 4, 1408)
    assert qwen.sliding_window is None  # use_sliding_window: false


def test_the_architecture_counts_every_expert() -> None:
    info = config(MIXTRAL_8X7B)
    assert info.params_source == "architecture"
    assert info.params / 1e9 == pytest.approx(46.7, rel=0.03)  # Mixtral 8x7B: 46.7B parameters


def test_config_json_says_which_layers_use_the_window() -> None:
    mistral = config(MISTRAL_7B_V01).arch
    assert (mistral.sliding_window, mistral.sliding_window_layers) == (4096, None)  # every layer, cache kept whole
    types = ["sliding_attention"] * 5 + ["full_attention"]
    listed = config({**MISTRAL_7B_V01, "num_hidden_layers": 12, "layer_types": types * 2}).arch
    assert listed.sliding_window_layers == 10
    gemma3 = config({**MISTRAL_7B_V01, "num_hidden_layers": 12, "sliding_window_pattern": 6}).arch
    assert gemma3.sliding_window_layers == 10
    gemma2 = config({**MISTRAL_7B_V01, "model_type": "gemma2", "num_hidden_layers": 42}).arch
    assert gemma2.sliding_window_layers == 21


@pytest.mark.parametrize("tied, expected", [(True, True), (False, False), (None, None)])
def test_config_json_says_whether_the_embeddings_are_tied(tied: bool | None, expected: bool | None) -> None:
    values = {k: v for k, v in MISTRAL_7B_V01.items() if k != "tie_word_embeddings"}
    if tied is not None:
        values["tie_word_embeddings"] = tied
    assert config(values).arch.tied_embeddings is expected


@pytest.mark.parametrize(
    "quantization, name",
    [
        ({"quant_method": "awq", "bits": 4, "group_size": 128}, "AWQ"),
        ({"quant_method": "awq", "bits": 4, "group_size": 64}, "AWQ-G64"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 32}, "GPTQ-INT4-G32"),
        ({"quant_method": "gptq", "bits": 4, "group_size": -1}, "GPTQ-INT4-G-1"),
        ({"quant_method": "gptq", "bits": 8, "group_size": 64}, "GPTQ-INT8-G64"),
        ({"quant_method": "gptq", "bits": 8, "group_size": 256}, "GPTQ-INT8"),  # no g256 entry: the g128 one
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "BNB-FP4"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "BNB-NF4-SQ"),
        ({"quant_method": "bitsandbytes", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}, "BNB-NF4"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "BNB-INT8"),
    ],
)
def test_quantisation_configs_name_the_group_size_and_the_4_bit_type(quantization: dict[str, Any], name: str) -> None:
    assert config({**MISTRAL_7B_V01, "quantization_config": quantization}).quant == name


@pytest.mark.django_db
def test_the_new_fields_round_trip_through_yaml_and_bad_values_are_refused(example_catalog: Path) -> None:
    catalog = yaml.safe_load(export_catalog())
    card = next(m for m in catalog["models"] if m["name"] == "Mistral-7B-v0.3")
    assert "experts" not in card["architecture"]  # absent on the example's cards: optional
    card["architecture"].update(ffn_size=14336, experts=8, experts_used=2, sliding_window=4096,
                                sliding_window_layers=16, tied_embeddings=True)  # fmt: skip
    import_catalog(yaml.safe_dump(catalog), "cat.yaml")
    arch = ModelCard.objects.get(name="Mistral-7B-v0.3").architecture
    assert (arch.ffn_size, arch.experts, arch.experts_used) == (14336, 8, 2)
    assert (arch.sliding_window, arch.sliding_window_layers, arch.tied_embeddings) == (4096, 16, True)
    again = next(m for m in yaml.safe_load(export_catalog())["models"] if m["name"] == "Mistral-7B-v0.3")
    assert again["architecture"]["tied_embeddings"] is True and again["architecture"]["experts"] == 8
    card["architecture"].update(experts="eight", tied_embeddings=3)
    with pytest.raises(CatalogImportError) as refused:
        import_catalog(yaml.safe_dump(catalog), "cat.yaml")
    messages = {e.path: e.message for e in refused.value.errors}
    assert any(path.endswith("architecture.experts") and "whole number" in m for path, m in messages.items())
    assert any(path.endswith("architecture.tied_embeddings") and "true or false" in m for path, m in messages.items())
    assert ModelCard.objects.get(name="Mistral-7B-v0.3").experts == 8  # nothing changed
