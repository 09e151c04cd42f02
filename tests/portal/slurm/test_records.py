"""scontrol's one-line records (portal/slurm/records.py), on the local cluster's own `scontrol show node -o` and
`scontrol show partition -o` (tests/portal/data/slurm/)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portal.slurm.errors import SlurmParseError
from portal.slurm.records import parse_job_records, parse_key_values, parse_nodes, parse_partitions
from tests.portal.slurm.data import text

NODES = text("scontrol-show-node.txt")
PARTITIONS = text("scontrol-show-partition.txt")


def test_the_local_clusters_nodes_are_read() -> None:
    nodes = {node.name: node for node in parse_nodes(NODES)}
    assert sorted(nodes) == ["node1", "node2", "node3"]
    assert (nodes["node1"].cpus, nodes["node1"].memory_mib, nodes["node1"].gpus) == (4, 4096, (("a100", 2),))
    assert nodes["node1"].features == {"a100", "a100-80g"} and nodes["node1"].partitions == {"gpu"}
    assert nodes["node3"].gpus == (("h100", 2),) and nodes["node3"].partitions == {"gpu", "gpu_devel"}


def test_the_local_clusters_partitions_are_read() -> None:
    partitions = {partition.name: partition for partition in parse_partitions(PARTITIONS)}
    gpu, devel = partitions["gpu"], partitions["gpu_devel"]
    assert (gpu.max_walltime_min, gpu.default_walltime_min, gpu.is_default, gpu.state) == (1440, 60, True, "UP")
    assert gpu.nodes == ("node1", "node2", "node3") and devel.nodes == ("node3",)
    assert (devel.max_walltime_min, devel.default_walltime_min, devel.is_default) == (120, 30, False)
    assert gpu.allow_accounts == "ALL" and gpu.allow_qos == "ALL"


def test_values_with_spaces_are_kept_whole() -> None:
    # catalog/inventory.py split records at every space: OS=Linux 6.18.44-fc-v1300 #1 SMP ... read as "Linux".
    node1 = parse_key_values(NODES.splitlines()[0])
    assert node1["OS"].startswith("Linux ") and "#1 SMP" in node1["OS"]
    assert node1["CfgTRES"] == "cpu=4,mem=4G,billing=4" and node1["AllocTRES"] == ""
    assert node1["RealMemory"] == "4096" and node1["Gres"] == "gpu:a100:2"


def test_unset_limits_and_empty_node_lists_are_none() -> None:
    line = "PartitionName=spare MaxTime=UNLIMITED DefaultTime=NONE Nodes=(null) State=DOWN AllowAccounts=lab1,lab2"
    (spare,) = parse_partitions(line)
    assert (spare.max_walltime_min, spare.default_walltime_min, spare.nodes) == (None, None, ())
    assert (spare.state, spare.allow_accounts) == ("DOWN", "lab1,lab2")


def test_records_that_cannot_be_read_are_refused_with_the_culprit() -> None:
    with pytest.raises(SlurmParseError, match="partition gpu"):
        parse_partitions("PartitionName=gpu MaxTime=soon Nodes=node[1-3]")
    with pytest.raises(SlurmParseError, match="partition gpu"):
        parse_partitions("PartitionName=gpu MaxTime=1:00:00 Nodes=node[1-2]-ib")
    with pytest.raises(SlurmParseError, match="node1"):
        parse_nodes("NodeName=node1 CPUTot=four RealMemory=4096")


def test_job_records_keep_values_with_spaces_and_keys_with_colons_and_slashes() -> None:
    line = (
        "JobId=36 UserId=llmuser(1001) Name=my job JobState=CANCELLED Partition=gpu TimeLimit=60 "
        "NodeList=node[1-2] ReqB:S:C:T=0:0:*:* CPUs/Task=1 ExitCode=0:0 "
    )
    record = parse_key_values(line)
    assert record["Name"] == "my job"
    assert record["JobState"] == "CANCELLED"
    assert record["ReqB:S:C:T"] == "0:0:*:*"
    assert record["CPUs/Task"] == "1"
    assert record["ExitCode"] == "0:0"
    records = parse_job_records(line + "\nJobId=36 JobState=COMPLETED\nnot a record\n")
    assert records["36"]["JobState"] == "COMPLETED"


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
    assert parse_key_values(line) == record


@given(st.text(max_size=300))
def test_anything_is_records_or_the_librarys_own_error(text: str) -> None:
    parse_job_records(text)
    for parse in (parse_nodes, parse_partitions):
        with contextlib.suppress(SlurmParseError):
            parse(text)
        with contextlib.suppress(SlurmParseError):
            parse("PartitionName=" + text)
        with contextlib.suppress(SlurmParseError):
            parse("NodeName=" + text)
