"""What sbatch prints (portal/slurm/sbatch.py), the local cluster's own included (tests/portal/data/slurm/)."""

from __future__ import annotations

import contextlib
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portal.slurm.errors import SlurmParseError
from portal.slurm.hostlist import expand_hostlist
from portal.slurm.sbatch import parse_sbatch_parsable, parse_test_only, sbatch_error
from tests.portal.slurm.data import text


def test_sbatch_parsable_and_its_errors() -> None:
    assert parse_sbatch_parsable("36\n") == "36"
    assert parse_sbatch_parsable("36;grace\n") == "36"  # with --clusters
    with pytest.raises(SlurmParseError):
        parse_sbatch_parsable("sbatch: error: Batch job submission failed\n")
    stderr = "sbatch: error: Batch job submission failed: Requested node configuration is not available\n"
    assert sbatch_error(stderr) == "Requested node configuration is not available"
    stderr = (
        "sbatch: error: invalid partition specified: nosuch\nallocation failure: Invalid partition name specified\n"
    )
    assert sbatch_error(stderr) == (
        "invalid partition specified: nosuch; allocation failure: Invalid partition name specified"
    )


def test_the_local_clusters_estimate_and_refusal_are_read() -> None:
    estimate = parse_test_only(text("sbatch-test-only.txt"))
    assert (estimate.partition, estimate.processors, expand_hostlist(estimate.node_list)) == (
        "gpu",
        2,
        ["node1", "node2"],
    )
    with pytest.raises(SlurmParseError, match="Requested node configuration is not available"):
        parse_test_only(text("sbatch-test-only-refused.txt"))


def test_test_only_forms() -> None:
    line = "sbatch: Job 38 to start at 2026-11-21T13:49:07 using 2 processors on nodes node[1-2] in partition gpu"
    estimate = parse_test_only(line)
    assert (estimate.job_id, estimate.start, estimate.processors, estimate.node_list, estimate.partition) == (
        "38",
        datetime(2026, 11, 21, 13, 49, 7),
        2,
        "node[1-2]",
        "gpu",
    )
    # Older Slurm prints no partition and "processor"/"node" in the singular.
    single = parse_test_only("sbatch: Job 5 to start at 2026-01-02T03:04:05 using 1 processor on node n1")
    assert (single.node_list, single.partition) == ("n1", "")


names = st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True)


@given(
    job=st.integers(1, 10**9),
    start=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 1, 1)).map(
        lambda d: d.replace(microsecond=0)
    ),
    cpus=st.integers(1, 10**5),
    nodes=st.lists(names, min_size=1, max_size=3).map(",".join),
    partition=st.one_of(st.none(), names),
    prefix=st.sampled_from(["sbatch: ", ""]),
)
def test_test_only_lines_round_trip(
    job: int, start: datetime, cpus: int, nodes: str, partition: str | None, prefix: str
) -> None:
    plural = "s" if cpus > 1 else ""
    where = f" in partition {partition}" if partition else ""
    when = f"{start:%Y-%m-%dT%H:%M:%S}"
    line = f"{prefix}Job {job} to start at {when} using {cpus} processor{plural} on nodes {nodes}{where}"
    parsed = parse_test_only("some warning\n" + line + "\n")
    assert (parsed.job_id, parsed.start, parsed.processors, parsed.node_list) == (str(job), start, cpus, nodes)
    assert parsed.partition == (partition or "")


@given(st.text(max_size=200))
def test_anything_is_read_or_the_librarys_own_error(text: str) -> None:
    for parse in (parse_test_only, parse_sbatch_parsable):
        with contextlib.suppress(SlurmParseError):
            parse(text)
    assert sbatch_error(text)
