"""The shape fields beyond the basics (FFN width, experts, sliding window and its layers, tied embeddings) as the GGUF
and config.json readers fill them, and as YAML keeps them: headers written with the gguf package, and published
config.json values of real models."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf as gguf_pkg
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog import architecture, gguf, hfconfig
from catalog.models import ModelCard
from catalog.yaml_io import CatalogImportError, export_catalog, import_catalog

Keys = Callable[[gguf_pkg.GGUFWriter], None]
VOCAB, HIDDEN = 256, 64


def gguf_header(
    path: Path, arch: str = "llama", blocks: int = 12, keys: Keys | None = None, tensors: tuple[str, ...] = ()
) -> gguf.GGUFInfo:
    """Write a small GGUF file (header, the given keys, token_embd.weight and the named tensors) and read it back."""
    writer = gguf_pkg.GGUFWriter(str(path), arch)
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(blocks)
    writer.add_head_count(8)
    writer.add_head_count_kv(4)
    writer.add_token_list([f"t{i}".encode() for i in range(VOCAB)])
    if keys:
        keys(writer)
    for name in ("token_embd.weight", *tensors):
        writer.add_tensor(name, np.zeros((VOCAB, HIDDEN), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.read_header(path.read_bytes())


# --- GGUF ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("each_expert_key", [False, True], ids=["feed_forward_only", "expert_feed_forward"])
def test_a_mixtral_header_gives_eight_experts_two_used_and_each_experts_ffn(
    tmp_path: Path, each_expert_key: bool
) -> None:
    # llama.cpp's converter writes Mixtral as "llama" with feed_forward_length only; newer writers add the expert key.
    def mixtral(w: gguf_pkg.GGUFWriter) -> None:
        w.add_expert_count(8)
        w.add_expert_used_count(2)
        w.add_feed_forward_length(14336)
        if each_expert_key:
            w.add_expert_feed_forward_length(14336)

    arch = gguf_header(tmp_path / "mixtral.gguf", blocks=32, keys=mixtral).arch
    assert (arch.experts, arch.experts_used, arch.ffn_size) == (8, 2, 14336)


def test_a_moe_header_prefers_each_experts_ffn_to_the_dense_one(tmp_path: Path) -> None:
    def qwen_moe(w: gguf_pkg.GGUFWriter) -> None:
        w.add_expert_count(60)
        w.add_expert_used_count(4)
        w.add_expert_feed_forward_length(1408)
        w.add_feed_forward_length(5632)

    arch = gguf_header(tmp_path / "qwen2moe.gguf", "qwen2moe", blocks=24, keys=qwen_moe).arch
    assert (arch.experts, arch.experts_used, arch.ffn_size) == (60, 4, 1408)


def test_a_dense_header_has_no_experts_and_its_ffn_from_feed_forward_length(tmp_path: Path) -> None:
    def llama(w: gguf_pkg.GGUFWriter) -> None:
        w.add_feed_forward_length(14336)
        w.add_expert_used_count(2)  # without expert_count it means nothing

    arch = gguf_header(tmp_path / "llama.gguf", keys=llama).arch
    assert (arch.ffn_size, arch.experts, arch.experts_used) == (14336, None, None)
    assert (arch.sliding_window, arch.sliding_window_layers) == (None, None)


def test_a_header_without_ffn_or_expert_keys_leaves_them_unknown(tmp_path: Path) -> None:
    arch = gguf_header(tmp_path / "bare.gguf").arch
    assert (arch.ffn_size, arch.experts, arch.experts_used) == (None, None, None)


def test_a_per_layer_feed_forward_length_gives_the_largest(tmp_path: Path) -> None:
    widths = [768, 1024, 3072, 2048] * 3  # OpenELM-style widths, one per block

    arch = gguf_header(tmp_path / "elm.gguf", keys=lambda w: w.add_feed_forward_length(widths)).arch
    assert arch.ffn_size == max(widths)


@pytest.mark.parametrize("arch_name, blocks, window_layers", [("gemma3", 12, 10), ("gemma2", 8, 4)])
def test_a_gemma_header_with_a_window_gives_the_window_and_its_layers(
    tmp_path: Path, arch_name: str, blocks: int, window_layers: int
) -> None:
    arch = gguf_header(
        tmp_path / f"{arch_name}.gguf", arch_name, blocks=blocks, keys=lambda w: w.add_sliding_window(4096)
    ).arch
    assert (arch.sliding_window, arch.sliding_window_layers) == (4096, window_layers)


def test_a_window_on_an_architecture_without_a_known_pattern_leaves_its_layers_unknown(tmp_path: Path) -> None:
    arch = gguf_header(tmp_path / "mistral.gguf", keys=lambda w: w.add_sliding_window(4096)).arch
    assert (arch.sliding_window, arch.sliding_window_layers) == (4096, None)


def test_an_explicit_window_pattern_overrides_the_architectures_default(tmp_path: Path) -> None:
    def every_third_global(w: gguf_pkg.GGUFWriter) -> None:
        w.add_sliding_window(1024)
        w.add_uint32("gemma2.attention.sliding_window_pattern", 3)

    arch = gguf_header(tmp_path / "g.gguf", "gemma2", blocks=12, keys=every_third_global).arch
    assert arch.sliding_window_layers == 8  # 12 blocks, every third global: not gemma2's default of half


def test_per_layer_window_flags_count_the_flagged_layers(tmp_path: Path) -> None:
    flags = [True, True, False, True] * 3  # what gemma3n-style writers store: one flag per block

    def per_layer(w: gguf_pkg.GGUFWriter) -> None:
        w.add_sliding_window(512)
        w.add_sliding_window_pattern(flags)

    arch = gguf_header(tmp_path / "flags.gguf", "gemma3", blocks=len(flags), keys=per_layer).arch
    assert arch.sliding_window_layers == flags.count(True)  # not gemma3's default of five in six


def swa_layers_as_llama_cpp_counts(blocks: int, every: int) -> int:
    """llama_hparams::set_swa_pattern: layer il uses the window unless il % every == every - 1."""
    return sum(1 for il in range(blocks) if il % every < every - 1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    arch_every=st.sampled_from([("gemma2", 2), ("gemma3", 6), ("cohere2", 4)]),
    blocks=st.integers(1, 80),
    window=st.integers(1, 1 << 20),
)
def test_window_layers_match_llama_cpps_per_layer_rule(
    tmp_path: Path, arch_every: tuple[str, int], blocks: int, window: int
) -> None:
    name, every = arch_every
    arch = gguf_header(tmp_path / "w.gguf", name, blocks=blocks, keys=lambda w: w.add_sliding_window(window)).arch
    assert (arch.sliding_window, arch.sliding_window_layers) == (window, swa_layers_as_llama_cpp_counts(blocks, every))


@pytest.mark.parametrize(
    "tensors, tied", [((), True), (("output.weight",), False)], ids=["no_output_head", "own_output_head"]
)
def test_an_output_head_decides_whether_the_embeddings_are_tied(
    tmp_path: Path, tensors: tuple[str, ...], tied: bool
) -> None:
    assert gguf_header(tmp_path / "t.gguf", tensors=tensors).arch.tied_embeddings is tied


# --- config.json --------------------------------------------------------------------------------------------

# Published config.json values (Hugging Face model pages), trimmed to what the reader looks at.
MIXTRAL_8X7B: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000,
}  # fmt: skip
QWEN15_MOE_A27B: dict[str, Any] = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21,
    "moe_intermediate_size": 1408, "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_key_value_heads": 16, "shared_expert_intermediate_size": 5632,
    "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vocab_size": 151936,
}  # fmt: skip
MISTRAL_7B_V01: dict[str, Any] = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 32000,
}  # fmt: skip


def read(values: dict[str, Any]) -> hfconfig.HFInfo:
    return hfconfig.read_config(json.dumps(values))


def test_mixtral_8x7b_has_eight_experts_two_used_and_no_window() -> None:
    arch = read(MIXTRAL_8X7B).arch
    assert (arch.experts, arch.experts_used, arch.ffn_size) == (8, 2, 14336)
    assert (arch.sliding_window, arch.sliding_window_layers) == (None, None)


def test_qwen_moe_gives_each_experts_ffn_and_ignores_a_window_it_does_not_use() -> None:
    arch = read(QWEN15_MOE_A27B).arch
    assert (arch.experts, arch.experts_used, arch.ffn_size) == (60, 4, 1408)
    assert (arch.sliding_window, arch.sliding_window_layers) == (None, None)


def test_the_same_window_is_kept_when_use_sliding_window_is_true() -> None:
    assert read({**QWEN15_MOE_A27B, "use_sliding_window": True}).arch.sliding_window == 32768


def test_a_dense_config_has_no_experts_and_its_intermediate_size() -> None:
    arch = read(MISTRAL_7B_V01).arch
    assert (arch.experts, arch.experts_used, arch.ffn_size) == (None, None, 14336)


def test_mistral_7b_v01_has_a_window_on_layers_it_does_not_name() -> None:
    arch = read(MISTRAL_7B_V01).arch
    assert (arch.sliding_window, arch.sliding_window_layers) == (4096, None)


def test_layer_types_count_the_sliding_attention_layers() -> None:
    types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"] * 4
    arch = read({**MISTRAL_7B_V01, "num_hidden_layers": len(types), "layer_types": types}).arch
    assert arch.sliding_window_layers == types.count("sliding_attention")


# 12 layers: two global; 26, 34 and 62: Gemma 3 1B, 4B and 27B (transformers: layer i is global when 6 divides i + 1).
@pytest.mark.parametrize("layers, window_layers", [(12, 10), (26, 22), (34, 29), (62, 52)])
def test_a_gemma3_window_pattern_counts_five_in_six_layers(layers: int, window_layers: int) -> None:
    values = {**MISTRAL_7B_V01, "model_type": "gemma3_text", "num_hidden_layers": layers, "sliding_window": 512,
              "sliding_window_pattern": 6}  # fmt: skip
    assert read(values).arch.sliding_window_layers == window_layers


@pytest.mark.parametrize("layers", [26, 42, 46])  # Gemma 2 2B, 9B, 27B
def test_a_gemma2_config_windows_every_other_layer(layers: int) -> None:
    values = {**MISTRAL_7B_V01, "model_type": "gemma2", "num_hidden_layers": layers}
    # transformers' Gemma 2: the even layers (0, 2, ...) use the window, the odd ones see the whole context.
    assert read(values).arch.sliding_window_layers == len(range(0, layers, 2))


@pytest.mark.parametrize("tie, tied", [(True, True), (False, False), (None, None)], ids=["true", "false", "absent"])
def test_tie_word_embeddings_says_whether_the_head_is_tied(tie: bool | None, tied: bool | None) -> None:
    values = {k: v for k, v in MISTRAL_7B_V01.items() if k != "tie_word_embeddings"}
    if tie is not None:
        values["tie_word_embeddings"] = tie
    assert read(values).arch.tied_embeddings is tied


def test_mixtral_8x7bs_parameters_from_its_architecture_count_every_expert() -> None:
    info = read(MIXTRAL_8X7B)  # no safetensors headers, no index
    assert info.params_source == "architecture"
    assert info.params == pytest.approx(46.7e9, rel=0.03)  # Mistral AI's published 46.7B
    assert info.arch.params_b == pytest.approx(info.params / 1e9)


def test_the_architecture_count_grows_with_the_experts() -> None:
    eight, sixteen = read(MIXTRAL_8X7B).params, read({**MIXTRAL_8X7B, "num_local_experts": 16}).params
    per_expert = 32 * 3 * 4096 * 14336  # layers x (gate, up, down) x hidden x FFN
    assert sixteen - eight == 8 * per_expert


# --- YAML ---------------------------------------------------------------------------------------------------

NEW_FIELDS: dict[str, Any] = {"ffn_size": 14336, "experts": 8, "experts_used": 2, "sliding_window": 4096,
                              "sliding_window_layers": 16, "tied_embeddings": False}  # fmt: skip
CARD = "Mistral-7B-v0.3"


def card_entry(catalog: dict[str, Any], name: str = CARD) -> dict[str, Any]:
    entry: dict[str, Any] = next(m for m in catalog["models"] if m["name"] == name)
    return entry


def exported() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(export_catalog())
    return data


def test_the_new_fields_are_exactly_the_optional_architecture_fields() -> None:
    assert set(NEW_FIELDS) == set(architecture.OPTIONAL_FIELDS)


@pytest.mark.django_db
def test_a_card_with_the_new_fields_round_trips_through_export_and_import(example_catalog: Path) -> None:
    catalog = exported()
    card_entry(catalog)["architecture"].update(NEW_FIELDS)
    import_catalog(yaml.safe_dump(catalog), "cat.yaml")
    card = ModelCard.objects.get(name=CARD)
    assert {name: getattr(card, name) for name in NEW_FIELDS} == NEW_FIELDS
    again = exported()
    assert again == catalog  # tied_embeddings: false is written, not dropped as empty
    assert import_catalog(yaml.safe_dump(again), "cat.yaml").changed is False


@pytest.mark.django_db
def test_cards_without_the_new_fields_import_and_keep_them_empty(example_catalog: Path) -> None:
    assert ModelCard.objects.exists()
    for card in ModelCard.objects.all():
        assert {name: getattr(card, name) for name in NEW_FIELDS} == dict.fromkeys(NEW_FIELDS)
    assert all(not set(NEW_FIELDS) & set(m["architecture"]) for m in exported()["models"])


@pytest.mark.django_db
def test_leaving_the_new_fields_out_again_clears_them(example_catalog: Path) -> None:
    plain = exported()
    with_fields = exported()
    card_entry(with_fields)["architecture"].update(NEW_FIELDS)
    import_catalog(yaml.safe_dump(with_fields), "cat.yaml")
    import_catalog(yaml.safe_dump(plain), "cat.yaml")
    card = ModelCard.objects.get(name=CARD)
    assert {name: getattr(card, name) for name in NEW_FIELDS} == dict.fromkeys(NEW_FIELDS)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("experts", "eight", "must be a whole number"),
        ("tied_embeddings", 3, "must be true or false"),
        ("tied_embeddings", "yes", "must be true or false"),
        ("ffn_size", 14336.5, "must be a whole number"),
        ("experts_used", 0, "greater than or equal to 1"),
        ("sliding_window", -4096, "greater than or equal to"),
    ],
)
def test_a_bad_value_for_a_new_field_is_refused_naming_the_field(
    example_catalog: Path, field: str, value: Any, fragment: str
) -> None:
    catalog = exported()
    index = catalog["models"].index(card_entry(catalog))
    card_entry(catalog)["architecture"].update({**NEW_FIELDS, field: value})
    with pytest.raises(CatalogImportError) as refused:
        import_catalog(yaml.safe_dump(catalog), "cat.yaml")
    found = [(e.path, e.message) for e in refused.value.errors]
    assert len(found) == 1, found
    path, message = found[0]
    assert path == f"models[{index}].architecture.{field}"
    assert fragment in message
    assert ModelCard.objects.get(name=CARD).experts is None  # all or nothing: the good fields were not saved


def test_a_window_pattern_of_zero_puts_every_layer_in_the_window(tmp_path: Path) -> None:
    def zero(w: gguf_pkg.GGUFWriter) -> None:
        w.add_sliding_window(256)
        w.add_uint32("gemma3.attention.sliding_window_pattern", 0)

    assert gguf_header(tmp_path / "z.gguf", "gemma3", keys=zero).arch.sliding_window_layers == 12


# --- quantisation names from quantization_config ------------------------------------------------------------


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
    assert read({**MISTRAL_7B_V01, "quantization_config": quantization}).quant == name


# --- found in review: shared experts, odd layer counts, dense-first patterns, long per-layer arrays ----------------


def test_qwen_moes_shared_expert_counts_in_its_parameters() -> None:
    info = read(QWEN15_MOE_A27B)
    assert info.params_source == "architecture"
    assert info.params / 1e9 == pytest.approx(14.3, rel=0.02)  # Qwen1.5-MoE-A2.7B: 14.3B in all


def test_gemma2s_window_is_on_the_even_layers_of_an_odd_count() -> None:
    assert read({**MISTRAL_7B_V01, "model_type": "gemma2", "num_hidden_layers": 25}).arch.sliding_window_layers == 13


@pytest.mark.parametrize("arch_name, expected", [("gpt-oss", 12), ("cohere2moe", 18), ("smallthinker", 18)])
def test_window_patterns_follow_llama_cpp_per_architecture(tmp_path: Path, arch_name: str, expected: int) -> None:
    """gpt-oss alternates (the last of each 2 is full); cohere2moe's full layer comes first in each 4 (dense_first)."""
    found = gguf_header(tmp_path / "w.gguf", arch_name, blocks=24, keys=lambda w: w.add_sliding_window(128)).arch
    assert found.sliding_window_layers == expected


def test_per_layer_arrays_of_80_layers_are_read_whole(tmp_path: Path) -> None:
    def deci(w: gguf_pkg.GGUFWriter) -> None:
        w.add_array("llama.feed_forward_length", [4096] * 79 + [28672])

    assert gguf_header(tmp_path / "deci.gguf", blocks=80, keys=deci).arch.ffn_size == 28672
