"""How sure an estimate is: the published measurements nearest to a request, and how far the estimator is from each.

The measurements are the reference rows the estimator is checked against (catalog/reference/*.csv, the portal's own
copies of the published tables), read as data: each row's setup (the columns, plus what its source
quotes of the benchmark's prompt and vLLM's batched tokens) becomes an estimator request, and the estimator's figure
for the part the row measured is compared with the published one. Plain Python, no Django.
"""

from __future__ import annotations

import csv
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

from catalog.architecture import Architecture
from catalog.estimate import Estimate, EstimateError, Request, estimate, ubatch_logits_in
from catalog.quant import QUANTS, canonical_quant
from catalog.training import TRAINING, PurposeRequest, estimate_purpose

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
REFERENCE_FILES = ("vram-public.csv", "vram-public-more.csv")
FINE_TUNING_FILE = "finetune-measurements.csv"  # collected for the portal (its header names the sources)
UNITS = {"GB": 1e9, "GiB": 2**30}
# Runtimes that share an engine compare with each other's measurements.
ENGINE = {"llama.cpp": "llama.cpp", "ollama": "llama.cpp", "vllm": "vllm", "transformers": "transformers"}


@dataclass(frozen=True)
class Measurement:
    id: str
    model: str
    runtime: str
    quant: str
    context: int
    what: str
    published_gib: float
    estimated_gib: float
    source: str
    request: Request
    label: str = ""  # how the confidence line names it; default: model, runtime and quantisation, part measured

    @property
    def error(self) -> float:
        """Relative: +0.05 means the estimator says 5 % more than was measured."""
        return self.estimated_gib / self.published_gib - 1


@dataclass(frozen=True)
class Confidence:
    nearest: tuple[Measurement, ...]
    kind: str = "published measurements"

    @property
    def worst_error(self) -> float:
        return max((abs(m.error) for m in self.nearest), default=math.inf)

    @staticmethod
    def _label(m: Measurement) -> str:
        return f"{m.model.split(' (')[0]}, {m.runtime} {m.quant}, {m.what}"

    def summary(self) -> str:
        if not self.nearest:
            return "no published measurement is near this request"
        rows = "; ".join(f"{m.id} {m.label or self._label(m)}: {m.error:+.0%}" for m in self.nearest)
        return f"within {self.worst_error:.0%} of the {len(self.nearest)} nearest {self.kind} ({rows})"


def _leading_int(text: str) -> int | None:
    match = re.match(r"\s*(\d+)", text)
    return int(match[1]) if match else None


def _flash(text: str) -> bool | None:
    """yes/on/"likely on" (the runtime's default backend, stated), no/off; unknown leaves the runtime's default."""
    folded = text.strip().casefold()
    if folded == "yes" or folded.startswith(("on", "likely on")):
        return True
    if folded == "no" or folded.startswith("off"):
        return False
    return None


