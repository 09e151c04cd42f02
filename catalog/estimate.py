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
import re
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
# llama.cpp's compute buffer is what ggml's graph allocator reserves for the worst-case graph (src/llama-context.cpp,
# llama_context::sched_reserve -> graph_reserve(n_tokens = min(n_ctx, n_ubatch), n_seqs, n_outputs)): it lays the
# graph's tensors out in one buffer per device in graph order, frees each after its last consumer and gives its
# block to a later tensor that fits, best fit first (ggml/src/ggml-alloc.c, ggml_gallocr_alloc_graph_impl,
# ggml_dyn_tallocr_alloc); the buffer is the highest offset reached. The figures below are that high-water mark per
# token of the micro-batch, in f32 rows (ggml_get_rows and ggml_mul_mat return f32), read off llama-server 0.3.36's
# "compute buffer size" for llama-architecture graphs (src/models/llama.cpp) on CPU over hidden sizes 64-1024, FFN
# widths 1-6x the hidden size, 1-64 slots and micro-batches of 64-1024 tokens (tests/catalog/data/llama-compute/):
# - graph inputs, allocated before every other tensor (ggml_gallocr_alloc_graph_impl: "allocate other graph inputs
#   and leafs first"): the KQ mask over a stream's cells (one slot's where each slot has its stream, as the job runs
#   llama-server; every cell in ollama's one cache) per token (llm_graph_input_attn_kv; f16 with flash attention,
#   f32 without), token ids and positions (4 bytes each) and the K and V cache rows to write (int64:
#   one per token for K, and for V too with flash attention; without it V is stored transposed, one index per
#   element: n_embd_v_gqa per token, llama_kv_cache::build_input_v_idxs), per cache (a sliding-window model has two);
LLAMA_CPP_TOKEN_INPUT_BYTES = 4 + 4
LLAMA_CPP_KV_INDEX_BYTES = 8
# - the FFN's moment: gate, up and their product (each ffn wide) beside hidden-size rows: the layer's input (the
#   residual) and holes that freed hidden-size tensors leave and an FFN-wide tensor cannot fill: 2 rows where the
#   FFN is no wider than the hidden size, 3 up to twice, 4 wider (SmolLM2 is 2.67x, most models 2.7-5.4x; the
#   middle case shows from 3 layers on, as the last layer is cut to the output rows: 2 rows in 2-layer models); a
#   mixture of experts' ggml_mul_mat_id rows are each token's experts (ffn x used) beside the router's logits;
LLAMA_CPP_FFN_COPIES = 3
LLAMA_CPP_FFN_HIDDEN_ROWS = 2  # plus one up to twice the hidden size (from 3 layers on), plus two above
# - without flash attention, the attention's moment: the KQ scores (f32, one slot's cells x heads per token; the
#   softmax overwrites them in place, ggml_op_can_inplace) beside five hidden-size rows (measured; the layer's
#   input, Q, V x KQ and its contiguous copy among them); with flash attention the scores are never stored
#   (ggml_flash_attn_ext) and the FFN's moment is the larger;
LLAMA_CPP_ATTENTION_HIDDEN_ROWS = 5
# - the output's moment: the logits of the rows the graph outputs (n_outputs x vocabulary, f32), after the mask and
#   the layers' tensors are freed. How many rows that is changed with ggml-org/llama.cpp#23861 (commit de6f727,
#   1 June 2026): llama-server sets n_outputs_max to one output per slot (tools/server/server-context.cpp,
#   server_output_limits: n_parallel x (1 + draft tokens), no drafts here) and sched_reserve reserves
#   min(n_tokens, n_outputs_max) rows (its log: "n_outputs_max = 2" beside "n_seq_max = 2"); before it the worst
#   case was every token of the micro-batch (llm_build_context's `n_outputs = worst_case ? n_tokens : ...` in 2024,
#   graph_reserve(n_tokens, n_seqs, n_tokens) from 2025), and so in ollama's llama.cpp runner up to 0.24
#   (runner/llamarunner; its Go engine, runner/ollamarunner, reserved one row per slot for the models it ran).
#   ollama 0.30 on runs llama-server (llm/llama_server.go; LLAMA_CPP_VERSION b9452 in 0.30.0, b9479 in 0.30.1).
#   The change lies after b9409 (ollama's pin of 29 May 2026) and by 2 June: a build named below b9479 is read as
#   reserving the micro-batch, which errs on the safe side for the few builds in between.
LLAMA_CPP_SLOT_OUTPUTS_BUILD = 9479
OLLAMA_SLOT_OUTPUTS_VERSION = (0, 30, 1)
# The logits also have a home outside the compute buffer: llama.cpp's output buffer (llama_context::output_reserve,
# "output buffer size" in its log) holds n_seq_max x vocabulary f32 logits between a decode and the sampler, in
# host memory (the CPU, or the GPU's pinned host buffer type, CUDA_Host). No GPU holds it, so it is in no GPU's
# figure here, and the measured compute (the "compute buffer size" lines) leaves it out too; the estimate's notes
# name it.
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
# Activations held at the peak of a layer's forward in vLLM's profile run, besides the MLP's: the hidden state, the
# residual, the normed input and the layer's output.
HIDDEN_COPIES = 4
# The MLP's peak: gate and up projections and their product (SwiGLU), each tokens x ffn, before down_proj frees them
# (modeling_llama.LlamaMLP.forward: down_proj(act_fn(gate_proj(x)) * up_proj(x)) holds the activation, the up
# projection and their product at once).
MLP_COPIES = 3
# A transformers decoder layer (modeling_llama.LlamaDecoderLayer.forward) keeps, while its MLP runs, the layer's input
# (the model's loop still holds it), the residual after attention and the normed MLP input; while attention runs,
# the input and its normed copy. Beside them, for every layer after the first, the embedding's output: the model's
# forward keeps `inputs_embeds` referenced for the whole pass (LlamaModel.forward: `hidden_states = inputs_embeds`,
# then the layer loop rebinds hidden_states only). Measured on transformers 4.51.3 (the tensors alive at the prefill's
# peak, docs/estimator.md): 4 hidden-size copies beside the SwiGLU's three ffn-wide tensors.
TF_MLP_HIDDEN_COPIES = 4
TF_ATTENTION_HIDDEN_COPIES = 3
# RoPE's cos and sin for the pass's positions, tokens x head_dim each in the model's dtype, computed once per forward
# (LlamaModel.forward: position_embeddings = self.rotary_emb(...)) and held until it returns.
TF_ROPE_TABLES = 2
# Eager attention (transformers attn_implementation="eager"): the 16-bit scores with the mask added, their float32
# softmax and the 16-bit copy back, held at once: 8 bytes per score (modeling_llama.eager_attention_forward:
# softmax(..., dtype=float32).to(query.dtype)). Beside them the 16-bit causal mask, batch x tokens x keys, built once
# per forward (modeling_attn_mask_utils; SDPA gets one too where the cache is static, as its causal shortcut then
# does not apply). SDPA without a mask and flash-attention 2 never hold a tokens x tokens matrix: both tile the
# softmax on chip (Dao 2023, "FlashAttention-2", Algorithm 1: only each query row's float32 logsumexp reaches GPU
# memory).
EAGER_SCORE_BYTES = 8
MASK_BYTES = 2
# AutoAWQ's fused attention scores the prompt with F.softmax(scores.float()).type_as(xq)
# (awq/modules/fused/attn.py, QuantAttentionFused.forward): the 16-bit scores, their float32 copy and its float32
# softmax at once, 10 bytes per score. Its decode steps run FasterTransformer's single-query kernel on the cache.
AWQ_FUSED_SCORE_BYTES = 2 + 4 + 4
# transformers' generate() asks modern models for the last position's logits only (logits_to_keep, 4.45 on); the
# logits are upcast to float32 beside their 16-bit copy.
LOGIT_BYTES = 2 + 4
BF16 = 2
# A mixture of experts in transformers (MixtralSparseMoeBlock.forward) routes with a float32 softmax over the experts
# and a one-hot int64 mask of tokens x used x experts, and runs one expert at a time over the tokens routed to it.
ROUTER_BYTES_PER_EXPERT = 4
ONE_HOT_BYTES = 8
# What a transformers process holds beyond weights, KV cache and the activations above, per GPU: cuBLAS's workspace
# (8-32 MiB a stream, CUBLAS_WORKSPACE_CONFIG), the sampler's buffers, allocator rounding (RoPE: TF_ROPE_TABLES).
# The published runs show 0.08-0.16 GiB over weights plus KV cache at prompts of 1-80 tokens (transformers 4.46-4.51:
# QW01, QW05, QW08; TF01), 0.14 GiB in AutoAWQ's benchmark, whose examples/benchmark.py warm-up multiplies two
# 4096 x 4096 float32 matrices (fused Mistral 7B: 4.00 GB over 3.86 GiB of weights). Older transformers (Llama's
# until 4.38) also cached RoPE cos/sin per layer for every position (0.5 GiB for Mistral 7B's 32768): left out.
TRANSFORMERS_BUFFERS_GIB = 0.2


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
    # The longest prompt (transformers' prefill); None: the whole context. The rest of the context is generated.
    prompt_tokens: int | None = None
    # transformers: a KV cache allocated up front for this many tokens per sequence (StaticCache's max_cache_len,
    # AutoAWQ's fused modules' max_seq_len / AwqConfig's fuse_max_seq_len); None: a dynamic cache that grows with the
    # tokens (a fused model's cache then holds the whole context).
    cache_tokens: int | None = None
    # transformers with AutoAWQ's fused modules (AwqConfig(do_fuse=True), from_quantized(fuse_layers=True)): their own
    # attention and a preallocated cache.
    fused_modules: bool = False
    gpus_per_node: int = 1
    nodes: int = 1
    file_size_gib: float | None = None
    gpu_memory_utilization: float = VLLM_GPU_MEMORY_UTILIZATION
    # llama.cpp/ollama: the build's worst-case graph holds logits for every token of a micro-batch, as builds before
    # ggml-org/llama.cpp#23861 and ollama before 0.30.1 did (ubatch_logits_in reads a build's name); False: one row
    # per slot, as llama-server has since (the portal's 0.3.36, ollama 0.32).
    ubatch_logits: bool = False

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
    if req.runtime != "transformers" and (req.cache_tokens is not None or req.fused_modules):
        raise EstimateError("a preallocated cache and fused modules are transformers options")
    if req.fused_modules and not quant.startswith("AWQ"):
        raise EstimateError(f"fused modules are AutoAWQ's; {quant} is not an AWQ quantisation")
    if req.fused_modules and req.flash_attn:
        # transformers docs, quantization/awq.md: fused modules cannot be combined with FlashAttention-2.
        raise EstimateError("AutoAWQ's fused modules bring their own attention; turn flash attention off")
    prompt = req.prompt_tokens or req.context
    if req.cache_tokens is not None and req.cache_tokens < (prompt if req.fused_modules else req.context):
        # StaticCache refuses to grow; AutoAWQ's fused cache rolls over old tokens while decoding, not the prompt.
        what = "the prompt" if req.fused_modules else "the prompt and every generated token (the context)"
        raise EstimateError(f"a preallocated cache of {req.cache_tokens} tokens must hold {what}")
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


