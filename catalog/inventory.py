"""What a cluster's Slurm says it has, as catalog entries: partitions with their limits, node groups of identical GPU
hardware, and GPU types by GRES name. Parsing and comparing are plain Python; reading runs one SSH command.

    read(text) -> Discovered                     from `scontrol show partition -o` and `scontrol show node -o`
    diff(discovered, catalog) -> list[Change]    added, changed and gone, against what the catalog holds
    as_yaml(discovered, cluster) -> dict         the cluster's entry in the catalog's YAML, for review and import

Applying goes through the YAML importer (catalog/yaml_io.py), so discovered values meet the same validation as a
hand-written file. Partitions without GPUs are left out: the portal only places GPU jobs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from portal import gate
from portal.slurm.cli import PLAIN, SlurmCli
from portal.slurm.errors import SlurmParseError
from portal.slurm.gres import parse_mig_profile
from portal.slurm.records import NodeRecord, PartitionRecord, parse_nodes, parse_partitions

SEPARATOR = "@@nodes"


# What `manage.py catalog discover` runs on the login host, as the given user: one line per partition and per node
# (scontrol prints no `CLUSTER:` line with --clusters; `read` takes only the lines it knows anyway).
DISCOVER = gate.Verb("discover", f"scontrol show partition -o && echo {SEPARATOR} && scontrol show node -o\n")
VERBS = (DISCOVER,)


def command(cli: SlurmCli = PLAIN) -> str:
    """The discovery's command for an account with a plain key."""
    return gate.command(DISCOVER, [], cli)


# Known GPUs by the GRES type names sites give them (lower case), with their memory as nvidia-smi reports it (GiB)
# and a display name. A100 and H100 come in two sizes: the name decides, else a node feature naming the size, else
# the type is listed as unknown for the admin to fill in.
KNOWN_GPUS: dict[str, tuple[str, float]] = {
    "h200": ("NVIDIA H200 141GB", 140.4),
    "h100": ("NVIDIA H100 80GB", 79.6),
    "h100-80g": ("NVIDIA H100 80GB", 79.6),
    "h100-94g": ("NVIDIA H100 NVL 94GB", 93.6),
    "gh200": ("NVIDIA GH200 96GB", 95.0),
    "a100-80g": ("NVIDIA A100 80GB", 80.0),
    "a100_80gb": ("NVIDIA A100 80GB", 80.0),
    "a100-40g": ("NVIDIA A100 40GB", 40.0),
    "a100_40gb": ("NVIDIA A100 40GB", 40.0),
    "a100-sxm4-80gb": ("NVIDIA A100 80GB", 80.0),
    "a100-sxm4-40gb": ("NVIDIA A100 40GB", 40.0),
    "l40s": ("NVIDIA L40S 48GB", 44.4),
    "l40": ("NVIDIA L40 48GB", 44.4),
    "a40": ("NVIDIA A40 48GB", 44.4),
    "a6000": ("NVIDIA RTX A6000 48GB", 47.5),
    "rtx6000ada": ("NVIDIA RTX 6000 Ada 48GB", 47.5),
    "a5000": ("NVIDIA RTX A5000 24GB", 23.99),
    "a10": ("NVIDIA A10 24GB", 22.5),
    "a10g": ("NVIDIA A10G 24GB", 22.5),
    "l4": ("NVIDIA L4 24GB", 22.5),
    "rtx4090": ("NVIDIA GeForce RTX 4090 24GB", 23.99),
    "rtx3090": ("NVIDIA GeForce RTX 3090 24GB", 23.99),
    "rtx3090ti": ("NVIDIA GeForce RTX 3090 Ti 24GB", 23.99),
    "rtx2080ti": ("NVIDIA GeForce RTX 2080 Ti 11GB", 10.75),
    "rtx5000": ("NVIDIA Quadro RTX 5000 16GB", 15.75),
    "rtx8000": ("NVIDIA Quadro RTX 8000 48GB", 47.5),
    "v100": ("NVIDIA V100 32GB", 31.7),
    "v100-32g": ("NVIDIA V100 32GB", 31.7),
    "v100-16g": ("NVIDIA V100 16GB", 15.8),
    "t4": ("NVIDIA T4 16GB", 15.0),
    "p100": ("NVIDIA P100 16GB", 15.9),
    "mi300x": ("AMD Instinct MI300X 192GB", 191.5),
    "mi250x": ("AMD Instinct MI250X (one GCD) 64GB", 64.0),
    "mi250": ("AMD Instinct MI250 (one GCD) 64GB", 64.0),
    "mi210": ("AMD Instinct MI210 64GB", 64.0),
}
# Sizes of an ambiguous GRES type, told apart by a node feature (a100 + a100-80g), and the size to assume without
# one: none for A100 and V100, whose two sizes are both common; the 80 GB H100 (the 94 GB NVL is the rarer card).
SIZED: dict[str, tuple[tuple[str, ...], str | None]] = {
    "a100": (("a100-80g", "a100-40g"), None),
    "h100": (("h100-94g", "h100-80g"), "h100-80g"),
    "v100": (("v100-32g", "v100-16g"), None),
}

