# mypy: ignore-errors
"""What transformers keeps alive during generate()'s prefill with flash-attention 2: every tensor storage an op
creates, from its creation until it is freed, and the high-water mark of their sum over the weights.

Not a test (it needs torch and transformers, which the portal does not install): it wrote measurements.json beside
it, which tests/catalog/test_estimate.py reads. Run with torch 2.6.0 and transformers 4.51.3 (CPU is enough):

    python measure.py > measurements.json

- `meta`: Llama-3-8B's shape at a 30,000-token prompt on the meta device (shapes only, no arithmetic, so seconds
  and no memory), one forward as generate() runs the prefill: model(input_ids, past_key_values=DynamicCache(),
  use_cache=True, logits_to_keep=1) (generation/utils.py sets logits_to_keep=1).
- `cpu`: a small model of the same proportions run for real through generate() on the CPU, to show that the meta
  forward holds what the real run holds.
- Qwen3-8B's shape at 30,720 prompt tokens on meta, the Qwen3 speed benchmark's long input on the transformers
  version it names.

Flash-attention 2 itself needs a GPU, so a stand-in takes its place in ALL_ATTENTION_FUNCTIONS (and the model
takes the flash-attention path for its mask, which builds none): on meta it allocates what flash_attn_func returns
(the output, batch x tokens x heads x head_dim, and each query row's float32 logsumexp; Dao 2023, Algorithm 1); on the
CPU it computes causal attention 128 query rows at a time, so no prompt x prompt matrix is held. Peak memory on a GPU
is torch.cuda.max_memory_allocated, the same tensors plus the allocator's rounding and cuBLAS's workspace.
"""

import contextlib
import json
import weakref

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


class Live(TorchDispatchMode):
    """Bytes of every storage created under it, until freed (weakref.finalize on the storage, whose Python object
    PyTorch keeps for as long as the storage lives); the peak and what was alive then."""

    def __init__(self, model):
        super().__init__()
        self.live = self.peak = 0
        self.alive = {p.untyped_storage()._cdata: None for p in [*model.parameters(), *model.buffers()]}
        self.at_peak = []
        self.peak_op = ""

    def _free(self, key, n):
        self.alive.pop(key, None)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, n = storage._cdata, storage.nbytes()
            if key in self.alive:
                continue
            self.alive[key] = (func.__name__.split(".")[0], list(t.shape), str(t.dtype).removeprefix("torch."), n)
            self.live += n
            weakref.finalize(storage, self._free, key, n)
            if self.live > self.peak:
                self.peak, self.peak_op = self.live, f"{func.__name__} -> {list(t.shape)}"
                self.at_peak = sorted((v for v in self.alive.values() if v), key=lambda v: -v[3])
        return out


def fa2_shapes(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    b, h, t, d = query.shape
    out = torch.empty(b, t, h, d, dtype=query.dtype, device=query.device)
    lse = torch.empty(b, h, t, dtype=torch.float32, device=query.device)
    del lse
    return out, None


def fa2_blocked(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    b, h, t, d = query.shape
    keys, rep = key.shape[2], h // key.shape[1]
    out = torch.empty(b, t, h, d, dtype=query.dtype, device=query.device)
    for i in range(0, t, 128):
        q = query[:, :, i : i + 128]
        end = keys - t + i + q.shape[2]
        mask = torch.ones(q.shape[2], end, dtype=torch.bool).tril(end - q.shape[2])
        k = key[:, :, :end].repeat_interleave(rep, dim=1)
        v = value[:, :, :end].repeat_interleave(rep, dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        out[:, i : i + q.shape[2]] = o.transpose(1, 2)
        del q, k, v, o, mask
    return out, None


def model_of(device, hidden, ffn, heads, kv_heads, layers, vocab, tokens, family="llama"):
    qwen3 = family == "qwen3"
    config_class, model_class = (Qwen3Config, Qwen3ForCausalLM) if qwen3 else (LlamaConfig, LlamaForCausalLM)
    config = config_class(
        hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=kv_heads,
        num_hidden_layers=layers, vocab_size=vocab, head_dim=hidden // heads, max_position_embeddings=tokens + 64,
        tie_word_embeddings=False, rope_theta=500000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config).to(torch.bfloat16).eval()
    model.config._attn_implementation = "flash_attention_2"
    return model


def measure(device, hidden, ffn, heads, kv_heads, layers, vocab, prompt, new_tokens=0, family="llama"):
    ALL_ATTENTION_FUNCTIONS["flash_attention_2"] = fa2_shapes if device == "meta" else fa2_blocked
    model = model_of(device, hidden, ffn, heads, kv_heads, layers, vocab, prompt + new_tokens, family)
    ids = torch.randint(0, vocab, (1, prompt)).to(device)
    mode = Live(model)
    with torch.no_grad(), mode:
        if device == "meta":
            model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1,
                  cache_position=torch.arange(prompt, device=device))  # fmt: skip
        else:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
    return {
        "family": family, "device": device, "hidden": hidden, "ffn": ffn, "heads": heads, "kv_heads": kv_heads,
        "layers": layers, "vocab": vocab, "prompt": prompt, "new_tokens": new_tokens,
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "peak_over_weights_bytes": mode.peak, "peak_at": mode.peak_op,
        "alive_at_peak": tally(entry for entry in mode.at_peak if entry[3] >= mode.peak / 1000),
    }  # fmt: skip


def tally(entries):
    """[op, shape, dtype, bytes, how many], largest first."""
    counts = {}
    for op, shape, dtype, n in entries:
        key = (op, tuple(shape), dtype, n)
        counts[key] = counts.get(key, 0) + 1
    return [[op, list(shape), dtype, n, count] for (op, shape, dtype, n), count in counts.items()]


if __name__ == "__main__":
    # autocast has no meta device; the RoPE module only uses it to force float32.
    autocast = torch.autocast
    torch.autocast = lambda device_type, *a, **k: (
        contextlib.nullcontext() if device_type == "meta" else autocast(device_type, *a, **k)
    )
    runs = [
        measure("meta", 4096, 14336, 32, 8, 32, 128256, 30000),  # Llama-3-8B, a 30,000-token prompt
        measure("cpu", 512, 1792, 8, 2, 4, 8192, 4096, new_tokens=8),  # its proportions, run for real
        measure("meta", 512, 1792, 8, 2, 4, 8192, 4096),  # the same on meta
        # Qwen3-8B at the Qwen3 speed benchmark's 30,720-token input, on the transformers it names (4.51.3)
        measure("meta", 4096, 12288, 32, 8, 36, 151936, 30720, family="qwen3"),
    ]
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__, "runs": runs}, indent=1))
