"""GPU memory of an LLM server: weights, KV cache, compute buffers and per-GPU overhead. Plain Python, no Django.

    estimate(Request(...)) -> Estimate      the breakdown, in total and per GPU
    fit(estimate, usable_gib) -> Fit        does it fit a GPU type, with what headroom
    smallest_layout(request, usable_gib, gpus_per_node, max_nodes) -> Layout | None

Sizes are GiB (2**30 bytes) unless a name says otherwise. Every constant says where it comes from; "llama.cpp" means
the sources vendored in llama-cpp-python 0.3.36, the version the portal builds and tests against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from catalog.architecture import Architecture
from catalog.quant import QUANTS, canonical_quant
from catalog.runtime_rules import RUNTIMES

GIB = 1024**3

# Bytes per cached element of each KV cache type: ggml block layouts (ggml/src/ggml-common.h), e.g. block_q8_0 is
# 32 values in 2 (f16 scale) + 32 bytes = 34 bytes, block_q4_0 is 32 values in 2 + 16 bytes = 18 bytes.
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                 "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}  # fmt: skip

# llama.cpp rounds the context up to a multiple of 256 cells: src/llama-context.cpp,
# `cparams.n_ctx = GGML_PAD(cparams.n_ctx, 256)`.
LLAMA_CPP_CTX_PAD = 256
# llama.cpp's default batch sizes (common/common.h: n_batch 2048, n_ubatch 512); ollama passes num_batch 512.
LLAMA_CPP_UBATCH = 512
# The input embedding stays in host memory in llama.cpp (src/llama-model.cpp places the input layer on the CPU
# device), so a GPU holds every weight but token_embd; the published lab log shows it: "CPU 563.65 MiB" of a 70B
# Q4_K_S = 128256 x 8192 x 4.5 bits.
# Pipeline parallelism over several GPUs keeps GGML_SCHED_MAX_COPIES (4) copies of the graph inputs
# (ggml/src/ggml-backend.cpp), one per micro-batch in flight.
LLAMA_CPP_PIPELINE_COPIES = 4
# A CUDA context with cuBLAS handles takes 300-500 MiB on current drivers (NVIDIA forum measurements; the gap
# between nvidia-smi and a runtime's own buffer sum in the reference rows is of that size). ROCm is similar.
CUDA_CONTEXT_GIB = 0.40
# ollama keeps at least this much of each GPU free when it places layers: envconfig/llm "GPU overhead" plus the
# CUDA minimum it assumes (discover/gpu.go: cudaMinimumMemory = 457 MiB).
OLLAMA_MIN_RESERVE_GIB = 457 / 1024
# vLLM: block_size 16 tokens (vllm/config: default CacheConfig.block_size), gpu_memory_utilization 0.9 (default),
# CUDA graphs captured for decode batch sizes take about 0.5 GiB per GPU for 7-70B models (vLLM's own log line
# "Graph capturing finished ... took 0.5 GiB" is typical), profile run with max_num_batched_tokens tokens.
VLLM_BLOCK_TOKENS = 16
VLLM_GPU_MEMORY_UTILIZATION = 0.90
VLLM_CUDA_GRAPHS_GIB = 0.5
VLLM_MAX_BATCHED_TOKENS = 8192
# Llama-family models use an FFN 3.5x (Llama 3) to 2.7x (Llama 2) the hidden size; 3.5 is the larger, so
# activation estimates err on the safe side when a card has no ffn size.
FFN_FACTOR = 3.5


class EstimateError(ValueError):
    """An impossible or unsupported combination; the message says which and why."""


@dataclass(frozen=True)
class Request:
    arch: Architecture
    quant: str
    runtime: str
    context: int
    parallel: int = 1
    kv_type: str = "f16"
    flash_attn: bool | None = None  # None: the runtime's default
    n_ubatch: int | None = None
    gpus_per_node: int = 1
    nodes: int = 1
    file_size_gib: float | None = None
    gpu_memory_utilization: float = VLLM_GPU_MEMORY_UTILIZATION

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class Estimate:
    weights_gib: float
    kv_cache_gib: float
    compute_gib: float
    overhead_gib: float
    per_gpu_gib: list[float]
    host_gib: float = 0.0  # weights llama.cpp keeps in host memory (the input embedding)
    reserve_gib: float = 0.0  # free memory the runtime insists on per GPU (ollama)
    vllm_reserved_fraction: float | None = None
    context_gib: float = CUDA_CONTEXT_GIB  # per GPU, inside per_gpu_gib and overhead_gib
    notes: list[str] = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.kv_cache_gib + self.compute_gib + self.overhead_gib

    @property
    def max_gpu_gib(self) -> float:
        return max(self.per_gpu_gib)


@dataclass(frozen=True)
class Fit:
    fits: bool
    headroom_gib: float  # on the fullest GPU; negative when it does not fit
    needed_gib: float  # on the fullest GPU, including the runtime's reserve


@dataclass(frozen=True)
class Layout:
    gpus_per_node: int
    nodes: int
    estimate: Estimate
    fit: Fit

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


def kv_cells(runtime: str, context: int, parallel: int = 1) -> int:
    """How many tokens of KV the runtime allocates for `parallel` requests of `context` tokens each.
    llama.cpp's -c is the whole cache, split evenly over its slots (n_ctx_slot = n_ctx / n_parallel), so a job
    passes -c context x parallel; ollama multiplies its num_ctx by OLLAMA_NUM_PARALLEL; both pad to 256 cells.
    vLLM and transformers hold `parallel` full-length requests (vLLM in 16-token blocks)."""
    if runtime in ("llama.cpp", "ollama"):
        return math.ceil(context * parallel / LLAMA_CPP_CTX_PAD) * LLAMA_CPP_CTX_PAD
    if runtime == "vllm":
        return math.ceil(context / VLLM_BLOCK_TOKENS) * VLLM_BLOCK_TOKENS * parallel
    return context * parallel


def kv_cache_bytes(arch: Architecture, cells: int, kv_type: str = "f16") -> float:
    """llama.cpp's formula: per layer, K and V each hold kv_heads x head_dim elements per cell."""
    return arch.layers * cells * arch.kv_width * 2 * KV_TYPE_BYTES[kv_type]


