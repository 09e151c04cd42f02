"""A model service's routing (issue 28) against two real llama-servers: affinity against round robin, what the
router itself adds to the first token, and a rollover under a steady client. A benchmark, not a test.

    .venv/bin/python bench/services.py [--conversations 8] [--turns 6] [--slots 3] [--rounds 2] [--requests 400]
        [--rollover-rate 5] [--rollover-seconds 30] [--rollover-at 10] [--phases 1,2,3]

Two llama-servers (scripts/build-llama-cpp) on loopback are the replicas of a service, each with its prompt cache
(`cache_prompt`, llama-server's default) in `--slots` slots of its own and no host-memory cache (`--cache-ram 0`),
as a server whose memory holds that many of the long prompts; a request takes the slot whose cached prompt it shares
most of, else the least recently used. The model is the random-weight llama of the other benches (scripts/tiny-gguf),
4 layers 256 wide rather than 2 x 64, so that reading a 1,500-token prompt takes a few hundred milliseconds (as a
real model does on a GPU) and reading it from the cache tens.

1. Affinity against round robin. `--conversations` conversations, each with a system prompt of its own of about
   1,500 tokens, `--turns` short questions each (the answers kept in the conversation, as a chat client does),
   interleaved in a seeded random order, one request at a time, through the portal's API to the service's name. With
   affinity: the portal as it runs (jobs/services/affinity.py's key, the system prompt and first question, so every
   turn of a conversation goes to one replica). Round robin: the same portal code in a second uvicorn in which
   `affinity.key_of` returns "" and `replicas.choose` takes the replicas in turn by a counter (the baseline is this
   patch, nothing else differs). The same requests in both, each phase on freshly started servers (empty caches), in
   the order affinity, round robin, round robin, affinity... for `--rounds` rounds. Printed: time to first token p50
   and mean of each, their ratio (target: affinity's p50 <= 0.5x round robin's), and the prompt-cache hit rate the
   servers report (the share of prompt tokens read from the cache: `timings.cache_n` / (`cache_n` + `prompt_n`) of
   each answer, and /metrics' `prompt_tokens_cached_total` against `prompt_tokens_total`), with which replica each
   conversation went to. The figure depends on the cache against the traffic: when one server's slots hold every
   conversation, round robin hits as often (try `--slots 8`).
2. The router's own cost: time to first token through a service of two replicas against the same server named by a
   session's alias, request by request in turn (bench/proxy.py's `measure`). Both replicas name that one server, so
   what differs is the lookup and the choice alone. Target: the service's p50 within 0.3 ms of the alias's.
3. A rollover under a steady client: `--rollover-rate` streaming requests a second (open loop: each sent on time
   whatever the others do) to a service of one replica on the first server, for `--rollover-seconds`. Beside it, in a
   process of its own, the keeper's own round (jobs/services/keep.py's `reconcile`, every second rather than every
   PORTAL_POLL_INTERVAL_S) on that service, its replica's walltime set to end `--rollover-at` seconds plus the lead
   time (timing.lead) after the start: so the keeper launches the successor (`_roll_over`), hands over once it is
   ready (`_hand_over`: the old replica drains) and has the old one cancelled once no portal process has published a
   request open on it (`_drain_done`, by load.site_inflight). What Slurm and the cancel task do is played by the bench:
   the successor's job runs (RUNNING, the second server's address and key), and the cancelled replica's server is
   terminated and its row CANCELLED with no host. Printed: when each step happened, requests sent and failed (a
   status other than 200, or a stream that ends without [DONE]; target 0), which server answered, and time to first
   token p50 and worst overall, before the handover, within 5 s either side of it and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.proxy import (  # noqa: E402
    LLAMA_BIN,
    SCRATCH,
    free_port,
    here,
    measure,
    pin,
    portal_env,
    prepare_portal,
    split_cpus,
    start_portal,
    wait_up,
)

TARGET_AFFINITY_RATIO = 0.5  # affinity's TTFT p50 against round robin's, at most
TARGET_ROUTER_MS = 0.3  # a service's TTFT p50 beyond a single session's, at most
SERVICE, SAME = "bench-lab", "bench-same"  # the services: two servers; two replicas naming one server
ROLL = "bench-roll"  # the service rolled over: one replica, then its successor on the other server
# The services' launch (the launch form's fields), as the keeper launches a successor from it: the session rows'.
ROLL_LAUNCH = {"cluster": "local", "partition": "gpu", "gpu": "a100-80g", "gpus": 1, "model": "tiny-llama",
               "quant": "F16", "runtime": "llama.cpp", "context": 1024, "walltime": 60}  # fmt: skip
REPLICAS = ("replica-a", "replica-b")  # the servers' aliases (-a), which their answers name as `model`
TOPICS = (  # what the system prompts and questions are made of
    "cluster node partition walltime queue scheduler allocation account budget quota storage scratch project "
    "module container image kernel driver memory bandwidth latency throughput token prompt context window cache "
    "replica service router gateway policy audit review release support ticket incident outage upgrade"
)


def model_file(layers: int, width: int) -> Path:
    path = SCRATCH / f"llama-{layers}x{width}.gguf"
    shape = ["--layers", str(layers), "--width", str(width), "--heads", "4", "--kv-heads", "2"]
    subprocess.run(
        [sys.executable, str(REPO / "scripts/tiny-gguf"), str(path), *shape], check=True, capture_output=True
    )
    return path


def start_llama(model: Path, alias: str, port: int, key: str, slots: int) -> subprocess.Popen[bytes]:
    """A replica's server: `slots` slots of 4,096 tokens, each keeping the prompt it last read, and no cache in host
    memory beyond them (llama-server's --cache-ram would otherwise keep every prompt of this small model)."""
    key_file = SCRATCH / f"{alias}.key"
    key_file.write_text(key)
    return subprocess.Popen(
        [str(LLAMA_BIN / "llama-server"), "-m", str(model), "-a", alias, "--host", "127.0.0.1", "--port", str(port),
         "--api-key-file", str(key_file), "-c", str(4096 * slots), "--parallel", str(slots), "--cache-ram", "0",
         "--metrics", "--no-webui", "--threads", "1"],
        env={**os.environ, "LD_LIBRARY_PATH": str(LLAMA_BIN)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def add_services(keys: dict[str, str]) -> None:
    """SERVICE, whose replicas are the sessions of the two servers, SAME, whose two replicas both name the first
    server, and ROLL, whose one replica names the first server (its successor, the second, comes in the rollover);
    replicas are copies of those sessions (their key and address), with fixed uuids so that the ring, and so which
    replica each conversation goes to, is the same in every run. Each keeps as many replicas as it has, launched from
    ROLL_LAUNCH (only the rollover's keeper launches one)."""
    first, second = keys[REPLICAS[0] + ":pk"], keys[REPLICAS[1] + ":pk"]
    names = {SERVICE: [first, second], SAME: [first] * 2, ROLL: [first]}
    script = f"""
import django, uuid; django.setup()
from django.contrib.auth import get_user_model
from jobs.models import LLMSession, ModelService
owner = get_user_model().objects.get(username="bench")
for name, sessions in {names!r}.items():
    service = ModelService.objects.create(name=name, owner=owner, launch={ROLL_LAUNCH!r}, min_replicas=len(sessions),
                                          max_replicas=len(sessions))
    for i, pk in enumerate(sessions):
        replica = LLMSession.objects.get(pk=pk)
        replica.pk = uuid.uuid5(uuid.NAMESPACE_URL, f"bench/{{name}}/{{i}}")
        replica.alias, replica.service = "", service
        replica._state.adding = True
        replica.save()
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=portal_env(), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr)


def start_round_robin_portal(port: int) -> subprocess.Popen[bytes]:
    """The portal as start_portal runs it, but routing a service's requests in turn and without affinity."""
    code = f"""
import itertools, django, uvicorn; django.setup()
from jobs.services import affinity, replicas
turn = itertools.count()
def round_robin(candidates, key=""):
    ordered = sorted(candidates)
    return (ordered[next(turn) % len(ordered)], replicas.LEAST_LOADED) if ordered else (None, "")
affinity.key_of = lambda route, payload: ""
replicas.choose = round_robin
from portal.asgi import application
uvicorn.run(application, port={port}, lifespan="off", log_level="warning", backlog=4096)
"""
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=portal_env())


@dataclass
class Conversation:
    system: str
    questions: list[str]
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.messages = [{"role": "system", "content": self.system}]


def conversations(count: int, turns: int, words: int, seed: int) -> tuple[list[Conversation], list[int]]:
    """`count` conversations, each with its own long system prompt (distinct from its first words) and `turns`
    questions, and the order of their turns: a seeded shuffle, so that conversations interleave."""
    rng, vocabulary = random.Random(seed), TOPICS.split()
    found = []
    for i in range(count):
        system = f"Team {i} ({rng.randrange(10**6)}). " + " ".join(rng.choice(vocabulary) for _ in range(words)) + "."
        questions = [
            f"Question {t}: what about the {rng.choice(vocabulary)} of the {rng.choice(vocabulary)}?"
            for t in range(turns)
        ]
        found.append(Conversation(system, questions))
    order = [i for i in range(count) for _ in range(turns)]
    rng.shuffle(order)
    return found, order


@dataclass
class Answer:
    ttft: float
    text: str
    server: str
    cache_n: int
    prompt_n: int


async def ask(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, object]) -> Answer:
    start = time.perf_counter()
    first, parts, server = 0.0, [], ""
    timings: dict[str, float] = {}
    async with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if not first:
                first = time.perf_counter() - start
            chunk = json.loads(line[6:])
            server = chunk.get("model", server)
            timings = chunk.get("timings", timings)
            parts += [c.get("delta", {}).get("content") or "" for c in chunk.get("choices", [])]
    return Answer(first, "".join(parts), server, int(timings.get("cache_n", 0)), int(timings.get("prompt_n", 0)))


async def converse(url: str, token: str, chats: list[Conversation], order: list[int], tokens: int) -> list[Answer]:
    """The turns in `order`, one request at a time, each conversation keeping its answers."""
    answers = []
    asked = [0] * len(chats)
    async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {token}"}) as client:
        for i in order:
            chat = chats[i]
            chat.messages.append({"role": "user", "content": chat.questions[asked[i]]})
            asked[i] += 1
            body = {"model": SERVICE, "messages": chat.messages, "stream": True, "max_tokens": tokens,
                    "temperature": 0}  # fmt: skip
            answer = await ask(client, url, {}, body)
            chat.messages.append({"role": "assistant", "content": answer.text})
            answers.append(answer)
    return answers


def cached_share(metrics: str) -> tuple[float, float]:
    """llama-server's /metrics: prompt tokens read from the cache, and read afresh."""
    values = dict(line.split() for line in metrics.splitlines() if line.startswith("llamacpp:prompt_tokens"))
    return float(values["llamacpp:prompt_tokens_cached_total"]), float(values["llamacpp:prompt_tokens_total"])


@dataclass
class Phase:
    answers: list[Answer] = field(default_factory=list)
    cached: float = 0.0  # prompt tokens, over the servers' /metrics
    fresh: float = 0.0
    homes: dict[int, set[str]] = field(default_factory=dict)  # conversation: the servers that answered it
    first_prompts: list[int] = field(default_factory=list)  # prompt tokens of each conversation's first turn

    def ttfts_ms(self) -> list[float]:
        return [a.ttft * 1000 for a in self.answers]

    def hit_rate(self) -> float:
        return sum(a.cache_n for a in self.answers) / max(1, sum(a.cache_n + a.prompt_n for a in self.answers))


def start_servers(model: Path, servers: dict[str, tuple[int, str]], slots: int) -> list[subprocess.Popen[bytes]]:
    processes = [start_llama(model, alias, port, key, slots) for alias, (port, key) in servers.items()]
    for port, key in servers.values():
        wait_up(here(port, "/health"), {"Authorization": f"Bearer {key}"})
    return processes


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=10)


