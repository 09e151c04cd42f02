"""What the authenticated RPC relay costs a two-node llama.cpp session. A benchmark, not a test.

    .venv/bin/python bench/rpc_relay.py [--rounds 3] [--tokens 64] [--layers 8] [--width 1024]

The processes of a two-node session as its job script starts them, on this host (the local cluster's nodes are all
this host): ggml-rpc-server for the second node and llama-server with --rpc on the first, with -ngl 999 so every
layer lives on the RPC server and each token's compute crosses the connection. Two paths in the same run:

- direct: llama-server --rpc straight to ggml-rpc-server (what the portal did before, with no authentication);
- relay: llama-server -> rpcrelay.py connect -> rpcrelay.py serve -> ggml-rpc-server on loopback (what it does now).

The model is a random-weight f16 llama written by scripts/tiny-gguf (about 140 MB at the defaults), large enough that
loading it is mostly weights crossing the connection. Printed per path, as medians over the rounds (paths
alternate, so drift hits both): load time (llama-server start to /health 200), generation tokens/s and prompt
tokens/s from llama-server's own timings; then relay / direct ratios. Target: load time <= 1.25x, tokens/s >= 0.8x.
Needs llama.cpp built by scripts/build-llama-cpp.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
LLAMA_BIN = Path(os.environ.get("LLAMA_CPP_CACHE", "/var/cache/hpc-llm-portal/llama.cpp")) / "0.3.36" / "bin"
RELAY = REPO / "jobs" / "cluster" / "scripts" / "rpcrelay.py"
SCRATCH = Path(tempfile.mkdtemp(prefix="hpcllm-bench-rpc-"))
PROMPT = "Write a long story about a cluster of computers that learned to share. " * 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command_name(process)} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def command_name(process: subprocess.Popen[bytes]) -> str:
    return str(process.args[0]) if isinstance(process.args, list) else str(process.args)


@contextmanager
def started(command: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "LD_LIBRARY_PATH": str(LLAMA_BIN)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def rpc_endpoint(relay: bool, key_file: Path) -> Iterator[int]:
    """ggml-rpc-server, and the relays in front of it when asked; yields the port llama-server's --rpc names."""
    inner = free_port()
    with started([str(LLAMA_BIN / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(inner)], inner):
        if not relay:
            yield inner
            return
        outer, local = free_port(), free_port()
        serve = [sys.executable, str(RELAY), "serve", "--listen", "127.0.0.1", "--port", str(outer),
                 "--upstream-port", str(inner), "--key-file", str(key_file)]  # fmt: skip
        connect = [sys.executable, str(RELAY), "connect", "--map", f"{local}=127.0.0.1:{outer}",
                   "--key-file", str(key_file)]  # fmt: skip
        with started(serve, outer), started(connect, local):
            yield local


def one_round(model: Path, relay: bool, key_file: Path, tokens: int) -> tuple[float, float, float]:
    """Load time (s), generation tokens/s, prompt tokens/s."""
    with rpc_endpoint(relay, key_file) as rpc_port:
        port = free_port()
        command = [str(LLAMA_BIN / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                   "-ngl", "999", "--rpc", f"127.0.0.1:{rpc_port}", "-c", "2048", "--no-webui"]  # fmt: skip
        began = time.monotonic()
        with started(command, port):
            url = httpx.URL(scheme="http", host="127.0.0.1", port=port)
            while True:
                try:
                    if httpx.get(url.copy_with(path="/health"), timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            load_s = time.monotonic() - began
            generation, prompt = [], []
            for _ in range(3):
                body = {"prompt": PROMPT, "n_predict": tokens, "temperature": 0, "cache_prompt": False}
                timings = httpx.post(url.copy_with(path="/completion"), json=body, timeout=600).json()["timings"]
                generation.append(timings["predicted_per_second"])
                prompt.append(timings["prompt_per_second"])
            return load_s, statistics.median(generation), statistics.median(prompt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()
    if not (LLAMA_BIN / "ggml-rpc-server").exists():
        print(f"llama.cpp is not built ({LLAMA_BIN}): run scripts/build-llama-cpp first")
        return
    model = SCRATCH / "bench.gguf"
    subprocess.run(
        [sys.executable, str(REPO / "scripts/tiny-gguf"), str(model), "--layers", str(args.layers),
         "--width", str(args.width), "--heads", "16", "--kv-heads", "4"],
        check=True, capture_output=True,
    )  # fmt: skip
    key_file = SCRATCH / "rpc_key"
    key_file.write_text(secrets.token_hex(32))
    size_mb = model.stat().st_size / 1e6
    results: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for relay in (False, True):
            results[relay].append(one_round(model, relay, key_file, args.tokens))

    def median(relay: bool, i: int) -> float:
        return statistics.median(r[i] for r in results[relay])

    print(f"two-node llama.cpp over RPC, {size_mb:.0f} MB f16 model, {args.rounds} rounds, {args.tokens} tokens")
    print(f"{'path':<8}{'load s':>10}{'gen tok/s':>12}{'prompt tok/s':>14}")
    for relay, name in ((False, "direct"), (True, "relay")):
        print(f"{name:<8}{median(relay, 0):>10.2f}{median(relay, 1):>12.1f}{median(relay, 2):>14.1f}")
    load, gen, prompt = (median(True, i) / median(False, i) for i in range(3))
    print(f"ratio relay/direct: load time {load:.2f}x (target <= 1.25x), generation {gen:.2f}x and prompt "
          f"{prompt:.2f}x of direct tokens/s (target >= 0.8x)")  # fmt: skip


if __name__ == "__main__":
    main()
