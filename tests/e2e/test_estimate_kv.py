"""The estimator's KV cache bytes equal what llama-server reports when it loads tiny models on the local cluster:
llama models (one cache), and a gemma3 model with a sliding window (a full cache and a smaller sliding-window one)."""

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
from catalog.estimate import LLAMA_CPP_UBATCH, kv_cache_bytes, kv_cells, window_cells
from catalog.gguf import read_header
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


def reported_kv(local: dict[str, Any], binary: str, model: Path, context: int, flags: str) -> tuple[str, int]:
    """Start llama-server in a Slurm job on the local cluster, read its 'llama_kv_cache: size = X MiB' line.
    Its port is below Linux's ephemeral range (32768 on), where the test's own connections could hold it."""
    script = (
        f"log=$(mktemp); {shlex.quote(binary)} -m {shlex.quote(str(model))} -c {context} {flags} -lv 4 "
        '--host 127.0.0.1 --port $((20000 + RANDOM % 12000)) >"$log" 2>&1 & pid=$!; '
        'for _ in $(seq 200); do grep -m1 "llama_kv_cache: size" "$log" && break; sleep 0.1; done; '
        'kill $pid; grep -m3 " E " "$log" >&2; rm -f "$log"'
    )
    command = f"timeout 90 srun -p gpu -t 2 -N1 --gres=gpu:a100:1 bash -c {shlex.quote(script)}"
    result = shell(local, command)
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
    script = (
        f"log=$(mktemp); {shlex.quote(BINARY)} -m {shlex.quote(str(model))} -c {context * parallel} "
        f"--parallel {parallel} -lv 4 "
        '--host 127.0.0.1 --port $((20000 + RANDOM % 12000)) >"$log" 2>&1 & pid=$!; '
        'for _ in $(seq 200); do [ "$(grep -c "llama_kv_cache: size" "$log")" -ge 2 ] && break; sleep 0.1; done; '
        'grep -E "llama_kv_cache(_iswa: creating|: size)" "$log"; kill $pid; grep -m3 " E " "$log" >&2; rm -f "$log"'
    )
    command = f"timeout 90 srun -p gpu -t 2 -N1 --gres=gpu:a100:1 bash -c {shlex.quote(script)}"
    result = shell(local, command)
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
        theirs, cells = reported_kv(local_cluster, BINARY, model, context, flags)
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


def test_the_binary_the_test_uses_is_the_local_clusters() -> None:
    assert os.path.exists(BINARY)
