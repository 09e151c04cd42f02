"""GPU memory of an LLM server: weights, KV cache, compute buffers and per-GPU overhead. Plain Python, no Django.

    estimate(Request(...)) -> Estimate      the breakdown, in total and per GPU
    fit(estimate, usable_gib) -> Fit        does it fit a GPU type, with what headroom
    smallest_layout(request, usable_gib, gpus_per_node, max_nodes) -> Layout | None

Sizes are GiB (2**30 bytes) unless a name says otherwise. Every constant says where it comes from; "llama.cpp" means
the sources vendored in llama-cpp-python 0.3.36, the version the portal builds and tests against. Fine-tuning and RAG
(the purposes beyond serving) are catalog/training.py, on top of this.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from catalog.architecture import Architecture
from catalog.quant import QUANTS, Quant, canonical_quant
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
# Q4_K_S = 128256 x 8192 x 4.5 bits. A file without output.weight (tied embeddings) loads token_embd a second time,
# on the output layer's GPU (TENSOR_DUPLICATED).
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
# "Graph capturing finished ... took 0.5 GiB" is typical). The profile run at start is one forward pass of
# max_num_batched_tokens tokens: the V1 engine's default for the OpenAI server is 8192 on GPUs of 70 GiB and more and
# 2048 below (vllm/engine/arg_utils.py), so 8192 errs on the safe side; with chunked prefill off (V0) it is
# max(max_model_len, 2048). Either way no more than max_num_seqs x max_model_len (the job passes --max-num-seqs).
VLLM_BLOCK_TOKENS = 16
VLLM_GPU_MEMORY_UTILIZATION = 0.90
VLLM_CUDA_GRAPHS_GIB = 0.5
VLLM_MAX_BATCHED_TOKENS = 8192
# Without an FFN width on the card, Llama-family models use 2.7x (Llama 2) to 3.5x (Llama 3) the hidden size; 3.5 is
# the larger, so activation estimates err on the safe side.
FFN_FACTOR = 3.5
# Activations held at the peak of a layer's forward, besides the MLP's: the hidden state, the residual, the normed
# input and the layer's output (vLLM's fused add-RMSNorm works in place; transformers keeps as many).
HIDDEN_COPIES = 4
# The MLP's peak: gate and up projections and their product (SwiGLU), each tokens x ffn, before down_proj frees them.
MLP_COPIES = 3
# Eager attention (transformers attn_implementation="eager", AutoAWQ's fused prefill): scores in 16 bit, their
# float32 softmax and the 16-bit copy back, all held at once: 8 bytes per score
# (transformers' modeling_llama.eager_attention_forward).
EAGER_SCORE_BYTES = 8
# transformers' generate() asks modern models for the last position's logits only (logits_to_keep, 4.45 on); the
# logits are upcast to float32 beside their 16-bit copy.
LOGIT_BYTES = 2 + 4
BF16 = 2
# A transformers process holds more than weights, KV cache and activations: RoPE cos/sin tables (one per layer, for
# the whole max_position_embeddings, before transformers 4.38: 0.5 GiB for Mistral 7B), fused modules' caches and
# kernel scratch. The AutoAWQ tables show the floor: Mistral 7B AWQ peaks at 4.50 GB unfused and 4.35 GB fused from
# 32 to 256 tokens, over 3.86 GiB of weights and a few MiB of KV (casper-hansen/AutoAWQ README, transformers
# docs/source/en/quantization/awq.md). Counted once, on the first GPU.
TRANSFORMERS_WORKSPACE_GIB = 0.45


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
    # Tokens the runtime computes in one step: llama.cpp's micro-batch (-ub, 512), vLLM's max_num_batched_tokens
    # (8192); transformers takes a whole prompt at once.
    batch_tokens: int | None = None
    # The longest prompt (transformers' prefill); None: the whole context.
    prompt_tokens: int | None = None
    gpus_per_node: int = 1
    nodes: int = 1
    file_size_gib: float | None = None
    gpu_memory_utilization: float = VLLM_GPU_MEMORY_UTILIZATION

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class Estimate:
    """Every part is the sum over all GPUs (and host memory for host_gib); per_gpu_gib is each GPU's need."""

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
    # Parts beyond serving (fine-tuning's gradients, optimizer states; RAG's embedding model), on the GPUs: shown
    # in the breakdown after the four above and counted in total_gib.
    extra_gib: tuple[tuple[str, float], ...] = ()

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.kv_cache_gib + self.compute_gib + self.overhead_gib + self.extra_total_gib

    @property
    def extra_total_gib(self) -> float:
        return sum(gib for _, gib in self.extra_gib)

    @property
    def gpu_total_gib(self) -> float:
        """What all GPUs hold together: the total less what stays in host memory."""
        return sum(self.per_gpu_gib)

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


