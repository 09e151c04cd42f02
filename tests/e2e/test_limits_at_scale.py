"""Limits that hold when the site scales out (issue 29): two uvicorn processes on PostgreSQL and Redis hold a token to
its requests a minute together, and count every answered call once in the usage records and /metrics; and fair share
on a real shared session on the local cluster: a user's third stream at once is refused while another user's request
is served."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest

from jobs.models import ApiToken, LLMSession, SessionShare, State
from portal import ssh
from tests.asgi import bearer, client, run
from tests.conftest import REPO, SMOLLM2_LAUNCH
from tests.e2e.sessions import cancel_all_jobs, drive, local_account
from tests.e2e.test_services import manage
from tests.worker import clean_env

pytestmark = pytest.mark.e2e
PER_MINUTE = 12  # the token's limit: 2N calls at once, N answered

# A model server on loopback answering every chat with usage, many at once (threads), a few milliseconds each so the
# calls overlap; the portal reaches it as a running session's address.
STAND_IN = """
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
ANSWER = json.dumps({"choices": [{"message": {"role": "assistant", "content": "hi"}}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(0.05)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)
    def log_message(self, *args):
        pass
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

# The rows the workers serve: the example catalog, a user with a running session at the stand-in's port, an API
# token and a scrape token. Prints the tokens as JSON.
ROWS = """
import django, json, sys; django.setup()
from django.contrib.auth import get_user_model
from catalog.models import *
from catalog.yaml_io import import_file
from jobs.models import *
import_file(sys.argv[1])
KEY = "[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
Cluster.objects.filter(slug="local").update(host_key=KEY, node_access="direct")
cluster = Cluster.objects.get(slug="local")
user = get_user_model().objects.create_user("scaled")
account = ClusterAccount(cluster=cluster, user=user, username="scaled"); account.save()
LLMSession.objects.create(owner=user, account=account, cluster=cluster,
    partition=Partition.objects.get(cluster=cluster, name="gpu"), gpu_type=GPUType.objects.get(name="a100-80g"),
    gpus_per_node=1, cpus_per_node=1, memory_gib=1, walltime_min=60,
    variant=ModelVariant.objects.get(model__name="tiny-llama"), runtime=Runtime.objects.get(kind="llama.cpp"),
    context_length=1024, state="running", host="127.0.0.1", port=int(sys.argv[2]), alias="tiny")
print(json.dumps({"token": ApiToken.issue(user, "load")[1], "scrape": ScrapeToken.issue("e2e")[1]}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def scaled_out(local_services: dict[str, str], tmp_path: Path) -> Iterator[tuple[list[str], dict[str, str], str]]:
    """A fresh PostgreSQL database, the stand-in server, and the portal scaled out as the README says: two uvicorn
    processes on PostgreSQL and Redis (each on a port of its own, so that the test, not the kernel's choice of which
    worker accepts, sends half the calls to each: `uvicorn --workers 2` on one socket let one worker take all of them
    on a quiet machine); yields the two processes' URLs, the tokens and the database's URL."""
    admin_url = local_services["DATABASE_URL"]
    name = f"portal_e2e_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
    env = clean_env(tmp_path / "var", DATABASE_URL=database_url, REDIS_URL=local_services["REDIS_URL"],
                    PORTAL_API_REQUESTS_PER_MINUTE=str(PER_MINUTE), PORTAL_LOG_LEVEL="WARNING",
                    PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "var" / "metrics"))  # fmt: skip
    processes: list[subprocess.Popen[bytes]] = []
    try:
        manage(env, "migrate", "--noinput")
        upstream = free_port()
        processes.append(subprocess.Popen([sys.executable, "-c", STAND_IN, str(upstream)], start_new_session=True))
        made = subprocess.run([sys.executable, "-c", ROWS, str(REPO / "catalog/examples/catalog.yaml"), str(upstream)],
                              cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
        assert made.returncode == 0, made.stderr
        tokens = json.loads(made.stdout.strip().splitlines()[-1])
        urls = []
        for _ in range(2):
            port = free_port()
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "portal.asgi:application", "--port", str(port),
                 "--lifespan", "off", "--log-level", "warning"],
                cwd=REPO, env=env, start_new_session=True,
            ))  # fmt: skip
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        for url in urls:
            while True:
                try:
                    httpx.get(f"{url}/healthz", timeout=1)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "uvicorn did not start"
                    time.sleep(0.1)
        yield urls, tokens, database_url
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)  # uvicorn's workers with it
                process.wait(timeout=20)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def in_one_minute() -> None:
    """Start where every call falls into one minute's window."""
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and line.split("}")[0].split("{")[1].split(",") == wanted.split(","):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_two_workers_on_postgres_and_redis_hold_a_token_to_its_rate_and_count_each_answer_once(
    scaled_out: tuple[list[str], dict[str, str], str], tmp_path: Path
) -> None:
    urls, tokens, database_url = scaled_out
    headers = {"Authorization": f"Bearer {tokens['token']}"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}

    async def at_once() -> list[httpx.Response]:
        # Half the calls to each process: were the limit counted per process, each would let all its calls through.
        async def one(url: str) -> httpx.Response:
            async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as api:
                return await api.post("/api/v1/chat/completions", json=body, headers=headers)

        return await asyncio.gather(*(one(urls[i % 2]) for i in range(2 * PER_MINUTE)))

    in_one_minute()
    replies = asyncio.run(at_once())
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200] * PER_MINUTE + [429] * PER_MINUTE, statuses
    refused = next(r for r in replies if r.status_code == 429)
    assert "this token made more than" in refused.json()["error"]["message"] and refused.headers["retry-after"]

    with psycopg.connect(database_url) as conn:
        deadline = time.monotonic() + 20
        while (rows := conn.execute("SELECT status, count(*) FROM jobs_proxyrequest GROUP BY status").fetchall()) != [
            (200, PER_MINUTE)
        ]:
            assert time.monotonic() < deadline, rows
            time.sleep(0.2)
    scraped = httpx.get(f"{urls[0]}/metrics", headers={"Authorization": f"Bearer {tokens['scrape']}"}, timeout=30).text
    answered = metric(scraped, "portal_proxy_requests_total", route="api", endpoint="chat/completions", status="2xx")
    assert answered == PER_MINUTE
    # Both processes counted (each writes its counters to a file of its own), and /metrics adds them up.
    assert len(list((tmp_path / "var" / "metrics").glob("counter_*.db"))) >= 2


@pytest.mark.django_db(transaction=True)
def test_a_users_third_stream_on_a_shared_session_is_refused_while_another_user_is_served(
    local_catalog: dict[str, Any], smollm2: str, owner: Any, other_user: Any, settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    from jobs.sessions.actions import launch
    from jobs.tasks import submit_session

    settings.PORTAL_MAX_INFLIGHT_PER_USER = 2
    local_account(owner, local_catalog)
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**SMOLLM2_LAUNCH, "alias": "lab", "parallel": 4})
    submit_session.apply(args=(str(session.pk),))
    session = drive(LLMSession.objects.get(pk=session.pk), lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    try:
        SessionShare.objects.create(session=session, user=other_user, created_by=owner)
        grantee = bearer(ApiToken.issue(other_user, "agent")[1])
        owners = bearer(ApiToken.issue(owner, "chat")[1])
        long = {"model": f"{owner.username}/lab", "messages": [{"role": "user", "content": "Tell a long story."}],
                "stream": True, "max_tokens": 400, "ignore_eos": True}  # fmt: skip
        short = {"model": "lab", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}

        async def three_streams_and_another_user() -> tuple[list[int], int, str, int]:
            async with client(grantee) as api, client(owners) as owner_api:
                first = api.stream("POST", "/api/v1/chat/completions", json=long)
                second = api.stream("POST", "/api/v1/chat/completions", json=long)
                async with first as one, second as two:
                    await anext(one.aiter_raw())
                    await anext(two.aiter_raw())  # both are streaming now
                    third = await api.post("/api/v1/chat/completions", json=long)
                    served = await owner_api.post("/api/v1/chat/completions", json=short)
                    statuses = [one.status_code, two.status_code, third.status_code]
                    retry_after = third.headers.get("retry-after", "")
                # Both streams left (their slots are freed on the proxy's threads just after): room again.
                for _ in range(40):
                    again = await api.post("/api/v1/chat/completions", json={**long, "stream": False, "max_tokens": 4})
                    if again.status_code != 429:
                        break
                    await asyncio.sleep(0.25)
                return statuses, served.status_code, retry_after, again.status_code

        statuses, served, retry_after, again = run(three_streams_and_another_user())
        assert statuses == [200, 200, 429] and retry_after
        assert served == 200 and again == 200
    finally:
        cancel_all_jobs()
        ssh.pool.close_all()
