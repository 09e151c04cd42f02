"""What a session's model server says it allocated and how fast it answered, read from the job's log.

Where this happens, and why: the figures are already in the job's log (Slurm's --output, where the server writes),
printed by the server itself: llama-server's buffer sizes (model, KV, compute, per device), vLLM's start-up
figures, the lines the job side adds (nvidia-smi's used memory after the health check, server.sh; the peak of
torch.cuda.max_memory_allocated, tfserve.py), and llama-server's own timings of every request. So the job writes
nothing new, and the portal reads the log as it does for the log page: one bounded command (MEASURE, `measure
UUID`), where grep keeps only the lines that can matter, each cut to LINE_CHARS and at most a few thousand of them,
then parse() reads those lines strictly. A file the job would write instead needs the same parsing on the node, a
Python helper in every job and a poll section per session on every poll, for figures that change a few times a
session. The worker runs MEASURE when a session is running and not yet measured, every MEASURE_EVERY while it
runs, and once after it ends (jobs/sessions/measuring.py).

The log is the job owner's to write: everything here is hostile input. A line counts only when it matches one of
the formats below whole; numbers must be finite, not negative and below MAX_GIB (a GiB figure) or MAX_TOKENS_PER_S;
nothing read is used for anything but these numbers. An owner can still print a believable line: the figures are
that session's word, shown as measured on its own page, never trusted for access or limits.

THE FORMATS, from the runtimes' sources (tests/jobs/cluster/data/measured/ holds real and format-exact excerpts):

llama.cpp (one start-up block: a later `model buffer size` line after KV or compute lines starts the block again,
as a restarted server's does). Library INFO lines print only at verbosity 4 in builds since late 2025 (common/log.cpp
maps them to trace), so llama.cpp.sh sets LLAMA_ARG_LOG_VERBOSITY=4; older builds print them by default.
    src/llama-model.cpp     "%s: %12s model buffer size = %8.2f MiB"   (load_tensors; 2024: llm_load_tensors:
                            "%s: %10s buffer size = %8.2f MiB")
    src/llama-kv-cache.cpp  "%s: %10s KV buffer size = %8.2f MiB"      (llama_kv_cache, llama_kv_cache_unified,
                            2024: llama_kv_cache_init); recurrent state: "%s: %10s RS buffer size = %8.2f MiB"
    src/llama-context.cpp   "%s: %10s compute buffer size = %8.2f MiB" (sched_reserve, llama_context,
                            2024: llama_new_context_with_model)
    tools/server            "prompt eval time = %10.2f ms / %5d tokens (...)" and "       eval time = ..." per request
A buffer's name is its device: CUDA0, ROCm1, Vulkan0, Metal, RPC0[host:port] (RPC[host:port] before 2025) are
accelerators; CPU, CPU_Mapped, CPU_REPACK and *_Host are host memory. The totals count the accelerators' buffers
where there are any (what the GPUs hold), else the host's (a CPU session); `devices` keeps every buffer.

vLLM (one line per worker process; a worker's later line replaces its earlier one):
    v1/worker/gpu_model_runner.py  "Model loading took %s GiB memory and %.6f seconds"  (0.6: "%.4f GiB")
    v1/worker/gpu_worker.py        "Available KV cache memory: %s GiB"
    worker.py (0.6 to 0.10)        "model weights take %.2fGiB; non_torch_memory takes %.2fGiB; PyTorch activation
                                   peak memory takes %.2fGiB; the rest of the memory reserved for KV Cache is %.2fGiB."
    v1/worker/cpu_worker.py        "Explicitly set (%s/%s) GiB for KV cache on node %d." (or "Auto set (...")
    weight_utils.py                "Checkpoint size: %.2f GiB." (weights, only where no loading figure is logged:
                                   on CPU vLLM keeps the checkpoint's tensors as they are stored)

The portal's own lines (the job side's, hence also the owner's to forge, checked the same way):
    server.sh    "portal: nvidia-smi memory.used MiB: 1234, 5678"     -> total_gib (the GPUs' used memory)
    tfserve.py   "tfserve: torch.cuda.max_memory_allocated MiB: 1234, 5678" -> total_gib where nvidia-smi is silent
Where neither is there, total_gib is the sum of the server's buffers; `total_from` says which it is
(catalog.measured.TOTAL_FROM: nvidia-smi, torch, buffers), since the estimate's figure for each differs.

Plain Python, no Django.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from catalog.measured import FIELDS as FIELDS
from catalog.measured import MAX_GIB as MAX_GIB
from catalog.measured import MAX_TOKENS_PER_S as MAX_TOKENS_PER_S
from catalog.measured import TOTAL_FROM, figure
from jobs.cluster import layout
from portal import gate, shellsafe
from portal.slurm.cli import PLAIN

# The figures' names (FIELDS), their bounds and what a total can be are the catalog's (catalog/measured.py), which
# compares them with the estimate.
MAX_DEVICES = 64
LINE_CHARS = 300  # every line the command prints is cut to this; a longer one is not a server's line here
MAX_TEXT_CHARS = 2 << 20
NVIDIA_SMI_LINE = "portal: nvidia-smi memory.used MiB:"
TORCH_PEAK_LINE = "tfserve: torch.cuda.max_memory_allocated MiB:"

# What grep keeps (fixed strings): the memory lines, the latest timing lines, the latest portal lines.
_MEMORY_WORDS = (
    "buffer size =",
    "Model loading took",
    "Available KV cache memory:",
    "model weights take",
    "GiB for KV cache on node",
    "Checkpoint size:",
)
_SPEED_WORDS = ("eval time =",)
_PORTAL_WORDS = (NVIDIA_SMI_LINE, TORCH_PEAK_LINE)


def _grep(words: tuple[str, ...]) -> str:
    return " ".join(f"-e '{word}'" for word in words)


# Runs as: bash -c SCRIPT measure UUID. Builtins, grep, tail and cut only; at most 400 + 4000 + 64 lines of
# LINE_CHARS each, however large the log.
MEASURE_SCRIPT = f"""
f="$SESSIONS_DIR/$1/$JOB_LOG"
[ -f "$f" ] || exit 0
grep -a -F {_grep(_MEMORY_WORDS)} -- "$f" | tail -n 400 | cut -c 1-{LINE_CHARS}
grep -a -F {_grep(_SPEED_WORDS)} -- "$f" | tail -n 4000 | cut -c 1-{LINE_CHARS}
grep -a -F {_grep(_PORTAL_WORDS)} -- "$f" | tail -n 64 | cut -c 1-{LINE_CHARS}
exit 0
"""
MAX_OUTPUT_BYTES = (400 + 4000 + 64) * (LINE_CHARS + 1) + 1024


MEASURE = gate.Verb("measure", layout.script(MEASURE_SCRIPT), args=(shellsafe.UUID,))
VERBS = (MEASURE,)


def measure_command(session_id: str, *, gated: bool = False) -> str:
    return gate.command(MEASURE, [session_id], PLAIN, gated=gated)


_NUMBER = r"(-?[0-9]+(?:\.[0-9]+)?|nan|inf|-nan|-inf)"
# A device, and an RPC one's endpoint: RPC0[10.0.0.2:50052] (an IPv6 one in brackets of its own is not read).
_DEVICE = r"([A-Za-z][A-Za-z0-9_]{0,31}(?:\[[A-Za-z0-9._-]{1,80}:[0-9]{1,5}\])?)"
_FUNCS = (
    "load_tensors|llm_load_tensors|llama_kv_cache\\w*|llama_memory_recurrent|sched_reserve|llama_context|"
    "llama_new_context_with_model|llama_init_from_model|graph_reserve"
)
_BUFFER = rf"(?:^|[\s|])(?:{_FUNCS}):\s+{_DEVICE} "
_LLAMA = {
    "weights": re.compile(rf"{_BUFFER}(?:model )?buffer size =\s*{_NUMBER} MiB\s*$"),
    "kv": re.compile(rf"{_BUFFER}(?:KV|RS) buffer size =\s*{_NUMBER} MiB\s*$"),
    "compute": re.compile(rf"{_BUFFER}compute buffer size =\s*{_NUMBER} MiB\s*$"),
}
_TIMING = re.compile(
    rf"(?:^|[\s|:])(prompt )?eval time =\s*{_NUMBER} ms /\s*([0-9]{{1,9}}) (?:tokens|runs) \(\s*{_NUMBER} ms per token,"
)
# vLLM: the process prefix names the worker, e.g. "(Worker_TP1 pid=4242) INFO 12-07 15:41:25 [file.py:12] "; its
# formatter repeats the level, time and place on every line of a message (NewLineFormatter).
_VLLM_AT = (
    r"^(?:\(([A-Za-z][A-Za-z0-9_]{0,40}) pid=[0-9]{1,10}\) )?(?:INFO|DEBUG) "
    r"[0-9-]{5} [0-9:]{8}(?:\.[0-9]+)? \[[A-Za-z0-9_./-]{1,80}:[0-9]{1,6}\] "
)
_VLLM = {
    "weights": re.compile(rf"{_VLLM_AT}Model loading took {_NUMBER} ?GiB memory and "),
    "kv": re.compile(rf"{_VLLM_AT}Available KV cache memory: {_NUMBER} ?GiB\s*$"),
    "cpu_kv": re.compile(
        rf"{_VLLM_AT}(?:Explicitly|Auto) set \({_NUMBER}/{_NUMBER}\) GiB for KV cache on node ([0-9]+)"
    ),
    "checkpoint": re.compile(rf"{_VLLM_AT}.*\bCheckpoint size: {_NUMBER} GiB\."),
}
_VLLM_PROFILE = re.compile(
    rf"{_VLLM_AT}model weights take {_NUMBER} ?GiB; non_torch_memory takes {_NUMBER} ?GiB; PyTorch activation peak "
    rf"memory takes {_NUMBER} ?GiB; the rest of the memory reserved for KV Cache is {_NUMBER} ?GiB\."
)
_PORTAL = re.compile(
    rf"(?:^|\] )({re.escape(NVIDIA_SMI_LINE)}|{re.escape(TORCH_PEAK_LINE)}) ([0-9]{{1,9}}(?:, ?[0-9]{{1,9}})*)\s*$"
)


def _number(text: str, most: float = MAX_GIB) -> float | None:
    """A finite, non-negative number below `most`, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 <= value <= most else None