def run_phase(servers: dict[str, tuple[int, str]], model: Path, url: str, token: str, args: argparse.Namespace,
              phase: Phase) -> None:  # fmt: skip
    """One pass of the conversations on freshly started servers (empty caches), added to `phase`."""
    processes = start_servers(model, servers, args.slots)
    try:
        chats, order = conversations(args.conversations, args.turns, args.words, args.seed)
        answers = asyncio.run(converse(url, token, chats, order, args.tokens))
        for i, answer in zip(order, answers, strict=True):
            if i not in phase.homes:
                phase.first_prompts.append(answer.cache_n + answer.prompt_n)
            phase.homes.setdefault(i, set()).add(answer.server)
        phase.answers += answers
        for port, key in servers.values():
            metrics = httpx.get(here(port, "/metrics"), headers={"Authorization": f"Bearer {key}"}).text
            cached, fresh = cached_share(metrics)
            phase.cached, phase.fresh = phase.cached + cached, phase.fresh + fresh
    finally:
        stop(processes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=8, help="each with a long system prompt of its own")
    parser.add_argument("--turns", type=int, default=6, help="questions per conversation")
    parser.add_argument("--words", type=int, default=145, help="words per system prompt (about 1,500 tokens)")
    parser.add_argument("--slots", type=int, default=3, help="prompts each server keeps (--parallel)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (affinity, round robin), order alternating")
    parser.add_argument("--seed", type=int, default=28)
    parser.add_argument("--requests", type=int, default=400, help="requests per path, the router's cost")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--rollover-rate", type=float, default=5.0, help="requests/s, the rollover's client")
    parser.add_argument("--rollover-seconds", type=float, default=30.0, help="how long the client sends")
    parser.add_argument("--rollover-at", type=float, default=10.0, help="seconds in: the successor is launched")
    parser.add_argument("--phases", default="1,2,3", help="which to run: 1 affinity, 2 router's cost, 3 rollover")
    args = parser.parse_args()
    phases = {int(p) for p in args.phases.split(",")}
    if not (LLAMA_BIN / "llama-server").exists():
        raise SystemExit(f"llama-server is not built ({LLAMA_BIN}): run scripts/build-llama-cpp first")
    portal_cpus = split_cpus()
    ports = {name: free_port() for name in (*REPLICAS, "portal", "round-robin")}
    token, keys = prepare_portal({alias: ports[alias] for alias in REPLICAS})
    add_services(keys)
    model = model_file(args.layers, args.width)
    servers = {alias: (ports[alias], keys[alias]) for alias in REPLICAS}
    portals = [start_portal(ports["portal"]), start_round_robin_portal(ports["round-robin"])]
    for process in portals:
        pin(process, portal_cpus)
    try:
        for name in ("portal", "round-robin"):
            wait_up(here(ports[name], "/healthz"))
        if 1 in phases:
            affinity_against_round_robin(ports, servers, model, token, args)
        if 2 in phases:
            processes = start_servers(model, servers, args.slots)
            try:
                router_cost(ports, keys, token, args.requests)
            finally:
                stop(processes)
        if 3 in phases:
            rollover(ports, keys, token, model, args)
    finally:
        stop(portals)


