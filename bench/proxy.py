"""Streaming through the portal's proxy against going direct and through nginx. A benchmark, not a test.

    .venv/bin/python bench/proxy.py [--tokens 20000] [--requests 30] [--ttft-requests 500] [--concurrency 100,...,1000]

Five paths to the same server, measured in one run: (1) straight to it, (2) through the portal's API (uvicorn as
scripts/serve runs it, the /api/v1 proxy with a personal token, a scratch SQLite database), (3) through the portal's
browser route, as the chat page calls it (/sessions/<uuid>/v1/ with a signed-in session cookie and the CSRF header),
(4) through nginx as a plain reverse proxy (`apt-get install nginx-light`; left out with a note when it is
missing) and (5) through a bare TCP relay (`relay`: bytes in, bytes out, on the portal's CPU). The servers:

- a local OpenAI-style server (keep-alive, one chunk per token like llama-server). It streams as fast as it can for
  the throughput figure, and paced (first token at once, then one a millisecond) for time to first token: an
  unpaced stream keeps both cores of a small machine busy, and then the first token of the next request waits for CPU
  rather than for the proxy;
- the real llama-server (built by scripts/build-llama-cpp) with a tiny random model, when the build is there;
- real vLLM (the CPU build of scripts/build-torch-runtimes) with SmolLM2-135M-Instruct as safetensors (scripts/
  fetch-models --safetensors), when both are there. As in a session, the portal reaches it through keyproxy.py (the
  node's key check); the table also shows keyproxy.py alone, so what each hop adds is seen apart.

Printed per server and path: stream throughput (tokens/s from the first token to the last), end-to-end tokens/s
(request to last token), time to first token p50/p99 and what each path adds, for the paths through the portal its
CPU time per request (`CPU ms`: all its threads, read from /proc before and after each request and its deferred
usage row; the portal's own cost, which a busy machine's scheduling delays do not inflate as they inflate the
clocks), and llama-server's own decode rate (its `timings`). The relay shows what any hop costs on a small
machine: the client and the server share one half of the CPUs and every proxy the other, and a second CPU reading
the stream slows llama-server's own decoding (by a sixth to a quarter on this machine's two vCPUs, through the relay
as through the portal), so throughput against direct measures the machine as much as the proxy, and against the
relay the portal's own. Then the most concurrent
streams the portal held open at once without an error (streams of 150 tokens at 10 tokens/s, so that they overlap) with
the portal's memory per stream (its RSS at the peak less before, over the streams); last, the targets of issue 18
beside the figures: against llama-server, through both portal routes, <= 1.5 ms added TTFT at p50 and <= 5 ms at p99
and >= 0.99 of direct stream throughput; 1,000 streams open at once through one uvicorn worker with no error; and
issue 27's: Anthropic's Messages route (/api/v1/messages, the token in x-api-key) adds at most 0.3 ms more time to
first token at p50 than the chat route, both to the same paced server in the same run, request by request (and,
reported beside it, llama-server's own /v1/messages direct and through the portal).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
SCRATCH = Path(tempfile.mkdtemp(prefix="hpcllm-bench-proxy-"))
LLAMA_BIN = Path("/var/cache/hpc-llm-portal/llama.cpp/0.3.36/bin")
VLLM_PYTHON = Path("/var/cache/hpc-llm-portal/torch-runtimes/vllm-0.32.0/bin/python")
SMOLLM2_HF = Path("/var/cache/hpc-llm-portal/models/SmolLM2-135M-Instruct")
TTFT_TOKENS = 32
PACE_S = 0.001
TARGET_TTFT_P50_MS = 1.5  # added by the portal, against llama-server (issue 18)
TARGET_TTFT_P99_MS = 5.0
TARGET_STREAM_RATIO = 0.99
TARGET_ROUTE_GAP_MS = 0.3  # Anthropic's Messages route adds at most this much more TTFT than chat (issue 27)
TARGET_STREAMS = 1000


def raise_fd_limit() -> int:
    """The soft limit on open files up to the hard one, for this process and the servers it starts: 1,000 streams
    hold about 4,000 descriptors here (the client's, the portal's two per stream, the stand-in server's), and a soft
    limit of 1,024 is common."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A minimal OpenAI-compatible streaming server with keep-alive.

    The request's max_tokens sets the reply's length, and its `bench_pace_s` the pause between tokens (0: as fast as
    the socket takes them). Each token is one HTTP chunk, as llama-server sends them.
    """
    chunk = {"choices": [{"index": 0, "delta": {"content": "tok "}}]}
    event = f"data: {json.dumps(chunk)}\n\n".encode()
    framed = b"%x\r\n%s\r\n" % (len(event), event)
    done = b"data: [DONE]\n\n"
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = json.loads(await reader.readexactly(length)) if length else {}
            tokens, pace = int(body.get("max_tokens", 16)), float(body.get("bench_pace_s", 0))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(tokens):
                writer.write(framed)
                if pace:
                    await writer.drain()
                    await asyncio.sleep(pace)
                elif i % 64 == 0:
                    await writer.drain()
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def relay_bytes(upstream_port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A bare TCP relay: the bytes of one connection to the server and back, nothing read or checked (the least any
    hop on the proxies' CPUs can cost; on a small machine even this one slows the server, see `relay` below)."""
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()

    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def start_relay(port: int, upstream_port: int) -> subprocess.Popen[bytes]:
    code = (
        f"import asyncio, functools, sys; sys.path.insert(0, {str(REPO)!r}); from bench.proxy import relay_bytes\n"
        "import uvloop\n"
        "async def main():\n"
        f"    handler = functools.partial(relay_bytes, {upstream_port})\n"
        f"    server = await asyncio.start_server(handler, '127.0.0.1', {port}, backlog=4096)\n"
        "    await server.serve_forever()\n"
        "uvloop.run(main())\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def start_backend(port: int) -> subprocess.Popen[bytes]:
    code = (
        f"import asyncio, sys; sys.path.insert(0, {str(REPO)!r}); from bench.proxy import backend\n"
        "async def main():\n"
        f"    server = await asyncio.start_server(backend, '127.0.0.1', {port}, backlog=4096)\n"
        "    await server.serve_forever()\n"
        "asyncio.run(main())\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def start_llama_server(port: int, key_file: Path) -> subprocess.Popen[bytes] | None:
    if not (LLAMA_BIN / "llama-server").exists():
        return None
    model = SCRATCH / "tiny.gguf"
    subprocess.run([sys.executable, str(REPO / "scripts/tiny-gguf"), str(model)], check=True, capture_output=True)
    return subprocess.Popen(
        [str(LLAMA_BIN / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
         "--api-key-file", str(key_file), "-c", "2048", "--parallel", "1", "--no-webui", "--threads", "1"],
        env={**os.environ, "LD_LIBRARY_PATH": str(LLAMA_BIN)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def start_vllm(port: int, proxy_port: int, key_file: Path, name: str) -> list[subprocess.Popen[bytes]]:
    """vLLM on 127.0.0.1:port (the direct path), and keyproxy.py in front of it on proxy_port. As in a session, vLLM
    itself has no key (keyproxy.py checks it, and forwards no Authorization header)."""
    if not (VLLM_PYTHON.exists() and (SMOLLM2_HF / "config.json").exists()):
        return []
    run_dir = SCRATCH / "vllm"
    (run_dir / "tmp").mkdir(parents=True)
    env = {**os.environ, "TMPDIR": str(run_dir / "tmp"), "XDG_CACHE_HOME": str(run_dir / "cache"),
           "VLLM_CACHE_ROOT": str(run_dir / "cache/vllm"), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    vllm = subprocess.Popen(
        [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(SMOLLM2_HF),
         "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
         "--max-model-len", "2048", "--max-num-seqs", "1", "--enforce-eager", "--kv-cache-memory-bytes", "64M"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    keyproxy = subprocess.Popen(
        [sys.executable, str(REPO / "jobs/cluster/scripts/keyproxy.py"), "--listen", "127.0.0.1", "--port",
         str(proxy_port), "--upstream-port", str(port), "--key-file", str(key_file)],
    )  # fmt: skip
    return [vllm, keyproxy]


def split_cpus() -> set[int]:
    """This process (the client) and the servers on one half of the CPUs, the proxies on the other (returned).

    In production the portal does not share a CPU with the model server or with its clients; on one small machine
    they would otherwise take CPU from each other, and the proxy's cost would show up as a slower llama-server.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("one CPU: client, servers and proxies share it")
        return set(cpus)
    load, proxies = set(cpus[: len(cpus) // 2]), set(cpus[len(cpus) // 2 :])
    os.sched_setaffinity(0, load)  # the servers started from here inherit it
    print(f"CPUs {sorted(load)}: this client and the servers; CPUs {sorted(proxies)}: the portal and nginx")
    return proxies


def pin(process: subprocess.Popen[bytes] | None, cpus: set[int]) -> subprocess.Popen[bytes] | None:
    if process is not None:
        os.sched_setaffinity(process.pid, cpus)
    return process


def portal_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(DJANGO_SETTINGS_MODULE="portal.settings", PORTAL_VAR_DIR=str(SCRATCH), PORTAL_LOG_LEVEL="WARNING")
    # One token makes every request here, thousands a minute: the limit is set out of reach, not off, so that the
    # counting stays on each request's path as in production.
    env["PORTAL_API_REQUESTS_PER_MINUTE"] = str(10**9)
    return env


def prepare_portal(ports: dict[str, int]) -> tuple[str, dict[str, str]]:
    """A scratch database with one running session per server, a token and a signed-in browser; returns the token,
    and the session keys (by alias), their uuids ("<alias>:pk") and the browser's cookie and CSRF header."""
    script = f"""
import django, json; django.setup()
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
keys = {{}}
for alias, port in {ports!r}.items():
    session = LLMSession.objects.create(owner=user, account=account, cluster=cluster,
        partition=Partition.objects.get(cluster=cluster, name="gpu"), gpu_type=GPUType.objects.get(name="a100-80g"),
        gpus_per_node=1, cpus_per_node=1, memory_gib=1, walltime_min=60,
        variant=ModelVariant.objects.get(model__name="tiny-llama"), runtime=Runtime.objects.get(kind="llama.cpp"),
        context_length=1024, state="running", host="127.0.0.1", port=port, alias=alias)
    keys[alias] = session.api_key
    keys[alias + ":pk"] = str(session.pk)
keys["served_name"] = session.served_model_name  # what the portal calls the model upstream
# A signed-in browser, as after the sign-in page: a session cookie and the CSRF cookie the chat page's header repeats.
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore
from django.middleware.csrf import _get_new_csrf_string
store = SessionStore()
store.update({{SESSION_KEY: str(user.pk), BACKEND_SESSION_KEY: "django.contrib.auth.backends.ModelBackend",
              HASH_SESSION_KEY: user.get_session_auth_hash()}})
store.create()
csrf = _get_new_csrf_string()
keys["cookie"] = f"{{settings.SESSION_COOKIE_NAME}}={{store.session_key}}; {{settings.CSRF_COOKIE_NAME}}={{csrf}}"
keys["csrf_header"] = settings.CSRF_HEADER_NAME.removeprefix("HTTP_").replace("_", "-")
keys["csrf"] = csrf
print(json.dumps({{"token": ApiToken.issue(user, "bench")[1], "keys": keys}}))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=portal_env(), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["token"], result["keys"]


def start_portal(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "portal.asgi:application", "--port", str(port), "--lifespan", "off",
         "--log-level", "warning", "--backlog", "4096"],
        cwd=REPO, env=portal_env(),
    )  # fmt: skip


def start_nginx(port: int, upstreams: dict[str, int]) -> subprocess.Popen[bytes] | None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        return None
    locations = "".join(
        f"location /{name}/ {{ proxy_pass http://127.0.0.1:{upstream}/; proxy_http_version 1.1; "
        'proxy_set_header Connection ""; proxy_buffering off; }\n'
        for name, upstream in upstreams.items()
    )
    conf = SCRATCH / "nginx.conf"
    conf.write_text(f"""
daemon off; pid {SCRATCH}/nginx.pid; error_log {SCRATCH}/nginx-error.log; worker_processes 2;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {SCRATCH}/nginx-body;
  server {{ listen 127.0.0.1:{port};
{locations} }} }}
""")
    return subprocess.Popen([nginx, "-c", str(conf)])


@dataclass
class Stream:
    ttft: float  # request sent to first token
    total: float  # request sent to last token
    tokens: int
    decode: float | None = None  # the server's own tokens/s while it generated (llama-server's `timings`)

    @property
    def streaming(self) -> float:
        return self.total - self.ttft


async def one(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, object]) -> Stream:
    start = time.perf_counter()
    first = last = None
    count, decode = 0, None
    async with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                last = time.perf_counter()
                count += 1
                if first is None:
                    first = last
                if '"timings"' in line:
                    decode = json.loads(line[6:]).get("timings", {}).get("predicted_per_second")
    end = last or time.perf_counter()
    return Stream((first or end) - start, end - start, count, decode)


PORTAL_PATHS = ("portal", "browser", "chat", "messages")  # the paths the portal serves: its CPU is read on these
SETTLE_S = 0.005  # after a stream through the portal, for its deferred work (the usage row) to count to that request
_portal_pid: int | None = None


def cpu_ns(pid: int) -> int:
    """The CPU time all threads of a process have run (Linux's schedstat, in ns): the portal's cost of a request,
    which a busy machine's scheduling delays do not inflate as they inflate the wall-clock times."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended
            continue
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def measure(
    paths: dict[str, tuple[str, dict[str, str]]],
    body: dict[str, object],
    requests: int,
    models: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Each path in turn, request by request, so that drift on a shared machine falls on all of them alike. `models`:
    the model to name on a path, where it is not the body's (the portal names a session, the server its model)."""
    clients = {name: httpx.AsyncClient(timeout=120) for name in paths}
    streams: dict[str, list[Stream]] = {name: [] for name in paths}
    cpu: dict[str, list[int]] = {name: [] for name in paths if name in PORTAL_PATHS}
    try:
        for round_ in range(3 + requests):  # three rounds warm up connections, caches and the first lookups
            for name, (url, headers) in paths.items():
                sent = {**body, "model": models[name]} if models and name in models else body
                counted = _portal_pid is not None and name in cpu and round_ >= 3
                before = cpu_ns(_portal_pid) if counted and _portal_pid else 0
                stream = await one(clients[name], url, headers, sent)
                if counted and _portal_pid:
                    await asyncio.sleep(SETTLE_S)
                    cpu[name].append(cpu_ns(_portal_pid) - before)
                if round_ >= 3:
                    streams[name].append(stream)
    finally:
        for client in clients.values():
            await client.aclose()
    results = {}
    for name, measured in streams.items():
        ttfts = [s.ttft for s in measured]
        results[name] = {
            "stream": sum(s.tokens - 1 for s in measured) / max(1e-9, sum(s.streaming for s in measured)),
            "end_to_end": sum(s.tokens for s in measured) / sum(s.total for s in measured),
            "ttft_p50_ms": statistics.median(ttfts) * 1000,
            "ttft_p99_ms": percentile(ttfts, 0.99) * 1000,
        }
        if cpu.get(name):
            results[name]["cpu_ms"] = statistics.fmean(cpu[name]) / 1e6
        decodes = [s.decode for s in measured if s.decode]
        if decodes:
            results[name]["decode"] = statistics.median(decodes)
    return results


def rss_bytes(pid: int) -> int:
    """The resident memory of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Held:
    streams: int
    errors: int
    peak: int  # the most streams open at the same moment
    rss_before: int  # the portal's, bytes
    rss_peak: int
    first_error: str = ""

    @property
    def bytes_per_stream(self) -> float:
        return (self.rss_peak - self.rss_before) / max(1, self.peak)


async def concurrent(url: str, headers: dict[str, str], n: int, portal_pid: int, rss_before: int) -> Held:
    """n paced streams at once; returns the errors, the most that were open at the same moment and the portal's
    memory at that moment (and `rss_before`, read before the first of these runs: a worker keeps what it grew to).

    Each stream lasts 15 s (150 tokens at 10 tokens/s, a large model's pace on a shared GPU): long enough for all of
    them to be open before the first ends. At 50 tokens/s, 1,000 streams are 50,000 events a second, which this
    one-CPU Python client and stand-in server cannot send and read, so streams ended before the last had opened."""
    body = {"model": "fast", "max_tokens": 150, "bench_pace_s": 0.1, "stream": True}
    open_now = peak = 0
    rss_peak = rss_bytes(portal_pid)

    async def tracked(client: httpx.AsyncClient) -> None:
        nonlocal open_now, peak, rss_peak
        async with client.stream("POST", url, json=body, headers=headers) as response:
            response.raise_for_status()
            lines = response.aiter_lines()
            async for line in lines:
                if line.startswith("data: {"):
                    break
            open_now += 1
            if open_now > peak:
                peak = open_now
                if peak % 50 == 0 or peak == n:  # /proc is read now and then, not at every stream
                    rss_peak = max(rss_peak, rss_bytes(portal_pid))
            try:
                async for _ in lines:
                    pass
            finally:
                open_now -= 1

    limits = httpx.Limits(max_connections=n + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        results = await asyncio.gather(*(tracked(client) for _ in range(n)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    first = f"{type(errors[0]).__name__}: {errors[0]}" if errors else ""
    return Held(n, len(errors), peak, rss_before, rss_peak, first)


def here(port: int, path: str) -> str:
    """A URL on this machine, built from its parts (never formatted: the portal's rule for a model server's URL)."""
    return str(httpx.URL(scheme="http", host="127.0.0.1", port=port, path=path))


def wait_up(url: str, headers: dict[str, str] | None = None, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def table(title: str, results: dict[str, dict[str, float]]) -> None:
    base = results["direct"]
    print(f"\n{title}")
    header = ("path", "stream tok/s", "ratio", "e2e tok/s", "ratio", "TTFT p50 ms", "added", "TTFT p99 ms", "added")
    print("{:<7} {:>12} {:>6} {:>10} {:>6} {:>11} {:>6} {:>11} {:>6} {:>8}".format(*header, "CPU ms"))
    for name, r in results.items():
        print(
            f"{name:<7} {r['stream']:>12.0f} {r['stream'] / base['stream']:>6.3f} {r['end_to_end']:>10.0f} "
            f"{r['end_to_end'] / base['end_to_end']:>6.3f} {r['ttft_p50_ms']:>11.2f} "
            f"{r['ttft_p50_ms'] - base['ttft_p50_ms']:>6.2f} {r['ttft_p99_ms']:>11.2f} "
            f"{r['ttft_p99_ms'] - base['ttft_p99_ms']:>6.2f}" + (f" {r['cpu_ms']:>8.2f}" if "cpu_ms" in r else "")
        )


@dataclass
class Target:
    what: str
    target: str
    measured: str
    met: bool | None  # None: not measured in this run


def ttft_targets(server: str, results: dict[str, dict[str, float]]) -> list[Target]:
    """The issue's figures for each portal route against `server`."""
    base = results["direct"]
    found = []
    for route in ("portal", "browser"):
        if route not in results:
            continue
        r = results[route]
        p50, p99 = r["ttft_p50_ms"] - base["ttft_p50_ms"], r["ttft_p99_ms"] - base["ttft_p99_ms"]
        ratio = r["stream"] / base["stream"]
        relayed = f" (a bare relay: {results['relay']['stream'] / base['stream']:.3f})" if "relay" in results else ""
        found += [
            Target(f"{route}: added TTFT p50, {server}", f"<= {TARGET_TTFT_P50_MS} ms", f"{p50:.2f} ms",
                   p50 <= TARGET_TTFT_P50_MS),
            Target(f"{route}: added TTFT p99, {server}", f"<= {TARGET_TTFT_P99_MS} ms", f"{p99:.2f} ms",
                   p99 <= TARGET_TTFT_P99_MS),
            Target(f"{route}: stream throughput, {server}", f">= {TARGET_STREAM_RATIO} of direct",
                   f"{ratio:.3f}{relayed}", ratio >= TARGET_STREAM_RATIO),
        ]  # fmt: skip
    return found


def print_targets(found: list[Target]) -> None:
    print("\ntargets (issues 18 and 27)")
    width = max(len(t.what) for t in found)
    print(f"{'figure':<{width}}  {'target':>18}  {'measured':>18}  met")
    for t in found:
        met = "n/a" if t.met is None else "yes" if t.met else "NO"
        print(f"{t.what:<{width}}  {t.target:>18}  {t.measured:>18}  {met}")


def run_paths(
    paths: dict[str, tuple[str, dict[str, str]]],
    body: dict[str, object],
    n: int,
    models: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    return asyncio.run(measure(paths, body, n, models))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=20000, help="tokens per fast stream (throughput)")
    parser.add_argument("--requests", type=int, default=30, help="fast streams per path")
    parser.add_argument("--ttft-requests", type=int, default=500, help="paced streams per path (TTFT)")
    parser.add_argument("--llama-tokens", type=int, default=256, help="tokens per llama-server reply")
    parser.add_argument("--vllm-tokens", type=int, default=64, help="tokens per vLLM reply")
    parser.add_argument("--vllm-requests", type=int, default=10, help="vLLM streams per path")
    parser.add_argument("--llama-requests", type=int, default=100, help="llama-server streams per path")
    parser.add_argument("--concurrency", default="100,500,1000", help="streams at once, in steps up to the target")
    args = parser.parse_args()
    print(f"open files allowed: {raise_fd_limit()}")
    proxy_cpus = split_cpus()
    names = ("fast", "llama", "vllm", "keyproxy", "portal", "nginx", "relay-fast", "relay-llama")
    ports = {name: free_port() for name in names}
    key_file, vllm_key_file = SCRATCH / "llama-key", SCRATCH / "vllm-key"
    # The portal's vLLM session is reached at keyproxy.py's port, as a session's address is.
    token, keys = prepare_portal({"fast": ports["fast"], "llama": ports["llama"], "vllm": ports["keyproxy"]})
    key_file.write_text(keys["llama"])
    vllm_key_file.write_text(keys["vllm"])
    global _portal_pid
    processes = [start_backend(ports["fast"]), start_portal(ports["portal"])]
    _portal_pid = processes[1].pid
    pin(processes[-1], proxy_cpus)
    llama = start_llama_server(ports["llama"], key_file)
    if llama:
        processes.append(llama)
    vllm = start_vllm(ports["vllm"], ports["keyproxy"], vllm_key_file, keys["served_name"])
    processes += vllm
    if vllm:
        pin(vllm[1], proxy_cpus)  # the key proxy runs beside the server on a node; here it is a proxy like the others
    for server in ("fast", "llama"):
        processes.append(pin(start_relay(ports["relay-" + server], ports[server]), proxy_cpus))  # type: ignore[arg-type]
    nginx = pin(start_nginx(ports["nginx"], {"fast": ports["fast"], "llama": ports["llama"]}), proxy_cpus)
    if nginx:
        processes.append(nginx)
    try:
        wait_up(here(ports["portal"], "/healthz"))
        portal = here(ports["portal"], "/api/v1/chat/completions")
        auth = {"Authorization": f"Bearer {token}"}
        signed_in = {"Cookie": keys["cookie"], keys["csrf_header"]: keys["csrf"]}
        figures: list[Target] = []

        def paths(server: str, headers: dict[str, str]) -> dict[str, tuple[str, dict[str, str]]]:
            browser = here(ports["portal"], f"/sessions/{keys[server + ':pk']}/v1/chat/completions")
            found = {
                "direct": (here(ports[server], "/v1/chat/completions"), headers),
                "portal": (portal, auth),
                "browser": (browser, signed_in),
            }
            if nginx:
                found["nginx"] = (here(ports["nginx"], f"/{server}/v1/chat/completions"), headers)
            found["relay"] = (here(ports["relay-" + server], "/v1/chat/completions"), headers)
            return found

        if not nginx:
            print("nginx is not installed (apt-get install nginx-light): direct and portal only")
        message = [{"role": "user", "content": "Say something."}]
        fast = {"model": "fast", "messages": message, "stream": True}
        table(
            f"local server, as fast as it streams ({args.tokens} tokens, {args.requests} requests per path)",
            run_paths(paths("fast", {}), {**fast, "max_tokens": args.tokens}, args.requests),
        )
        paced = run_paths(paths("fast", {}), {**fast, "max_tokens": TTFT_TOKENS, "bench_pace_s": PACE_S},
                          args.ttft_requests)  # fmt: skip
        table(
            f"local server, paced: first token at once, then one per {PACE_S * 1000:g} ms "
            f"({TTFT_TOKENS} tokens, {args.ttft_requests} requests per path)",
            paced,
        )
        # The paced stand-in's TTFT is the proxy's own cost with the least noise; its throughput is the pace's.
        figures += [t for t in ttft_targets("local paced", paced) if "throughput" not in t.what]
        # The same server by the chat route and by Anthropic's Messages route (the stand-in streams the same tokens
        # on either path): what the second route costs the proxy beyond the first.
        by_route = run_paths(
            {
                "direct": (here(ports["fast"], "/v1/messages"), {}),
                "chat": (portal, auth),
                "messages": (here(ports["portal"], "/api/v1/messages"), {"x-api-key": token}),
            },
            {**fast, "max_tokens": TTFT_TOKENS, "bench_pace_s": PACE_S},
            args.ttft_requests,
        )
        table(f"local server, paced, by route: chat completions and Anthropic's messages ({args.ttft_requests} "
              "requests per path)", by_route)  # fmt: skip
        gap = by_route["messages"]["ttft_p50_ms"] - by_route["chat"]["ttft_p50_ms"]
        figures.append(Target("messages: TTFT p50 beyond the chat route's, local paced", f"<= {TARGET_ROUTE_GAP_MS} ms",
                              f"{gap:.2f} ms", gap <= TARGET_ROUTE_GAP_MS))  # fmt: skip
        if llama:
            key = {"Authorization": f"Bearer {keys['llama']}"}
            wait_up(here(ports["llama"], "/health"), key)
            body = {"model": "llama", "messages": message, "stream": True, "max_tokens": args.llama_tokens,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            results = run_paths(paths("llama", key), body, args.llama_requests)
            table(f"llama-server, tiny model ({args.llama_tokens} tokens, {args.llama_requests} requests per path)",
                  results)  # fmt: skip
            print("llama-server's own decode rate (its timings, median): " + ", ".join(
                f"{name} {r['decode']:.0f} tok/s" for name, r in results.items() if "decode" in r))  # fmt: skip
            figures += ttft_targets("llama-server", results)
            asked = {"model": "llama", "messages": message, "stream": True, "max_tokens": args.llama_tokens,
                     "temperature": 0}  # fmt: skip
            messages = run_paths(
                {
                    "direct": (here(ports["llama"], "/v1/messages"), key),
                    "chat": (portal, auth),
                    "messages": (here(ports["portal"], "/api/v1/messages"), {"x-api-key": token}),
                },
                asked,
                args.llama_requests,
            )
            table(f"llama-server, tiny model, Anthropic's messages direct and through the portal, beside chat "
                  f"({args.llama_requests} requests per path; the model stops when it will)", messages)  # fmt: skip
        else:
            print(f"\nllama-server is not built ({LLAMA_BIN}): run scripts/build-llama-cpp to measure it too")
            figures.append(Target("added TTFT and throughput, llama-server", "see above", "not built", None))
        if vllm and args.vllm_requests > 0:  # --vllm-requests 0 leaves vLLM out
            key = {"Authorization": f"Bearer {keys['vllm']}"}
            wait_up(here(ports["vllm"], "/health"), key, timeout_s=300)
            body = {"model": keys["served_name"], "messages": message, "stream": True, "max_tokens": args.vllm_tokens,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            vllm_paths = {
                "direct": (here(ports["vllm"], "/v1/chat/completions"), key),
                "keyprx": (here(ports["keyproxy"], "/v1/chat/completions"), key),
                "portal": (portal, auth),
            }
            table(
                f"vLLM (CPU), SmolLM2-135M; the portal through keyproxy.py as in a session ({args.vllm_tokens} tokens, "
                f"{args.vllm_requests} requests per path)",
                run_paths(vllm_paths, body, args.vllm_requests, models={"portal": "vllm"}),
            )
        else:
            print("\nvLLM left out (--vllm-requests 0)" if vllm else f"\nvLLM or SmolLM2 as safetensors is missing "
                  f"({VLLM_PYTHON}, {SMOLLM2_HF}): run local-cluster up")  # fmt: skip
        print()
        held, per_stream = 0, 0.0
        rss_before = rss_bytes(processes[1].pid)
        for n in [int(x) for x in args.concurrency.split(",")]:
            run = asyncio.run(concurrent(portal, auth, n, processes[1].pid, rss_before))
            print(f"portal: {n} concurrent paced streams, {run.errors} errors, {run.peak} open at once, RSS "
                  f"{run.rss_before / 2**20:.0f} MiB before, {run.rss_peak / 2**20:.0f} MiB at the peak: "
                  f"{run.bytes_per_stream / 1024:.0f} KiB per stream {run.first_error}")  # fmt: skip
            if run.errors:
                break
            held, per_stream = run.peak, run.bytes_per_stream
        print(f"most concurrent streams held open through the portal without an error: {held}")
        figures.append(Target("streams open at once through one worker, 0 errors", f">= {TARGET_STREAMS}", str(held),
                            held >= TARGET_STREAMS))  # fmt: skip
        figures.append(Target("portal memory per open stream", "report", f"{per_stream / 1024:.0f} KiB", None))
        print_targets(figures)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


if __name__ == "__main__":
    main()
