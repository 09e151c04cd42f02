"""The estimator's KV cache bytes equal what llama-server reports when it loads tiny models on the local cluster."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from catalog.architecture import Architecture
from catalog.estimate import kv_cache_bytes, kv_cells
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


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kv_bytes_equal_llama_servers_own_figure(
    shape: tuple[int, int, int, int], models: Path, local_cluster: dict[str, Any]
) -> None:
    layers, width, heads, kv = shape
    binary = "/var/cache/hpc-llm-portal/llama.cpp/0.3.36/bin/llama-server"
    arch = Architecture(0.0001, layers, width, heads, kv, width // heads, 259)
    model = models / f"m-{layers}-{width}-{heads}-{kv}.gguf"
    for context, flags, kv_type in RUNS:
        if kv_type != "f16" and (width // heads) % 32:
            continue  # llama.cpp refuses quantised K rows that its 32-value blocks do not divide (tested in unit tests)
        ours = kv_cache_bytes(arch, kv_cells("llama.cpp", context), kv_type) / 2**20
        theirs, cells = reported_kv(local_cluster, binary, model, context, flags)
        assert cells == kv_cells("llama.cpp", context)
        # llama.cpp prints MiB with printf's "%.2f"; Python's formatting rounds the same way.
        assert f"{ours:.2f}" == theirs, (context, kv_type, ours, theirs)


def test_the_binary_the_test_uses_is_the_local_clusters() -> None:
    assert os.path.exists("/var/cache/hpc-llm-portal/llama.cpp/0.3.36/bin/llama-server")
