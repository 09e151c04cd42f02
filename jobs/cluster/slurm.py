"""Slurm's text formats: building the few commands the portal runs and parsing what they print.

Knows Slurm and nothing of SSH or Django. Parsers are strict about what they return and never guess: a line they
cannot read is skipped and reported (squeue), or raises SlurmParseError, so a scheduler hiccup is never mistaken
for "the job is gone".

Checked against Slurm 22.05 (Debian 12) on the local test cluster; the forms are stable across 20.x-24.x.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from catalog.slurm_cli import PLAIN, SlurmCli, is_cluster_header
from portal import shellsafe

JOB_NAME_PREFIX = "hpcllm-"

# Slurm job states (squeue %T, scontrol JobState) by what they mean for a session.
PENDING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED"})
ACTIVE_STATES = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "STAGE_OUT", "RESIZING", "SIGNALING"})
FINISHED_STATES = frozenset(
    {
        "COMPLETED",
        "CANCELLED",
        "FAILED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)

# One field per job, "|"-separated: portal job names never contain "|" and squeue prints fields verbatim.
SQUEUE_FIELDS = ("%i", "%j", "%T", "%r", "%S", "%N", "%M", "%L", "%P", "%D")
SQUEUE_FORMAT = "|".join(SQUEUE_FIELDS)

_NOT_A_TIME = {"", "N/A", "Unknown", "None", "(null)"}


class SlurmParseError(ValueError):
    """Slurm printed something the portal cannot read; callers treat the state as unknown, never as finished."""


def job_name(session_id: str) -> str:
    """The Slurm job name of a session: a fixed prefix and the session's uuid, so retries can find the job."""
    shellsafe.UUID.check(session_id, "session uuid")
    return f"{JOB_NAME_PREFIX}{session_id}"


def squeue_command(*, job_names: list[str] | None = None, user: str | None = None, cli: SlurmCli = PLAIN) -> str:
    """squeue for the given job names (or a user's jobs), one "|"-separated line per job, all states."""
    words = ["--noheader", "--states=all", f"--format={SQUEUE_FORMAT}"]
    if job_names:
        words.append("--name=" + ",".join(job_names))
    if user:
        words.append(f"--user={user}")
    return cli.command("squeue", *words)


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
    """Parse squeue output in SQUEUE_FORMAT; return the jobs and the lines that could not be read."""
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
                    state=state.split()[0] if state.strip() else "",
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


def parse_sbatch_parsable(stdout: str) -> str:
    """`sbatch --parsable` prints "JOBID" or "JOBID;CLUSTER"; return the job id."""
    text = stdout.strip()
    match = re.fullmatch(r"(\d+)(?:;[\w.-]+)?", text)
    if not match:
        raise SlurmParseError(f"sbatch did not print a job id: {text[:200]!r}")
    return match.group(1)


def sbatch_error(stderr: str) -> str:
    """The scheduler's own words from a failed sbatch, for the session's end reason."""
    messages = []
    for line in stderr.splitlines():
        line = line.strip()
        if not line:
            continue
        line = re.sub(r"^(sbatch: )?(error: )?", "", line)
        line = re.sub(r"^Batch job submission failed: ", "", line)
        if line and line not in messages:
            messages.append(line)
    return "; ".join(messages) or "sbatch failed without a message"


@dataclass(frozen=True)
class StartEstimate:
    job_id: str
    start: datetime
    processors: int
    node_list: str
    partition: str


_TEST_ONLY = re.compile(
    r"Job (?P<job>\d+) to start at (?P<start>\S+) using (?P<cpus>\d+) processors? on nodes? (?P<nodes>\S+)"
    r"(?: in partition (?P<partition>\S+))?"
)


def parse_test_only(stderr: str) -> StartEstimate:
    """Read `sbatch --test-only`'s estimate; raise SlurmParseError with Slurm's message when it gave none."""
    match = _TEST_ONLY.search(stderr)
    if not match:
        raise SlurmParseError(sbatch_error(stderr))
    start = parse_time(match.group("start"))
    if start is None:
        raise SlurmParseError(f"no start time in: {match.group(0)}")
    return StartEstimate(
        job_id=match.group("job"),
        start=start,
        processors=int(match.group("cpus")),
        node_list=match.group("nodes"),
        partition=match.group("partition") or "",
    )


_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")


def parse_key_values(line: str) -> dict[str, str]:
    """Split `Key=value Key=value` records (scontrol -o, jobcomp/filetxt). Values may contain spaces."""
    found = list(_KEY.finditer(line))
    record: dict[str, str] = {}
    for index, match in enumerate(found):
        end = found[index + 1].start() if index + 1 < len(found) else len(line)
        record[match.group(1)] = line[match.end() : end].strip()
    return record


def parse_job_records(text: str) -> dict[str, dict[str, str]]:
    """Records of `scontrol show job -o` or the jobcomp/filetxt log, by job id; a later record wins."""
    records: dict[str, dict[str, str]] = {}
    for line in text.split("\n"):
        record = parse_key_values(line)
        job_id = record.get("JobId")
        if job_id and job_id.isdigit():
            records[job_id] = record
    return records


def parse_time(text: str) -> datetime | None:
    """Slurm prints local wall-clock times of the cluster, ISO-like, without a zone; None for N/A and friends."""
    text = text.strip()
    if text in _NOT_A_TIME:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise SlurmParseError(f"not a Slurm time: {text!r}") from None


_DURATION = re.compile(r"(?:(?P<days>\d+)-)?(?:(?P<hours>\d+):)?(?P<minutes>\d+):(?P<seconds>\d+)")