# MIG slices (portal/slurm/gres.py reads the profile from the GRES type): the size in a profile's name is rounded up to
# whole GiB (NVIDIA's names; Slurm's nvml plugin rounds the same way when it builds one), and nvidia-smi reports a
# little less: on an H100 80GB 9.75 GiB for 1g.10gb, 19.62 for 2g.20gb, 39.5 for 3g.40gb, 79.25 for 7g.80gb; 4.75 for
# an A100 40GB's 1g.5gb. MIG_USABLE_SHARE rounded down to a quarter GiB stays at or under each of those.
MIG_USABLE_SHARE = 0.985
MIG_USABLE_LESS_GIB = 0.1


def mig_slice(gres_type: str) -> GPUSpec | None:
    """The catalog's GPU type for a MIG slice's GRES type, with its memory from the profile; None when the name is
    not a MIG profile. A compute instance (1c.3g.20gb) shares its memory, so the admin decides what it may use."""
    key = gres_type.lower()
    profile = parse_mig_profile(key)
    if profile is None:
        return None
    base = profile.gpu.removeprefix("nvidia_").removeprefix("nvidia-").replace("_", " ").upper()
    display = f"NVIDIA {base + ' ' if base else ''}MIG {profile.name} slice"
    if profile.compute_slices is not None:
        return GPUSpec(key, key, "", (display + " (memory shared with other compute instances)")[:100], None)
    memory_gib = math.floor((profile.memory_gb * MIG_USABLE_SHARE - MIG_USABLE_LESS_GIB) * 4) / 4
    return GPUSpec(key, key, "", display[:100], memory_gib) if memory_gib >= 0.25 else None


class DiscoverError(ValueError):
    """Output the portal cannot read as scontrol's; the message says which line and why."""


@dataclass(frozen=True)
class GroupSpec:
    """A node group: the nodes of one partition with the same GPU type and count (their CPUs and memory may vary;
    the catalog keeps the smallest, which every node of the group can give a job)."""

    gpu_type: str  # the catalog's GPU type name
    gpus_per_node: int
    nodes: int
    cpus_per_node: int
    ram_gib: float
    features: tuple[str, ...] = ()  # the node features every node of the group has


@dataclass(frozen=True)
class PartitionSpec:
    name: str
    max_walltime_min: int
    default_walltime_min: int
    groups: tuple[GroupSpec, ...]
    allow_accounts: str = "ALL"
    allow_qos: str = "ALL"


@dataclass(frozen=True)
class GPUSpec:
    name: str
    gres_type: str
    constraint: str
    display_name: str
    memory_gib: float | None  # None: not a GPU the portal knows; the admin fills it in


@dataclass
class Discovered:
    partitions: list[PartitionSpec] = field(default_factory=list)
    gpu_types: list[GPUSpec] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # what was left out, and why

    @property
    def unknown_gpus(self) -> list[GPUSpec]:
        return [g for g in self.gpu_types if g.memory_gib is None]


def read(text: str) -> tuple[list[PartitionRecord], list[NodeRecord]]:
    """The partitions and nodes of `command()`'s output. Raises DiscoverError."""
    if SEPARATOR not in text:
        raise DiscoverError("the output has no node section: scontrol show node did not run")
    partition_text, node_text = text.split(SEPARATOR, 1)
    try:
        partitions, nodes = parse_partitions(partition_text), parse_nodes(node_text)
    except SlurmParseError as exc:
        raise DiscoverError(str(exc)) from None
    if not partitions:
        raise DiscoverError("scontrol listed no partitions")
    return partitions, nodes


