"""sinfo's rows per node and partition: its state, features, and GRES configured and in use."""

from __future__ import annotations

from dataclasses import dataclass

from portal.slurm.cli import is_cluster_header
from portal.slurm.gres import gpu_counts

# `sinfo -h -N -O SINFO_GRES_OPTIONS`: -O fields end with "|" so values may contain commas.
SINFO_GRES_OPTIONS = "NodeList:|,Partition:|,StateCompact:|,Features:|,Gres:|,GresUsed:|"
# Nodes in these states take no new jobs; their GPUs are neither idle nor soon available.
UNAVAILABLE_NODE_STATES = ("down", "drain", "drng", "fail", "maint", "boot", "powered", "power", "inval", "futr")


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
        # The compact state's last character flags it: * not responding, ~ powered off, # powering up...
        return not self.state.rstrip("*~#!%$@^-").startswith(UNAVAILABLE_NODE_STATES)


def parse_sinfo_gres(text: str) -> tuple[list[NodeGres], list[str]]:
    """sinfo's output with SINFO_GRES_OPTIONS: a row per node and partition, and the lines that could not be read."""
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
                partition=partition.rstrip("*"),  # the default partition's mark
                state=state,
                features=frozenset(f for f in features.split(",") if f and f != "(null)"),
                gpus=gpu_counts(gres),
                gpus_used=gpu_counts(used),
            )
        )
    return nodes, bad