@dataclass(frozen=True)
class Weights:
    """Bytes of a model's weights by where they go: the input embedding, the repeating layers, the output head."""

    embed: float
    layers: float
    output: float

    @property
    def total(self) -> float:
        return self.embed + self.layers + self.output


def kv_cells(runtime: str, context: int, parallel: int = 1) -> int:
    """How many tokens of KV the runtime allocates for `parallel` requests of `context` tokens each.
    llama.cpp's -c is the whole cache, split evenly over its slots, so a job passes -c context x parallel; with
    --parallel and no --kv-unified each slot is a stream of its own, padded to 256 cells (src/llama-context.cpp:
    n_ctx_seq = GGML_PAD(n_ctx / n_seq_max, 256), n_ctx = n_ctx_seq * n_seq_max), which comes to each slot's context
    padded. ollama multiplies its num_ctx by OLLAMA_NUM_PARALLEL and pads the whole.
    vLLM and transformers hold `parallel` full-length requests (vLLM in 16-token blocks)."""
    if runtime == "llama.cpp":
        return math.ceil(context / LLAMA_CPP_CTX_PAD) * LLAMA_CPP_CTX_PAD * parallel
    if runtime == "ollama":
        return math.ceil(context * parallel / LLAMA_CPP_CTX_PAD) * LLAMA_CPP_CTX_PAD
    if runtime == "vllm":
        return math.ceil(context / VLLM_BLOCK_TOKENS) * VLLM_BLOCK_TOKENS * parallel
    return context * parallel


def window_cells(runtime: str, arch: Architecture, cells: int, parallel: int, ubatch: int) -> int:
    """Cells a sliding-window layer keeps: llama.cpp's SWA cache holds, in each slot's stream, the window plus one
    micro-batch, padded, at most the slot's cells (src/llama-kv-cache-iswa.cpp: size_swa = GGML_PAD(min(size_base,
    n_swa * (unified ? n_seq_max : 1) + n_ubatch), 256); the job passes --parallel without --kv-unified); ollama's
    one unified cache holds every sequence's window plus one micro-batch. vLLM and transformers keep the window per
    request."""
    window = arch.sliding_window or 0
    if not window or not arch.sliding_window_layers:  # no window, or not known which layers use it: full cache
        return cells
    if runtime == "llama.cpp":
        slot_cells = cells // parallel
        return min(slot_cells, math.ceil((window + ubatch) / LLAMA_CPP_CTX_PAD) * LLAMA_CPP_CTX_PAD) * parallel
    if runtime == "ollama":
        return min(cells, math.ceil((window * parallel + ubatch) / LLAMA_CPP_CTX_PAD) * LLAMA_CPP_CTX_PAD)
    return min(cells, window * parallel)


def kv_cache_bytes(arch: Architecture, cells: int, kv_type: str = "f16", window: int | None = None) -> float:
    """llama.cpp's formula: per layer, K and V each hold kv_heads x head_dim elements per cell. Layers that attend
    within a sliding window (where the card says how many) keep `window` cells instead."""
    swa = min(arch.sliding_window_layers or 0, arch.layers) if window is not None and arch.sliding_window else 0
    layer_cells = (arch.layers - swa) * cells + swa * (window if window is not None else cells)
    return layer_cells * arch.kv_width * 2 * KV_TYPE_BYTES[kv_type]


