"""A synthetic catalog for benchmarks: many models on many GPU types, as YAML the catalog import takes."""

from __future__ import annotations

from pathlib import Path

import yaml


def synthetic_catalog(path: Path, models: int = 100, gpu_types: int = 20) -> None:
    """A catalog of `models` models on `gpu_types` GPU types (8 to 192 GiB, 1 to 8 per node, 1 to 16 nodes)."""
    gpus = [
        {"name": f"gpu{i:02d}", "display_name": f"GPU {i}", "memory_gib": 8 + i * 10, "reserved_gib": 0.5}
        for i in range(gpu_types)
    ]
    groups = [
        {"gpu_type": g["name"], "gpus_per_node": 1 + i % 8, "nodes": 1 + i % 16, "cpus_per_node": 32, "ram_gib": 256}
        for i, g in enumerate(gpus)
    ]
    cards = []
    for i in range(models):
        layers, hidden = 16 + (i % 8) * 8, 1024 * (1 + i % 8)
        heads = hidden // 128
        moe = i % 5 == 0
        ffn = int(hidden * 3.5) // (4 if moe else 1)
        params = layers * (4 * hidden * hidden + 3 * hidden * ffn * (8 if moe else 1)) + 2 * 128256 * hidden
        arch = {"layers": layers, "hidden_size": hidden, "attention_heads": heads, "kv_heads": max(1, heads // 4),
                "head_dim": 128, "vocab_size": 128256, "max_context": 131072, "ffn_size": ffn}  # fmt: skip
        if moe:
            arch.update(experts=8, experts_used=2)
        where = [{"cluster": "bench", "path": f"/models/m{i}"}]
        gguf_gib, bf16_gib = round(params * 4.9 / 8 / 2**30, 3), round(params * 2 / 2**30, 3)
        cards.append({
            "name": f"bench-model-{i:03d}", "family": "bench", "params_b": round(params / 1e9, 3), "architecture": arch,
            "variants": [
                {"quant": "Q4_K_M", "format": "gguf", "size_gib": gguf_gib, "locations": where},
                {"quant": "bf16", "format": "safetensors", "size_gib": bf16_gib, "locations": where},
            ],
        })  # fmt: skip
    catalog = {
        "version": 1,
        "gpu_types": gpus,
        "runtimes": [{"kind": "llama.cpp", "display_name": "llama.cpp"}, {"kind": "vllm", "display_name": "vLLM"}],
        "clusters": [{
            "slug": "bench", "name": "Bench", "login_host": "login.bench.invalid",
            "partitions": [{"name": "gpu", "max_walltime_min": 2880, "node_groups": groups}],
            "runtimes": [{"runtime": "llama.cpp", "binary": "llama-server", "rpc_binary": "rpc-server"},
                         {"runtime": "vllm", "binary": "vllm"}],
        }],
        "models": cards,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
