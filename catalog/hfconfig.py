"""Read a Hugging Face checkpoint's config.json (and its safetensors index or headers) into catalog numbers.

Parameter count: exact from safetensors headers when given (the sum of tensor shapes), else from the index's
metadata.total_size divided by the bytes per parameter of the dtype, else from the architecture (embeddings +
per-layer attention and MLP matrices), which is within a few percent for Llama-style models.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from catalog.architecture import Architecture
from catalog.quant import grouped_name


class HFConfigError(ValueError):
    pass


@dataclass(frozen=True)
class HFInfo:
    arch_name: str  # the first of config.json's architectures, e.g. LlamaForCausalLM
    params: int
    params_source: str  # "safetensors", "index" or "architecture"
    arch: Architecture
    quant: str  # the catalog's name: bf16, fp16, fp32, AWQ, GPTQ-INT4, BNB-NF4, fp8, ...
    model_type: str = ""  # config.json's model_type, e.g. qwen2, llama, gemma4


_DTYPE_QUANT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "half": "fp16", "float": "fp32"}
_DTYPE_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "fp8": 1.0}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}  # fmt: skip


def _quant(config: dict[str, Any]) -> str:
    q = config.get("quantization_config") or {}
    method = str(q.get("quant_method", "")).lower()
    bits = q.get("bits") or q.get("w_bit")
    group = q.get("group_size", q.get("q_group_size"))
    if method in ("awq", "gptq"):
        return grouped_name(method, 8 if bits == 8 else 4, group if isinstance(group, int) else None)
    if method == "bitsandbytes":
        if q.get("load_in_8bit"):
            return "BNB-INT8"
        nf4 = q.get("bnb_4bit_quant_type") == "nf4"  # BitsAndBytesConfig's default is fp4
        if nf4:
            return "BNB-NF4" if q.get("bnb_4bit_use_double_quant") else "BNB-NF4-SQ"
        return "BNB-FP4"
    if method in ("fp8", "compressed-tensors") and "8" in json.dumps(q):
        return "fp8"
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").replace("torch.", "")
    return _DTYPE_QUANT.get(dtype, "bf16")


def read_config(
    config_text: str, index_text: str | None = None, safetensors_headers: list[bytes] | None = None
) -> HFInfo:
    try:
        config = json.loads(config_text)
    except json.JSONDecodeError as exc:
        raise HFConfigError(f"config.json is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise HFConfigError("config.json is not an object")
    config = {**config.get("text_config", {}), **config} if "text_config" in config else config

    def need(*keys: str) -> int:
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and value > 0:
                return value
        raise HFConfigError(f"config.json has no {' / '.join(keys)}")

    layers = need("num_hidden_layers", "n_layer", "num_layers")
    hidden = need("hidden_size", "n_embd", "d_model")
    heads = need("num_attention_heads", "n_head")
    kv_heads = config.get("num_key_value_heads") or config.get("num_kv_heads") or heads
    if config.get("multi_query"):
        kv_heads = 1
    head_dim = config.get("head_dim") or hidden // heads
    vocab = need("vocab_size")
    context = need("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    quant = _quant(config)
    intermediate = config.get("intermediate_size") or config.get("n_inner") or 4 * hidden
    params, source = _params(config, quant, safetensors_headers, index_text)
    if not params:
        # Embeddings (tied or not), per layer Q/O (hidden^2 each), K/V (hidden x kv width) and a gated or plain MLP.
        kv_width = int(kv_heads) * int(head_dim)
        gated = 3 if config.get("hidden_act", "silu") in ("silu", "swiglu", "gelu_pytorch_tanh") else 2
        moe = _moe_and_window(config)
        ffn = moe["ffn_size"] or intermediate
        # Qwen-MoE adds one shared expert of its own width to the routed ones.
        shared = config.get("shared_expert_intermediate_size") if moe["experts"] else None
        ffn_total = ffn * (moe["experts"] or 1) + (shared if isinstance(shared, int) else 0)
        per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv_width + gated * hidden * ffn_total
        embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
        params, source = layers * per_layer + embeddings, "architecture"
    architectures = config.get("architectures") or [config.get("model_type", "")]
    return HFInfo(
        arch_name=str(architectures[0]),
        params=int(params),
        params_source=source,
        arch=Architecture(
            params_b=Architecture.params_b_of(int(params)),
            layers=layers,
            hidden_size=hidden,
            attention_heads=heads,
            kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            vocab_size=vocab,
            max_context=context,
            **_moe_and_window(config),
            # Absent, the model class decides (Llama's default is untied, GPT-2's tied): unknown, sized untied.
            tied_embeddings=tied if isinstance(tied := config.get("tie_word_embeddings"), bool) else None,
        ),
        quant=quant,
        model_type=str(config.get("model_type") or ""),
    )


def _moe_and_window(config: dict[str, Any]) -> dict[str, int | None]:
    """Each expert's FFN width for a mixture of experts (moe_intermediate_size, Qwen-MoE and DeepSeek's name; Mixtral
    keeps it in intermediate_size), the experts (num_local_experts, num_experts, n_routed_experts) and how many a
    token uses (num_experts_per_tok), and the sliding window (None when use_sliding_window is false)."""

    def number(*keys: str) -> int | None:
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    experts = number("num_local_experts", "num_experts", "n_routed_experts")
    window = None if config.get("use_sliding_window") is False else number("sliding_window")
    return {
        "ffn_size": (number("moe_intermediate_size") if experts else None) or number("intermediate_size", "n_inner"),
        "experts": experts,
        "experts_used": number("num_experts_per_tok") if experts else None,
        "sliding_window": window,
        "sliding_window_layers": _window_layers(config) if window else None,
    }


def _window_layers(config: dict[str, Any]) -> int | None:
    """Layers that attend within the window: transformers' layer_types (4.53 on), else Gemma 3's
    sliding_window_pattern (every Nth layer is global), else Gemma 2's alternation; None where the config does not
    say (Mistral 7B v0.1 names a window for every layer, yet transformers' default cache keeps the whole context)."""
    types = config.get("layer_types")
    if isinstance(types, list) and types:
        return sum(1 for t in types if t == "sliding_attention")
    layers = config.get("num_hidden_layers")
    pattern = config.get("sliding_window_pattern")
    if isinstance(layers, int) and isinstance(pattern, int) and pattern > 0:
        return layers - layers // pattern
    if isinstance(layers, int) and config.get("model_type") == "gemma2":
        return layers - layers // 2  # the even-numbered layers: ceil(n / 2)
    return None


def _params(config: dict[str, Any], quant: str, headers: list[bytes] | None, index_text: str | None) -> tuple[int, str]:
    if headers:
        total = 0
        for header in headers:
            for name, tensor in safetensors_header(header).items():
                if name != "__metadata__":
                    total += math.prod(tensor["shape"])
        if quant.startswith(("AWQ", "GPTQ")):
            return 0, ""  # packed int32 tensors do not count parameters; fall back to the architecture
        return total, "safetensors"
    if index_text and quant in _DTYPE_BYTES:
        try:
            size = json.loads(index_text)["metadata"]["total_size"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise HFConfigError("the safetensors index has no metadata.total_size") from None
        return int(size / _DTYPE_BYTES[quant]), "index"
    return 0, ""


def chat_template(tokenizer_config_text: str) -> str:
    """The chat template in a tokenizer_config.json: its `chat_template`, a string or a list of {name, template}, of
    which the one named tool_use (a separate template for requests with tools), else default, else the first; "" where
    there is none or the file is not what it should be (a model without a template is still a model)."""
    try:
        config = json.loads(tokenizer_config_text)
    except json.JSONDecodeError:
        return ""
    found = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(found, str):
        return found
    if not isinstance(found, list):
        return ""
    named = {item.get("name"): item.get("template") for item in found if isinstance(item, dict)}
    for name in ("tool_use", "default", *named):
        if isinstance(named.get(name), str):
            return str(named[name])
    return ""


def safetensors_header(data: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors file from its first bytes: 8-byte little-endian length, then JSON."""
    if len(data) < 8:
        raise HFConfigError("too short for a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > 100 << 20 or len(data) < 8 + length:
        raise HFConfigError("the safetensors header is truncated or implausibly large")
    header = json.loads(data[8 : 8 + length])
    if not isinstance(header, dict):
        raise HFConfigError("the safetensors header is not an object")
    return header