def weights_of(arch: Architecture, quant: str, file_size_gib: float | None = None) -> Weights:
    """The input embedding and the output head (vocab x hidden each; one table when tied) in their own types, the
    rest at the quantisation's bits per weight; a known file size is the whole."""
    q = QUANTS[quant]
    table = arch.vocab_size * arch.hidden_size
    tied = bool(arch.tied_embeddings)
    # A GGUF quantiser gives a tied table the output head's type (src/llama-quant.cpp treats token_embd as the output).
    embed = table * (q.output_bits if tied and "gguf" in q.formats else q.embed_bits) / 8
    output = 0.0 if tied else table * q.output_bits / 8
    if file_size_gib:
        total = file_size_gib * GIB  # the file is the weights (a GGUF header is kilobytes)
        if embed + output > total / 2:  # a toy model: scale the tables down rather than go negative
            embed, output = embed * total / 2 / (embed + output), output * total / 2 / (embed + output)
        return Weights(embed, total - embed - output, output)
    layer_params = max(arch.params_b * 1e9 - table * (1 if tied else 2), arch.params_b * 1e9 / 2)
    return Weights(embed, layer_params * q.bits_per_weight / 8, output)


def weights_bytes(arch: Architecture, quant: str, file_size_gib: float | None = None) -> float:
    return weights_of(arch, quant, file_size_gib).total


def ffn_width(arch: Architecture) -> int:
    """The FFN width one token passes through: each expert's times the experts it is routed to, for a MoE."""
    ffn = arch.ffn_size or int(FFN_FACTOR * arch.hidden_size)
    return ffn * (arch.experts_used or 1) if arch.experts else ffn


def largest_matrix(arch: Architecture) -> int:
    """Elements of the largest weight matrix of a layer (an FFN projection, or the fused gate+up of one expert)."""
    return arch.hidden_size * max(arch.ffn_size or int(FFN_FACTOR * arch.hidden_size), arch.hidden_size)


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
    if req.batch_tokens is not None and req.batch_tokens < 1:
        raise EstimateError("batch tokens must be positive")
    if req.prompt_tokens is not None and not 1 <= req.prompt_tokens <= req.context:
        raise EstimateError(f"the prompt must be 1 to {req.context} tokens (the context)")
    if req.arch.max_context and req.context > req.arch.max_context:
        raise EstimateError(f"context {req.context} is above the model's maximum of {req.arch.max_context}")
    if req.nodes > 1 and not rules.multi_node:
        raise EstimateError(rules.one_node_only())
    if req.arch.kv_heads > req.arch.attention_heads or req.arch.attention_heads % req.arch.kv_heads:
        raise EstimateError("attention heads must be a multiple of KV heads")
    if req.arch.experts and not 1 <= (req.arch.experts_used or 1) <= req.arch.experts:
        raise EstimateError("experts used per token must be between 1 and the number of experts")
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


def _moe_note(arch: Architecture) -> list[str]:
    if not arch.experts:
        return []
    return [f"mixture of {arch.experts} experts, {arch.experts_used or 1} per token: every expert's weights are "
            "loaded; activations are those of the experts a token uses"]  # fmt: skip