def affinity_against_round_robin(ports: dict[str, int], servers: dict[str, tuple[int, str]], model: Path, token: str,
                                 args: argparse.Namespace) -> None:  # fmt: skip
    modes = {"affinity": ports["portal"], "round robin": ports["round-robin"]}
    phases = {mode: Phase() for mode in modes}
    for round_ in range(args.rounds):
        for mode in list(modes) if round_ % 2 == 0 else reversed(list(modes)):
            url = here(modes[mode], "/api/v1/chat/completions")
            run_phase(servers, model, url, token, args, phases[mode])
    report_affinity(phases, args)


def report_affinity(phases: dict[str, Phase], args: argparse.Namespace) -> None:
    first = statistics.mean(phases["affinity"].first_prompts)
    prompt = statistics.mean(a.cache_n + a.prompt_n for p in phases.values() for a in p.answers)
    print(f"\n1. affinity against round robin: {args.conversations} conversations x {args.turns} turns; prompts of "
          f"{first:.0f} tokens at a first turn (the system prompt and a question), {prompt:.0f} on average; "
          f"{args.tokens} tokens per answer; {args.slots} slot(s) per server; {args.rounds} round(s)")  # fmt: skip
    print(f"{'routing':<12} {'requests':>8} {'TTFT p50 ms':>11} {'mean ms':>8} {'cache hit (answers)':>19} "
          f"{'(/metrics)':>10}")  # fmt: skip
    for mode, phase in phases.items():
        ttfts = phase.ttfts_ms()
        metrics = phase.cached / max(1.0, phase.cached + phase.fresh)
        print(f"{mode:<12} {len(ttfts):>8} {statistics.median(ttfts):>11.1f} {statistics.mean(ttfts):>8.1f} "
              f"{phase.hit_rate():>19.1%} {metrics:>10.1%}")  # fmt: skip
    homes = phases["affinity"].homes
    split = {alias: sum(1 for served in homes.values() if served == {alias}) for alias in REPLICAS}
    print(f"with affinity, conversations answered by one replica only: {split}; by both: "
          f"{sum(1 for served in homes.values() if len(served) > 1)}")  # fmt: skip
    ratio = statistics.median(phases["affinity"].ttfts_ms()) / statistics.median(phases["round robin"].ttfts_ms())
    met = "yes" if ratio <= TARGET_AFFINITY_RATIO else "NO"
    print(f"affinity's TTFT p50 / round robin's: {ratio:.2f}x (target <= {TARGET_AFFINITY_RATIO}x): met {met}")


