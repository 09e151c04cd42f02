"""GPU memory of the purposes beyond serving: fine-tuning (full, LoRA, QLoRA) and RAG. Plain Python, no Django.

    estimate_purpose(PurposeRequest(...)) -> Estimate    the same breakdown as estimate.estimate, with the parts
                                                         training adds (gradients, optimizer states, adapters,
                                                         saved activations) or RAG adds (the embedding model)

From first principles, for one GPU or sharded over several (full fine-tuning with ZeRO-3 / FSDP splits weights,
gradients and optimizer states evenly; LoRA and QLoRA with device_map split layers as inference does):

- weights: full fine-tuning holds the model in bf16 plus, in mixed precision, an fp32 master copy (Adam's standard
  recipe: Micikevicius et al. 2018; DeepSpeed's ZeRO paper counts 2 + 2 + 12 = 16 bytes per parameter); LoRA holds
  the frozen model in bf16; QLoRA in 4-bit NF4 with double quantisation, embeddings and output head in bf16
  (Dettmers et al. 2023, the QLoRA recipe).
- trainable parameters: all of them, or the adapters: rank r x (inputs + outputs) for every targeted matrix (PEFT's
  LoRA A and B), kept in fp32 by PEFT.
- gradients: one per trainable parameter, in the trainable's dtype (bf16 for pure-bf16 full fine-tuning).
- optimizer: AdamW keeps two fp32 moments (8 bytes per trainable parameter); 8-bit AdamW (bitsandbytes) two 8-bit
  moments with block scales (about 2 bytes); SGD with momentum one (4 bytes).
- activations saved for the backward pass, per token per layer in bf16 (the per-layer accounting of Korthikanti et
  al. 2022, "Reducing Activation Recomputation", redone for RMSNorm in float32, RoPE, flash attention and SwiGLU,
  and for which linear inputs each method keeps: activation_bytes_per_token); with gradient checkpointing only each
  layer's input is kept and one layer's set is recomputed at a time; plus the logits of every position in bf16,
  their float32 upcast and its gradient for the loss (10 bytes each).
- optimizer states follow the trainable parameters' dtype (torch.optim.AdamW allocates zeros_like(param)): fp32 in
  mixed precision and for PEFT's adapters, bf16 in pure-bf16 full fine-tuning (LLaMA-Factory's pure_bf16, torchtune's
  default), which is what brings full fine-tuning to 3-5x the memory of 16-bit inference.
- RAG: beside the chat model, an embedding model and a reranker (BGE-M3 and bge-reranker-v2-m3 class, 0.57B
  parameters each in fp16, with a batch of passages), a GPU vector index of the corpus (FAISS flat, fp16, 1024
  dimensions per passage), and the retrieved passages added to each prompt's context.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from catalog.architecture import Architecture
from catalog.estimate import (
    CUDA_CONTEXT_GIB,
    GIB,
    Estimate,
    EstimateError,
    Request,
    estimate,
    largest_matrix,
    weights_of,
)

PURPOSES = {
    "inference": "chat or batch inference",
    "rag": "RAG (with an embedding model alongside)",
    "lora": "LoRA fine-tuning (bf16 base model)",
    "qlora": "QLoRA fine-tuning (4-bit base model)",
    "full": "full fine-tuning",
}
TRAINING = ("lora", "qlora", "full")
Optimizer = Literal["adamw", "adamw-8bit", "sgd"]
# Optimizer state elements per trainable parameter, and the bytes of an 8-bit state (bnb blockwise: fp32 per 2048).
OPTIMIZER_STATES = {"adamw": 2, "adamw-8bit": 2, "sgd": 1}
EIGHT_BIT_STATE = 1 + 4 / 2048

# Saved activations per token and layer, in bf16 elements (activation_bytes_per_token): two norms' bf16 inputs and
# their float32 upcasts, which the mean square's backward keeps (2 x (1 + 2)); RoPE's and flash attention's copies of
# Q and K (or V); the SwiGLU's gate, activation and up projection.
NORMS, ROPE, ATTENTION, MLP = 6, 2, 2, 3
# PEFT keeps adapter weights in fp32 whatever the base model's dtype.
ADAPTER_BYTES = 4
BF16, FP32 = 2, 4
# Logits of every position for the loss: bf16 logits, their float32 upcast and the float32 gradient.
LOSS_LOGIT_BYTES = BF16 + FP32 + FP32
# What a training process holds beyond the tensors counted here (cuBLAS workspaces of the forward and backward
# passes, autograd's and the optimizer's temporaries, allocator rounding), per GPU: the 0.45 GiB the published
# fine-tuning runs (catalog/reference/finetune-measurements.csv) were checked with when serving used the same figure.
TRAINING_WORKSPACE_GIB = 0.45
# The RAG embedding model and reranker: BAAI/bge-m3 and bge-reranker-v2-m3 (XLM-RoBERTa large: 568M parameters,
# 24 layers, 1024 hidden, 4096 FFN) in fp16, each encoding a batch of 32 passages of 512 tokens at a time.
RAG_MODEL_PARAMS = 568e6
RAG_MODELS = 2
RAG_BATCH_TOKENS = 32 * 512
RAG_HIDDEN, RAG_FFN = 1024, 4096
# The corpus on the GPU: FAISS GpuIndexFlat with fp16 storage, one 1024-dimension vector per passage. Five million
# 512-token passages is a large departmental corpus (English Wikipedia is about 21M 100-word passages in DPR).
RAG_CORPUS_PASSAGES = 5_000_000
RAG_VECTOR_BYTES = 1024 * BF16
# A RAG prompt adds the retrieved passages (top-k 5 to 20 chunks of 256-1024 tokens in LangChain's and LlamaIndex's
# examples) to the question and its answer.
RAG_PASSAGES = 10
RAG_PASSAGE_TOKENS = 512


@dataclass(frozen=True)
class PurposeRequest:
    """A serving request (estimate.Request: model, quantisation, runtime, context = sequence length, GPUs) and the
    purpose's own settings. For fine-tuning, `parallel` is the micro-batch and the quantisation is the base model's
    (QLoRA always loads it in 4-bit NF4)."""

    serving: Request
    purpose: str = "inference"
    lora_rank: int = 16
    # q, k, v, o, gate, up, down: every linear layer (QLoRA's recipe); "attention" targets q, k, v, o only; "qv"
    # the query and value projections only (the LoRA paper's choice, PEFT's default for Llama, litgpt's default).
    lora_targets: Literal["all", "attention", "qv"] = "all"
    optimizer: Optimizer = "adamw"
    double_quant: bool = True  # QLoRA: bitsandbytes' double quantisation of the absmax (the QLoRA paper's recipe)
    gradient_checkpointing: bool = True
    mixed_precision: bool = False  # full fine-tuning: fp32 master weights and states beside bf16 (False: pure bf16)
    rag_passages: int = RAG_PASSAGES
    passage_tokens: int = RAG_PASSAGE_TOKENS
    corpus_passages: int = RAG_CORPUS_PASSAGES


def estimate_purpose(req: PurposeRequest) -> Estimate:
    if req.purpose not in PURPOSES:
        raise EstimateError(f"unknown purpose {req.purpose!r}; one of {', '.join(PURPOSES)}")
    if req.purpose == "inference":
        return estimate(req.serving)
    if req.purpose == "rag":
        return _rag(req)
    return _training(req)


def _rag(req: PurposeRequest) -> Estimate:
    """The chat model at its context plus the retrieved passages, and the retrieval models and index beside it."""
    if min(req.rag_passages, req.passage_tokens, req.corpus_passages) < 1:
        raise EstimateError("passages, passage tokens and corpus size must be positive")
    serving = req.serving
    retrieved = req.rag_passages * req.passage_tokens
    est = estimate(replace(serving, context=serving.context + retrieved))
    models = RAG_MODELS * (RAG_MODEL_PARAMS + RAG_BATCH_TOKENS * (4 * RAG_HIDDEN + 2 * RAG_FFN)) * BF16
    index = req.corpus_passages * RAG_VECTOR_BYTES
    extra = (("embedding model and reranker", models / GIB), ("vector index", index / GIB))
    per_gpu = list(est.per_gpu_gib)
    per_gpu[0] += (models + index) / GIB  # the retrieval side sits on the session's first GPU
    return replace(
        est,
        per_gpu_gib=per_gpu,
        extra_gib=extra,
        notes=[
            *est.notes,
            f"RAG: {serving.context} tokens plus {req.rag_passages} passages of {req.passage_tokens} "
            f"tokens per request; an embedding model and a reranker (fp16) and an fp16 vector index of "
            f"{req.corpus_passages:,} passages on the first GPU",
        ],
    )


def adapter_params(arch: Architecture, rank: int, targets: str = "all") -> int:
    """LoRA's trainable parameters: rank x (inputs + outputs) of every targeted matrix of every layer."""
    h, q, kv = arch.hidden_size, arch.attention_heads * arch.head_dim, arch.kv_heads * arch.head_dim
    if targets == "qv":
        return rank * arch.layers * ((h + q) + (h + kv))
    attention = (h + q) + 2 * (h + kv) + (q + h)
    ffn = arch.ffn_size or int(3.5 * h)
    mlp = 3 * (h + ffn) * (arch.experts or 1) if targets == "all" else 0
    return rank * arch.layers * (attention + mlp)