def ubatch_logits_in(build: str) -> bool:
    """Whether the llama.cpp or ollama build a figure came from, named as published measurements name it
    ("llama.cpp b2961 (main)", "ollama 0.6.2", "ollama v0.30.1"), reserved logits for a whole micro-batch: llama.cpp
    builds below LLAMA_CPP_SLOT_OUTPUTS_BUILD, ollama below OLLAMA_SLOT_OUTPUTS_VERSION. A name without a build
    number is read as the portal's own builds, which reserve one row per slot."""
    if match := re.search(r"llama\.cpp\W+b(\d+)\b", build, re.IGNORECASE):
        return int(match[1]) < LLAMA_CPP_SLOT_OUTPUTS_BUILD
    if match := re.search(r"ollama\W+v?(\d+)\.(\d+)(?:\.(\d+))?", build, re.IGNORECASE):
        version = (int(match[1]), int(match[2]), int(match[3] or 0))
        return version < OLLAMA_SLOT_OUTPUTS_VERSION
    return False


@dataclass(frozen=True)
class LlamaCompute:
    """A llama.cpp device's compute buffer, in bytes, by the moment of the graph that sets it (see the constants)."""

    inputs: float  # the graph inputs: KQ masks, token ids, positions, KV cache row indices
    attention: float  # without flash attention: the KQ scores beside the hidden-size rows around them
    ffn: float  # the FFN's gate, up and product beside the hidden-size rows
    logits: float  # the output rows' logits, with their final norm
    output_rows: int

    @property
    def layers(self) -> float:
        """A device running layers: its inputs and the larger of the two moments."""
        return self.inputs + max(self.attention, self.ffn)

    @property
    def last(self) -> float:
        """The device with the output layer: the layers' peak, or the logits once the layers' tensors are freed."""
        return max(self.layers, self.logits)


