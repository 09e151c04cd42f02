"""Parsers of Slurm's text: property tests for their contracts, and the real cluster's own output."""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.cluster import slurm
from portal.ssh import SSHPool, SSHTarget

# --- unit tests with the output forms Slurm prints ---------------------------------------------------------


def test_squeue_lines_parse_into_jobs_and_bad_lines_are_reported_not_dropped() -> None:
    text = (
        "37|waiter|PENDING|Resources|N/A||0:00|1:00:00|gpu|2\n"
        "36|hold|RUNNING|None|2026-11-21T12:29:07|node[1-2]|0:01|59:59|gpu|2\n"
        "slurm_load_jobs error: Socket timed out on send/recv operation\n"
    )
    jobs, bad = slurm.parse_squeue(text)
    assert [j.job_id for j in jobs] == ["37", "36"]
    pending, running = jobs
    assert (pending.state, pending.reason, pending.start_time, pending.nodes) == ("PENDING", "Resources", None, [])
    assert running.start_time == datetime(2026, 11, 21, 12, 29, 7)
    assert running.nodes == ["node1", "node2"]
    assert (running.time_used_s, running.time_left_s, running.reason) == (1, 3599, "")
    assert bad == ["slurm_load_jobs error: Socket timed out on send/recv operation"]


def test_sbatch_parsable_and_its_errors() -> None:
    assert slurm.parse_sbatch_parsable("36\n") == "36"
    assert slurm.parse_sbatch_parsable("36;grace\n") == "36"
    with pytest.raises(slurm.SlurmParseError):
        slurm.parse_sbatch_parsable("sbatch: error: Batch job submission failed\n")
    stderr = "sbatch: error: Batch job submission failed: Requested node configuration is not available\n"
    assert slurm.sbatch_error(stderr) == "Requested node configuration is not available"
    stderr = (
        "sbatch: error: invalid partition specified: nosuch\nallocation failure: Invalid partition name specified\n"
    )
    assert slurm.sbatch_error(stderr) == (
        "invalid partition specified: nosuch; allocation failure: Invalid partition name specified"
    )


def test_test_only_forms() -> None:
    line = "sbatch: Job 38 to start at 2026-11-21T13:49:07 using 2 processors on nodes node[1-2] in partition gpu"
    estimate = slurm.parse_test_only(line)
    assert (estimate.job_id, estimate.start, estimate.processors, estimate.node_list, estimate.partition) == (
        "38",
        datetime(2026, 11, 21, 13, 49, 7),
        2,
        "node[1-2]",
        "gpu",
    )
    # Older Slurm prints no partition and "processor"/"node" in the singular.
    single = slurm.parse_test_only("sbatch: Job 5 to start at 2026-01-02T03:04:05 using 1 processor on node n1")
    assert (single.node_list, single.partition) == ("n1", "")
    with pytest.raises(slurm.SlurmParseError, match="Requested node configuration is not available"):
        slurm.parse_test_only("allocation failure: Requested node configuration is not available\n")


def test_key_value_records_keep_values_with_spaces() -> None:
    line = (
        "JobId=36 UserId=llmuser(1001) Name=my job JobState=CANCELLED Partition=gpu TimeLimit=60 "
        "NodeList=node[1-2] ReqB:S:C:T=0:0:*:* CPUs/Task=1 ExitCode=0:0 "
    )
    record = slurm.parse_key_values(line)
    assert record["Name"] == "my job"
    assert record["JobState"] == "CANCELLED"
    assert record["ReqB:S:C:T"] == "0:0:*:*"
    assert record["CPUs/Task"] == "1"
    assert record["ExitCode"] == "0:0"
    records = slurm.parse_job_records(line + "\nJobId=36 JobState=COMPLETED\nnot a record\n")
    assert records["36"]["JobState"] == "COMPLETED"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0:01", 1), ("59:59", 3599), ("1:00:00", 3600), ("2-00:00:00", 172800), ("UNLIMITED", None), ("N/A", None)],
)
def test_durations(text: str, seconds: int | None) -> None:
    assert slurm.parse_duration(text) == seconds


def test_hostlists() -> None:
    assert slurm.expand_hostlist("node[1-3,7],gpu[01-02]") == ["node1", "node2", "node3", "node7", "gpu01", "gpu02"]
    assert slurm.expand_hostlist("c1,c2") == ["c1", "c2"]
    assert slurm.expand_hostlist("rack[1-2]-n") == ["rack1-n", "rack2-n"]
    assert slurm.expand_hostlist("(null)") == []
    with pytest.raises(slurm.SlurmParseError):
        slurm.expand_hostlist("node[a-b]")


def test_job_names_carry_only_a_session_uuid() -> None:
    session = str(uuid.uuid4())
    assert slurm.job_name(session) == f"hpcllm-{session}"
    for hostile in ("x; rm -rf ~", "$(id)", session + "\n", ""):
        with pytest.raises(ValueError):
            slurm.job_name(hostile)