def gpu_spec(gres_type: str, features: frozenset[str]) -> GPUSpec:
    """The catalog's GPU type for a GRES type on nodes with these features: a known size when the name or a
    feature says it, else an unknown type named after the GRES type."""
    key = gres_type.lower() or "gpu"
    constraint = ""
    mig = mig_slice(key)
    if mig is not None:
        return mig
    if key in SIZED:
        sizes, assumed = SIZED[key]
        sized = next((s for s in sizes if s in features), None)
        if sized is not None:
            display, memory = KNOWN_GPUS[sized]
            return GPUSpec(sized, key, sized, display, memory)
        if assumed is None:
            return GPUSpec(key, key, constraint, key.upper(), None)
        display, memory = KNOWN_GPUS[assumed]
        return GPUSpec(key, key, constraint, display, memory)
    if key in KNOWN_GPUS:
        display, memory = KNOWN_GPUS[key]
        return GPUSpec(key, key, constraint, display, memory)
    return GPUSpec(key, key, constraint, key.upper(), None)


def discover(text: str) -> Discovered:
    """Partitions with GPU node groups, and the GPU types they use."""
    slurm_partitions, nodes = read(text)
    by_name = {n.name: n for n in nodes}
    found = Discovered()
    gpu_types: dict[str, GPUSpec] = {}
    for part in slurm_partitions:
        members = [by_name[name] for name in sorted(set(part.nodes)) if name in by_name]
        groups: dict[tuple[str, int], list[NodeRecord]] = defaultdict(list)
        for node in members:
            for gres_type, count in node.gpus:
                spec = gpu_spec(gres_type, node.features)
                gpu_types.setdefault(spec.name, spec)
                groups[(spec.name, count)].append(node)
        if not groups:
            found.skipped.append(f"partition {part.name}: no GPUs on its nodes")
            continue
        if part.max_walltime_min is None:
            found.skipped.append(f"partition {part.name}: no time limit (UNLIMITED); the catalog keeps 7 days")
        max_min = part.max_walltime_min or 7 * 1440
        default_min = min(part.default_walltime_min or min(60, max_min), max_min)
        specs = tuple(
            GroupSpec(
                gpu_type=gpu,
                gpus_per_node=count,
                nodes=len(group),
                cpus_per_node=min(n.cpus for n in group),
                ram_gib=round(min(n.memory_mib for n in group) / 1024, 1),
                features=tuple(sorted(frozenset.intersection(*(n.features for n in group)))),
            )
            for (gpu, count), group in sorted(groups.items())
        )
        found.partitions.append(
            PartitionSpec(part.name, max_min, default_min, specs, part.allow_accounts, part.allow_qos)
        )
    found.gpu_types = sorted(gpu_types.values(), key=lambda g: g.name)
    return found


@dataclass(frozen=True)
class Change:
    kind: str  # "added", "changed" or "gone"
    what: str  # "partition gpu", "node group gpu/a100-80g x 2", "GPU type h100"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind:>7}  {self.what}" + (f": {self.detail}" if self.detail else "")


def diff(found: Discovered, catalog: dict[str, Any]) -> list[Change]:
    """What discovery would change in the catalog's entry for the cluster (as `as_yaml` writes it) and in its GPU
    types: `catalog` is {"partitions": [...], "gpu_types": {name: memory_gib}} in the YAML's shape."""
    changes: list[Change] = []
    known_gpus: dict[str, Any] = catalog.get("gpu_types", {})
    for gpu in found.gpu_types:
        if gpu.name not in known_gpus:
            memory = f"{gpu.memory_gib} GiB" if gpu.memory_gib else "memory unknown: fill it in"
            changes.append(Change("added", f"GPU type {gpu.name}", f"{gpu.display_name}, {memory}"))
    before: dict[str, dict[str, Any]] = {p["name"]: p for p in catalog.get("partitions", [])}
    after = {p["name"]: p for p in as_yaml(found)["partitions"]}
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old is None:
            changes.append(Change("added", f"partition {name}", _partition_text(new)))
            continue
        if new is None:
            changes.append(Change("gone", f"partition {name}", "Slurm no longer lists it (or it has no GPUs)"))
            continue
        for limit in ("max_walltime_min", "default_walltime_min", "allowed_accounts", "allowed_qos"):
            if _value(old, limit) != _value(new, limit):
                changes.append(
                    Change("changed", f"partition {name}", f"{limit} {_value(old, limit)} -> {_value(new, limit)}")
                )
        old_groups = {(g["gpu_type"], g["gpus_per_node"]): g for g in old.get("node_groups", [])}
        new_groups = {(g["gpu_type"], g["gpus_per_node"]): g for g in new.get("node_groups", [])}
        for key in sorted(set(old_groups) | set(new_groups)):
            label = f"node group {name}/{key[0]} x {key[1]}"
            og, ng = old_groups.get(key), new_groups.get(key)
            if og is None:
                changes.append(Change("added", label, f"{ng['nodes']} nodes" if ng else ""))
            elif ng is None:
                changes.append(Change("gone", label, "no such nodes in the partition now"))
            else:
                keys = ("nodes", "cpus_per_node", "ram_gib", "features")
                moved = [f"{k} {_value(og, k)} -> {_value(ng, k)}" for k in keys if _value(og, k) != _value(ng, k)]
                if moved:
                    changes.append(Change("changed", label, ", ".join(moved)))
    return changes