def router_cost(ports: dict[str, int], keys: dict[str, str], token: str, requests: int) -> None:
    port, key = ports[REPLICAS[0]], keys[REPLICAS[0]]
    portal, auth = here(ports["portal"], "/api/v1/chat/completions"), {"Authorization": f"Bearer {token}"}
    paths = {
        "direct": (here(port, "/v1/chat/completions"), {"Authorization": f"Bearer {key}"}),
        "alias": (portal, auth),
        "service": (portal, auth),
    }
    body = {"messages": [{"role": "user", "content": "Say something."}], "stream": True, "max_tokens": 16,
            "temperature": 0}  # fmt: skip
    models = {"direct": REPLICAS[0], "alias": REPLICAS[0], "service": SAME}
    # Half the rounds with the alias before the service, half after: a path's place in the round is not its cost.
    halves = [
        asyncio.run(measure({name: paths[name] for name in order}, body, requests // 2, models))
        for order in (("direct", "alias", "service"), ("direct", "service", "alias"))
    ]
    results = {name: {k: statistics.mean(h[name][k] for h in halves) for k in ("ttft_p50_ms", "ttft_p99_ms")}
               for name in paths}  # fmt: skip
    print(f"\n2. the router's own cost: {requests} requests per path in turn (two halves, the alias first in one and "
          f"the service in the other; the mean of the halves' figures), llama-server {REPLICAS[0]}; the alias names "
          f"its session, the service {SAME!r} two replicas of it")  # fmt: skip
    print(f"{'path':<8} {'TTFT p50 ms':>11} {'p99 ms':>8}")
    for name, r in results.items():
        print(f"{name:<8} {r['ttft_p50_ms']:>11.2f} {r['ttft_p99_ms']:>8.2f}")
    added = results["service"]["ttft_p50_ms"] - results["alias"]["ttft_p50_ms"]
    met = "yes" if added <= TARGET_ROUTER_MS else "NO"
    print(f"the service's TTFT p50 beyond the alias's: {added:+.2f} ms (target <= {TARGET_ROUTER_MS} ms): met {met}")


# The keeper's rounds in a process of their own (the keep_services task's part): jobs/services/keep.py's reconcile
# every `every` seconds on ROLL. Its replica's walltime is set to end `at` seconds plus the lead time from now, so that
# the keeper's own rule launches the successor at `at` (launching.create, a row with `replaces`); what Slurm and the
# cancel task would do is played here: the successor's job runs on the second server (RUNNING, its address and that
# server's key), and a replica the round hands to be cancelled has its server terminated and its row CANCELLED with
# no host. Each step is printed as a JSON line with its wall-clock time.
KEEPER = """
import django, json, os, signal, sys, time; django.setup()
from datetime import timedelta
from django.utils import timezone
from jobs.models import LLMSession, ModelService, State, transition
from jobs.services import keep, timing
at, seconds, every, port, key_from, pid = {args!r}
service = ModelService.objects.get(name={roll!r})
(old,) = LLMSession.objects.filter(service=service)
ends = timezone.now() + timedelta(seconds=at) + timing.lead(service)
LLMSession.objects.filter(pk=old.pk).update(started_at=ends - timedelta(minutes=old.walltime_min))
def event(name, **more):
    print(json.dumps({{"event": name, "at": time.time(), **more}}), flush=True)
event("ready", lead_s=timing.lead(service).total_seconds())
sys.stdin.readline()  # the client has started
deadline, handed = time.time() + seconds, False
while time.time() < deadline:
    done = keep.reconcile(service.pk)
    for pk in done.created:
        event("successor launched", by="keep.reconcile (_roll_over)")
        sealed = LLMSession.objects.values_list("api_key_encrypted", flat=True).get(pk=key_from)
        LLMSession.objects.filter(pk=pk).update(api_key_encrypted=sealed, job_id="bench-successor")
        transition(pk, State.RUNNING, cause="bench: its job runs and its server answers", host="127.0.0.1", port=port,
                   started_at=timezone.now())
        event("successor ready")
    if LLMSession.objects.filter(pk=old.pk, draining_since__isnull=False).exists() and not handed:
        handed = True
        event("handover", by="keep.reconcile (_hand_over)")
    for pk in done.cancel:
        event("drained", by="keep.reconcile (_drain_done)")
        os.kill(pid, signal.SIGTERM)
        transition(pk, State.CANCELLED, cause="bench: scancel", host="")
        event("ended")
        deadline = min(deadline, time.time() + 1)
    time.sleep(every)
"""


@dataclass
class Sent:
    at: float  # wall-clock time the request was sent
    ttft: float | None  # None: no token
    server: str  # the llama-server that answered (its alias)
    error: str = ""  # a status other than 200 or a broken stream


async def steady(url: str, token: str, rate: float, seconds: float) -> list[Sent]:
    """`rate` streaming requests a second to ROLL for `seconds`, each sent on time whatever the others do (open
    loop); a request failed if its status is not 200 or its stream ends without [DONE]."""
    sent: list[Sent] = []

    async def one_request(client: httpx.AsyncClient, i: int) -> None:
        at, start = time.time(), time.perf_counter()
        first, server, finished, error = None, "", False, ""
        body = {"model": ROLL, "stream": True, "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": f"Question {i}: say something."}]}  # fmt: skip
        try:
            async with client.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    error = f"HTTP {response.status_code}"
                    await response.aread()
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        first = first or time.perf_counter() - start
                        server = json.loads(line[6:]).get("model", server)
                    finished = finished or line.startswith("data: [DONE]")
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        sent.append(Sent(at, first, server, error or ("" if finished else "the stream ended without [DONE]")))

    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(timeout=60, limits=limits, headers={"Authorization": f"Bearer {token}"}) as client:
        for i in range(3):  # warm-up: the first lookups and connections, not counted
            await one_request(client, -1 - i)
        sent.clear()
        begin, tasks = time.perf_counter(), []
        for i in range(round(rate * seconds)):
            await asyncio.sleep(max(0.0, begin + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one_request(client, i)))
        await asyncio.gather(*tasks)
    return sorted(sent, key=lambda s: s.at)


