"""Poll cycle cost for 10 / 100 / 1,000 active sessions on the local cluster. A benchmark, not a test.

    .venv/bin/python bench/poll.py [--sizes 10,100,1000] [--repeat 3]

Needs the local cluster (scripts/local-cluster up, as root). It submits held jobs (sbatch --hold, so they stay
PENDING and use nothing) named like portal jobs, creates one queued session per job in a scratch database, and
times poll_account: the portal's one SSH command per (cluster, account) plus applying the result. The baseline,
measured in the same run, is the naive design: one `squeue -j` per session over the same pooled connection.
Target: one command per cycle, and 1,000 sessions in under 2 s.

Then a site-sized cycle (--accounts, --sessions): 10,000 live sessions over 50 accounts, each account its own user
on the local cluster (hpcbench01..50, made here with the local cluster's key) with its share of held jobs, polled
as beat polls them: poll_clusters' one poll_account per account, run by --workers worker processes at once (as
a Celery worker's prefork pool runs them). Baseline in the same run: the least any poll must do, one bare
`squeue -u USER` per account over the same connections and processes. Then the same cycle with the cluster's
status account (Cluster.status_account, jobs/sessions/listing.py): one listing of every portal job, then the
accounts it could not settle polled on their own (none here, where every job waits); its baseline is one bare squeue
of every job. Printed: each cycle's wall time (median of --repeat), the SSH commands, and the target of issue 18
(<= 1 s and a bounded number of commands).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SCRATCH = Path(tempfile.mkdtemp(prefix="hpcllm-bench-"))
os.environ.update(
    DJANGO_SETTINGS_MODULE="portal.settings",
    PORTAL_VAR_DIR=str(SCRATCH),
    PORTAL_LOG_LEVEL="WARNING",
)
os.environ.pop("DATABASE_URL", None)

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.db import close_old_connections, connections  # noqa: E402

from bench.local import CLUSTER_DIR, CountingPool, setup  # noqa: E402
from catalog.models import Cluster, ClusterAccount, GPUType, ModelVariant, Partition, Runtime  # noqa: E402
from jobs.cluster import slurm  # noqa: E402
from jobs.models import LLMSession, State  # noqa: E402
from jobs.sessions import listing  # noqa: E402
from jobs.tasks import poll_account  # noqa: E402
from portal import ssh  # noqa: E402


def submit_held(pool: ssh.SSHPool, account: ClusterAccount, names: list[str]) -> list[str]:
    """One SSH command submitting len(names) held jobs; returns their ids in order."""
    script = "for n in " + " ".join(shlex.quote(n) for n in names) + "; do "
    script += "sbatch --hold --parsable -J \"$n\" -p gpu -t 5 --mem=64M -o /dev/null --wrap 'sleep 1' || exit 1; done"
    result = pool.run(account.ssh_target(), script, timeout_s=900)
    if result.exit_code != 0:
        raise SystemExit(f"sbatch failed: {result.stderr}")
    return [line.split(";")[0] for line in result.stdout.split()]


def make_sessions(account: ClusterAccount, n: int, pool: ssh.SSHPool) -> list[LLMSession]:
    ids = [uuid.uuid4() for _ in range(n)]
    job_ids = submit_held(pool, account, [slurm.job_name(str(i)) for i in ids])
    common = {
        "owner": account.user,
        "account": account,
        "cluster": account.cluster,
        "partition": Partition.objects.get(cluster=account.cluster, name="gpu"),
        "gpu_type": GPUType.objects.get(name="a100-80g"),
        "variant": ModelVariant.objects.get(model__name="tiny-llama"),
        "runtime": Runtime.objects.get(kind="llama.cpp"),
        "gpus_per_node": 1,
        "cpus_per_node": 1,
        "memory_gib": 1,
        "walltime_min": 5,
        "context_length": 1024,
        "state": State.QUEUED,
        "api_key_encrypted": "unused",
    }
    return LLMSession.objects.bulk_create(
        [LLMSession(id=i, job_id=j, **common) for i, j in zip(ids, job_ids, strict=True)], batch_size=500
    )


def cancel(pool: ssh.SSHPool, account: ClusterAccount, job_ids: list[str]) -> None:
    for start in range(0, len(job_ids), 500):
        pool.run(account.ssh_target(), "scancel " + " ".join(job_ids[start : start + 500]) + " 2>/dev/null; true")


def naive_cycle(pool: CountingPool, account: ClusterAccount, sessions: list[LLMSession]) -> float:
    target = account.ssh_target()
    start = time.perf_counter()
    for session in sessions:
        pool.run(target, f"squeue -h -j {session.job_id} -o '%i|%T|%r'")
    return time.perf_counter() - start


def bench_user(n: int, key_from: ClusterAccount) -> str:
    """The local cluster's user hpcbenchNN, made (as root) with the key of the cluster's own user."""
    name = f"hpcbench{n:02d}"
    if subprocess.run(["id", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
    subprocess.run(["usermod", "-p", "*", name], check=True)  # not locked: sshd without PAM refuses locked accounts
    home = Path(f"/home/{name}")
    (home / ".ssh").mkdir(mode=0o700, exist_ok=True)
    (home / ".ssh" / "authorized_keys").write_text((CLUSTER_DIR / "id_ed25519.pub").read_text())
    subprocess.run(["chown", "-R", f"{name}:{name}", str(home / ".ssh")], check=True)
    (home / ".ssh" / "authorized_keys").chmod(0o600)
    return name


def _worker_process() -> None:
    """A worker slot of its own, as a Celery worker's process: its own database connection and SSH pool (what the
    parent opened is not shared across fork)."""
    connections.close_all()
    ssh.pool = CountingPool()


def _poll(account_id: int) -> int:
    """One account's poll in a worker process; the SSH commands it ran."""
    assert isinstance(ssh.pool, CountingPool)
    before = ssh.pool.commands
    poll_account(account_id)
    return ssh.pool.commands - before


