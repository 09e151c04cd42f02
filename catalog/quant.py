"""Known weight formats and quantisations, with their bits per weight.

Plain Python (no Django) so the estimator and the YAML importer share one list. Bits per weight of GGUF block types
come from ggml's block layouts (ggml/src/ggml-common.h: e.g. Q4_0 = 32 weights in 2 + 16 bytes = 4.5 bpw); for GGUF
*file* types, which mix block types per tensor, the figure is the overall average llama.cpp's quantize tool reports
(tools/quantize/README.md table, e.g. Q4_K_M 4.89 bpw for Llama-3-8B). Safetensors quantisations include their
scales (AWQ/GPTQ at group size 128 store a 16-bit scale and a 4-bit zero per group: 4 + (16 + 4) / 128 ~ 4.16).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Quant:
    name: str
    bits_per_weight: float
    formats: tuple[str, ...]


_GGUF = ("gguf", "ollama")
_HF = ("safetensors",)
_ANY = ("gguf", "safetensors", "ollama")

QUANTS: dict[str, Quant] = {
    q.name: q
    for q in [
        Quant("fp32", 32.0, _ANY),
        Quant("fp16", 16.0, _ANY),
        Quant("bf16", 16.0, _ANY),
        Quant("fp8", 8.0 + 16 / 128 / 8, _HF),  # per-tensor/per-channel scales, rounded up
        Quant("int8", 8.0 + 16 / 128, _HF),
        Quant("AWQ", 4.0 + 20 / 128, _HF),
        Quant("GPTQ-INT4", 4.0 + 20 / 128, _HF),
        Quant("GPTQ-INT8", 8.0 + 20 / 128, _HF),
        Quant("BNB-NF4", 4.0 + 32 / 64 / 8 + 0.127, _HF),  # nf4 with double-quantised absmax (bitsandbytes docs)
        Quant("BNB-INT8", 8.0 + 32 / 4096, _HF),
        Quant("Q4_0", 4.5, _GGUF),
        Quant("Q4_1", 5.0, _GGUF),
        Quant("Q5_0", 5.5, _GGUF),
        Quant("Q5_1", 6.0, _GGUF),
        Quant("Q8_0", 8.5, _GGUF),
        Quant("Q2_K", 3.0, _GGUF),
        Quant("Q3_K_S", 3.5, _GGUF),
        Quant("Q3_K_M", 3.91, _GGUF),
        Quant("Q3_K_L", 4.27, _GGUF),
        Quant("Q4_K_S", 4.58, _GGUF),
        Quant("Q4_K_M", 4.89, _GGUF),
        Quant("Q4_K_L", 5.05, _GGUF),  # Q4_K_M with Q8_0 embeddings and output (bartowski's "_L" files)
        Quant("Q5_K_S", 5.54, _GGUF),
        Quant("Q5_K_M", 5.70, _GGUF),
        Quant("Q5_K_L", 5.85, _GGUF),
        Quant("Q6_K", 6.56, _GGUF),
        Quant("Q6_K_L", 6.70, _GGUF),
        Quant("IQ1_S", 1.56, _GGUF),
        Quant("IQ1_M", 1.75, _GGUF),
        Quant("IQ2_XXS", 2.06, _GGUF),
        Quant("IQ2_XS", 2.31, _GGUF),
        Quant("IQ2_S", 2.5, _GGUF),
        Quant("IQ2_M", 2.7, _GGUF),
        Quant("IQ3_XXS", 3.06, _GGUF),
        Quant("IQ3_XS", 3.3, _GGUF),
        Quant("IQ3_S", 3.44, _GGUF),
        Quant("IQ3_M", 3.66, _GGUF),
        Quant("IQ4_XS", 4.25, _GGUF),
        Quant("IQ4_NL", 4.5, _GGUF),
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
}


def canonical_quant(name: str) -> str:
    """Return the catalog's spelling of a quantisation name, case-insensitively; KeyError if unknown."""
    folded = name.strip().casefold()
    if folded in _ALIASES:
        return _ALIASES[folded]
    return _BY_FOLDED[folded]


def known_quants() -> list[str]:
    return list(QUANTS)