# AutoAWQ's benchmark table (examples/benchmark.py's output, in AutoAWQ's README and transformers' AWQ docs): a
# row reads "| kernel | batch | prefill | decode | ...", spaced as the table pads it.
AWQ_TABLE = re.compile(r"(?:GEMM|GEMV|ExLlama\w*|Marlin)\W*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|", re.IGNORECASE)
PROMPT = re.compile(r"(?:prefill|input) (\d[\d,]*)|(\d[\d,]*)[- ]token prompt")
DECODE = re.compile(r"decode (\d[\d,]*)")
CACHE = re.compile(r"max_seq_len\W{0,3}(\d[\d,]*)")


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def request_of(row: dict[str, str]) -> Request:
    """The measurement's setup as its row states it: the columns, plus what the source quotes of the benchmark's
    prompt length ("prefill 2048", "input 30720", a 30,000-token prompt, an AutoAWQ table's prefill column), vLLM's
    profiled batch, and for AutoAWQ's fused modules (runtime_detail) the length of their preallocated cache: a
    max_seq_len the source states, else the decode length, which AutoAWQ's examples/benchmark.py (the command under
    its README's tables) gave the fused modules as their cache (from_quantized(max_new_tokens=n_generate) in 0.1.x,
    max_seq_len=n_generate in 0.2.x); for llama.cpp and ollama, whether the build it names reserved logits for a
    whole micro-batch (catalog.estimate.ubatch_logits_in: "llama.cpp b2961" did)."""
    arch = Architecture(
        float(row["params_b"]), int(row["layers"]), int(row["hidden"]), int(row["heads"]),
        int(row["kv_heads"]), int(row["head_dim"]), int(row["vocab"]),
        ffn_size=int(row["ffn"]) if row.get("ffn") else None,
    )  # fmt: skip
    source = row["source"]
    batched = re.search(r"max_num_batched_tokens \((\d+)", row["parallel"])
    table = AWQ_TABLE.search(source)
    stated = PROMPT.search(source)
    prompt = _number(next(g for g in stated.groups() if g)) if stated else int(table[2]) if table else None
    decode = DECODE.search(source)
    generated = _number(decode[1]) if decode else int(table[3]) if table else None
    detail = row.get("runtime_detail", "").casefold()
    fused = "fused" in detail.replace("unfused", "")
    cache_stated = CACHE.search(source)
    cache = None
    if fused and cache_stated:
        cache = _number(cache_stated[1])
    elif fused and generated:
        cache = max(generated, prompt or 0)
    return Request(
        arch=arch,
        quant=row["quant"],
        runtime=row["runtime"],
        context=max(int(row["context"]), 1),
        parallel=_leading_int(row["parallel"]) or 1,
        flash_attn=_flash(row["flash_attn"]),
        gpus_per_node=_leading_int(row["gpus"]) or 1,
        batch_tokens=int(batched[1]) if batched else None,
        prompt_tokens=prompt,
        cache_tokens=cache,
        fused_modules=fused,
        ubatch_logits=ubatch_logits_in(row.get("runtime_detail", "")),
    )


def figure_of(row: dict[str, str], est: Estimate) -> float:
    """The part the row measured: nvidia-smi sees every GPU's whole process, a runtime's own sum leaves out the CUDA
    context; weights, KV cache and compute buffers are sums over the GPUs, except vLLM's tensor-parallel rows, which
    are per GPU."""
    figure = {
        "total_nvidia_smi": est.gpu_total_gib,
        "total_runtime": est.gpu_total_gib - est.context_gib * len(est.per_gpu_gib),
        "weights": est.weights_gib,
        "kv": est.kv_cache_gib,
        "compute": est.compute_gib,
    }[row["what"]]
    return figure / len(est.per_gpu_gib) if row["runtime"] == "vllm" else figure


def _rows(path: Path) -> list[dict[str, str]]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return list(csv.DictReader(lines))


def reference_rows(directory: Path = REFERENCE_DIR) -> list[dict[str, str]]:
    return [row for name in REFERENCE_FILES for row in _rows(directory / name)]


def fine_tuning_rows() -> list[dict[str, str]]:
    return _rows(REFERENCE_DIR / FINE_TUNING_FILE)


def fine_tuning_request_of(row: dict[str, str]) -> PurposeRequest:
    """A published fine-tuning run as the estimator's request: its model's shape, method, sequence, micro-batch,
    LoRA rank and targets, double quantisation (when stated) and gradient checkpointing."""
    arch = Architecture(
        float(row["params_b"]), int(row["layers"]), int(row["hidden"]), int(row["heads"]),
        int(row["kv_heads"]), int(row["head_dim"]), int(row["vocab"]), ffn_size=int(row["ffn"]),
    )  # fmt: skip
    serving = Request(arch, "bf16", "transformers", int(row["sequence"]), parallel=int(row["micro_batch"]))
    settings: dict[str, object] = {"gradient_checkpointing": row["checkpointing"] == "on"}
    if row["double_quant"]:
        settings["double_quant"] = row["double_quant"] == "on"
    return PurposeRequest(
        serving, row["purpose"], lora_rank=int(row["lora_rank"]), lora_targets=row["targets"],  # type: ignore[arg-type]
        **settings,  # type: ignore[arg-type]
    )  # fmt: skip