def _llama_cpp(req: Request) -> Estimate:
    arch, devices = req.arch, req.gpus
    flash = req.flash_attn if req.flash_attn is not None else req.runtime == "llama.cpp"
    # llama-server 0.3.36 defaults to -fa auto (on where supported); ollama leaves it off unless OLLAMA_FLASH_ATTENTION.
    cells = kv_cells(req.runtime, req.context, req.parallel)
    ubatch = min(req.batch_tokens or LLAMA_CPP_UBATCH, cells)
    w = weights_of(arch, req.quant, req.file_size_gib)
    # A tied table serves as the output head too: llama.cpp loads it again on the last GPU.
    output = w.embed if arch.tied_embeddings else w.output
    window = window_cells(req.runtime, arch, cells, req.parallel, ubatch)
    kv = kv_cache_bytes(arch, cells, req.kv_type, window)
    f32 = 4
    # Compute buffer: the largest graph node dominates. Without flash attention that is the KQ matrix (f32,
    # cells x ubatch x heads, full-attention layers' cells); with it, the attention is tiled and only activations
    # and logits remain. A MoE's ggml_mul_mat_id computes each token's experts: ubatch x used x ffn, plus the router.
    kq = cells * ubatch * arch.attention_heads * f32 if not flash else 0.0
    activations = ubatch * (3 * arch.hidden_size + 2 * ffn_width(arch) + (arch.experts or 0)) * f32
    logits = ubatch * arch.vocab_size * f32
    compute_first = kq + activations
    weights_split = _split(w.layers, arch.layers, devices)
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
    if window < cells:
        notes.append(f"{arch.sliding_window_layers} sliding-window layers keep {window} cells")
    if req.nodes > 1:
        notes.append(f"layers split over {devices} GPUs on {req.nodes} nodes (ggml-rpc-server on the others)")
    return Estimate(
        weights_gib=(w.layers + output) / GIB + w.embed / GIB,
        kv_cache_gib=kv / GIB,
        compute_gib=compute_total / GIB,
        overhead_gib=CUDA_CONTEXT_GIB * devices,
        per_gpu_gib=per_gpu,
        host_gib=w.embed / GIB,
        reserve_gib=OLLAMA_MIN_RESERVE_GIB if req.runtime == "ollama" else 0.0,
        notes=notes + _moe_note(arch),
    )


def layer_activation_bytes(arch: Architecture, tokens: int, shards: int = 1, dtype_bytes: int = BF16) -> float:
    """The peak of one layer's forward over `tokens` tokens, split over `shards` tensor-parallel GPUs: the MLP's
    gate/up/product (each token's experts for a MoE) and the projections' outputs, beside the hidden states."""
    heads = (arch.attention_heads + 2 * arch.kv_heads) * arch.head_dim
    per_token = MLP_COPIES * ffn_width(arch) / shards + heads / shards + HIDDEN_COPIES * arch.hidden_size
    return tokens * per_token * dtype_bytes


def _vllm(req: Request) -> Estimate:
    arch = req.arch
    tp, pp = req.gpus_per_node, req.nodes
    w = weights_of(arch, req.quant, req.file_size_gib)
    cells = kv_cells("vllm", req.context, req.parallel)
    window = window_cells("vllm", arch, cells, req.parallel, 0)
    kv = kv_cache_bytes(arch, cells, "f16", window)
    # The profile run: one forward pass of max_num_batched_tokens tokens; its activation peak per GPU (vLLM's log:
    # "PyTorch activation peak memory takes ..."). Only the last token of each sequence gets logits.
    # Left to its default, vLLM caps the budget at what its sequences can hold (max_num_seqs x max_model_len).
    tokens = req.batch_tokens or min(VLLM_MAX_BATCHED_TOKENS, req.parallel * req.context)
    activations = layer_activation_bytes(arch, tokens, tp) + req.parallel * arch.vocab_size * (LOGIT_BYTES + 4)
    per_gpu_bytes = w.total / (tp * pp) + kv / (tp * pp) + activations
    per_gpu = [per_gpu_bytes / GIB + VLLM_CUDA_GRAPHS_GIB + CUDA_CONTEXT_GIB] * (tp * pp)
    return Estimate(
        weights_gib=w.total / GIB,
        kv_cache_gib=kv / GIB,
        compute_gib=activations * tp * pp / GIB,
        overhead_gib=(CUDA_CONTEXT_GIB + VLLM_CUDA_GRAPHS_GIB) * tp * pp,
        per_gpu_gib=per_gpu,
        vllm_reserved_fraction=req.gpu_memory_utilization,
        notes=[
            f"vLLM takes {req.gpu_memory_utilization:.0%} of each GPU at start and fills what is left after the "
            f"weights with KV cache; it refuses to start unless {req.parallel} request(s) of {req.context} tokens fit",
            f"profile run of {tokens} batched tokens; tensor parallel {tp} x pipeline parallel {pp}",
            *_moe_note(arch),
        ],
    )


