"""sinfo's rows per node and partition (portal/slurm/sinfo.py), the local cluster's own among them."""

from __future__ import annotations

from portal.slurm.sinfo import parse_sinfo_gres
from tests.portal.slurm.data import text


def test_the_local_clusters_nodes_and_their_gpus_are_read() -> None:
    nodes, bad = parse_sinfo_gres(text("sinfo-gres.txt"))
    assert bad == []
    assert [(n.node, n.partition, n.state, n.available, n.gpus, n.gpus_used) for n in nodes] == [
        ("node1", "gpu", "idle", True, {"a100": 2}, {"a100": 0}),
        ("node2", "gpu", "idle", True, {"a100": 2}, {"a100": 0}),
        ("node3", "gpu_devel", "idle", True, {"h100": 2}, {"h100": 0}),
        ("node3", "gpu", "idle", True, {"h100": 2}, {"h100": 0}),
    ]
    assert nodes[0].features == {"a100", "a100-80g"}


def test_sinfo_gres_lines_count_gpus_by_type_and_skip_unavailable_nodes() -> None:
    sample = (
        "CLUSTER: c2\n"
        "node1|gpu*|mix|a100,a100-80g|gpu:a100:2|gpu:a100:1(IDX:0)|\n"
        "node2|gpu*|drain|a100,a100-80g|gpu:a100:2(S:0-1)|gpu:a100:0(IDX:N/A)|\n"
        "node3|gpu|idle~|(null)|gpu:4|gpu:0|\n"
        "node4|gpu|down*|(null)|gpu:4|gpu:0|\n"
        "garbage\n"
    )
    nodes, bad = parse_sinfo_gres(sample)
    assert bad == ["garbage"]
    assert [(n.node, n.partition, n.available, n.gpus, n.gpus_used) for n in nodes] == [
        ("node1", "gpu", True, {"a100": 2}, {"a100": 1}),
        ("node2", "gpu", False, {"a100": 2}, {"a100": 0}),
        ("node3", "gpu", True, {"": 4}, {"": 0}),
        ("node4", "gpu", False, {"": 4}, {"": 0}),
    ]
    assert nodes[0].features == {"a100", "a100-80g"} and nodes[2].features == frozenset()