def llama_cpp_compute(req: Request, flash: bool, cells: int, window: int, ubatch: int) -> LlamaCompute:
    """The compute buffer of one device of llama.cpp's worst-case graph (the constants above say what each term
    holds and where it comes from): `cells` and `window` are the full and sliding-window caches' cells over every
    slot. llama-server gives each slot a stream of its own (the job passes --parallel without --kv-unified), whose
    cells are what a token attends to; ollama's one cache holds every slot's."""
    arch = req.arch
    f32 = 4
    streams = req.parallel if req.runtime == "llama.cpp" else 1
    full_kv = cells // streams
    swa = bool(arch.sliding_window and arch.sliding_window_layers)
    swa_kv = window // streams if swa else 0
    caches = 2 if swa else 1  # llama_kv_cache_iswa: a full and a sliding-window cache, each with its inputs
    mask_bytes = 2 if flash else 4
    v_index = LLAMA_CPP_KV_INDEX_BYTES * (1 if flash else arch.kv_width)
    per_token = (full_kv + swa_kv) * mask_bytes + LLAMA_CPP_TOKEN_INPUT_BYTES
    per_token += caches * (LLAMA_CPP_KV_INDEX_BYTES + v_index)
    inputs = ubatch * per_token
    attention = 0.0
    if not flash:
        # the largest scores are a full-attention layer's, unless every layer attends within the window
        scored = swa_kv if swa and (arch.sliding_window_layers or 0) >= arch.layers else full_kv
        hidden_rows = LLAMA_CPP_ATTENTION_HIDDEN_ROWS * arch.hidden_size
        attention = ubatch * (scored * arch.attention_heads + hidden_rows) * f32
    width = ffn_width(arch)
    rows = LLAMA_CPP_FFN_HIDDEN_ROWS
    if width > 2 * arch.hidden_size:
        rows += 2
    elif width > arch.hidden_size and arch.layers > 2:
        rows += 1
    ffn = ubatch * (LLAMA_CPP_FFN_COPIES * width + (arch.experts or 0) + rows * arch.hidden_size) * f32
    output_rows = ubatch if req.ubatch_logits else min(ubatch, req.parallel)
    logits = output_rows * (arch.vocab_size + 2 * arch.hidden_size) * f32
    return LlamaCompute(inputs, attention, ffn, logits, output_rows)


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
    compute = llama_cpp_compute(req, flash, cells, window, ubatch)
    weights_split = _split(w.layers, arch.layers, devices)
    kv_split = _split(kv, arch.layers, devices)
    per_gpu: list[float] = []
    compute_total = 0.0
    for i in range(devices):
        last = i == devices - 1
        device_compute = compute.last if last else compute.layers
        if devices > 1:
            device_compute += (LLAMA_CPP_PIPELINE_COPIES - 1) * ubatch * arch.hidden_size * f32
        compute_total += device_compute
        gpu_bytes = weights_split[i] + (output if last else 0.0) + kv_split[i] + device_compute
        per_gpu.append(gpu_bytes / GIB + CUDA_CONTEXT_GIB)
    notes = [f"KV cache: {cells} cells ({req.kv_type}), flash attention {'on' if flash else 'off'}"]
    if window < cells:
        notes.append(f"{arch.sliding_window_layers} sliding-window layers keep {window} cells")
    output_mib = req.parallel * arch.vocab_size * f32 / 2**20
    notes.append(
        f"compute graph for {ubatch}-token micro-batches with {compute.output_rows} output row(s); host memory "
        f"also holds the output buffer, {req.parallel} slot(s) x {arch.vocab_size} f32 logits ({output_mib:.2f} MiB)"
    )
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