def weights_bytes(arch: Architecture, quant: str, file_size_gib: float | None = None) -> float:
    if file_size_gib:
        return file_size_gib * GIB  # the file is the weights (a GGUF header is kilobytes)
    return arch.params_b * 1e9 * QUANTS[quant].bits_per_weight / 8


def _validate(req: Request) -> str:
    rules = RUNTIMES.get(req.runtime)
    if rules is None:
        raise EstimateError(f"unknown runtime {req.runtime!r}; one of {', '.join(RUNTIMES)}")
    try:
        quant = canonical_quant(req.quant)
    except KeyError:
        raise EstimateError(f"unknown quantisation {req.quant!r}; known: {', '.join(QUANTS)}") from None
    formats = QUANTS[quant].formats
    if not set(rules.formats) & set(formats):
        raise EstimateError(f"{req.runtime} {rules.serves_text}; {quant} comes as {' or '.join(formats)}")
    if req.kv_type not in KV_TYPE_BYTES:
        raise EstimateError(f"unknown KV cache type {req.kv_type!r}; one of {', '.join(KV_TYPE_BYTES)}")
    if req.kv_type not in ("f16", "bf16", "f32"):
        if not rules.kv_quant:
            raise EstimateError(f"{req.kv_type} KV cache is a llama.cpp option; {req.runtime} uses f16/bf16 or fp8")
        block = 1 if req.kv_type in ("f32", "f16", "bf16") else 32
        if req.arch.head_dim % block:
            # src/llama-context.cpp: "K cache type q8_0 with block size 32 does not divide n_embd_head_k".
            raise EstimateError(f"a {req.kv_type} KV cache needs a head dimension divisible by 32")
        if req.flash_attn is False:
            # llama.cpp refuses it: "V cache quantization requires flash_attn" (src/llama-context.cpp).
            raise EstimateError("a quantised V cache needs flash attention on llama.cpp (turn flash attention on)")
    if req.context < 1 or req.parallel < 1 or req.gpus_per_node < 1 or req.nodes < 1:
        raise EstimateError("context, parallel slots, GPUs and nodes must be positive")
    if req.arch.max_context and req.context > req.arch.max_context:
        raise EstimateError(f"context {req.context} is above the model's maximum of {req.arch.max_context}")
    if req.nodes > 1 and not rules.multi_node:
        raise EstimateError(rules.one_node_only())
    if req.arch.kv_heads > req.arch.attention_heads or req.arch.attention_heads % req.arch.kv_heads:
        raise EstimateError("attention heads must be a multiple of KV heads")
    return quant