def _timed(tokens: int, ms: float, per_token_ms: float) -> int:
    """The tokens the server's time covers: recent llama-servers print a generation's N tokens but time N - 1 (the
    first came with the prompt), older ones all N; their per-token figure says which. Over many requests the speed
    is these tokens over the time, so each request weighs by its tokens."""
    if tokens > 1 and abs(ms / (tokens - 1) - per_token_ms) < abs(ms / tokens - per_token_ms):
        return tokens - 1
    return tokens


def is_host(device: str) -> bool:
    """A buffer in host memory (llama.cpp's names): CPU, CPU_Mapped, CPU_REPACK, CUDA_Host, Vulkan_Host..."""
    return device.startswith("CPU") or device.endswith("_Host")


@dataclass
class _Llama:
    """One start-up block of llama.cpp's buffers: device -> kind -> MiB."""

    devices: dict[str, dict[str, float]] = field(default_factory=dict)
    past_weights: bool = False  # a KV or compute line came: the next model line starts a new block

    def add(self, kind: str, device: str, mib: float) -> None:
        if kind == "weights" and self.past_weights:
            self.devices, self.past_weights = {}, False
        if kind != "weights":
            self.past_weights = True
        if device not in self.devices and len(self.devices) >= MAX_DEVICES:
            return
        kinds = self.devices.setdefault(device, {})
        kinds[kind] = kinds.get(kind, 0.0) + mib


