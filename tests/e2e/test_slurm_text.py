"""The library of Slurm's text (portal/slurm/) against the live local cluster's Slurm: hostlists as `scontrol show
hostnames` expands them, time limits as sbatch reads them, the nodes and partitions scontrol lists now, and sacct's
answer to the poll's question.

Runs Slurm's commands as root on this host; submits no job (`sbatch --test-only` only asks when a job would start).
The same inputs, recorded, are the unit tests' (tests/portal/data/slurm/)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from portal.slurm.errors import SlurmParseError
from portal.slurm.hostlist import MAX_RANGE, expand_hostlist
from portal.slurm.jobstates import base_state
from portal.slurm.records import parse_job_records, parse_nodes, parse_partitions
from portal.slurm.sacct import SACCT_OPTIONS, parse_sacct
from portal.slurm.sinfo import SINFO_GRES_OPTIONS, parse_sinfo_gres
from portal.slurm.times import parse_limit_min
from tests.portal.slurm.data import (
    TIMES_PRINTED_ONLY,
    TIMES_SBATCH_READS_OTHERWISE,
    cases,
    hostnames_expected,
    sbatch_time_of,
)
from tests.portal.slurm.data import text as recorded

pytestmark = pytest.mark.e2e

HOSTLISTS = [case["input"] for case in cases("hostnames.jsonl")]
# Beyond the recording (their output is long): Slurm's largest range, and the next it refuses.
HOSTLISTS += [f"n[0-{MAX_RANGE - 1}]", f"n[1-{MAX_RANGE}],m[1-2]", f"n[0-{MAX_RANGE}]"]
TIMES = [case["input"] for case in cases("sbatch-time.jsonl")]
# The keys of a jobcomp record that sacct --completion reads without checking they are there.
SACCT_READS = ("UserId", "GroupId", "Name", "JobState", "StartTime", "EndTime", "NodeList", "ExitCode")


def whole_record(line: str) -> bool:
    return line.endswith("\n") and line.startswith("JobId=") and all(f" {key}=" in line for key in SACCT_READS)


def slurm(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def cluster(local_cluster: dict[str, Any]) -> dict[str, Any]:
    return local_cluster


def test_hostlists_expand_as_scontrol_show_hostnames_expands_them(cluster: dict[str, Any]) -> None:
    wrong = []
    for text in HOSTLISTS:
        shown = slurm("scontrol", "show", "hostnames", text)
        expected = hostnames_expected(text, shown.stdout, shown.stderr)
        try:
            names: list[str] | None = expand_hostlist(text)
        except SlurmParseError:
            names = None
        if names != expected:
            wrong.append(f"{text!r}: Slurm {shown.stdout[:80]!r} {shown.stderr[:80]!r}, library {str(names)[:80]}")
    assert not wrong, "\n".join(wrong)


def test_time_limits_are_read_as_sbatch_reads_them(cluster: dict[str, Any]) -> None:
    wrong = []
    for text in TIMES:
        if text in TIMES_SBATCH_READS_OTHERWISE or text in TIMES_PRINTED_ONLY:
            continue
        asked = slurm("sbatch", "--test-only", "-p", "gpu", "-t", text, "-vv", "--wrap=true")
        read = sbatch_time_of(asked.stderr)
        try:
            ours: int | str | None = parse_limit_min(text)
        except SlurmParseError:
            ours = "refused"
        if ours != ("refused" if read is None else parse_limit_min(read)):
            wrong.append(f"{text!r}: sbatch read {read!r}, library {ours!r}")
    assert not wrong, "\n".join(wrong)


def test_the_live_nodes_and_partitions_parse_and_agree_with_each_other(cluster: dict[str, Any]) -> None:
    nodes = {node.name: node for node in parse_nodes(slurm("scontrol", "show", "node", "-o").stdout)}
    partitions = parse_partitions(slurm("scontrol", "show", "partition", "-o").stdout)
    assert {"node1", "node2", "node3"} <= set(nodes)
    assert {"gpu", "gpu_devel"} <= {partition.name for partition in partitions}
    for partition in partitions:
        assert partition.max_walltime_min is None or partition.max_walltime_min > 0
        listed = slurm("scontrol", "show", "partition", partition.name, "-o").stdout
        (nodes_field,) = [word for word in listed.split() if word.startswith("Nodes=")]
        expanded = slurm("scontrol", "show", "hostnames", nodes_field.removeprefix("Nodes=")).stdout.split()
        assert list(partition.nodes) == expanded
        for name in partition.nodes:
            assert partition.name in nodes[name].partitions
    # sinfo says the same of each node's CPUs, memory and GPUs as scontrol did.
    rows = slurm("sinfo", "-h", "-N", "-o", "%N|%c|%m").stdout.split()
    for row in rows:
        name, cpus, memory = row.split("|")
        assert (nodes[name].cpus, nodes[name].memory_mib) == (int(cpus), int(memory))
    gres, bad = parse_sinfo_gres(slurm("sinfo", "-h", "-N", "-O", SINFO_GRES_OPTIONS).stdout)
    assert bad == [] and gres
    for seen in gres:
        assert seen.gpus == dict(nodes[seen.node].gpus) and seen.features == nodes[seen.node].features


def test_sacct_answers_the_polls_question_as_recorded(cluster: dict[str, Any]) -> None:
    """No slurmdbd here: sacct says so and prints no row, as recorded. On a cluster with one every row it prints for
    the poll's options is read."""
    asked = slurm("sacct", *SACCT_OPTIONS, "-j", "1")
    if asked.returncode != 0:
        assert (asked.stdout, asked.stderr) == ("", recorded("sacct-disabled.txt"))
    assert parse_sacct(asked.stdout)[1] == []


