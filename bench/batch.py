"""A batch run through the portal's runner against the same prompts sent straight to llama-server. A benchmark, not a
test.

    .venv/bin/python bench/batch.py [--prompts 1000] [--concurrency 4] [--max-tokens 32] [--rounds 3]

The portal's batch path is batchrun.py on the compute node (docs/batch.md): it reads the checked requests, sends
them to the server with `--concurrency` in flight, and records every answer exactly once (an fsynced line each).
The baseline is the least a script could do: the same requests, the same concurrency, answers kept in memory and
written once at the end. Both against one llama-server (scripts/build-llama-cpp) with the tiny random model and
`ignore_eos`, so every answer has the same length; the paths alternate over the rounds so that drift on a shared
machine falls on both. Printed: prompts/s and completion tokens/s of each, and the ratio (target >= 0.95).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

from jobs.batch.inputs import Options, normalize  # noqa: E402  (plain Python: no Django set-up needed)

LLAMA_BIN = Path("/var/cache/hpc-llm-portal/llama.cpp/0.3.36/bin")
KEY = "sk-hpcllm-bench"
SCRATCH = Path(tempfile.mkdtemp(prefix="hpcllm-bench-batch-"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, parallel: int) -> subprocess.Popen[bytes]:
    model = SCRATCH / "tiny.gguf"
    subprocess.run([sys.executable, str(REPO / "scripts/tiny-gguf"), str(model)], check=True, capture_output=True)
    (SCRATCH / "key").write_text(KEY)
    return subprocess.Popen(
        [str(LLAMA_BIN / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
         "--api-key-file", str(SCRATCH / "key"), "-c", str(1024 * parallel), "--parallel", str(parallel),
         "--no-webui"],
        env={**os.environ, "LD_LIBRARY_PATH": str(LLAMA_BIN)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_up(port: int) -> None:
    for _ in range(600):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("llama-server did not come up")


def requests_file(prompts: int, max_tokens: int) -> Path:
    text = "\n".join(f"Write about the number {i}." for i in range(prompts)).encode()
    out = io.BytesIO()
    options = Options(format="text", defaults={"max_tokens": max_tokens, "temperature": 0})
    normalize(io.BytesIO(text), out, options)
    path = SCRATCH / "requests.jsonl"
    # ignore_eos is llama-server's: every answer as long as max_tokens, so both paths do the same work.
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    path.write_text("".join(json.dumps({**r, "body": {**r["body"], "ignore_eos": True}}) + "\n" for r in lines))
    return path


def direct(port: int, requests: Path, concurrency: int) -> tuple[float, int]:
    """The baseline: threads sending the requests, answers kept in memory and written once at the end."""
    lines = [json.loads(line) for line in requests.read_text().splitlines()]
    answers: list[dict[str, Any]] = [{} for _ in lines]
    next_index = iter(range(len(lines)))
    lock = threading.Lock()

    def work() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            body = json.dumps({**lines[i]["body"], "model": "bench"})
            connection.request("POST", lines[i]["url"], body,
                               {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})  # fmt: skip
            answers[i] = json.loads(connection.getresponse().read())

    start = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (SCRATCH / "direct.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    elapsed = time.perf_counter() - start
    tokens = sum(int(a.get("usage", {}).get("completion_tokens", 0)) for a in answers)
    return elapsed, tokens


def runner(port: int, requests: Path, concurrency: int, round_: int) -> tuple[float, int]:
    """The portal's path: batchrun.py, as the job starts it."""
    run_dir = SCRATCH / f"run-{round_}"
    run_dir.mkdir()
    server = str(httpx.URL(scheme="http", host="127.0.0.1", port=port))
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(REPO / "jobs/cluster/scripts/batchrun.py"), "--requests", str(requests),
         "--results", str(run_dir / "results.jsonl"), "--progress", str(run_dir / "progress.json"),
         "--output", str(run_dir / "output.jsonl"), "--server", server,
         "--key-file", str(SCRATCH / "key"), "--model", "bench", "--concurrency", str(concurrency)],
        check=True,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["state"] == "finished" and progress["failed"] == 0, progress
    return elapsed, int(progress["completion_tokens"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not (LLAMA_BIN / "llama-server").exists():
        raise SystemExit(f"llama-server is not built ({LLAMA_BIN}): run scripts/build-llama-cpp")
    port = free_port()
    server = start_server(port, args.concurrency)
    try:
        wait_up(port)
        requests = requests_file(args.prompts, args.max_tokens)
        direct(port, requests, args.concurrency)  # warm-up
        totals: dict[str, list[float]] = {"direct": [0.0, 0.0], "runner": [0.0, 0.0]}
        for round_ in range(args.rounds):
            for name in ("direct", "runner") if round_ % 2 == 0 else ("runner", "direct"):
                if name == "direct":
                    elapsed, tokens = direct(port, requests, args.concurrency)
                else:
                    elapsed, tokens = runner(port, requests, args.concurrency, round_)
                totals[name][0] += elapsed
                totals[name][1] += tokens
        prompts = args.prompts * args.rounds
        print(f"{args.prompts} prompts x {args.rounds} rounds, {args.concurrency} at a time, "
              f"{args.max_tokens} tokens each, tiny model on llama-server (CPU)")  # fmt: skip
        print(f"{'path':<8} {'prompts/s':>10} {'tokens/s':>10} {'ratio':>6}")
        base = prompts / totals["direct"][0]
        for name, (seconds, completion) in totals.items():
            rate = prompts / seconds
            print(f"{name:<8} {rate:>10.1f} {completion / seconds:>10.0f} {rate / base:>6.3f}")
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
