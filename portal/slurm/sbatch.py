"""What sbatch prints: `--parsable`'s job id, `--test-only`'s estimate, and the scheduler's words when it refuses."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from portal.slurm.errors import SlurmParseError
from portal.slurm.times import parse_time

# "JOBID" or "JOBID;CLUSTER" (with --clusters).
_PARSABLE = re.compile(r"(\d+)(?:;[\w.-]+)?")
_TEST_ONLY = re.compile(
    r"Job (?P<job>\d+) to start at (?P<start>\S+) using (?P<cpus>\d+) processors? on nodes? (?P<nodes>\S+)"
    r"(?: in partition (?P<partition>\S+))?"
)


def parse_sbatch_parsable(stdout: str) -> str:
    """The job id of `sbatch --parsable`'s output. Raises SlurmParseError."""
    text = stdout.strip()
    match = _PARSABLE.fullmatch(text)
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
    partition: str  # "" from a Slurm that does not say


def parse_test_only(stderr: str) -> StartEstimate:
    """`sbatch --test-only`'s estimate; raises SlurmParseError with Slurm's message when it gave none."""
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