def fine_tuning_figure_of(row: dict[str, str], est: Estimate) -> float:
    """PyTorch's peak as the row states it (no CUDA context), in the row's unit."""
    return (est.gpu_total_gib - est.context_gib * len(est.per_gpu_gib)) * 2**30 / UNITS[row["unit"]]


@functools.cache
def measurements() -> tuple[Measurement, ...]:
    """Every reference row with the estimator's figure for it (computed once per process)."""
    found = []
    for row in reference_rows():
        request = request_of(row)
        found.append(
            Measurement(
                id=row["id"],
                model=row["model"],
                runtime=row["runtime"],
                quant=row["quant"],
                context=request.context,
                what=row["what"],
                published_gib=float(row["gib"]),
                estimated_gib=figure_of(row, estimate(request)),
                source=row["source"],
                request=request,
            )
        )
    return tuple(found)


@functools.cache
def fine_tuning_measurements() -> tuple[Measurement, ...]:
    found = []
    for row in fine_tuning_rows():
        request = fine_tuning_request_of(row)
        figure = fine_tuning_figure_of(row, estimate_purpose(request))
        found.append(
            Measurement(
                id=row["id"], model=row["model"], runtime="transformers", quant=row["purpose"],
                context=int(row["sequence"]) * int(row["micro_batch"]), what=row["purpose"],
                published_gib=float(row["figure"]), estimated_gib=figure, source=row["source"],
                request=request.serving,
                label=f"{row['model']} {row['purpose']} r{row['lora_rank']}, {row['sequence']} tokens x "
                      f"{row['micro_batch']}",
            )
        )  # fmt: skip
    return tuple(found)


def _quant_family(name: str) -> str:
    try:
        quant = QUANTS[canonical_quant(name)]
    except KeyError:
        return name
    if "gguf" in quant.formats and "safetensors" not in quant.formats:
        return "gguf"
    return "16-bit" if quant.bits_per_weight >= 16 else canonical_quant(name).split("-")[0]


def distance(request: Request, m: Measurement) -> float:
    """How unlike two setups are: another engine counts most, then another kind of quantisation, then the size of
    the model and the context (each a factor of e counts 1)."""
    engine = 0.0 if ENGINE.get(request.runtime) == ENGINE.get(m.runtime) else 4.0
    quant = 0.0 if _quant_family(request.quant) == _quant_family(m.quant) else 1.5
    size = abs(math.log(request.arch.params_b / m.request.arch.params_b))
    context = abs(math.log(request.context / m.context)) / 2
    return engine + quant + size + context


def confidence(request: Request, count: int = 3) -> Confidence:
    """The `count` measurements nearest to the request, and the estimator's error on each."""
    try:
        known = measurements()
    except (OSError, EstimateError, KeyError, ValueError):  # a damaged copy of the data: say nothing rather than fail
        return Confidence(())
    return Confidence(tuple(sorted(known, key=lambda m: (distance(request, m), m.id))[:count]))


def purpose_confidence(request: PurposeRequest, count: int = 3) -> Confidence:
    """For fine-tuning, the nearest published runs (the same method first, then model size and tokens per step);
    for serving and RAG, the serving measurements."""
    if request.purpose not in TRAINING:
        return confidence(request.serving, count)
    try:
        known = fine_tuning_measurements()
    except (OSError, EstimateError, KeyError, ValueError):
        return Confidence(())
    serving = request.serving
    tokens = serving.context * serving.parallel

    def far(m: Measurement) -> float:
        method = 0.0 if m.what == request.purpose else 2.0
        return method + abs(math.log(serving.arch.params_b / m.request.arch.params_b)) + abs(
            math.log(tokens / m.context)) / 2  # fmt: skip

    nearest = tuple(sorted(known, key=lambda m: (far(m), m.id))[:count])
    return Confidence(nearest, "published fine-tuning runs")