def _bare_squeue(account_id: int) -> int:
    account = ClusterAccount.objects.select_related("cluster").get(pk=account_id)
    ssh.pool.run(account.ssh_target(), 'squeue -h -u "$(id -un)" -o %i')
    return 1


def site_cycle(first: ClusterAccount, accounts: int, total: int, workers: int, repeat: int, pool: CountingPool) -> None:
    others = []
    for n in range(1, accounts + 1):
        user = get_user_model().objects.create_user(f"bench{n:02d}")
        account = ClusterAccount(cluster=first.cluster, user=user, kind="personal", username=bench_user(n, first))
        account.set_private_key((CLUSTER_DIR / "id_ed25519").read_text())
        account.save()
        others.append(account)
    LLMSession.objects.all().delete()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as threads:
        made = list(threads.map(lambda a: make_sessions(a, total // accounts, pool), others))
    close_old_connections()
    print(f"\n{total} held jobs of {accounts} users submitted in {time.perf_counter() - start:.0f} s")
    try:
        ids = [a.pk for a in others]
        with ProcessPoolExecutor(max_workers=workers, initializer=_worker_process) as slots:
            list(slots.map(_poll, ids))  # the first cycle records "pending (JobHeldUser)"
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                commands = sum(slots.map(_poll, ids))
                times.append(time.perf_counter() - start)
            floors = []
            for _ in range(repeat):
                start = time.perf_counter()
                list(slots.map(_bare_squeue, ids))
                floors.append(time.perf_counter() - start)
            queued = LLMSession.objects.filter(state=State.QUEUED, slurm_reason="JobHeldUser").count()
            assert queued == total, f"only {queued} of {total} sessions were read back as held"
            # The same cycle with a status account: one listing, then the accounts it could not settle (none here:
            # every job waits) on their own, as poll_cluster dispatches them.
            status = ClusterAccount(cluster=first.cluster, kind="service", username=first.username)
            status.set_private_key((CLUSTER_DIR / "id_ed25519").read_text())
            status.save()
            Cluster.objects.filter(pk=first.cluster_id).update(status_account=status)
            LLMSession.objects.update(queue_position=None)
            warm = listing.cycle(first.cluster_id)  # writes every place again: checked below
            assert warm.changed == total, f"the listing changed {warm.changed} of {total} sessions"
            listed_times, listed_commands, own = [], 0, 0
            for _ in range(repeat):
                before = pool.commands
                start = time.perf_counter()
                cycle = listing.cycle(first.cluster_id)
                listed_commands = pool.commands - before + sum(slots.map(_poll, cycle.own))
                listed_times.append(time.perf_counter() - start)
                own = len(cycle.own)
            lists = []
            for _ in range(repeat):
                start = time.perf_counter()
                pool.run(status.ssh_target(), "squeue -h -o %i >/dev/null")
                lists.append(time.perf_counter() - start)
        placed = LLMSession.objects.filter(state=State.QUEUED, queue_position__isnull=False).count()
        assert placed == total, f"only {placed} of {total} sessions were given their place by the listing"
        cycle_s, listed_s = statistics.median(times), statistics.median(listed_times)
        print(f"{'poll':>16} {'sessions':>8} {'accounts':>8} {'workers':>7} {'SSH cmds/cycle':>14} "
              f"{'cycle s (median)':>16}")  # fmt: skip
        print(f"{'each account':>16} {total:>8} {accounts:>8} {workers:>7} {commands:>14} {cycle_s:>16.3f}")
        print(f"{'status account':>16} {total:>8} {accounts:>8} {workers:>7} {listed_commands:>14} {listed_s:>16.3f}")
        floor, list_floor = statistics.median(floors), statistics.median(lists)
        print(f"baseline, a bare squeue per account: {floor:.3f} s; each account's own poll is {cycle_s / floor:.1f}x "
              f"that")  # fmt: skip
        print(f"baseline, one bare squeue of every job: {list_floor:.3f} s; the status account's cycle is "
              f"{listed_s / list_floor:.1f}x that ({own} accounts polled on their own)")  # fmt: skip
        met = listed_s <= 1 and listed_commands <= 1 + own
        print(f"target: <= 1 s and a bounded number of SSH commands (1 + the accounts with a started or ended job) "
              f"-> {'met' if met else 'missed'}")  # fmt: skip
    finally:
        for account, sessions in zip(others, made, strict=True):
            cancel(pool, account, [s.job_id for s in sessions])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--naive-max", type=int, default=100, help="sessions the naive baseline polls per size")
    parser.add_argument("--accounts", type=int, default=50, help="the site-sized cycle's accounts (0: skip it)")
    parser.add_argument("--sessions", type=int, default=10000, help="the site-sized cycle's sessions, over all")
    parser.add_argument("--workers", type=int, default=4, help="worker slots polling at once")
    args = parser.parse_args()
    account = setup()
    counting = CountingPool()
    ssh.pool = counting  # the poll reads the module attribute
    print(
        f"{'sessions':>8} {'cmds/cycle':>10} {'cycle s (median)':>16} {'naive cmds':>10} {'naive s':>9} {'speed-up':>8}"
    )
    try:
        for n in [int(x) for x in args.sizes.split(",")]:
            LLMSession.objects.all().delete()
            sessions = make_sessions(account, n, counting)
            poll_account(account.pk)  # first cycle records "pending (JobHeldUser)"; time the steady state
            times = []
            for _ in range(args.repeat):
                counting.commands = 0
                start = time.perf_counter()
                poll_account(account.pk)
                times.append(time.perf_counter() - start)
                per_cycle = counting.commands
            cycle = statistics.median(times)
            sample = sessions[: min(n, args.naive_max)]
            naive = naive_cycle(counting, account, sample) * n / len(sample)
            queued = LLMSession.objects.filter(state=State.QUEUED, slurm_reason="JobHeldUser").count()
            assert queued == n, f"only {queued} of {n} sessions were read back as held"
            print(f"{n:>8} {per_cycle:>10} {cycle:>16.3f} {n:>10} {naive:>9.2f} {naive / cycle:>7.1f}x")
            cancel(counting, account, [s.job_id for s in sessions])
    finally:
        cancel(counting, account, list(LLMSession.objects.values_list("job_id", flat=True)))
    print("naive s: extrapolated from up to --naive-max sessions, one squeue per session over a pooled connection")
    if args.accounts:
        site_cycle(account, args.accounts, args.sessions, args.workers, args.repeat, counting)


if __name__ == "__main__":
    main()