ATTENTION_NAMES = {
    "eager": "eager",
    "sdpa": "sdpa",
    "flash_attention_2": "flash-attention 2",
    "awq_fused": "AutoAWQ's fused modules",
}


def transformers_attention(req: Request) -> str:
    """The attention a transformers run uses: attn_implementation "sdpa" by default, "flash_attention_2" when asked,
    "eager" where flash attention is off; AutoAWQ's fused modules bring their own."""
    if req.fused_modules:
        return "awq_fused"
    return "eager" if req.flash_attn is False else "flash_attention_2" if req.flash_attn else "sdpa"


def transformers_layer_bytes(
    arch: Architecture, q: Quant, tokens: int, batch: int, attention: str, keys: int, masked: bool = False
) -> float:
    """The peak of one decoder layer's forward over `batch` sequences of `tokens` new tokens that attend to `keys`
    positions (the prompt at prefill; the cache at a decode step; a static cache's whole length), on the GPU that runs
    the layer: the larger of two moments.
    Both hold RoPE's cos/sin tables for the pass and, after the first layer, the embedding's output.
    1. Attention: the layer's input and its normed copy; Q, K and V, and Q and K rotated; the attention's output. K
       and V repeated to every query head where the kernel does not take grouped heads (modeling_llama.repeat_kv for
       eager and SDPA, torch.repeat_interleave in AutoAWQ's fused attention; flash-attention 2 takes them grouped).
       Eager attention's and AutoAWQ's scores; a materialised 16-bit mask (eager, or `masked`: SDPA on a static
       cache).
    2. MLP: the layer's input, the residual and the normed input, and the SwiGLU's three tokens x ffn tensors; a
       mixture of experts runs one expert at a time over its share of the tokens (tokens x used / experts on
       average), beside the router's float32 weights, the one-hot expert mask and the output it accumulates; and
       the dequantised copy of the largest matrix that bitsandbytes, AWQ and GPTQ kernels make from their threshold
       on (Quant.dequant_from_tokens)."""
    t = batch * tokens
    heads, kv, head_dim, hidden = arch.attention_heads, arch.kv_heads, arch.head_dim, arch.hidden_size
    projections = (heads + 2 * kv) * head_dim + (heads + kv) * head_dim + heads * head_dim
    attn = float(t * (TF_ATTENTION_HIDDEN_COPIES * hidden + projections) * BF16)
    if attention != "flash_attention_2" and kv < heads:
        # AutoAWQ repeats the prompt's fresh K and V; its decode kernel reads the grouped cache as it is.
        repeated = tokens if attention == "awq_fused" else keys
        attn += 2 * batch * repeated * heads * head_dim * BF16
    if attention == "eager":
        attn += batch * tokens * keys * (heads * EAGER_SCORE_BYTES + MASK_BYTES)
    elif attention == "awq_fused":
        attn += batch * heads * tokens * tokens * AWQ_FUSED_SCORE_BYTES  # the prompt attends to itself
    elif masked and attention == "sdpa":
        attn += batch * tokens * keys * MASK_BYTES
    ffn = arch.ffn_size or int(FFN_FACTOR * hidden)
    mlp = float(t * TF_MLP_HIDDEN_COPIES * hidden * BF16)
    if arch.experts:
        used = arch.experts_used or 1
        routed = math.ceil(t * used / arch.experts)
        mlp += MLP_COPIES * routed * ffn * BF16 + routed * hidden * BF16 + t * hidden * BF16
        mlp += t * arch.experts * (ROUTER_BYTES_PER_EXPERT + used * ONE_HOT_BYTES)
    else:
        mlp += MLP_COPIES * t * ffn * BF16
    if q.dequant_bits and t >= q.dequant_from_tokens:  # while the MLP's own matrices run
        mlp += largest_matrix(arch) * q.dequant_bits / 8
    rope = t * TF_ROPE_TABLES * head_dim * BF16  # held through both moments
    return max(attn, mlp) + rope


