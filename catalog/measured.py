"""What sessions measured on this site, beside the estimate: THE names of the measured figures, what each one is
compared with, the median of the sessions of the same choices and the estimator's error on it. Plain Python, no
Django.

The jobs app reads a session's figures from its server's log (jobs/cluster/measured.py) and keeps them, one row a
session, as the catalog's SiteMeasurement (catalog/models/measurements.py); catalog.plans.site_measured() reads those
rows as Runs and compare() sets them beside an estimate:

- memory, for the same variant, runtime, context and parallel requests: grouped by GPU type and layout (GPUs per
  node, nodes; a compute buffer is per GPU), each part's median over the sessions that measured it, and the
  estimator's figure for that layout's same part;
- speed, for the same variant and runtime on each GPU type whatever the context: the median of the sessions'
  generation and prompt tokens per second.

A figure is compared only with the part of the estimate that measures the same thing (estimated_gib): vLLM's KV
figure is what --gpu-memory-utilization left for the cache, not what the context needs, so neither it nor a total
that holds it is compared; llama.cpp's weights on a GPU leave out the input embedding, which stays in host memory (and
count a tied one twice), while a session wholly in host memory (a node without GPUs, as on the local test cluster)
maps each tensor of the file once; a total is nvidia-smi's (with the CUDA context), PyTorch's peak (without it) or
the sum of the server's buffers.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from catalog.estimate import GIB, Estimate, EstimateError, Request, estimate, weights_bytes
from catalog.quant import canonical_quant
from portal.units import gib_text

# THE names of a session's measured figures (LLMSession.measured, its page, `sessions show --json`, the site's
# measurements): GiB of memory, then tokens per second.
MEMORY = ("weights_gib", "kv_gib", "compute_gib", "total_gib")
SPEEDS = ("prompt_tokens_per_s", "tokens_per_s")
FIELDS = (*MEMORY, *SPEEDS)
LABELS = {
    "weights_gib": "weights",
    "kv_gib": "KV cache",
    "compute_gib": "compute",
    "total_gib": "total",
    "prompt_tokens_per_s": "prompt tokens/s",
    "tokens_per_s": "tokens/s",
}
MAX_GIB = 65536.0  # a figure above this (64 TiB) is no session's: refused
MAX_TOKENS_PER_S = 1e7
# What a measured total is: the GPUs' used memory by nvidia-smi (the CUDA context included), PyTorch's peak
# (torch.cuda.max_memory_allocated: without it), or the sum of the server's own buffers.
TOTAL_FROM = ("nvidia-smi", "torch", "buffers")
# Past this the estimator is off on a site's measurements: the wizard says so, `estimate --check-measured` lists it.
OFF_BY = 0.10
NEWEST = 500  # the site's newest sessions of a variant and runtime that count


def figure(name: str, value: object) -> float | None:
    """A measured figure as a number when it is one: finite, not negative, below its bound; else None. What the
    job's log said, the database holds and the site's medians read all pass here."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return None
    most = MAX_TOKENS_PER_S if name in SPEEDS else MAX_GIB
    return float(value) if 0 <= value <= most else None


@dataclass(frozen=True)
class Run:
    """One session's figures as the site measured them, with the choices they are for."""

    gpu_type: str
    context: int
    parallel: int
    figures: Mapping[str, object]
    gpus_per_node: int = 1
    nodes: int = 1
    on_host: bool = False  # every buffer was in host memory: a session on a node without GPUs
    total_from: str = ""  # one of TOTAL_FROM, or "" when not known

    def value(self, name: str) -> float | None:
        return figure(name, self.figures.get(name))