def rollover(ports: dict[str, int], keys: dict[str, str], token: str, model: Path, args: argparse.Namespace) -> None:
    """A rollover of ROLL under a steady client: the keeper's rounds (KEEPER) beside `steady`."""
    servers = {alias: (ports[alias], keys[alias]) for alias in REPLICAS}
    processes = start_servers(model, servers, args.slots)
    keeper_args = (args.rollover_at, args.rollover_seconds + 10, 1.0, ports[REPLICAS[1]], keys[REPLICAS[1] + ":pk"],
                   processes[0].pid)  # fmt: skip
    script = KEEPER.format(args=keeper_args, roll=ROLL)
    keeper = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=portal_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert keeper.stdin is not None and keeper.stdout is not None
        lead = json.loads(keeper.stdout.readline())["lead_s"]
        keeper.stdin.write("go\n")
        keeper.stdin.flush()
        url = here(ports["portal"], "/api/v1/chat/completions")
        begin = time.time()
        sent = asyncio.run(steady(url, token, args.rollover_rate, args.rollover_seconds))
        keeper.stdin.close()
        events = {e["event"]: e["at"] - begin for e in map(json.loads, keeper.stdout.read().splitlines())}
        keeper.wait(timeout=30)
    finally:
        if keeper.poll() is None:
            keeper.terminate()
        stop(processes)
    report_rollover(sent, events, begin, lead, args)


