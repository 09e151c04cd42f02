"""Estimate and rank every catalog model variant on every GPU option. A benchmark, not a test.

    .venv/bin/python bench/estimate.py [--repeat 20]

Loads the example catalog into a scratch SQLite database, then for each variant and its runtime times a full
ranking (catalog.plans.plans: the smallest fitting layout of every node group, sorted). Target: well under 30 ms
per ranking. Baseline in the same run: the exhaustive search that estimates every layout of every node group.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.update(
    DJANGO_SETTINGS_MODULE="portal.settings",
    PORTAL_VAR_DIR=tempfile.mkdtemp(prefix="hpcllm-bench-"),
    PORTAL_LOG_LEVEL="WARNING",
)
os.environ.pop("DATABASE_URL", None)

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402

from catalog.estimate import EstimateError, Request, estimate, fit  # noqa: E402
from catalog.models import ModelVariant, NodeGroup  # noqa: E402
from catalog.plans import plans, request_for  # noqa: E402
from catalog.yaml_io import import_file  # noqa: E402

RUNTIME_FOR = {"gguf": "llama.cpp", "ollama": "ollama", "safetensors": "vllm"}


def exhaustive(request: Request, groups: list[NodeGroup]) -> int:
    """Every layout of every group estimated: what ranking costs without smallest-first search."""
    count = 0
    for group in groups:
        for per_node in range(1, group.gpus_per_node + 1):
            for nodes in range(1, group.node_count + 1):
                with contextlib.suppress(EstimateError):
                    fit(estimate(replace(request, gpus_per_node=per_node, nodes=nodes)), group.gpu_type.usable_gib)
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    import_file(str(REPO / "catalog" / "examples" / "catalog.yaml"))
    variants = list(ModelVariant.objects.select_related("model"))
    groups = list(NodeGroup.objects.select_related("partition__cluster", "gpu_type"))
    requests = [(v, request_for(v, RUNTIME_FOR[v.format], min(8192, v.model.max_context))) for v in variants]
    ranked, options, timings = 0, 0, []
    for _ in range(args.repeat):
        start = time.perf_counter()
        for variant, request in requests:
            options += len(plans(request, variant, available_only=False))
            ranked += 1
        timings.append((time.perf_counter() - start) / len(requests))
    baseline_timings = []
    for _ in range(max(1, args.repeat // 4)):
        start = time.perf_counter()
        layouts = sum(exhaustive(request, groups) for _, request in requests)
        baseline_timings.append((time.perf_counter() - start) / len(requests))
    per_ranking = statistics.median(timings)
    baseline = statistics.median(baseline_timings)
    print(f"{len(variants)} variants x {len(groups)} node groups; {options // args.repeat} options per full pass")
    print(f"time per full ranking (median): {per_ranking * 1000:.2f} ms  (target: well under 30 ms)")
    print(f"exhaustive baseline ({layouts // len(requests)} layouts per variant): {baseline * 1000:.2f} ms")
    print(f"ratio baseline / ranking: {baseline / per_ranking:.1f}x")


if __name__ == "__main__":
    main()