def _value(entry: dict[str, Any], key: str) -> Any:
    """A YAML entry's value; the export leaves empty lists out, so absent and empty are the same."""
    value = entry.get(key)
    return [] if value is None and key in ("allowed_accounts", "allowed_qos", "features") else value


def _partition_text(entry: dict[str, Any] | None) -> str:
    assert entry is not None
    groups = entry.get("node_groups", [])
    shapes = ", ".join(f"{g['nodes']} x {g['gpus_per_node']} {g['gpu_type']}" for g in groups)
    return f"max {entry['max_walltime_min']} min; {shapes}"


def as_yaml(found: Discovered) -> dict[str, list[dict[str, Any]]]:
    """The discovered partitions in the catalog YAML's shape (the cluster's `partitions:` list)."""
    return {
        "partitions": [
            {
                "name": p.name,
                "max_walltime_min": p.max_walltime_min,
                "default_walltime_min": p.default_walltime_min,
                "allowed_accounts": [] if p.allow_accounts == "ALL" else sorted(p.allow_accounts.split(",")),
                "allowed_qos": [] if p.allow_qos == "ALL" else sorted(p.allow_qos.split(",")),
                "node_groups": [
                    {
                        "gpu_type": g.gpu_type,
                        "gpus_per_node": g.gpus_per_node,
                        "nodes": g.nodes,
                        "cpus_per_node": g.cpus_per_node,
                        "ram_gib": g.ram_gib,
                        "features": list(g.features),
                    }
                    for g in p.groups
                ],
            }
            for p in found.partitions
        ]
    }


# --- against the catalog -------------------------------------------------------------------------------------------


def with_catalog_gpus(found: Discovered, existing: list[tuple[str, str, str]]) -> Discovered:
    """Name discovered GPUs as the catalog already does: a catalog GPU type with the same GRES type and constraint
    (name, gres_type, constraint) is the same GPU; only the others are new."""
    rename: dict[str, str] = {}
    for spec in found.gpu_types:
        same = next((name for name, gres, constraint in existing if name == spec.name), None)
        same = same or next(
            (name for name, gres, constraint in existing if gres == spec.gres_type and constraint == spec.constraint),
            None,
        )
        if same:
            rename[spec.name] = same
    partitions = [
        PartitionSpec(
            p.name,
            p.max_walltime_min,
            p.default_walltime_min,
            tuple(replace(g, gpu_type=rename.get(g.gpu_type, g.gpu_type)) for g in p.groups),
            p.allow_accounts,
            p.allow_qos,
        )
        for p in found.partitions
    ]
    new = [g for g in found.gpu_types if g.name not in rename]
    return Discovered(partitions, new, found.skipped)


def merged_cluster(entry: dict[str, Any], found: Discovered) -> dict[str, Any]:
    """The cluster's YAML entry with the discovered partitions: keys Slurm does not tell (debug, runtimes, limits)
    stay as the catalog has them; partitions Slurm no longer lists stay too (the import leaves what a file does not
    name; `diff` reports them as gone)."""
    old = {p["name"]: p for p in entry.get("partitions", [])}
    partitions = []
    for new in as_yaml(found)["partitions"]:
        partitions.append({**old.get(new["name"], {}), **new})
    partitions += [p for name, p in old.items() if name not in {n["name"] for n in partitions}]
    return {**entry, "partitions": partitions}


def gpu_entries(found: Discovered) -> list[dict[str, Any]]:
    """New GPU types for the YAML; an unknown one has no memory, which the import refuses until the admin adds it."""
    return [
        {
            "name": g.name,
            "display_name": g.display_name,
            "gres_type": g.gres_type,
            **({"constraint": g.constraint} if g.constraint else {}),
            "memory_gib": g.memory_gib,
        }
        for g in found.gpu_types
    ]