def transformers_activation_bytes(arch: Architecture, q: Quant, tokens: int, batch: int, eager: bool) -> float:
    """The peak of a transformers forward over `batch` prompts of `tokens` tokens: the larger of a layer's MLP and,
    with eager attention, its scores; plus the last position's logits and the dequantised copy of the largest
    matrix a bitsandbytes/AWQ/GPTQ layer makes."""
    mlp = layer_activation_bytes(arch, batch * tokens)
    scores = batch * arch.attention_heads * tokens * tokens * EAGER_SCORE_BYTES if eager else 0.0
    hidden = batch * tokens * arch.hidden_size * BF16 * 2
    logits = batch * arch.vocab_size * LOGIT_BYTES
    dequant = largest_matrix(arch) * q.dequant_bits / 8
    return max(mlp, scores + hidden) + logits + dequant


def _transformers(req: Request) -> Estimate:
    arch, devices = req.arch, req.gpus
    q = QUANTS[req.quant]
    w = weights_of(arch, req.quant, req.file_size_gib)
    cells = kv_cells("transformers", req.context, req.parallel)
    window = window_cells("transformers", arch, cells, req.parallel, 0)
    kv = kv_cache_bytes(arch, cells, "f16", window)
    # Prefill of the longest prompt is the peak. attn_implementation: "sdpa" by default (PyTorch's fused kernels keep
    # no tokens x tokens matrix), "flash_attention_2" when asked; flash_attn False here means "eager".
    eager = req.flash_attn is False
    activations = transformers_activation_bytes(arch, q, req.prompt_tokens or req.context, req.parallel, eager)
    weights_split = _split(w.layers, arch.layers, devices)
    kv_split = _split(kv, arch.layers, devices)
    per_gpu = []
    for i in range(devices):
        first, last = i == 0, i == devices - 1
        held = weights_split[i] + kv_split[i] + (w.embed if first else 0) + (w.output + activations if last else 0)
        per_gpu.append(held / GIB + CUDA_CONTEXT_GIB + (TRANSFORMERS_WORKSPACE_GIB if first else 0))
    return Estimate(
        weights_gib=w.total / GIB,
        kv_cache_gib=kv / GIB,
        compute_gib=activations / GIB + TRANSFORMERS_WORKSPACE_GIB,
        overhead_gib=CUDA_CONTEXT_GIB * devices,
        per_gpu_gib=per_gpu,
        notes=[
            "device_map='auto' splits layers over the GPUs of one node",
            f"attention: {'eager' if eager else 'flash-attention 2' if req.flash_attn else 'sdpa'}",
            *_moe_note(arch),
        ],
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
    req: Request,
    usable_gib: float,
    gpus_per_node: int,
    max_nodes: int = 1,
    min_gpus: int = 1,
    estimator: Callable[[Request], Estimate] | None = None,
) -> Layout | None:
    """The fewest GPUs that fit: 1..gpus_per_node on one node, then whole nodes where the runtime spans nodes.
    Where tensor parallel splits the attention heads (vLLM), counts that do not divide them are skipped.
    `estimator` sizes each layout (default: serving; catalog/training.py passes a purpose's)."""
    candidates = [(g, 1) for g in range(max(1, min_gpus), gpus_per_node + 1)]
    rules = RUNTIMES.get(req.runtime)
    if rules is not None and rules.multi_node:
        candidates += [(gpus_per_node, n) for n in range(2, max_nodes + 1)]
    for per_node, nodes in candidates:
        if rules is not None and rules.splits_heads and req.arch.attention_heads % per_node:
            continue
        est = (estimator or estimate)(replace(req, gpus_per_node=per_node, nodes=nodes))
        result = fit(est, usable_gib)
        if result.fits:
            return Layout(per_node, nodes, est, result)
    return None
