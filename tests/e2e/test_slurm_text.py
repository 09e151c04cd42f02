"""The library of Slurm's text (portal/slurm/) against the live local cluster's Slurm: hostlists as `scontrol show
hostnames` expands them, time limits as sbatch reads them, and the nodes and partitions scontrol lists now.

Runs Slurm's commands as root on this host; submits no job (`sbatch --test-only` only asks when a job would start).
The same inputs, recorded, are the unit tests' (tests/portal/data/slurm/)."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from portal.slurm.errors import SlurmParseError
from portal.slurm.hostlist import MAX_RANGE, expand_hostlist
from portal.slurm.records import parse_nodes, parse_partitions
from portal.slurm.sinfo import SINFO_GRES_OPTIONS, parse_sinfo_gres
from portal.slurm.times import parse_limit_min
from tests.portal.slurm.data import (
    TIMES_PRINTED_ONLY,
    TIMES_SBATCH_READS_OTHERWISE,
    cases,
    hostnames_expected,
    sbatch_time_of,
)

pytestmark = pytest.mark.e2e

HOSTLISTS = [case["input"] for case in cases("hostnames.jsonl")]
# Beyond the recording (their output is long): Slurm's largest range, and the next it refuses.
HOSTLISTS += [f"n[0-{MAX_RANGE - 1}]", f"n[1-{MAX_RANGE}],m[1-2]", f"n[0-{MAX_RANGE}]"]
TIMES = [case["input"] for case in cases("sbatch-time.jsonl")]


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
