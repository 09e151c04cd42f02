"""squeue's rows: the portal's jobs in the one format it asks for, and the pending jobs' demand per partition."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from portal import shellsafe
from portal.slurm.cli import is_cluster_header
from portal.slurm.errors import SlurmParseError
from portal.slurm.gres import gpu_counts
from portal.slurm.hostlist import expand_hostlist
from portal.slurm.jobstates import base_state
from portal.slurm.times import parse_duration, parse_time

# One field per job, "|"-separated: the portal's job names never contain "|" and squeue prints fields verbatim.
# Job id, name, state, reason, start, nodes, time used, time left, partition, node count.
SQUEUE_FIELDS = ("%i", "%j", "%T", "%r", "%S", "%N", "%M", "%L", "%P", "%D")
SQUEUE_FORMAT = "|".join(SQUEUE_FIELDS)
# Pending jobs' partitions, GRES asked for per node, and node count: `squeue -h -t PENDING -o PENDING_DEMAND_FORMAT`.
PENDING_DEMAND_FORMAT = "%P|%b|%D"


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    name: str
    state: str
    reason: str
    start_time: datetime | None  # actual start when running, Slurm's estimate (or None) when pending
    node_list: str
    time_used_s: int | None
    time_left_s: int | None
    partition: str
    node_count: int

    @property
    def nodes(self) -> list[str]:
        return expand_hostlist(self.node_list)


def parse_squeue(text: str) -> tuple[list[QueuedJob], list[str]]:
    """squeue's output in SQUEUE_FORMAT: the jobs, and the lines that could not be read."""
    jobs: list[QueuedJob] = []
    bad: list[str] = []
    # Only "\n" ends a record: splitlines() would also split on characters a job name may contain (\x1e, \x85).
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if not line.strip() or is_cluster_header(line):  # "CLUSTER: NAME" when asked with --clusters
            continue
        parts = line.split("|")
        if len(parts) != len(SQUEUE_FIELDS) or not shellsafe.JOB_ID.accepts(parts[0]):
            bad.append(line)
            continue
        job_id, name, state, reason, start, nodes, used, left, partition, count = parts
        try:
            jobs.append(
                QueuedJob(
                    job_id=job_id,
                    name=name,
                    state=base_state(state),
                    reason=reason if reason != "None" else "",
                    start_time=parse_time(start),
                    node_list=nodes,
                    time_used_s=parse_duration(used),
                    time_left_s=parse_duration(left),
                    partition=partition,
                    node_count=int(count),
                )
            )
        except (SlurmParseError, ValueError):
            bad.append(line)
    return jobs, bad


@dataclass(frozen=True)
class PendingDemand:
    jobs: int
    gpus: dict[str, int]  # GRES type -> GPUs the pending jobs ask for in all


def parse_pending_demand(text: str) -> dict[str, PendingDemand]:
    """Pending jobs and the GPUs they ask for, per partition, from squeue's rows in PENDING_DEMAND_FORMAT."""
    jobs: dict[str, int] = {}
    gpus: dict[str, dict[str, int]] = {}
    for line in text.split("\n"):
        parts = line.strip().split("|")
        if len(parts) != 3 or not (parts[2].isascii() and parts[2].isdigit()):
            continue
        nodes = int(parts[2])
        # A job may name several partitions; it waits in each of them.
        for partition in parts[0].split(","):
            jobs[partition] = jobs.get(partition, 0) + 1
            for kind, count in gpu_counts(parts[1]).items():
                per = gpus.setdefault(partition, {})
                per[kind] = per.get(kind, 0) + count * nodes
    return {p: PendingDemand(jobs=n, gpus=gpus.get(p, {})) for p, n in jobs.items()}
