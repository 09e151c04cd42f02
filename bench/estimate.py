"""Estimate and rank every catalog model variant on every GPU option. A benchmark, not a test.

    .venv/bin/python bench/estimate.py [--repeat 20]

Two catalogs in scratch SQLite databases: the example catalog, then a synthetic one of 100 models (dense and
mixture-of-experts, 0.5B to 400B, GGUF and safetensors variants) on 20 GPU types, written as YAML and imported
through the same validation. For each variant and its runtime it times a full ranking (catalog.plans.plans: the
smallest fitting layout of every node group, sorted) and the confidence line. Target: under 3 ms per ranking, a
tenth of the wizard's 30 ms budget. Baseline in the same run: the exhaustive search that estimates every layout of
every node group.
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

from bench.synthetic import synthetic_catalog  # noqa: E402
from catalog.confidence import confidence  # noqa: E402
from catalog.estimate import EstimateError, Request, estimate, fit  # noqa: E402
from catalog.models import Cluster, GPUType, ModelCard, ModelVariant, NodeGroup, Runtime  # noqa: E402
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


def rank(label: str, repeat: int) -> None:
    variants = list(ModelVariant.objects.select_related("model"))
    groups = list(NodeGroup.objects.select_related("partition__cluster", "gpu_type"))
    requests = [(v, request_for(v, RUNTIME_FOR[v.format], min(8192, v.model.max_context))) for v in variants]
    confidence(requests[0][1])  # the reference rows are estimated once per process, as in a web worker
    options, timings, sure = 0, [], []
    for _ in range(repeat):
        start = time.perf_counter()
        for variant, request in requests:
            options += len(plans(request, variant, available_only=False))
        timings.append((time.perf_counter() - start) / len(requests))
        start = time.perf_counter()
        for _, request in requests:
            confidence(request)
        sure.append((time.perf_counter() - start) / len(requests))
    baseline_timings = []
    for _ in range(max(1, repeat // 4)):
        start = time.perf_counter()
        layouts = sum(exhaustive(request, groups) for _, request in requests)
        baseline_timings.append((time.perf_counter() - start) / len(requests))
    per_ranking = statistics.median(timings)
    baseline = statistics.median(baseline_timings)
    models = len({v.model_id for v in variants})
    print(f"{label}: {models} models, {len(variants)} variants x {len(groups)} node groups "
          f"({options // repeat} options per full pass)")  # fmt: skip
    print(f"  time per full ranking (median): {per_ranking * 1000:.2f} ms  (target: under 3 ms, a tenth of 30 ms)")
    print(f"  confidence line (median): {statistics.median(sure) * 1000:.3f} ms")
    print(f"  exhaustive baseline ({layouts // len(requests)} layouts per variant): {baseline * 1000:.2f} ms")
    print(f"  ratio baseline / ranking: {baseline / per_ranking:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    import_file(str(REPO / "catalog" / "examples" / "catalog.yaml"))
    rank("example catalog", args.repeat)
    for model in (ModelVariant, ModelCard, NodeGroup, GPUType, Cluster, Runtime):
        model.objects.all().delete()
    synthetic = Path(os.environ["PORTAL_VAR_DIR"]) / "bench-catalog.yaml"
    synthetic_catalog(synthetic)
    import_file(str(synthetic))
    rank("synthetic catalog", args.repeat)


if __name__ == "__main__":
    main()
