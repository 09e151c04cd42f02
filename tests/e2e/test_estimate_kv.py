"""The estimator's KV cache bytes equal what llama-server reports when it loads tiny models on the local cluster:
llama models (one cache), and a gemma3 model with a sliding window (a full cache and a smaller sliding-window one);
and its compute buffer is llama-server's own within 10 %, with flash attention on and off, over one and several
slots (tests/catalog/test_estimate_compute.py checks captured runs of more shapes, SmolLM2 among them)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from catalog.architecture import Architecture
from catalog.estimate import LLAMA_CPP_UBATCH, Request, estimate, kv_cache_bytes, kv_cells, window_cells
from catalog.gguf import read_header
from portal.ssh import CommandResult
from tests.conftest import REPO
from tests.e2e.sessions import shell

pytestmark = pytest.mark.e2e

SHAPES = [  # layers, width, heads, kv heads
    (2, 64, 4, 2),
    (3, 128, 4, 1),
    (4, 96, 6, 6),
]
RUNS = [  # context, flags, KV type
    (1000, "", "f16"),
    (3000, "-fa on -ctk q8_0 -ctv q8_0", "q8_0"),
    (4096, "-fa on -ctk q4_0 -ctv q4_0", "q4_0"),
]
# gemma3: every sixth layer attends to the whole context, the other five within the window (llama.cpp's pattern).
GEMMA3 = (12, 64, 4, 2)  # layers, width, heads, kv heads
GEMMA3_WINDOW = 128
# context per slot, slots: passed as the job script does (-c context x slots --parallel slots), so each slot has its
# own cache stream; 1100 x 3 is a context that 256 does not divide, over an odd number of slots.
GEMMA3_RUNS = [(1000, 1), (4096, 1), (1000, 2), (1100, 3)]
BINARY = "/var/cache/hpc-llm-portal/llama.cpp/0.3.36/bin/llama-server"
# context per slot, slots, micro-batch (-ub), flash attention: as the job passes them (-c context x slots --parallel
# slots), so each slot has its own cache stream; the compute buffer is the graph allocator's high-water mark.
COMPUTE_RUNS = [(1000, 1, 512, True), (1000, 1, 512, False), (2048, 3, 256, True), (2048, 3, 256, False)]


@pytest.fixture(scope="module")
def models() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="tiny-models-", dir="/tmp"))
    directory.chmod(0o755)  # the cluster user reads them
    for layers, width, heads, kv in SHAPES:
        out = directory / f"m-{layers}-{width}-{heads}-{kv}.gguf"
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "tiny-gguf"), str(out),
             "--layers", str(layers), "--width", str(width), "--heads", str(heads), "--kv-heads", str(kv)],
            check=True, capture_output=True,
        )  # fmt: skip
    layers, width, heads, kv = GEMMA3
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "tiny-gguf"), str(directory / "gemma3.gguf"), "--arch", "gemma3",
         "--sliding-window", str(GEMMA3_WINDOW),
         "--layers", str(layers), "--width", str(width), "--heads", str(heads), "--kv-heads", str(kv)],
        check=True, capture_output=True,
    )  # fmt: skip
    yield directory
    subprocess.run(["rm", "-rf", str(directory)], check=False)


def server_lines(local: dict[str, Any], model: Path, flags: str, ready: str, lines: str) -> CommandResult:
    """Start llama-server with `flags` in a Slurm job on the local cluster, wait until `ready` (a shell test over its
    "$log") holds, print the log's lines that `lines` (an extended regex) matches, and its errors to stderr.
    Its port is below Linux's ephemeral range (32768 on), where the test's own connections could hold it."""
    script = (
        f"log=$(mktemp); {shlex.quote(BINARY)} -m {shlex.quote(str(model))} {flags} -lv 4 "
        '--host 127.0.0.1 --port $((20000 + RANDOM % 12000)) >"$log" 2>&1 & pid=$!; '
        f"for _ in $(seq 200); do {ready} && break; sleep 0.1; done; "
        f'grep -E {shlex.quote(lines)} "$log"; kill $pid; grep -m3 " E " "$log" >&2; rm -f "$log"'
    )
    command = f"timeout 90 srun -p gpu -t 2 -N1 --gres=gpu:a100:1 bash -c {shlex.quote(script)}"
    return shell(local, command)


def reported_kv(local: dict[str, Any], model: Path, context: int, flags: str) -> tuple[str, int]:
    """Start llama-server in a Slurm job on the local cluster, read its 'llama_kv_cache: size = X MiB' line."""
    ready = 'grep -q "llama_kv_cache: size" "$log"'
    result = server_lines(local, model, f"-c {context} {flags}", ready, "llama_kv_cache: size")
    match = re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells", result.stdout)
    assert match, result.stdout + result.stderr
    return match.group(1), int(match.group(2))


class KVCache(NamedTuple):
    """One 'llama_kv_cache: size = X MiB (N cells, L layers, S/T seqs)' line: N cells in each of T streams."""

    mib: str
    cells: int  # all streams together
    layers: int


KV_LINE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*\d+/(\d+) seqs\)")


def reported_iswa_kv(local: dict[str, Any], model: Path, context: int, parallel: int) -> tuple[KVCache, KVCache]:
    """Start llama-server as the job script does (-c context x slots, --parallel slots) in a Slurm job, read its two
    caches: llama_kv_cache_iswa creates the full one, then the sliding-window one, and each prints its size line."""
    ready = '[ "$(grep -c "llama_kv_cache: size" "$log")" -ge 2 ]'
    flags = f"-c {context * parallel} --parallel {parallel}"
    result = server_lines(local, model, flags, ready, "llama_kv_cache(_iswa: creating|: size)")
    out = result.stdout
    caches = [KVCache(m.group(1), int(m.group(2)) * int(m.group(4)), int(m.group(3))) for m in KV_LINE.finditer(out)]
    assert len(caches) == 2, out + result.stderr
    assert 0 <= out.find("creating non-SWA KV cache") < out.find("creating     SWA KV cache"), out
    return caches[0], caches[1]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kv_bytes_equal_llama_servers_own_figure(
    shape: tuple[int, int, int, int], models: Path, local_cluster: dict[str, Any]
) -> None:
    layers, width, heads, kv = shape
    arch = Architecture(0.0001, layers, width, heads, kv, width // heads, 259)
    model = models / f"m-{layers}-{width}-{heads}-{kv}.gguf"
    for context, flags, kv_type in RUNS:
        if kv_type != "f16" and (width // heads) % 32:
            continue  # llama.cpp refuses quantised K rows that its 32-value blocks do not divide (tested in unit tests)
        ours = kv_cache_bytes(arch, kv_cells("llama.cpp", context), kv_type) / 2**20
        theirs, cells = reported_kv(local_cluster, model, context, flags)
        assert cells == kv_cells("llama.cpp", context)
        # llama.cpp prints MiB with printf's "%.2f"; Python's formatting rounds the same way.
        assert f"{ours:.2f}" == theirs, (context, kv_type, ours, theirs)


def test_sliding_window_caches_equal_llama_servers_own_figures(models: Path, local_cluster: dict[str, Any]) -> None:
    layers, width, heads, kv = GEMMA3
    model = models / "gemma3.gguf"
    with model.open("rb") as fh:
        header = read_header(fh.read(1 << 20))
    swa_layers = header.arch.sliding_window_layers
    assert swa_layers == layers - layers // 6
    arch = Architecture(
        0.0001, layers, width, heads, kv, width // heads, 259,
        sliding_window=GEMMA3_WINDOW, sliding_window_layers=swa_layers,
    )  # fmt: skip
    for context, parallel in GEMMA3_RUNS:
        cells = kv_cells("llama.cpp", context, parallel)
        window = window_cells("llama.cpp", arch, cells, parallel, min(LLAMA_CPP_UBATCH, cells))
        full, swa = reported_iswa_kv(local_cluster, model, context, parallel)
        run = (context, parallel, full, swa)
        assert (full.layers, swa.layers) == (layers - swa_layers, swa_layers), run
        assert (full.cells, swa.cells) == (cells, window), run
        # Each cache prints its own "%.2f" MiB, so each is compared, not their sum (two roundings need not add up to
        # the total's). The full-attention layers alone are the estimate with a zero window.
        total = kv_cache_bytes(arch, cells, "f16", window)
        full_bytes = kv_cache_bytes(arch, cells, "f16", 0)
        assert (full.mib, swa.mib) == (f"{full_bytes / 2**20:.2f}", f"{(total - full_bytes) / 2**20:.2f}"), run
        assert abs(float(full.mib) + float(swa.mib) - total / 2**20) <= 0.01, run


class Compute(NamedTuple):
    """llama-server's 'CPU compute buffer size = X MiB' and the output rows its graph reserves ('n_outputs_max')."""

    mib: float
    outputs: int