@dataclass
class _Speed:
    tokens: int = 0
    ms: float = 0.0

    def add(self, tokens: int, ms: float) -> None:
        if tokens > 0 and ms > 0:
            self.tokens += tokens
            self.ms += ms

    def per_s(self) -> float | None:
        if self.tokens <= 0 or self.ms <= 0:
            return None
        value = self.tokens / (self.ms / 1000)
        return value if value <= MAX_TOKENS_PER_S else None


def parse(text: str) -> dict[str, Any]:
    """The figures in what MEASURE printed (or any log text): FIELDS that were found, each a number, and `devices`
    (device -> weights_gib, kv_gib, compute_gib) where the server named them, and `total_from` with a total. Empty when
    nothing was found. Never raises on any input."""
    llama = _Llama()
    vllm: dict[str, dict[str, float]] = {}  # worker -> kind -> GiB
    prompt, generated = _Speed(), _Speed()
    gpu_used: float | None = None
    torch_peak: float | None = None
    for line in text[:MAX_TEXT_CHARS].splitlines():
        if len(line) > LINE_CHARS:
            continue
        if "buffer size =" in line:
            for kind, pattern in _LLAMA.items():
                if (m := pattern.search(line)) and (mib := _number(m.group(2), MAX_GIB * 1024)) is not None:
                    llama.add(kind, m.group(1), mib)
                    break
        elif "eval time =" in line:
            if (m := _TIMING.search(line)) and (ms := _number(m.group(2), 1e12)) is not None:
                tokens, per_token_ms = int(m.group(3)), _number(m.group(4), 1e12)
                if m.group(1):
                    prompt.add(tokens, ms)
                elif per_token_ms is not None:
                    generated.add(_timed(tokens, ms, per_token_ms), ms)
        elif line.find("portal: ") >= 0 or line.find("tfserve: ") >= 0:
            if m := _PORTAL.search(line):
                mib_values = [_number(v, MAX_GIB * 1024) for v in m.group(2).split(",")[:MAX_DEVICES]]
                if all(v is not None for v in mib_values):
                    gib = sum(v for v in mib_values if v is not None) / 1024
                    if m.group(1) == NVIDIA_SMI_LINE:
                        gpu_used = gib
                    else:
                        torch_peak = gib
        else:
            _vllm_line(line, vllm)
    found: dict[str, Any] = {}
    if llama.devices:
        found.update(_llama_totals(llama.devices))
    elif vllm:
        found.update(_vllm_totals(vllm))
    total, total_from = (gpu_used, "nvidia-smi") if gpu_used is not None else (torch_peak, "torch")
    if total is None and found:
        total, total_from = sum(found.get(name, 0.0) for name in ("weights_gib", "kv_gib", "compute_gib")), "buffers"
    if total is not None and total <= MAX_GIB:
        found["total_gib"], found["total_from"] = total, total_from
    for name, speed in (("prompt_tokens_per_s", prompt), ("tokens_per_s", generated)):
        if (value := speed.per_s()) is not None:
            found[name] = value
    return clean(found)


