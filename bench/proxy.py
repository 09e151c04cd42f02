"""Streaming through the portal's proxy against going direct (and through nginx when it is installed). A benchmark.

    .venv/bin/python bench/proxy.py [--tokens 2000] [--requests 30] [--concurrency 50,100,200,500]

A local backend streams OpenAI-style chunks as fast as it can. The same requests go (1) straight to it, (2) through
the portal (uvicorn, the /api/v1 proxy with a personal token, a scratch SQLite database) and (3) through nginx as a
plain reverse proxy, if `nginx` is on PATH. Printed: tokens/s and its ratio to direct, time to first token (p50, p99)
and what each path adds, and the most concurrent streams held without an error.
Targets: >= 0.97 of direct throughput, <= 3 ms added TTFT at p50, 500 concurrent streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
SCRATCH = Path(tempfile.mkdtemp(prefix="hpcllm-bench-proxy-"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tokens: int) -> None:
    """A minimal OpenAI-compatible streaming server: one response per connection, chunked SSE."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if length:
            await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        chunk = {"choices": [{"index": 0, "delta": {"content": "tok "}}]}
        line = f"data: {json.dumps(chunk)}\n\n".encode()
        for i in range(tokens):
            writer.write(line)
            if i % 64 == 0:
                await writer.drain()
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def start_backend(port: int, tokens: int) -> subprocess.Popen[bytes]:
    code = (
        f"import asyncio, sys; sys.path.insert(0, {str(REPO)!r}); from bench.proxy import backend\n"
        "async def main():\n"
        f"    server = await asyncio.start_server(lambda r, w: backend(r, w, {tokens}), '127.0.0.1', {port}, "
        "backlog=2048)\n"
        "    await server.serve_forever()\n"
        "asyncio.run(main())\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def portal_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(DJANGO_SETTINGS_MODULE="portal.settings", PORTAL_VAR_DIR=str(SCRATCH), PORTAL_LOG_LEVEL="WARNING")
    return env


def prepare_portal(backend_port: int) -> str:
    """Scratch database with a running session pointing at the backend and a token for it; returns the token."""
    script = f"""
import django; django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from catalog.yaml_io import import_file
import_file({str(REPO / "catalog/examples/catalog.yaml")!r})
from django.contrib.auth import get_user_model
from catalog.models import *
from jobs.models import *
KEY = "[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
Cluster.objects.filter(slug="local").update(host_key=KEY, node_access="direct")
user = get_user_model().objects.create_user("bench")
cluster = Cluster.objects.get(slug="local")
account = ClusterAccount(cluster=cluster, user=user, username="bench"); account.save()
partition = Partition.objects.get(cluster=cluster, name="gpu")
Session.objects.create(owner=user, account=account, cluster=cluster, partition=partition,
    gpu_type=GPUType.objects.get(name="a100-80g"), gpus_per_node=1, cpus_per_node=1, memory_gib=1, walltime_min=60,
    variant=ModelVariant.objects.get(model__name="tiny-llama"), runtime=Runtime.objects.get(kind="llama.cpp"),
    context_length=1024, state="running", host="127.0.0.1", port={backend_port}, alias="bench")
print(ApiToken.issue(user, "bench")[1])
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=portal_env(), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return out.stdout.strip().splitlines()[-1]


def start_portal(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "portal.asgi:application", "--port", str(port), "--lifespan", "off",
         "--log-level", "warning", "--backlog", "2048"],
        cwd=REPO, env=portal_env(),
    )  # fmt: skip


def start_nginx(port: int, backend_port: int) -> subprocess.Popen[bytes] | None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        return None
    conf = SCRATCH / "nginx.conf"
    conf.write_text(f"""
daemon off; pid {SCRATCH}/nginx.pid; error_log {SCRATCH}/nginx-error.log; worker_processes 2;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {SCRATCH}/nginx-body;
  server {{ listen 127.0.0.1:{port};
    location / {{ proxy_pass http://127.0.0.1:{backend_port}; proxy_http_version 1.1; proxy_buffering off; }} }} }}
""")
    return subprocess.Popen([nginx, "-c", str(conf)])


async def one(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> tuple[float, float, int]:
    body = {"model": "bench", "messages": [{"role": "user", "content": "x"}], "stream": True}
    start = time.perf_counter()
    first = None
    count = 0
    async with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                count += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - start, end - start, count


async def measure(url: str, headers: dict[str, str], requests: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=60) as client:
        await one(client, url, headers)  # warm up connections and caches
        results = [await one(client, url, headers) for _ in range(requests)]
    ttfts = sorted(r[0] for r in results)
    return {
        "tokens_per_s": sum(r[2] for r in results) / sum(r[1] for r in results),
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "ttft_p99_ms": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] * 1000,
    }


async def concurrent(url: str, headers: dict[str, str], n: int) -> int:
    limits = httpx.Limits(max_connections=n + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        results = await asyncio.gather(*(one(client, url, headers) for _ in range(n)), return_exceptions=True)
    return sum(1 for r in results if isinstance(r, BaseException))


def wait_up(url: str) -> None:
    for _ in range(200):
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--concurrency", default="50,100,200,500")
    args = parser.parse_args()
    backend_port, portal_port, nginx_port = free_port(), free_port(), free_port()
    processes = [start_backend(backend_port, args.tokens)]
    token = prepare_portal(backend_port)
    processes.append(start_portal(portal_port))
    nginx = start_nginx(nginx_port, backend_port)
    if nginx:
        processes.append(nginx)
    try:
        wait_up(f"http://127.0.0.1:{portal_port}/healthz")
        paths = {
            "direct": (f"http://127.0.0.1:{backend_port}/v1/chat/completions", {}),
            "portal": (f"http://127.0.0.1:{portal_port}/api/v1/chat/completions", {"Authorization": f"Bearer {token}"}),
        }
        if nginx:
            time.sleep(0.5)
            paths["nginx"] = (f"http://127.0.0.1:{nginx_port}/v1/chat/completions", {})
        else:
            print("nginx not installed (apt-get install nginx-light): measuring direct and portal only")
        results = {name: asyncio.run(measure(url, headers, args.requests)) for name, (url, headers) in paths.items()}
        base = results["direct"]
        header = ("path", "tokens/s", "ratio", "TTFT p50 ms", "added", "TTFT p99 ms", "added")
        print("{:<8} {:>12} {:>6} {:>12} {:>7} {:>12} {:>7}".format(*header))
        for name, r in results.items():
            print(
                f"{name:<8} {r['tokens_per_s']:>12.0f} {r['tokens_per_s'] / base['tokens_per_s']:>6.3f} "
                f"{r['ttft_p50_ms']:>12.2f} {r['ttft_p50_ms'] - base['ttft_p50_ms']:>7.2f} "
                f"{r['ttft_p99_ms']:>12.2f} {r['ttft_p99_ms'] - base['ttft_p99_ms']:>7.2f}"
            )
        url, headers = paths["portal"]
        held = 0
        for n in [int(x) for x in args.concurrency.split(",")]:
            errors = asyncio.run(concurrent(url, headers, n))
            print(f"portal: {n} concurrent streams, {errors} errors")
            if errors:
                break
            held = n
        print(f"most concurrent streams held through the portal without an error: {held}")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


if __name__ == "__main__":
    main()