def report_rollover(sent: list[Sent], events: dict[str, float], begin: float, lead: float,
                    args: argparse.Namespace) -> None:  # fmt: skip
    print(f"\n3. a rollover under a steady client: {args.rollover_rate:g} streaming requests/s for "
          f"{args.rollover_seconds:g} s to {ROLL!r} through /api/v1 (16 tokens each); the keeper's own round "
          f"(keep.reconcile, every 1 s in a process of its own) with the replica's walltime set to end "
          f"{args.rollover_at:g} s + its lead ({lead:.0f} s) after the start; the bench plays Slurm (the successor "
          f"RUNNING on {REPLICAS[1]}) and the cancel task (the old replica's llama-server terminated, its row "
          f"CANCELLED with no host)")  # fmt: skip
    for name in ("successor launched", "successor ready", "handover", "drained", "ended"):
        print(f"  {name:<19} at {events[name]:6.1f} s" if name in events else f"  {name:<19} NOT SEEN")
    failed = [s for s in sent if s.error]
    by_server = {alias: sum(1 for s in sent if s.server == alias) for alias in REPLICAS}
    late = sum(1 for s in sent if s.server == REPLICAS[0] and s.at > begin + events.get("handover", 1e9))
    print(f"requests sent {len(sent)}, failed {len(failed)}; answered by {by_server}; sent after the handover and "
          f"answered by the old replica: {late}")  # fmt: skip
    for s in failed[:5]:
        print(f"  failed at {s.at - begin:.1f} s: {s.error}")
    if "handover" not in events:
        print("no handover: no figures around it")
        return
    handover = begin + events["handover"]
    groups = {
        "overall": sent,
        "before (sent > 5 s before the handover)": [s for s in sent if s.at < handover - 5],
        "during (within +-5 s of the handover)": [s for s in sent if abs(s.at - handover) <= 5],
        "after (sent > 5 s after)": [s for s in sent if s.at > handover + 5],
    }
    ms = {name: [s.ttft * 1000 for s in group if s.ttft is not None] for name, group in groups.items()}
    print(f"{'requests':<40} {'n':>4} {'TTFT p50 ms':>11} {'worst ms':>9}")
    for name, ttfts in ms.items():
        if ttfts:
            print(f"{name:<40} {len(ttfts):>4} {statistics.median(ttfts):>11.1f} {max(ttfts):>9.1f}")
    during, before = ms["during (within +-5 s of the handover)"], ms["before (sent > 5 s before the handover)"]
    if during and before:
        print(f"TTFT p50 during / before: {statistics.median(during) / statistics.median(before):.2f}x; the worst "
              f"during the handover: {max(during):.1f} ms")  # fmt: skip
    print(f"failed requests: {len(failed)} (target 0): met {'yes' if not failed else 'NO'}")


if __name__ == "__main__":
    main()