def estimate(req: Request) -> Estimate:
    quant = _validate(req)
    req = replace(req, quant=quant)
    if req.runtime in ("llama.cpp", "ollama"):
        return _llama_cpp(req)
    if req.runtime == "vllm":
        return _vllm(req)
    return _transformers(req)


def _split(total: float, layers: int, devices: int) -> list[float]:
    """Shares of per-layer data over devices, at layer granularity (llama.cpp's even --tensor-split)."""
    base, extra = divmod(layers, devices)
    return [total * (base + (1 if i < extra else 0)) / layers for i in range(devices)]


def _llama_cpp(req: Request) -> Estimate:
    arch, devices = req.arch, req.gpus
    flash = req.flash_attn if req.flash_attn is not None else req.runtime == "llama.cpp"
    # llama-server 0.3.36 defaults to -fa auto (on where supported); ollama leaves it off unless OLLAMA_FLASH_ATTENTION.
    ubatch = req.n_ubatch or LLAMA_CPP_UBATCH
    bpw = QUANTS[req.quant].bits_per_weight
    weights = weights_bytes(arch, req.quant, req.file_size_gib)
    embd = min(arch.vocab_size * arch.hidden_size * bpw / 8, weights * 0.5)
    # The output projection (vocab x hidden) sits on the last device with the logits.
    output = min(arch.vocab_size * arch.hidden_size * max(bpw, 6.5625) / 8, weights * 0.25)
    layer_weights = max(weights - embd - output, 0.0)
    cells = kv_cells(req.runtime, req.context, req.parallel)
    kv = kv_cache_bytes(arch, cells, req.kv_type)
    ffn = FFN_FACTOR * arch.hidden_size
    f32 = 4
    # Compute buffer: the largest graph node dominates. Without flash attention that is the KQ matrix (f32,
    # cells x ubatch x heads); with it, the attention is tiled and only activations and logits remain.
    kq = cells * ubatch * arch.attention_heads * f32 if not flash else 0.0
    activations = ubatch * (3 * arch.hidden_size + 2 * ffn) * f32
    logits = ubatch * arch.vocab_size * f32
    compute_first = kq + activations
    weights_split = _split(layer_weights, arch.layers, devices)
    kv_split = _split(kv, arch.layers, devices)
    per_gpu: list[float] = []
    compute_total = 0.0
    for i in range(devices):
        compute = compute_first
        if devices > 1:
            compute += (LLAMA_CPP_PIPELINE_COPIES - 1) * ubatch * arch.hidden_size * f32
        last = i == devices - 1
        if last:
            compute += logits
        compute_total += compute
        gpu_bytes = weights_split[i] + (output if last else 0.0) + kv_split[i] + compute
        per_gpu.append(gpu_bytes / GIB + CUDA_CONTEXT_GIB)
    notes = [f"KV cache: {cells} cells ({req.kv_type}), flash attention {'on' if flash else 'off'}"]
    if req.nodes > 1:
        notes.append(f"layers split over {devices} GPUs on {req.nodes} nodes (ggml-rpc-server on the others)")
    return Estimate(
        weights_gib=weights / GIB,
        kv_cache_gib=kv / GIB,
        compute_gib=compute_total / GIB,
        overhead_gib=CUDA_CONTEXT_GIB * devices,
        per_gpu_gib=per_gpu,
        host_gib=embd / GIB,
        reserve_gib=OLLAMA_MIN_RESERVE_GIB if req.runtime == "ollama" else 0.0,
        notes=notes,
    )