def test_sacct_rows_of_the_finished_jobs_say_what_their_completion_records_say(
    cluster: dict[str, Any], tmp_path: Path
) -> None:
    """sacct --completion reads the cluster's jobcomp log (a copy, named by a copy of slurm.conf) through the same
    printer that prints slurmdbd's rows: the library reads them with scontrol's keys and its values."""
    log = tmp_path / "jobcomp.log"
    # Whole records only. sacct 22.05's reader of this log dies of a segmentation fault on a record without a key it
    # reads (StartTime, UserId, JobId, ...): one cut short while slurmctld writes it (a job an earlier test cancelled),
    # or the first line of a job whose name holds a newline (the hostile-name tests submit one), which splits its
    # record over lines. The portal never reads this log; what is checked here is its reading of sacct's rows.
    lines = Path(cluster["jobcomp_log"]).read_text().splitlines(keepends=True)
    log.write_text("".join(line for line in lines if whole_record(line)))
    logged = parse_job_records(log.read_text())  # a requeued job's later record wins, as its later row does
    if not logged:
        pytest.skip("no job has finished on the local cluster yet")
    config = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    (tmp_path / "slurm.conf").write_text(re.sub(r"(?m)^JobCompLoc=.*$", f"JobCompLoc={log}", config))
    asked = subprocess.run(
        ["sacct", "--completion", *SACCT_OPTIONS, "-j", ",".join(logged)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SLURM_CONF": str(tmp_path / "slurm.conf")},
    )
    records, bad = parse_sacct(asked.stdout)
    assert asked.returncode == 0 and bad == [], asked.stderr
    assert set(records) == set(logged)
    keys = ("JobState", "ExitCode", "StartTime", "EndTime", "NodeList")
    for job_id, record in records.items():
        entry = {**logged[job_id], "JobState": base_state(logged[job_id]["JobState"])}
        assert [record[key] for key in keys] == [entry[key] for key in keys], job_id
        assert record["JobName"] == entry["Name"]  # the log's key for it; scontrol show job says JobName