def estimated_gib(
    request: Request, est: Estimate, name: str, on_host: bool = False, total_from: str = ""
) -> float | None:
    """The estimate of the request's figure for a measured one, or None where they do not measure the same thing."""
    if request.runtime == "vllm" and name in ("kv_gib", "total_gib"):
        return None  # vLLM's KV cache is what it was given, not what the context needs; so is its total
    # On GPUs llama.cpp keeps the input embedding in host memory (and a tied one a second time on the last GPU); in
    # host memory alone it maps each tensor of the file once.
    if on_host:
        weights = weights_bytes(request.arch, canonical_quant(request.quant), request.file_size_gib) / GIB
    else:
        weights = est.weights_gib - est.host_gib
    if name == "weights_gib":
        return weights
    if name == "kv_gib":
        return est.kv_cache_gib
    if name == "compute_gib":
        return est.compute_gib
    if name == "total_gib":
        return {
            "nvidia-smi": est.gpu_total_gib,
            "torch": est.gpu_total_gib - est.context_gib * len(est.per_gpu_gib),
            "buffers": weights + est.kv_cache_gib + est.compute_gib,
        }.get(total_from)
    return None


@dataclass(frozen=True)
class Part:
    """One measured part: the sessions' median and the estimator's figure for the same thing."""

    name: str
    measured_gib: float
    sessions: int
    estimated_gib: float | None = None

    @property
    def label(self) -> str:
        return LABELS[self.name]

    @property
    def error(self) -> float | None:
        """Relative: +0.05 means the estimator says 5 % more than the sessions measured."""
        if self.estimated_gib is None or self.measured_gib <= 0:
            return None
        return self.estimated_gib / self.measured_gib - 1

    @property
    def off(self) -> bool:
        return self.error is not None and abs(self.error) > OFF_BY

    @property
    def error_text(self) -> str:
        return "" if self.error is None else f"{self.error:+.0%}"

    def text(self) -> str:
        error = f" (estimate {self.error_text})" if self.error_text else ""
        return f"{self.label} {gib_text(self.measured_gib)}{error}"


@dataclass(frozen=True)
class SiteFigures:
    """The median of the sessions of the same choices on one GPU type and layout, part by part."""

    gpu_type: str
    gpus_per_node: int
    nodes: int
    sessions: int
    parts: tuple[Part, ...]
    on_host: bool = False
    total_from: str = ""

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def off(self) -> tuple[Part, ...]:
        """The parts the estimator is off on by more than OFF_BY."""
        return tuple(p for p in self.parts if p.off)

    @property
    def total(self) -> Part | None:
        return next((p for p in self.parts if p.name == "total_gib"), None)

    @property
    def where(self) -> str:
        shape = f"{self.gpus_per_node} x {self.gpu_type}" + (f" x {self.nodes} nodes" if self.nodes > 1 else "")
        return shape + (" (host memory: no GPU used)" if self.on_host else "")

    def summary(self) -> str:
        sessions = f"{self.sessions} session{'s' if self.sessions != 1 else ''}"
        return f"{self.where}, {sessions} (median): " + ", ".join(p.text() for p in self.parts)

    def advice(self) -> str:
        """What to plan with where the estimator is off: the measured total, else the measured parts."""
        if not self.off:
            return ""
        wrong = ", ".join(f"{p.label} {p.error_text}" for p in self.off)
        total = self.total
        if total is not None:
            take = f"plan with the measured total, {gib_text(total.measured_gib)}"
            if self.gpus > 1:
                take += f" ({gib_text(total.measured_gib / self.gpus)} per GPU)"
        else:
            take = "plan with the measured figures"
        return f"the estimate is off by more than {OFF_BY:.0%} on what was measured here ({wrong}): {take}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "gpu_type": self.gpu_type,
            "gpus_per_node": self.gpus_per_node,
            "nodes": self.nodes,
            "sessions": self.sessions,
            "on_host": self.on_host,
            "total_from": self.total_from or None,
            "measured": {p.name: round(p.measured_gib, 6) for p in self.parts},
            "estimated": {p.name: round(p.estimated_gib, 6) for p in self.parts if p.estimated_gib is not None},
            "error": {p.name: round(p.error, 4) for p in self.parts if p.error is not None},
            "off": [p.name for p in self.off],
        }