def activation_bytes_per_token(arch: Architecture, purpose: str = "full", targets: str = "all") -> float:
    """Saved for the backward pass, per token and layer, in bf16 elements x 2 bytes (see the module's docstring).
    Every method keeps what the norms, the attention and the SwiGLU need: the residual stream into both norms (2h)
    and, since RMSNorm computes in float32 (transformers' LlamaRMSNorm), each norm's float32 upcast (4h more);
    RoPE's inputs and rotated halves of Q and K (2 (h_q + h_kv)); flash attention's
    Q, K, V and output (2 (h_q + h_kv)); the gate, its activation and the up projection (3 ffn). A linear layer's
    input is kept only where its backward needs it: for the weight's gradient (full fine-tuning), for LoRA's A
    matrix on a targeted layer, and always under bitsandbytes' 4-bit matmul, which saves its input whether or not
    the weight is trained (MatMul4Bit's ctx.tensors): the normed input of each half (2h), the attention output
    (h_q) and the product into down_proj (ffn). A token's experts each keep their own FFN activations."""
    h = arch.hidden_size
    q, kv = arch.attention_heads * arch.head_dim, arch.kv_heads * arch.head_dim
    ffn = (arch.ffn_size or int(3.5 * h)) * ((arch.experts_used or 1) if arch.experts else 1)
    kept = NORMS * h + (ROPE + ATTENTION) * (q + kv) + MLP * ffn
    if purpose in ("full", "qlora") or targets == "all":
        inputs = 2 * h + q + ffn
    elif targets == "attention":
        inputs = h + q
    else:  # q and v share the normed input
        inputs = h
    return BF16 * (kept + inputs)