def _vllm_line(line: str, vllm: dict[str, dict[str, float]]) -> None:
    for kind, pattern in _VLLM.items():
        if m := pattern.search(line):
            worker = m.group(1) or "engine"
            if kind == "cpu_kv":
                value, worker = _number(m.group(2)), f"{worker} node {m.group(4)}"
                kind = "kv"
            else:
                value = _number(m.group(2))
            if value is not None and (worker in vllm or len(vllm) < MAX_DEVICES):
                vllm.setdefault(worker, {})[kind] = value
            return
    if "model weights take" in line and (m := _VLLM_PROFILE.search(line)):
        weights, activation, kv = (_number(m.group(i)) for i in (2, 4, 5))
        worker = m.group(1) or "engine"
        known = weights is not None and activation is not None and kv is not None
        if known and (worker in vllm or len(vllm) < MAX_DEVICES):
            vllm[worker] = {"weights": weights or 0.0, "compute": activation or 0.0, "kv": kv or 0.0}


def _llama_totals(devices: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Totals over the accelerators' buffers where there are any, else over the host's; every buffer by device."""
    counted = [d for d in devices if not is_host(d)] or list(devices)
    found: dict[str, Any] = {}
    for kind in ("weights", "kv", "compute"):
        values = [devices[d][kind] for d in counted if kind in devices[d]]
        if values:
            found[f"{kind}_gib"] = sum(values) / 1024
    found["devices"] = {
        device: {f"{kind}_gib": mib / 1024 for kind, mib in kinds.items()} for device, kinds in devices.items()
    }
    return found


def _vllm_totals(workers: dict[str, dict[str, float]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    loaded = [w["weights"] for w in workers.values() if "weights" in w]
    checkpoint = [w["checkpoint"] for w in workers.values() if "checkpoint" in w]
    if loaded or checkpoint:
        found["weights_gib"] = sum(loaded) if loaded else max(checkpoint)
    for kind in ("kv", "compute"):
        values = [w[kind] for w in workers.values() if kind in w]
        if values:
            found[f"{kind}_gib"] = sum(values)
    return found


_DEVICE_NAME = re.compile(rf"{_DEVICE}|[A-Za-z][A-Za-z0-9_]{{0,40}}(?: node [0-9]{{1,4}})?")


def clean(raw: object) -> dict[str, Any]:
    """Only the known fields, each a finite non-negative number in range, rounded (catalog.measured.figure), with
    `total_from` when it is one of TOTAL_FROM; `devices` likewise. What parse() returns and what the database holds
    both pass here, so a page never shows anything else."""
    if not isinstance(raw, dict):
        return {}
    figures: dict[str, Any] = {}
    for name in FIELDS:
        if (value := figure(name, raw.get(name))) is not None:
            figures[name] = round(value, 6 if name.endswith("_gib") else 2)
    if "total_gib" in figures and raw.get("total_from") in TOTAL_FROM:
        figures["total_from"] = raw["total_from"]
    devices = raw.get("devices")
    if isinstance(devices, dict) and figures:
        kept = {}
        for device, kinds in list(devices.items())[:MAX_DEVICES]:
            if not (isinstance(device, str) and _DEVICE_NAME.fullmatch(device) and isinstance(kinds, dict)):
                continue
            numbers = {k: figure(k, kinds.get(k)) for k in ("weights_gib", "kv_gib", "compute_gib")}
            good = {k: round(v, 6) for k, v in numbers.items() if v is not None}
            if good:
                kept[device] = good
        if kept:
            figures["devices"] = kept
    return figures