def _vllm(req: Request) -> Estimate:
    arch = req.arch
    tp, pp = req.gpus_per_node, req.nodes
    weights = weights_bytes(arch, req.quant, req.file_size_gib)
    cells = kv_cells("vllm", req.context, req.parallel)
    kv = kv_cache_bytes(arch, cells, "f16")
    tokens = min(max(req.context, 2048), VLLM_MAX_BATCHED_TOKENS)
    activations = tokens * (arch.vocab_size * 4 + (4 * arch.hidden_size + 2 * FFN_FACTOR * arch.hidden_size) * 2)
    per_gpu_bytes = weights / (tp * pp) + kv / (tp * pp) + activations / tp
    per_gpu = [per_gpu_bytes / GIB + VLLM_CUDA_GRAPHS_GIB + CUDA_CONTEXT_GIB] * (tp * pp)
    return Estimate(
        weights_gib=weights / GIB,
        kv_cache_gib=kv / GIB,
        compute_gib=activations * pp / GIB + VLLM_CUDA_GRAPHS_GIB * tp * pp,
        overhead_gib=CUDA_CONTEXT_GIB * tp * pp,
        per_gpu_gib=per_gpu,
        vllm_reserved_fraction=req.gpu_memory_utilization,
        notes=[
            f"vLLM takes {req.gpu_memory_utilization:.0%} of each GPU at start and fills what is left after the "
            f"weights with KV cache; it refuses to start unless {req.parallel} request(s) of {req.context} tokens fit",
            f"tensor parallel {tp} x pipeline parallel {pp}",
        ],
    )


def _transformers(req: Request) -> Estimate:
    arch, devices = req.arch, req.gpus
    weights = weights_bytes(arch, req.quant, req.file_size_gib)
    cells = kv_cells("transformers", req.context, req.parallel)
    kv = kv_cache_bytes(arch, cells, "f16")
    # Prefill of the whole prompt: logits in f32 for every position, plus the attention scores of one layer.
    activations = req.context * req.parallel * (arch.vocab_size * 4 + 2 * FFN_FACTOR * arch.hidden_size * 2)
    activations += req.parallel * arch.attention_heads * req.context**2 * 2 if req.flash_attn is not True else 0
    weights_split = _split(weights, arch.layers, devices)
    kv_split = _split(kv, arch.layers, devices)
    per_gpu = [
        (weights_split[i] + kv_split[i] + (activations if i == devices - 1 else 0)) / GIB + CUDA_CONTEXT_GIB
        for i in range(devices)
    ]
    return Estimate(
        weights_gib=weights / GIB,
        kv_cache_gib=kv / GIB,
        compute_gib=activations / GIB,
        overhead_gib=CUDA_CONTEXT_GIB * devices,
        per_gpu_gib=per_gpu,
        notes=["device_map='auto' splits layers over the GPUs of one node"],
    )


def fit(est: Estimate, usable_gib: float) -> Fit:
    """Against one GPU type's usable memory: its size less what the catalog reserves for the driver, the CUDA
    context and anything else on the card. That reserve covers the context, so it is not counted twice."""
    needed = est.max_gpu_gib - est.context_gib + est.reserve_gib
    if est.vllm_reserved_fraction is not None:
        budget = usable_gib * est.vllm_reserved_fraction
        return Fit(fits=needed <= budget, headroom_gib=budget - needed, needed_gib=needed)
    return Fit(fits=needed <= usable_gib, headroom_gib=usable_gib - needed, needed_gib=needed)


def smallest_layout(
    req: Request, usable_gib: float, gpus_per_node: int, max_nodes: int = 1, min_gpus: int = 1
) -> Layout | None:
    """The fewest GPUs that fit: 1..gpus_per_node on one node, then whole nodes where the runtime spans nodes.
    Where tensor parallel splits the attention heads (vLLM), counts that do not divide them are skipped."""
    candidates = [(g, 1) for g in range(max(1, min_gpus), gpus_per_node + 1)]
    rules = RUNTIMES.get(req.runtime)
    if rules is not None and rules.multi_node:
        candidates += [(gpus_per_node, n) for n in range(2, max_nodes + 1)]
    for per_node, nodes in candidates:
        if rules is not None and rules.splits_heads and req.arch.attention_heads % per_node:
            continue
        est = estimate(replace(req, gpus_per_node=per_node, nodes=nodes))
        result = fit(est, usable_gib)
        if result.fits:
            return Layout(per_node, nodes, est, result)
    return None