@dataclass(frozen=True)
class Speed:
    """The median speeds of the sessions of a variant and runtime on one GPU type."""

    gpu_type: str
    sessions: int
    tokens_per_s: float | None = None
    prompt_tokens_per_s: float | None = None

    def summary(self) -> str:
        speeds = [f"{value:.0f} {LABELS[name]}" for name, value in self.figures().items()]
        return f"{self.gpu_type}, {self.sessions} session{'s' if self.sessions != 1 else ''}: " + ", ".join(speeds)

    def figures(self) -> dict[str, float]:
        found = {"tokens_per_s": self.tokens_per_s, "prompt_tokens_per_s": self.prompt_tokens_per_s}
        return {name: value for name, value in found.items() if value is not None}

    def as_dict(self) -> dict[str, Any]:
        return {"gpu_type": self.gpu_type, "sessions": self.sessions, **self.figures()}


@dataclass(frozen=True)
class Beside:
    """The site's measurements beside one estimate: memory per GPU type and layout, speed per GPU type."""

    figures: tuple[SiteFigures, ...] = ()
    speeds: Mapping[str, Speed] = field(default_factory=dict)

    @property
    def off(self) -> tuple[SiteFigures, ...]:
        return tuple(f for f in self.figures if f.off)

    def for_layout(self, gpu_type: str, gpus_per_node: int, nodes: int) -> SiteFigures | None:
        return next(
            (f for f in self.figures if (f.gpu_type, f.gpus_per_node, f.nodes) == (gpu_type, gpus_per_node, nodes)),
            None,
        )

    def on(self, gpu_type: str) -> Beside:
        """Only what was measured on this GPU type."""
        figures = tuple(f for f in self.figures if f.gpu_type == gpu_type)
        return Beside(figures, {name: s for name, s in self.speeds.items() if name == gpu_type})

    def as_dict(self) -> dict[str, Any]:
        return {
            "memory": [f.as_dict() for f in self.figures],
            "speed": [s.as_dict() for s in self.speeds.values()],
        }


def _values(runs: list[Run], name: str) -> list[float]:
    return [v for v in (run.value(name) for run in runs) if v is not None]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _counted(runs: list[Run], names: tuple[str, ...]) -> int:
    """The runs with any of these figures."""
    return sum(any(run.value(name) is not None for name in names) for run in runs)


def compare(request: Request, runs: Iterable[Run], estimator: Callable[[Request], Estimate] = estimate) -> Beside:
    """The runs beside the request's estimate.

    1. Memory: the runs of the request's context and parallel requests, grouped by GPU type, layout and how their
       figures were taken; each part's median over the runs that have it.
    2. The estimate of each group's layout, and its figure for each measured part (estimated_gib).
    3. Speed: every run of each GPU type, each speed's median.
    """
    runs = list(runs)
    groups: dict[tuple[str, int, int, bool, str], list[Run]] = defaultdict(list)
    for run in runs:
        if (run.context, run.parallel) == (request.context, request.parallel):
            groups[(run.gpu_type, run.gpus_per_node, run.nodes, run.on_host, run.total_from)].append(run)
    figures = []
    for (gpu_type, per_node, nodes, on_host, total_from), members in sorted(groups.items()):
        try:
            est: Estimate | None = estimator(replace(request, gpus_per_node=per_node, nodes=nodes))
        except EstimateError:
            est = None
        parts = []
        for name in MEMORY:
            values = _values(members, name)
            if values:
                guess = estimated_gib(request, est, name, on_host, total_from) if est else None
                parts.append(Part(name, statistics.median(values), len(values), guess))
        if parts:
            figures.append(
                SiteFigures(gpu_type, per_node, nodes, _counted(members, MEMORY), tuple(parts), on_host, total_from)
            )
    by_gpu: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_gpu[run.gpu_type].append(run)
    speeds = {}
    for gpu_type, members in sorted(by_gpu.items()):
        if counted := _counted(members, SPEEDS):
            tokens, prompt = (_median(_values(members, name)) for name in ("tokens_per_s", "prompt_tokens_per_s"))
            speeds[gpu_type] = Speed(gpu_type, counted, tokens, prompt)
    return Beside(tuple(figures), speeds)
