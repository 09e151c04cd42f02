"""Model cards from real files: GGUF headers the tests write with the gguf package, and real models' config.json."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf as gguf_pkg
import numpy as np
import pytest
from django.core.exceptions import ValidationError

from catalog import gguf, hfconfig
from catalog.add_model import add, inspect
from catalog.models import Cluster, ModelCard, ModelVariant, VariantLocation
from tests.conftest import REPO

# Published config.json values (Hugging Face model pages) and index totals of real checkpoints.
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "torch_dtype": "bfloat16", "vocab_size": 128256, "tie_word_embeddings": False,
    "hidden_act": "silu",
}  # fmt: skip
LLAMA_31_8B_TOTAL_SIZE = 16060522496
MISTRAL_7B_AWQ = {
    "architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "vocab_size": 32768, "torch_dtype": "float16", "hidden_act": "silu",
    "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"},
}  # fmt: skip
GPT2 = {
    "architectures": ["GPT2LMHeadModel"], "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
    "vocab_size": 50257, "activation_function": "gelu_new",
}  # fmt: skip


def write_gguf(
    path: Path, file_type: gguf_pkg.LlamaFileType, vocab: int = 300, chat_template: str | list[dict[str, str]] = ""
) -> None:
    writer = gguf_pkg.GGUFWriter(str(path), "llama")
    if chat_template:
        writer.add_chat_template(chat_template)
    writer.add_name("Test Model")
    writer.add_license("apache-2.0")
    writer.add_context_length(8192)
    writer.add_embedding_length(64)
    writer.add_block_count(3)
    writer.add_head_count(8)
    writer.add_head_count_kv(2)
    writer.add_file_type(file_type)
    writer.add_token_list([f"t{i}".encode() for i in range(vocab)])
    writer.add_tensor("token_embd.weight", np.zeros((vocab, 64), dtype=np.float16))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_header_fills_the_architecture_and_the_quantisation(tmp_path: Path) -> None:
    path = tmp_path / "Test-Model-Q4_K_M.gguf"
    write_gguf(path, gguf_pkg.LlamaFileType.MOSTLY_Q4_K_M)
    found = inspect(str(path))
    assert (found.name, found.family, found.quant, found.format) == ("Test-Model", "llama", "Q4_K_M", "gguf")
    assert (
        found.arch.layers,
        found.arch.hidden_size,
        found.arch.attention_heads,
        found.arch.kv_heads,
        found.arch.head_dim,
    ) == (3, 64, 8, 2, 8)
    assert (found.arch.vocab_size, found.arch.max_context) == (300, 8192)  # the long token list is counted, not kept
    assert f"{300 * 64 + 64 * 64:,} parameters" in found.source
    assert found.arch.params_b == 0.0001  # the catalog's smallest model size
    assert found.size_gib == round(path.stat().st_size / 2**30, 4)


def test_the_tiny_model_the_local_cluster_serves_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    subprocess.run([sys.executable, str(REPO / "scripts" / "tiny-gguf"), str(path)], check=True, capture_output=True)
    info = gguf.read_file(str(path))
    assert (
        info.arch.layers,
        info.arch.hidden_size,
        info.arch.attention_heads,
        info.arch.kv_heads,
        info.arch.vocab_size,
    ) == (2, 64, 4, 2, 259)
    assert info.file_type == "fp16"


def test_a_prefix_that_ends_in_the_header_asks_for_more_and_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_gguf(path, gguf_pkg.LlamaFileType.MOSTLY_Q8_0)
    data = path.read_bytes()
    with pytest.raises(gguf.NeedMoreBytes):
        gguf.read_header(data[:200])
    assert gguf.read_header(data).file_type == "Q8_0"
    with pytest.raises(gguf.GGUFError, match="not a GGUF file"):
        gguf.read_header(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValidationError, match="not a GGUF file"):
        (tmp_path / "x.gguf").write_bytes(b"hello world, not a model")
        inspect(str(tmp_path / "x.gguf"))


def hf_dir(tmp_path: Path, config: dict[str, Any], index_total: int | None = None) -> Path:
    directory = tmp_path / "Meta-Llama-3.1-8B-Instruct"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    if index_total:
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": index_total}}))
    return directory


def test_a_hugging_face_directory_gives_the_card_and_the_parameter_count(tmp_path: Path) -> None:
    found = inspect(str(hf_dir(tmp_path, LLAMA_31_8B, LLAMA_31_8B_TOTAL_SIZE)))
    assert (found.name, found.family, found.quant, found.format) == ("Meta-Llama-3.1-8B-Instruct", "llama", "bf16",
                                                                     "safetensors")  # fmt: skip
    assert (found.arch.layers, found.arch.kv_heads, found.arch.head_dim, found.arch.max_context) == (32, 8, 128, 131072)
    assert found.arch.params_b == pytest.approx(8.03, abs=0.01)


def test_the_architecture_alone_counts_parameters_closely() -> None:
    info = hfconfig.read_config(json.dumps(LLAMA_31_8B))
    assert info.params_source == "architecture"
    assert info.params / 1e9 == pytest.approx(8.03, rel=0.02)
    gpt2 = hfconfig.read_config(json.dumps(GPT2))
    assert (gpt2.arch.layers, gpt2.arch.hidden_size, gpt2.arch.kv_heads, gpt2.arch.max_context) == (12, 768, 12, 1024)


def test_quantised_checkpoints_are_named_as_the_catalog_names_them() -> None:
    assert hfconfig.read_config(json.dumps(MISTRAL_7B_AWQ)).quant == "AWQ"
    gptq = {**MISTRAL_7B_AWQ, "quantization_config": {"quant_method": "gptq", "bits": 8}}
    assert hfconfig.read_config(json.dumps(gptq)).quant == "GPTQ-INT8"


def test_safetensors_headers_give_the_exact_count(tmp_path: Path) -> None:
    directory = hf_dir(tmp_path, GPT2)
    header = json.dumps({"a": {"dtype": "F16", "shape": [10, 20], "data_offsets": [0, 400]},
                         "__metadata__": {"format": "pt"}}).encode()  # fmt: skip
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(400))
    found = inspect(str(directory))
    assert "parameters from safetensors" in found.source


def test_bad_config_files_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"needs config\.json"):
        (tmp_path / "empty").mkdir()
        inspect(str(tmp_path / "empty"))
    broken = {k: v for k, v in LLAMA_31_8B.items() if k != "num_hidden_layers"}
    with pytest.raises(ValidationError, match="num_hidden_layers"):
        inspect(str(hf_dir(tmp_path, broken)))
    with pytest.raises(ValidationError):
        inspect("relative/path.gguf")


def test_adding_creates_the_card_variant_and_location_then_updates_them(tmp_path: Path, example_catalog: Path) -> None:
    path = tmp_path / "Test-Model-Q4_K_M.gguf"
    write_gguf(path, gguf_pkg.LlamaFileType.MOSTLY_Q4_K_M)
    cluster = Cluster.objects.get(slug="local")
    added = add(inspect(str(path)), str(path), cluster)
    assert added.created == ["model card Test-Model", "variant Q4_K_M", "location on local"]
    assert added.card.license == "apache-2.0"  # from the header's general.license
    ModelCard.objects.filter(name="Test-Model").update(license="Apache 2.0 (see LICENSE)")
    again = add(inspect(str(path)), str(path), cluster)
    assert again.created == []
    assert ModelCard.objects.filter(name="Test-Model").count() == 1
    assert ModelCard.objects.get(name="Test-Model").license == "Apache 2.0 (see LICENSE)"  # the admin's own stays
    assert ModelVariant.objects.get(model__name="Test-Model").format == "gguf"
    assert VariantLocation.objects.get(variant__model__name="Test-Model").path == str(path)


TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
QWEN25_TEMPLATE = (TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()


def test_a_gguf_chat_template_names_the_tool_call_parser(tmp_path: Path) -> None:
    path = tmp_path / "Qwen-Q4_K_M.gguf"
    write_gguf(path, gguf_pkg.LlamaFileType.MOSTLY_Q4_K_M, chat_template=QWEN25_TEMPLATE)
    assert inspect(str(path)).tool_call_parser == "hermes"
    # A separate template for requests with tools (tokenizer.chat_template.tool_use) is the one read.
    both = tmp_path / "Hermes-Q8_0.gguf"
    llama = (TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()
    templates = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": llama}]
    write_gguf(both, gguf_pkg.LlamaFileType.MOSTLY_Q8_0, chat_template=templates)
    assert inspect(str(both)).tool_call_parser == "llama3_json"
    plain = tmp_path / "Plain-Q8_0.gguf"
    write_gguf(plain, gguf_pkg.LlamaFileType.MOSTLY_Q8_0)  # no template at all, as the tests' tiny model
    assert inspect(str(plain)).tool_call_parser == ""


def test_a_hugging_face_directorys_template_and_model_type_name_the_parser(tmp_path: Path) -> None:
    directory = hf_dir(tmp_path, {**LLAMA_31_8B, "model_type": "qwen2"})
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN25_TEMPLATE}))
    assert inspect(str(directory)).tool_call_parser == "hermes"
    # chat_template.jinja, where there is one, is the template transformers and vLLM use.
    (directory / "chat_template.jinja").write_text((TEMPLATES / "Qwen3-Coder.jinja").read_text())
    assert inspect(str(directory)).tool_call_parser == "qwen3_xml"
    # The model type settles what the markers cannot: Granite 4 writes Hermes' <tool_call> but has its own parser.
    (directory / "config.json").write_text(json.dumps({**LLAMA_31_8B, "model_type": "granitemoehybrid"}))
    assert inspect(str(directory)).tool_call_parser == "granite4"


def test_adding_fills_the_parser_only_where_the_admin_has_set_none(tmp_path: Path, example_catalog: Path) -> None:
    path = tmp_path / "Test-Model-Q4_K_M.gguf"
    write_gguf(path, gguf_pkg.LlamaFileType.MOSTLY_Q4_K_M, chat_template=QWEN25_TEMPLATE)
    cluster = Cluster.objects.get(slug="local")
    assert add(inspect(str(path)), str(path), cluster).card.tool_call_parser == "hermes"
    ModelCard.objects.filter(name="Test-Model").update(tool_call_parser="qwen3_json")
    add(inspect(str(path)), str(path), cluster)
    assert ModelCard.objects.get(name="Test-Model").tool_call_parser == "qwen3_json"  # the admin's own stays


def test_a_card_refuses_a_parser_vllm_does_not_know(example_catalog: Path) -> None:
    card = ModelCard.objects.get(name="Llama-3.1-8B-Instruct")
    assert card.tool_call_parser == "llama3_json"  # as the example catalog names it
    card.tool_call_parser = "llama3"
    with pytest.raises(ValidationError) as exc:
        card.full_clean()
    assert "'llama3' is not a tool-call parser vLLM 0.32 knows" in str(exc.value.message_dict["tool_call_parser"])
    assert ModelCard.objects.get(name="tiny-llama").tool_call_parser == ""


def test_the_admin_button_adds_a_model_from_a_file(tmp_path: Path, example_catalog: Path, admin_client: Any) -> None:
    path = tmp_path / "Test-Model-Q8_0.gguf"
    write_gguf(path, gguf_pkg.LlamaFileType.MOSTLY_Q8_0)
    listing = admin_client.get("/admin/catalog/modelcard/")
    assert b"add-from-file" in listing.content
    reply = admin_client.post("/admin/catalog/modelcard/add-from-file/", {"path": str(path), "name": ""})
    assert reply.status_code == 302
    assert ModelVariant.objects.filter(model__name="Test-Model", quantization="Q8_0").exists()
    bad = admin_client.post("/admin/catalog/modelcard/add-from-file/", {"path": str(tmp_path / "missing.gguf")})
    assert bad.status_code == 200 and b"cannot read" in bad.content
