"""My usage and Site usage over a million proxy requests, against a plain SQL aggregate of the same rows, and what
recording a request costs. A benchmark, not a test.

    .venv/bin/python bench/usage.py [--requests 1000000] [--sessions 300] [--users 40] [--repeat 21] [--record 2000]

Seeds a throwaway database: SQLite in a scratch directory, and PostgreSQL too when DATABASE_URL is set (a database
of its own, created there and dropped after, as the test suite does; the role needs CREATEDB). The rows: --users
users in six groups, --sessions sessions over the last 90 days (1 to 4 GPUs, 1 to 48 hours, a few deleted), and
--requests proxy requests inside their runs, most by the owner and the rest by others (shared sessions), with
realistic times to first token, speeds and a few errors; plus batch runs. The rows are bulk-created in batches, then
summarised once (jobs/usage/rollups.py, as beat does every PORTAL_USAGE_SUMMARY_S; it also deletes the raw rows past
PORTAL_USAGE_RAW_DAYS, a few of the oldest).

Timed, server side with Django's test client (p50 and p95 of --repeat, after one warm-up, and the queries each makes):
My usage of the busiest user, Site usage by user, group, model and month, and its CSV; then each again "cold", with
nothing remembered of the summaries (jobs/usage/memo.py), as the first view of a page after each summary run is. The
baseline, in the same run on the same rows, is the least a page reading every request row must do: `SELECT user_id,
COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM jobs_proxyrequest GROUP BY user_id`. Printed: milliseconds
and the p50's ratio to the baseline's. Then recording a request: records.save of --record rows, one at a time as the
proxy writes them (one INSERT each, nothing else: the summaries are built by beat), p50 and p95 per row.
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


BATCH = 20_000  # rows bulk-created at a time: a million model instances at once would not fit in memory


def percentiles_ms(action: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """p50 and p95 of `repeat` runs, after a warm-up (connections, templates, the database's caches)."""
    action()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000)
    cuts = statistics.quantiles(times, n=20, method="inclusive")
    return statistics.median(times), cuts[-1]