def reported_compute(
    local: dict[str, Any], model: Path, context: int, parallel: int, ubatch: int, flash: bool
) -> Compute:
    """Start llama-server (one thread) in a Slurm job as the job script does, read its compute buffer's size."""
    flags = f"-c {context * parallel} --parallel {parallel} -ub {ubatch} -fa {'on' if flash else 'off'} -t 1"
    ready = 'grep -q "compute buffer size" "$log"'
    result = server_lines(local, model, flags, ready, "n_outputs_max +=|compute buffer size")
    mib = re.search(r"CPU compute buffer size =\s*([\d.]+) MiB", result.stdout)
    outputs = re.search(r"n_outputs_max\s+=\s*(\d+)", result.stdout)
    assert mib and outputs, result.stdout + result.stderr
    return Compute(float(mib.group(1)), int(outputs.group(1)))


def compute_estimate(arch: Architecture, context: int, parallel: int, ubatch: int, flash: bool) -> tuple[float, str]:
    est = estimate(
        Request(arch, "fp16", "llama.cpp", context, parallel=parallel, batch_tokens=ubatch, flash_attn=flash)
    )
    return est.compute_gib * 1024, next(note for note in est.notes if note.startswith("compute graph for "))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_compute_buffers_are_llama_servers_own_figure_within_ten_percent(
    shape: tuple[int, int, int, int], models: Path, local_cluster: dict[str, Any]
) -> None:
    layers, width, heads, kv = shape
    arch = Architecture(0.0001, layers, width, heads, kv, width // heads, 259, ffn_size=2 * width)  # tiny-gguf's FFN
    model = models / f"m-{layers}-{width}-{heads}-{kv}.gguf"
    for context, parallel, ubatch, flash in COMPUTE_RUNS:
        theirs = reported_compute(local_cluster, model, context, parallel, ubatch, flash)
        ours, note = compute_estimate(arch, context, parallel, ubatch, flash)
        run = (context, parallel, ubatch, flash, ours, theirs)
        assert ours == pytest.approx(theirs.mib, rel=0.10), run
        # llama-server reserves one output row per slot (n_outputs_max), as the estimate does
        assert theirs.outputs == parallel and f"with {parallel} output row(s)" in note, run


def test_a_sliding_window_models_compute_buffer_is_llama_servers_own_figure(
    models: Path, local_cluster: dict[str, Any]
) -> None:
    """Two caches, two masks: the full layers' over a slot's cells, the window's over its own."""
    layers, width, heads, kv = GEMMA3
    arch = Architecture(
        0.0001, layers, width, heads, kv, width // heads, 259, ffn_size=2 * width, tied_embeddings=True,
        sliding_window=GEMMA3_WINDOW, sliding_window_layers=layers - layers // 6,
    )  # fmt: skip
    for context, parallel, ubatch, flash in COMPUTE_RUNS:
        theirs = reported_compute(local_cluster, models / "gemma3.gguf", context, parallel, ubatch, flash)
        ours, _ = compute_estimate(arch, context, parallel, ubatch, flash)
        assert ours == pytest.approx(theirs.mib, rel=0.10), (context, parallel, ubatch, flash, ours, theirs)


def test_the_binary_the_test_uses_is_the_local_clusters() -> None:
    assert os.path.exists(BINARY)
