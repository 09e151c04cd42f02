"""scontrol's one-line records (`scontrol show job|node|partition -o`, and the jobcomp/filetxt log): `Key=value`
pairs separated by spaces, where a value may itself hold spaces (`OS=Linux 6.1.0 #1 SMP`, a job's `Name=my job`,
a node's `Reason=...`) and `=` (`CfgTRES=cpu=4,mem=4G`), and keys may hold `:` and `/` (`ReqB:S:C:T=0:0:*:*`,
`CPUs/Task=1`). A key starts after whitespace; its value runs to the next key.

What Slurm cannot tell apart neither can we: a value holding " Word=" (a job named "a b=c") reads as a new key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from portal.slurm.errors import SlurmParseError
from portal.slurm.gres import gpu_counts
from portal.slurm.hostlist import expand_hostlist
from portal.slurm.times import parse_limit_min

_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")
NO_VALUE = frozenset({"", "(null)"})


def parse_key_values(line: str) -> dict[str, str]:
    """One record's keys and values, the values stripped."""
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
        if job_id and job_id.isascii() and job_id.isdigit():
            records[job_id] = record
    return records


def _names(value: str) -> frozenset[str]:
    """A comma-separated list of names (features, partitions); (null) is none."""
    return frozenset(name for name in value.split(",") if name and name not in NO_VALUE)


@dataclass(frozen=True)
class PartitionRecord:
    """What the portal reads of `scontrol show partition -o`."""

    name: str
    max_walltime_min: int | None  # None: UNLIMITED
    default_walltime_min: int | None  # None: NONE (the job must say)
    nodes: tuple[str, ...]
    allow_accounts: str = "ALL"
    allow_qos: str = "ALL"
    is_default: bool = False
    state: str = "UP"


@dataclass(frozen=True)
class NodeRecord:
    """What the portal reads of `scontrol show node -o`."""

    name: str
    cpus: int
    memory_mib: int
    gpus: tuple[tuple[str, int], ...]  # (GRES type, count) as Slurm spells the type; an untyped "gpu:2" has ""
    features: frozenset[str]
    partitions: frozenset[str]


def parse_partitions(text: str) -> list[PartitionRecord]:
    """The partitions of `scontrol show partition -o`; other lines are skipped. Raises SlurmParseError for a
    partition whose limits or nodes cannot be read."""
    partitions = []
    for line in text.split("\n"):
        if not line.startswith("PartitionName="):
            continue
        field = parse_key_values(line)
        try:
            partitions.append(
                PartitionRecord(
                    name=field["PartitionName"],
                    max_walltime_min=parse_limit_min(field.get("MaxTime", "UNLIMITED")),
                    default_walltime_min=parse_limit_min(field.get("DefaultTime", "NONE")),
                    nodes=tuple(expand_hostlist(field.get("Nodes", ""))),
                    allow_accounts=field.get("AllowAccounts", "ALL"),
                    allow_qos=field.get("AllowQos", "ALL"),
                    is_default=field.get("Default") == "YES",
                    state=field.get("State", "UP"),
                )
            )
        except SlurmParseError as exc:
            raise SlurmParseError(f"partition {field['PartitionName']}: {exc}") from None
    return partitions


def parse_nodes(text: str) -> list[NodeRecord]:
    """The nodes of `scontrol show node -o`; other lines are skipped. Raises SlurmParseError for a node whose CPUs
    or memory are not numbers."""
    nodes = []
    for line in text.split("\n"):
        if not line.startswith("NodeName="):
            continue
        field = parse_key_values(line)
        cpus, memory = field.get("CPUTot", "0"), field.get("RealMemory", "0")
        if not (cpus.isascii() and cpus.isdigit() and memory.isascii() and memory.isdigit()):
            raise SlurmParseError(f"cannot read node {field['NodeName']}: {line[:200]}")
        nodes.append(
            NodeRecord(
                name=field["NodeName"],
                cpus=int(cpus),
                memory_mib=int(memory),
                gpus=tuple(gpu_counts(field.get("Gres", "")).items()),
                features=_names(field.get("AvailableFeatures", "")),
                partitions=_names(field.get("Partitions", "")),
            )
        )
    return nodes