def parse_duration(text: str) -> int | None:
    """Seconds in a Slurm duration ([D-]HH:MM:SS, MM:SS); None for UNLIMITED, NOT_SET, INVALID and N/A."""
    text = text.strip()
    if text in {"UNLIMITED", "NOT_SET", "INVALID", "N/A", "Partition_Limit", ""}:
        return None
    match = _DURATION.fullmatch(text)
    if not match:
        raise SlurmParseError(f"not a Slurm duration: {text!r}")
    parts = {k: int(v) if v else 0 for k, v in match.groupdict().items()}
    if match.group("days") and not match.group("hours"):
        raise SlurmParseError(f"not a Slurm duration: {text!r}")
    return ((parts["days"] * 24 + parts["hours"]) * 60 + parts["minutes"]) * 60 + parts["seconds"]


def format_duration(seconds: int) -> str:
    """The [D-]HH:MM:SS form sbatch --time accepts."""
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock


_HOSTLIST_ITEM = re.compile(r"([^,\[]+)(?:\[([^\]]+)\])?([^,\[]*)")


def expand_hostlist(text: str) -> list[str]:
    """Expand a Slurm hostlist such as "node[1-3,7],gpu[01-02]" into host names, keeping zero padding."""
    text = text.strip()
    if text in {"", "(null)", "None"}:
        return []
    hosts: list[str] = []
    position = 0
    while position < len(text):
        match = _HOSTLIST_ITEM.match(text, position)
        if not match or match.end() == position:
            raise SlurmParseError(f"not a Slurm hostlist: {text!r}")
        prefix, ranges, suffix = match.groups()
        if ranges is None:
            hosts.append(prefix + suffix)
        else:
            for part in ranges.split(","):
                low, _, high = part.partition("-")
                if not low.isdigit() or (high and not high.isdigit()):
                    raise SlurmParseError(f"not a Slurm hostlist: {text!r}")
                width = len(low)
                for number in range(int(low), int(high or low) + 1):
                    hosts.append(f"{prefix}{number:0{width}d}{suffix}")
        position = match.end()
        if position < len(text):
            if text[position] != ",":
                raise SlurmParseError(f"not a Slurm hostlist: {text!r}")
            position += 1
    return hosts


# Per node and partition: configured and allocated GRES. -O fields end with "|" so values may contain commas.
SINFO_GRES_OPTIONS = "NodeList:|,Partition:|,StateCompact:|,Features:|,Gres:|,GresUsed:|"
PENDING_DEMAND_FORMAT = "%P|%b|%D"
# Nodes in these states take no new jobs; their GPUs are neither idle nor soon available.
UNAVAILABLE_NODE_STATES = ("down", "drain", "drng", "fail", "maint", "boot", "powered", "power", "inval", "futr")
_GPU_GRES = re.compile(r"(?:^|[,\s])(?:gres[:/])?gpu(?::(?P<type>[^:(,\s]+))?:(?P<count>\d+)")


@dataclass(frozen=True)
class NodeGres:
    node: str
    partition: str
    state: str
    features: frozenset[str]
    gpus: dict[str, int]  # GRES type -> configured count
    gpus_used: dict[str, int]

    @property
    def available(self) -> bool:
        return not self.state.rstrip("*~#!%$@^-").startswith(UNAVAILABLE_NODE_STATES)


def gpu_counts(text: str) -> dict[str, int]:
    """GPU GRES by type from 'gpu:a100:2', 'gpu:a100:2(IDX:0-1),gpu:h100:1' or 'gres:gpu:a100:2'; untyped -> ''."""
    counts: dict[str, int] = {}
    for match in _GPU_GRES.finditer(text):
        kind = match.group("type") or ""
        if kind.isdigit():  # "gpu:4" has no type; the regex took the count for one
            kind = ""
        counts[kind] = counts.get(kind, 0) + int(match.group("count"))
    return counts


def parse_sinfo_gres(text: str) -> tuple[list[NodeGres], list[str]]:
    nodes: list[NodeGres] = []
    bad: list[str] = []
    for line in text.split("\n"):
        if not line.strip() or is_cluster_header(line):
            continue
        parts = line.split("|")
        if len(parts) < 6:
            bad.append(line)
            continue
        node, partition, state, features, gres, used = (p.strip() for p in parts[:6])
        nodes.append(
            NodeGres(
                node=node,
                partition=partition.rstrip("*"),
                state=state,
                features=frozenset(f for f in features.split(",") if f and f != "(null)"),
                gpus=gpu_counts(gres),
                gpus_used=gpu_counts(used),
            )
        )
    return nodes, bad


@dataclass(frozen=True)
class PendingDemand:
    jobs: int
    gpus: dict[str, int]  # GRES type -> GPUs the pending jobs ask for in all


def parse_pending_demand(text: str) -> dict[str, PendingDemand]:
    """Pending jobs and the GPUs they ask for, per partition, from squeue -t PENDING -o PENDING_DEMAND_FORMAT."""
    jobs: dict[str, int] = {}
    gpus: dict[str, dict[str, int]] = {}
    for line in text.split("\n"):
        parts = line.strip().split("|")
        if len(parts) != 3 or not parts[2].isdigit():
            continue
        nodes = int(parts[2])
        # A job may name several partitions; it waits in each of them.
        for partition in parts[0].split(","):
            jobs[partition] = jobs.get(partition, 0) + 1
            for kind, count in gpu_counts(parts[1]).items():
                per = gpus.setdefault(partition, {})
                per[kind] = per.get(kind, 0) + count * nodes
    return {p: PendingDemand(jobs=n, gpus=gpus.get(p, {})) for p, n in jobs.items()}
