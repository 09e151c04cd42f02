"""Known weight formats and quantisations: bits per weight of the repeating layers, of the input embedding and of the
output head, each with its source.

Plain Python (no Django) so the estimator and the YAML importer share one list.

- GGUF block types: ggml's block layouts (ggml/src/ggml-common.h), e.g. Q4_0 = 32 weights in 2 + 16 bytes = 4.5 bpw,
  Q4_K = 256 weights in 144 bytes = 4.5, Q6_K = 210 bytes = 6.5625, Q2_K = 84 bytes = 2.625.
- GGUF *file* types mix block types per tensor (src/llama-quant.cpp, llama_tensor_get_type): the token embedding takes
  the file type's base type (Q2_K, Q4_K, ...; IQ1/IQ2_XXS/IQ2_XS files use Q2_K, IQ2_S/M and IQ3_XXS use IQ3_S); the
  output head is Q6_K (Q8_0 in Q8_0 files, Q5_K in IQ1/IQ2/IQ3_XXS files); "_L" files (bartowski's) keep both in Q8_0.
  The layers' average includes the mix: Q4_K_M gives half of attn_v and ffn_down Q6_K (4.5 + 0.3 = 4.8 for Llama 3
  shapes), Q4_K_S only the first eighth Q5_K (4.55), Q2_K puts attn_v, attn_output and ffn_down in Q3_K/Q4_K. Q2_K
  files differ by the llama.cpp that made them: 3.36 bpw over the layers in late-2023 files (TheBloke's), 2.95 in
  2024 ones; 3.2 is within 7 % of both.
- Safetensors quantisations store their scales: AWQ/GPTQ a 16-bit scale and a packed zero per group of `g` weights
  (bits + (16 + bits) / g: 4.16 at g = 128); bitsandbytes 4-bit an fp32 absmax per 64 weights (+0.5), or with double
  quantisation an 8-bit absmax plus an fp32 per 256 of those (+0.127); LLM.int8 an fp32 scale per row. They quantise
  only the linear layers: the embedding and the output head stay 16-bit (transformers keeps the output embedding out of
  bitsandbytes; AutoAWQ and GPTQ leave lm_head and embed_tokens alone), which for a 128k-vocabulary 8B model is a
  third of a 4-bit checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Quant:
    name: str
    bits_per_weight: float  # the repeating layers' weights (attention and MLP matrices), scales included
    formats: tuple[str, ...]
    embed_bits: float = 16.0  # the input token-embedding table
    output_bits: float = 16.0  # the output head, where it is not tied to the embedding
    # bitsandbytes and AWQ/GPTQ dequantise a layer's weight to 16 bit for prompts longer than a few tokens: a
    # transient copy of the largest matrix, in this many bits, from this many tokens in one forward on (bnb's
    # matmul_4bit for more than one row; AutoAWQ's WQLinear_GEMM from batch x tokens >= 1024,
    # awq/modules/linear/gemm.py FP16_MATMUL_HEURISTIC_CONDITION; below that its split-k GEMM writes 8 partial
    # outputs of tokens x outputs, smaller than the copy).
    dequant_bits: float = 0.0
    dequant_from_tokens: int = 2


_GGUF = ("gguf", "ollama")
_HF = ("safetensors",)
_ANY = ("gguf", "safetensors", "ollama")

Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_0 = 2.625, 3.4375, 4.5, 5.5, 6.5625, 8.5
IQ3_S = 3.4375


def _gguf(name: str, layers: float, embed: float, output: float = Q6_K) -> Quant:
    return Quant(name, layers, _GGUF, embed, output)


def group_bits(bits: int, group: int) -> float:
    """AWQ/GPTQ: `bits` per weight plus a 16-bit scale and a `bits`-wide zero per group (per row when group <= 0)."""
    return bits + (16 + bits) / group if group > 0 else float(bits)


def _grouped(method: str, bits: int, group: int) -> Quant:
    suffix = "" if group == 128 else f"-G{group}"
    # AutoAWQ dequantises from 1024 tokens; the GPTQ exllama kernel reconstructs the weight from 50 rows on
    # (MAX_Q_GEMM_ROWS in its q_gemm.cu, as AutoGPTQ and vLLM ship it).
    from_tokens = 1024 if method == "AWQ" else 50
    return Quant(f"{method}{suffix}", group_bits(bits, group), _HF, dequant_bits=16.0, dequant_from_tokens=from_tokens)


BNB_ABSMAX = 32 / 64  # fp32 absmax per 64 weights (bitsandbytes' default 4-bit block size)
BNB_DOUBLE_QUANT = 8 / 64 + 32 / (64 * 256)  # 8-bit absmax, fp32 per 256 of them

QUANTS: dict[str, Quant] = {
    q.name: q
    for q in [
        Quant("fp32", 32.0, _ANY, 32.0, 32.0),
        Quant("fp16", 16.0, _ANY),
        Quant("bf16", 16.0, _ANY),
        Quant("fp8", 8.0, _HF),  # per-tensor or per-channel scales: a few bytes per matrix
        Quant("int8", 8.0 + 16 / 128, _HF),
        _grouped("AWQ", 4, 128),
        _grouped("AWQ", 4, 64),
        _grouped("AWQ", 4, 32),
        _grouped("GPTQ-INT4", 4, 128),
        _grouped("GPTQ-INT4", 4, 64),
        _grouped("GPTQ-INT4", 4, 32),
        _grouped("GPTQ-INT4", 4, -1),
        _grouped("GPTQ-INT8", 8, 128),
        _grouped("GPTQ-INT8", 8, 64),
        _grouped("GPTQ-INT8", 8, 32),
        _grouped("GPTQ-INT8", 8, -1),
        Quant("BNB-NF4", 4.0 + BNB_DOUBLE_QUANT, _HF, dequant_bits=16.0),  # QLoRA's recipe: nf4, double quantised
        Quant("BNB-NF4-SQ", 4.0 + BNB_ABSMAX, _HF, dequant_bits=16.0),  # nf4, single quantisation
        Quant("BNB-FP4", 4.0 + BNB_ABSMAX, _HF, dequant_bits=16.0),  # BitsAndBytesConfig(load_in_4bit=True) default
        Quant("BNB-INT8", 8.0 + 32 / 4096, _HF, dequant_bits=16.0),
        _gguf("Q4_0", 4.5, 4.5),
        _gguf("Q4_1", 5.0, 5.0),
        _gguf("Q5_0", 5.5, 5.5),
        _gguf("Q5_1", 6.0, 6.0),
        _gguf("Q8_0", 8.5, Q8_0, Q8_0),
        _gguf("Q2_K", 3.2, Q2_K),
        _gguf("Q2_K_L", 3.2, Q8_0, Q8_0),
        _gguf("Q3_K_S", 3.5, Q3_K),
        _gguf("Q3_K_M", 3.91, Q3_K),
        _gguf("Q3_K_L", 4.27, Q3_K),
        _gguf("Q3_K_XL", 4.27, Q8_0, Q8_0),
        _gguf("Q4_K_S", 4.55, Q4_K),
        _gguf("Q4_K_M", 4.8, Q4_K),
        _gguf("Q4_K_L", 4.8, Q8_0, Q8_0),
        _gguf("Q5_K_S", 5.5, Q5_K),
        _gguf("Q5_K_M", 5.63, Q5_K),
        _gguf("Q5_K_L", 5.63, Q8_0, Q8_0),
        _gguf("Q6_K", Q6_K, Q6_K),
        _gguf("Q6_K_L", Q6_K, Q8_0, Q8_0),
        _gguf("IQ1_S", 1.56, Q2_K, Q5_K),
        _gguf("IQ1_M", 1.75, Q2_K, Q5_K),
        _gguf("IQ2_XXS", 2.06, Q2_K, Q5_K),
        _gguf("IQ2_XS", 2.31, Q2_K, Q5_K),
        _gguf("IQ2_S", 2.5, IQ3_S, Q5_K),
        _gguf("IQ2_M", 2.7, IQ3_S, Q5_K),
        _gguf("IQ3_XXS", 3.06, IQ3_S, Q5_K),
        _gguf("IQ3_XS", 3.3, IQ3_S),
        _gguf("IQ3_S", 3.44, IQ3_S),
        _gguf("IQ3_M", 3.66, IQ3_S),
        _gguf("IQ4_XS", 4.25, 4.25),
        _gguf("IQ4_NL", 4.5, 4.5),
    ]
}

_BY_FOLDED = {name.casefold(): name for name in QUANTS}
_ALIASES = {
    "f32": "fp32",
    "f16": "fp16",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32",
    "gptq": "GPTQ-INT4",
    "awq-int4": "AWQ",
    "bnb-4bit": "BNB-FP4",
    "bnb-4bit-fp4": "BNB-FP4",
    "bnb-4bit-nf4": "BNB-NF4-SQ",
    "bnb-8bit": "BNB-INT8",
    "fp8-e4m3": "fp8",
}
_GROUP_SUFFIX = re.compile(r"^(?P<base>.+)-g128$")


def canonical_quant(name: str) -> str:
    """Return the catalog's spelling of a quantisation name, case-insensitively; KeyError if unknown.
    A group size of 128 is the default and may be spelt out (AWQ-G128 is AWQ)."""
    folded = name.strip().casefold()
    if match := _GROUP_SUFFIX.match(folded):
        folded = match["base"]
    if folded in _ALIASES:
        return _ALIASES[folded]
    return _BY_FOLDED[folded]


def grouped_name(method: str, bits: int, group: int | None) -> str:
    """The catalog's name of an AWQ/GPTQ quantisation from a quantization_config: AWQ, GPTQ-INT4-G32, ..."""
    base = "AWQ" if method == "awq" else f"GPTQ-INT{bits}"
    name = base if group in (None, 128) else f"{base}-G{group}"
    return name if name in QUANTS else base


def known_quants() -> list[str]:
    return list(QUANTS)