def test_squeue_command_quotes_its_arguments() -> None:
    command = slurm.squeue_command(job_names=["hpcllm-a", "hpcllm-b"], user="ada")
    assert command == "squeue --noheader --states=all '--format=%i|%j|%T|%r|%S|%N|%M|%L|%P|%D' " + (
        "--name=hpcllm-a,hpcllm-b --user=ada"
    )


# --- properties ---------------------------------------------------------------------------------------------

SAFE = st.text(alphabet=st.characters(exclude_characters="|\n\r", exclude_categories=["Cs"]), max_size=20)
TIMES = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31)).map(
    lambda d: d.replace(microsecond=0)
)


@given(
    st.lists(
        st.tuples(
            st.integers(1, 10**9),
            SAFE,
            st.sampled_from(sorted(slurm.PENDING_STATES | slurm.ACTIVE_STATES | slurm.FINISHED_STATES)),
            st.from_regex(r"[A-Za-z]{1,20}", fullmatch=True),
            st.none() | TIMES,
            st.integers(0, 10**7),
            st.integers(1, 64),
        ),
        max_size=20,
    )
)
def test_squeue_round_trips_whatever_the_job_names(rows: list[Any]) -> None:
    lines = []
    for job_id, name, state, reason, start, used, count in rows:
        start_text = start.strftime("%Y-%m-%dT%H:%M:%S") if start else "N/A"
        lines.append(
            f"{job_id}|{name}|{state}|{reason}|{start_text}|n[1-{count}]|{slurm.format_duration(used)}|"
            f"UNLIMITED|gpu|{count}"
        )
    jobs, bad = slurm.parse_squeue("\n".join(lines))
    assert bad == []
    assert [(j.job_id, j.name, j.state, j.start_time, j.time_used_s, len(j.nodes)) for j in jobs] == [
        (str(job_id), name, state, start, used, count) for job_id, name, state, _, start, used, count in rows
    ]


@given(st.integers(0, 10**8))
def test_durations_round_trip(seconds: int) -> None:
    assert slurm.parse_duration(slurm.format_duration(seconds)) == seconds


@given(st.text(max_size=200))
def test_parsers_never_fail_with_anything_but_their_own_error(text: str) -> None:
    for parse in (slurm.parse_test_only, slurm.parse_sbatch_parsable, slurm.expand_hostlist, slurm.parse_duration):
        with contextlib.suppress(slurm.SlurmParseError):
            parse(text)
    slurm.parse_squeue(text)
    slurm.parse_job_records(text)


@given(
    st.dictionaries(
        st.from_regex(r"[A-Z][A-Za-z]{0,12}", fullmatch=True),
        st.text(alphabet=st.characters(exclude_characters="=\n\r", exclude_categories=["Cs"]), max_size=15).map(
            str.strip
        ),
        min_size=1,
        max_size=10,
    )
)
def test_key_values_round_trip(record: dict[str, str]) -> None:
    line = " ".join(f"{key}={value}" for key, value in record.items())
    assert slurm.parse_key_values(line) == record


# --- the real scheduler's output ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_real_outputs_of_the_local_cluster_parse(local_cluster: dict[str, Any]) -> None:
    target = SSHTarget(
        local_cluster["host"],
        local_cluster["port"],
        local_cluster["user"],
        local_cluster["host_key_line"],
        Path(local_cluster["private_key"]).read_text(),
    )
    pool = SSHPool()
    try:
        name = slurm.job_name(str(uuid.uuid4()))
        estimate = slurm.parse_test_only(pool.run(target, "sbatch --test-only -p gpu -N2 --wrap=true").stderr)
        assert estimate.partition == "gpu" and len(slurm.expand_hostlist(estimate.node_list)) == 2
        submitted = pool.run(target, f"sbatch --parsable -J {name} -p gpu -N2 --ntasks-per-node=1 --wrap='sleep 30'")
        job_id = slurm.parse_sbatch_parsable(submitted.stdout)
        try:
            for _ in range(40):
                jobs, bad = slurm.parse_squeue(pool.run(target, slurm.squeue_command(job_names=[name])).stdout)
                assert not bad
                if jobs and jobs[0].state == "RUNNING":
                    break
                time.sleep(0.25)
            job = jobs[0]
            assert (job.job_id, job.name, job.state, job.partition, job.node_count) == (
                job_id,
                name,
                "RUNNING",
                "gpu",
                2,
            )
            assert len(job.nodes) == 2 and job.start_time is not None
        finally:
            pool.run(target, f"scancel {job_id}")
        for _ in range(40):
            record = slurm.parse_job_records(
                pool.run(target, f"grep 'JobId={job_id} ' {local_cluster['jobcomp_log']}").stdout
            )
            if job_id in record:
                break
            time.sleep(0.25)
        assert record[job_id]["JobState"] == "CANCELLED"
        assert record[job_id]["Name"] == name
        assert slurm.expand_hostlist(record[job_id]["NodeList"]) == job.nodes
        failure = pool.run(target, "sbatch -p gpu --gres=gpu:a100:3 --wrap=true")
        assert not failure.ok
        assert slurm.sbatch_error(failure.stderr) == "Requested node configuration is not available"
        assert re.search(r"^\d+$", job_id)
    finally:
        pool.close_all()
