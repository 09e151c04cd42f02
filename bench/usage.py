"""My usage and Site usage over 100,000 proxy requests, against a plain SQL aggregate of the same rows. A benchmark,
not a test.

    .venv/bin/python bench/usage.py [--requests 100000] [--sessions 300] [--users 40] [--repeat 7]

Seeds a throwaway database: SQLite in a scratch directory, and PostgreSQL too when DATABASE_URL is set (a database
of its own, created there and dropped after, as the test suite does; the role needs CREATEDB). The rows: --users
users in six groups, --sessions sessions over the last 90 days (1 to 4 GPUs, 1 to 48 hours, a few deleted), and
--requests proxy requests inside their runs, most by the owner and the rest by others (shared sessions), with
realistic times to first token, speeds and a few errors; plus batch runs. Each row is bulk-created.

Timed, server side with Django's test client (median of --repeat, after one warm-up): My usage of the busiest user,
Site usage by user, group and model, and its CSV. The baseline, in the same run on the same rows, is the least any
usage page must do: `SELECT user_id, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM jobs_proxyrequest
GROUP BY user_id`. Printed: milliseconds and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def median_ms(action: Callable[[], Any], repeat: int) -> float:
    action()  # warm-up: connections, templates, the database's caches
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def seed(args: argparse.Namespace) -> Any:
    """The rows; returns the user with the most requests."""
    from django.contrib.auth.models import Group, User
    from django.db import connection
    from django.utils import timezone

    from catalog.models import Cluster, ClusterAccount, GPUType, ModelVariant, Partition, Runtime
    from catalog.yaml_io import import_file
    from jobs.models import BatchRun, LLMSession, ProxyRequest, State

    rng = random.Random(15)
    import_file(str(REPO / "catalog" / "examples" / "catalog.yaml"))
    users = User.objects.bulk_create([User(username=f"user{i:03}", password="!") for i in range(args.users)])
    groups = Group.objects.bulk_create([Group(name=f"lab-{name}") for name in ("nlp", "vision", "bio", "chem", "hep",
                                                                              "astro")])  # fmt: skip
    memberships = [User.groups.through(user_id=u.pk, group_id=g.pk) for u in users for g in rng.sample(groups, 2)]
    User.groups.through.objects.bulk_create(memberships[: len(memberships) * 3 // 4])  # some in two groups, some one
    cluster = Cluster.objects.get(slug="local")
    accounts = {}
    for user in users:
        account = ClusterAccount(cluster=cluster, user=user, username=user.username[:32],
                                 slurm_account=rng.choice(["nlp", "vision", "bio", ""]))  # fmt: skip
        account.save()
        accounts[user.pk] = account
    partition = Partition.objects.get(cluster=cluster, name="gpu")
    gpus = list(GPUType.objects.filter(name__in=["a100-80g", "h100"]))
    variants = list(ModelVariant.objects.filter(model__name__in=["tiny-llama", "GPT-2", "Llama-3.1-8B-Instruct"]))
    runtime = Runtime.objects.get(kind="llama.cpp")
    now = timezone.now()
    sessions = []
    for _ in range(args.sessions):
        owner = rng.choice(users)
        start = now - timedelta(days=rng.uniform(0, 90))
        end = min(now, start + timedelta(hours=rng.uniform(1, 48)))
        ended = end < now
        sessions.append(LLMSession(
            owner=owner, account=accounts[owner.pk], cluster=cluster, partition=partition, gpu_type=rng.choice(gpus),
            variant=rng.choice(variants), runtime=runtime, gpus_per_node=rng.choice([1, 1, 2, 4]), cpus_per_node=4,
            memory_gib=16, context_length=4096, state=State.COMPLETED if ended else State.RUNNING, started_at=start,
            ended_at=end if ended else None, deleted_at=end if ended and rng.random() < 0.1 else None,
            api_key_encrypted="unused",
        ))  # fmt: skip
    sessions = LLMSession.objects.bulk_create(sessions, batch_size=500)
    requests = []
    for _ in range(args.requests):
        session = sessions[int(rng.paretovariate(1.2)) % len(sessions)]  # a few busy sessions, many quiet ones
        end = session.ended_at or now
        assert session.started_at is not None
        at = session.started_at + (end - session.started_at) * rng.random()
        user = session.owner if rng.random() < 0.7 else rng.choice(users)
        failed = rng.random() < 0.02
        completion = 0 if failed else rng.randint(1, 800)
        streamed = rng.random() < 0.8
        requests.append(ProxyRequest(
            session=session, user=user, at=at, route="api" if rng.random() < 0.6 else "chat",
            endpoint="chat/completions", status=rng.choice([429, 500, 502]) if failed else 200,
            prompt_tokens=0 if failed else rng.randint(5, 4000), completion_tokens=completion,
            ttft_ms=rng.lognormvariate(5, 1) if streamed and not failed else None,
            duration_ms=rng.uniform(50, 20000), tokens_per_s=None if failed or completion < 2 else rng.uniform(5, 300),
            bytes_in=rng.randint(100, 20000), bytes_out=rng.randint(100, 200000),
        ))  # fmt: skip
    ProxyRequest.objects.bulk_create(requests, batch_size=5000)
    runs = []
    for s in rng.sample(sessions, min(50, len(sessions))):
        runs.append(BatchRun(
            owner=s.owner, session=s, name="prompts.jsonl", input_format="jsonl", endpoint="chat/completions",
            prompts=1000, requests="batch/x/requests.jsonl", state=BatchRun.State.FINISHED, done=1000,
            prompt_tokens=rng.randint(10_000, 1_000_000), completion_tokens=rng.randint(10_000, 500_000),
            started_at=s.started_at,
        ))  # fmt: skip
    BatchRun.objects.bulk_create(runs)
    with connection.cursor() as cursor:  # statistics, as autovacuum keeps them on a database in use
        cursor.execute("ANALYZE")
    counts: dict[int, int] = {}
    for r in requests:
        counts[r.user_id] = counts.get(r.user_id, 0) + 1
    busiest = max(counts, key=lambda pk: counts[pk])
    return User.objects.get(pk=busiest), counts[busiest]


def measure(args: argparse.Namespace) -> None:
    """One backend, in this process: the database settings come from the environment."""
    scratch = tempfile.mkdtemp(prefix="hpcllm-bench-usage-")
    os.environ.update(DJANGO_SETTINGS_MODULE="portal.settings", PORTAL_VAR_DIR=scratch, PORTAL_LOG_LEVEL="WARNING")
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import setup_test_environment

    setup_test_environment()  # the test client's host name is allowed
    # Pages render without collectstatic's manifest, as in the tests.
    settings.STORAGES = {**settings.STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage."
                                                                         "StaticFilesStorage"}}  # fmt: skip
    backend = connection.vendor
    if backend != "sqlite":  # never the configured database itself: one of its own, dropped after
        connection.settings_dict["TEST"]["NAME"] = f"bench_usage_{os.getpid()}"
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        started = time.perf_counter()
        busiest, busiest_requests = seed(args)
        seeded_s = time.perf_counter() - started
        admin = User.objects.create_superuser("bench-admin", "admin@example.edu", None)
        mine, site = Client(), Client()
        mine.force_login(busiest)
        site.force_login(admin)

        def baseline() -> None:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT user_id, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM jobs_proxyrequest "
                    "GROUP BY user_id"
                )
                cursor.fetchall()

        def page(client: Client, url: str) -> Callable[[], None]:
            def get() -> None:
                reply = client.get(url)
                assert reply.status_code == 200, (url, reply.status_code)

            return get

        base = median_ms(baseline, args.repeat)
        timed = [
            (f"/usage/ (busiest user: {busiest_requests:,} requests)", page(mine, "/usage/")),
            ("/usage/site/?by=user", page(site, "/usage/site/?by=user")),
            ("/usage/site/?by=group", page(site, "/usage/site/?by=group")),
            ("/usage/site/?by=model", page(site, "/usage/site/?by=model")),
            ("/usage/site.csv?by=user", page(site, "/usage/site.csv?by=user")),
        ]
        print(f"\n{backend}: {args.requests:,} requests, {args.sessions} sessions, {args.users} users "
              f"(seeded in {seeded_s:.1f} s); median of {args.repeat}")  # fmt: skip
        print(f"{'what':<46} {'ms':>9} {'x baseline':>11}")
        print(f"{'baseline: GROUP BY user_id (plain SQL)':<46} {base:>9.1f} {1:>11.1f}")
        for name, action in timed:
            ms = median_ms(action, args.repeat)
            print(f"{name:<46} {ms:>9.1f} {ms / base:>11.1f}")
    finally:
        connection.creation.destroy_test_db(connection.settings_dict["NAME"], verbosity=0)
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--here", action="store_true", help="one backend in this process, as the environment says")
    args = parser.parse_args()
    if args.here:
        measure(args)
        return
    # Each backend in a process of its own: Django's settings are read once per process.
    flags = [f"--requests={args.requests}", f"--sessions={args.sessions}", f"--users={args.users}",
             f"--repeat={args.repeat}", "--here"]  # fmt: skip
    sqlite = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    subprocess.run([sys.executable, __file__, *flags], env=sqlite, check=True)
    if os.environ.get("DATABASE_URL"):
        subprocess.run([sys.executable, __file__, *flags], env=dict(os.environ), check=True)
    else:
        print("\n(set DATABASE_URL to measure PostgreSQL too)")


if __name__ == "__main__":
    main()