def counted(connection: Any, action: Callable[[], Any]) -> int:
    """The queries `action` makes (counted as they go to the database: CaptureQueriesContext's log, which each
    request clears as it starts, counted none here)."""
    made = []

    def count(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        made.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(count):
        action()
    return len(made)


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
    # The requests' figures first, as plain tuples, then the rows in the order of their moments, as the proxy appends
    # them: the newest rows (those the summaries do not hold yet) lie together at the table's end, as on a site.
    counts: dict[int, int] = {}
    made = []
    for _ in range(args.requests):
        session = sessions[int(rng.paretovariate(1.2)) % len(sessions)]  # a few busy sessions, many quiet ones
        end = session.ended_at or now
        assert session.started_at is not None
        at = session.started_at + (end - session.started_at) * rng.random()
        user = session.owner if rng.random() < 0.7 else rng.choice(users)
        failed = rng.random() < 0.02
        completion = 0 if failed else rng.randint(1, 800)
        streamed = rng.random() < 0.8
        made.append((
            at, session.pk, user.pk, "api" if rng.random() < 0.6 else "chat",
            rng.choice([429, 500, 502]) if failed else 200, 0 if failed else rng.randint(5, 4000), completion,
            rng.lognormvariate(5, 1) if streamed and not failed else None, rng.uniform(50, 20000),
            None if failed or completion < 2 else rng.uniform(5, 300), rng.randint(100, 20000),
            rng.randint(100, 200000),
        ))  # fmt: skip
        counts[user.pk] = counts.get(user.pk, 0) + 1
    made.sort(key=lambda figures: figures[0])
    fields = ("at", "session_id", "user_id", "route", "status", "prompt_tokens", "completion_tokens", "ttft_ms",
              "duration_ms", "tokens_per_s", "bytes_in", "bytes_out")  # fmt: skip
    for first in range(0, len(made), BATCH):
        rows = [ProxyRequest(endpoint="chat/completions", **dict(zip(fields, one, strict=True)))
                for one in made[first : first + BATCH]]  # fmt: skip
        ProxyRequest.objects.bulk_create(rows, batch_size=5000)
    del made
    runs = []
    for s in rng.sample(sessions, min(50, len(sessions))):
        runs.append(BatchRun(
            owner=s.owner, session=s, name="prompts.jsonl", input_format="jsonl", endpoint="chat/completions",
            prompts=1000, requests="batch/x/requests.jsonl", state=BatchRun.State.FINISHED, done=1000,
            prompt_tokens=rng.randint(10_000, 1_000_000), completion_tokens=rng.randint(10_000, 500_000),
            started_at=s.started_at,
        ))  # fmt: skip
    BatchRun.objects.bulk_create(runs)
    analyse(connection)
    busiest = max(counts, key=lambda pk: counts[pk])
    return User.objects.get(pk=busiest), counts[busiest]


def analyse(connection: Any) -> None:
    with connection.cursor() as cursor:  # statistics, as autovacuum keeps them on a database in use
        cursor.execute("ANALYZE")


def recording(args: argparse.Namespace, user: Any) -> tuple[float, float]:
    """records.save of --record rows, one at a time: p50 and p95 per row (ms)."""
    from jobs.models import LLMSession
    from jobs.usage.records import Meter, save

    session = LLMSession.objects.filter(owner=user).first() or LLMSession.objects.first()
    assert session is not None
    times = []
    for _ in range(args.record):
        meter = Meter(str(session.pk), user.pk, "api", "chat/completions", bytes_in=300)
        meter.begin(200, "application/json")
        meter.feed(b'{"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7}}')
        row = meter.finish()
        start = time.perf_counter()
        save(row)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), statistics.quantiles(times, n=20, method="inclusive")[-1]


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
    from django.utils import timezone

    from jobs.usage import memo, rollups

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
        started = time.perf_counter()
        rollups.summarise()
        summarised_s = time.perf_counter() - started
        analyse(connection)
        admin = User.objects.create_superuser("bench-admin", "admin@example.edu", None)
        since = (timezone.localdate() - timedelta(days=35)).isoformat()
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

        def cold_page(client: Client, url: str) -> Callable[[], None]:
            get = page(client, url)

            def forgotten() -> None:
                memo.forget()
                get()

            return forgotten

        base, base_p95 = percentiles_ms(baseline, args.repeat)
        timed = [
            (f"/usage/ (busiest user: {busiest_requests:,} requests)", mine, "/usage/"),
            ("/usage/site/?by=user", site, "/usage/site/?by=user"),
            ("/usage/site/?by=group", site, "/usage/site/?by=group"),
            ("/usage/site/?by=model", site, "/usage/site/?by=model"),
            ("/usage/site/?by=month", site, "/usage/site/?by=month"),
            ("/usage/site.csv?by=user", site, "/usage/site.csv?by=user"),
            ("/usage/site/?by=user&since=<35 days ago> (days)", site, f"/usage/site/?by=user&since={since}"),
        ]
        print(f"\n{backend}: {args.requests:,} requests, {args.sessions} sessions, {args.users} users "
              f"(seeded in {seeded_s:.1f} s, summarised in {summarised_s:.1f} s); {args.repeat} runs each")  # fmt: skip
        print(f"{'what':<52} {'p50 ms':>8} {'p95 ms':>8} {'queries':>8} {'x baseline':>11} {'cold p50':>9} "
              f"{'cold p95':>9}")  # fmt: skip
        print(f"{'baseline: GROUP BY user_id (plain SQL)':<52} {base:>8.1f} {base_p95:>8.1f} {1:>8} {1:>11.2f}")
        for name, client, url in timed:
            p50, p95 = percentiles_ms(page(client, url), args.repeat)
            queries = counted(connection, page(client, url))
            cold_p50, cold_p95 = percentiles_ms(cold_page(client, url), args.repeat)
            print(f"{name:<52} {p50:>8.1f} {p95:>8.1f} {queries:>8} {p50 / base:>11.2f} {cold_p50:>9.1f} "
                  f"{cold_p95:>9.1f}")  # fmt: skip
        p50, p95 = recording(args, busiest)
        print(f"{'recording a request: records.save, per row':<52} {p50:>8.2f} {p95:>8.2f} {1:>8}")
    finally:
        connection.creation.destroy_test_db(connection.settings_dict["NAME"], verbosity=0)
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--record", type=int, default=2000, help="requests recorded one at a time")
    parser.add_argument("--here", action="store_true", help="one backend in this process, as the environment says")
    args = parser.parse_args()
    if args.here:
        measure(args)
        return
    # Each backend in a process of its own: Django's settings are read once per process.
    flags = [f"--requests={args.requests}", f"--sessions={args.sessions}", f"--users={args.users}",
             f"--repeat={args.repeat}", f"--record={args.record}", "--here"]  # fmt: skip
    sqlite = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    subprocess.run([sys.executable, __file__, *flags], env=sqlite, check=True)
    if os.environ.get("DATABASE_URL"):
        subprocess.run([sys.executable, __file__, *flags], env=dict(os.environ), check=True)
    else:
        print("\n(set DATABASE_URL to measure PostgreSQL too)")


if __name__ == "__main__":
    main()