def _training(req: PurposeRequest) -> Estimate:
    serving, arch = req.serving, req.serving.arch
    if serving.runtime != "transformers":
        raise EstimateError("fine-tuning runs on PyTorch (transformers, PEFT, TRL): choose the transformers runtime")
    if req.lora_rank < 1 or serving.context < 1 or serving.parallel < 1:
        raise EstimateError("LoRA rank, sequence length and micro-batch must be positive")
    if req.optimizer not in OPTIMIZER_STATES:
        raise EstimateError(f"unknown optimizer {req.optimizer!r}; one of {', '.join(OPTIMIZER_STATES)}")
    gpus = serving.gpus
    params = arch.params_b * 1e9
    tokens = serving.context * serving.parallel
    if req.purpose == "full":
        weights = params * BF16
        trainable = params
        master = params * FP32 if req.mixed_precision else 0.0
        grad_bytes = FP32 if req.mixed_precision else BF16
        base_note = "bf16 weights" + (" with fp32 master weights" if req.mixed_precision else " (pure bf16)")
    else:
        quant = ("BNB-NF4" if req.double_quant else "BNB-NF4-SQ") if req.purpose == "qlora" else "bf16"
        weights = weights_of(arch, quant).total
        trainable = adapter_params(arch, req.lora_rank, req.lora_targets)
        master = trainable * ADAPTER_BYTES
        grad_bytes = ADAPTER_BYTES
        base_note = f"4-bit NF4 base ({'double' if req.double_quant else 'single'} quantised), bf16 embeddings"
        base_note = base_note if quant != "bf16" else "bf16 base model"
    gradients = trainable * grad_bytes
    state = EIGHT_BIT_STATE if req.optimizer.endswith("8bit") else grad_bytes  # states in the trainables' dtype
    optimizer = trainable * OPTIMIZER_STATES[req.optimizer] * state
    per_layer = activation_bytes_per_token(arch, req.purpose, req.lora_targets) * tokens
    if req.gradient_checkpointing:
        saved = arch.layers * tokens * arch.hidden_size * BF16 + per_layer  # layer inputs, one layer recomputed
    else:
        saved = arch.layers * per_layer
    logits = tokens * arch.vocab_size * LOSS_LOGIT_BYTES
    dequant = largest_matrix(arch) * BF16 if req.purpose == "qlora" else 0.0
    activations = saved + logits + dequant
    # Full fine-tuning over several GPUs shards everything (ZeRO-3 / FSDP); activations are each GPU's own batch.
    # LoRA/QLoRA over several GPUs split layers (device_map="auto"), as inference does: shares of one total.
    states = weights + master + gradients + optimizer
    if req.purpose == "full":
        per_gpu_bytes = [states / gpus + activations] * gpus
        act_total = activations * gpus
    else:
        per_gpu_bytes = [(states + activations) / gpus] * gpus
        act_total = activations
    per_gpu = [b / GIB + CUDA_CONTEXT_GIB + TRAINING_WORKSPACE_GIB for b in per_gpu_bytes]
    method = PURPOSES[req.purpose]
    return Estimate(
        weights_gib=weights / GIB,
        kv_cache_gib=0.0,
        compute_gib=act_total / GIB + TRAINING_WORKSPACE_GIB * gpus,
        overhead_gib=CUDA_CONTEXT_GIB * gpus,
        per_gpu_gib=per_gpu,
        extra_gib=tuple(
            (label, gib / GIB)
            for label, gib in (
                ("fp32 master weights" if req.purpose == "full" else "adapters", master),
                ("gradients", gradients),
                ("optimizer states", optimizer),
            )
            if gib
        ),
        notes=[
            f"{method}: {base_note}; {trainable / 1e6:,.1f}M trainable parameters, {req.optimizer}",
            f"sequence {serving.context} x micro-batch {serving.parallel}; gradient checkpointing "
            + ("on" if req.gradient_checkpointing else "off"),
            *(
                ["weights, gradients and optimizer states sharded over the GPUs (ZeRO-3 / FSDP)"]
                if req.purpose == "full" and gpus > 1
                else []
            ),
        ],
    )