def _transformers(req: Request) -> Estimate:
    """device_map="auto" splits layers over the GPUs of one node; each GPU runs its layers over the whole prompt, so
    each holds its own activation peak (the embedding sits on the first GPU, the head and the logits on the last).
    A GPU's peak is the larger of two moments:
    - the prefill: its weights, the KV cache as it stands after the prompt (a dynamic cache holds the prompt's
      tokens; a preallocated one its whole length) and one layer's prefill activations;
    - the last decode step: its weights, the KV cache at its largest, one layer's K and V copied by the dynamic
      cache's torch.cat (cache_utils.DynamicCache.update), and one layer's activations for one new token.
    Plus the process's own buffers (TRANSFORMERS_BUFFERS_GIB) and the CUDA context."""
    arch, devices = req.arch, req.gpus
    q = QUANTS[req.quant]
    w = weights_of(arch, req.quant, req.file_size_gib)
    attention = transformers_attention(req)
    prompt = req.prompt_tokens or req.context
    preallocated = req.fused_modules or req.cache_tokens is not None
    if preallocated:
        # AutoAWQ's fused cache (awq/modules/fused/cache.py WindowedCache): batch x KV heads x max_seq_len x head_dim,
        # K and V in fp16, for every layer, from load on; StaticCache likewise (cache_utils.StaticCache).
        cache = req.cache_tokens or req.context
        cells = kv_cells("transformers", cache, req.parallel)
        window = None if req.fused_modules else window_cells("transformers", arch, cells, req.parallel, 0)
        kv_prefill = kv_end = kv_cache_bytes(arch, cells, "f16", window)
        cat_copy = 0.0
        prefill_keys, decode_keys = (prompt if req.fused_modules else cache), cache
    else:
        cells = kv_cells("transformers", req.context, req.parallel)
        kv_end = kv_cache_bytes(arch, cells, "f16", window_cells("transformers", arch, cells, req.parallel, 0))
        prompt_cells = kv_cells("transformers", prompt, req.parallel)
        prompt_window = window_cells("transformers", arch, prompt_cells, req.parallel, 0)
        kv_prefill = kv_cache_bytes(arch, prompt_cells, "f16", prompt_window)
        cat_copy = kv_end / arch.layers
        prefill_keys, decode_keys = prompt, req.context
    masked = preallocated and not req.fused_modules
    prefill = transformers_layer_bytes(arch, q, prompt, req.parallel, attention, prefill_keys, masked)
    decode = transformers_layer_bytes(arch, q, 1, req.parallel, attention, decode_keys, masked)
    logits = req.parallel * arch.vocab_size * LOGIT_BYTES
    # Fusing on the GPU (AutoAWQ's from_quantized(fuse_layers=True); awq/models/llama.py LlamaFuser.fuse_transformer)
    # builds every layer's concatenated QKV before the fused model replaces the old one, so the separate Q, K and V
    # of all layers are still held when the last fused copy is made: a load-time peak of one more copy of them
    # (models whose checkpoints already fuse QKV, MPT's Wqkv or Falcon's query_key_value, make none).
    qkv = arch.layers * arch.hidden_size * (arch.attention_heads + 2 * arch.kv_heads) * arch.head_dim
    fusing = qkv * q.bits_per_weight / 8 if req.fused_modules else 0.0
    weights_split, fusing_split = _split(w.layers, arch.layers, devices), _split(fusing, arch.layers, devices)
    prefill_split, end_split = _split(kv_prefill, arch.layers, devices), _split(kv_end, arch.layers, devices)
    per_gpu: list[float] = []
    peak_at = ""
    for i in range(devices):
        first, last = i == 0, i == devices - 1
        held = weights_split[i] + (w.embed if first else 0.0) + (w.output + logits if last else 0.0)
        moments = {
            "the prefill": prefill_split[i] + prefill,
            "the last decode step": end_split[i] + cat_copy + decode,
            "loading (fusing)": prefill_split[i] + fusing_split[i],  # the fused cache is allocated as layers fuse
        }
        moment = max(moments, key=lambda name: moments[name])
        gib = (held + moments[moment]) / GIB + TRANSFORMERS_BUFFERS_GIB + CUDA_CONTEXT_GIB
        if not per_gpu or gib > max(per_gpu):
            peak_at = moment
        per_gpu.append(gib)
    overhead = CUDA_CONTEXT_GIB * devices
    if preallocated:
        cache_note = f"KV cache preallocated for {cache} tokens x {req.parallel} sequence(s)"
    else:
        cache_note = f"dynamic KV cache: {prompt} prompt tokens, then {req.context - prompt} generated"
    return Estimate(
        weights_gib=w.total / GIB,
        kv_cache_gib=kv_end / GIB,
        compute_gib=sum(per_gpu) - (w.total + kv_end) / GIB - overhead,
        overhead_gib=overhead,
        per_gpu_gib=per_gpu,
        notes=[
            "device_map='auto' splits layers over the GPUs of one node",
            f"attention: {ATTENTION_NAMES[attention]}; {cache_note}; the peak comes at {peak_at}",
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
