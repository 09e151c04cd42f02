"""GRES strings and MIG profiles.

A GRES string is a comma-separated list of `NAME[:TYPE][:COUNT]`, each maybe followed by what Slurm knows of it in
parentheses, which may hold commas too:

    scontrol's Gres=, sinfo's Gres     gpu:a100:2(S:0-1),shard:a100:8(S:0-1)   gpu:4   (null)
    sinfo's GresUsed                   gpu:a100:1(IDX:0,2)   gpu:a100:0(IDX:N/A)
    squeue's %b (what a job asks for)  gres:gpu:a100:2 (22.05)   gres/gpu:a100:2, gres/gpu=2 (the TRES forms)

A missing count is 1 (Slurm's rule: `--gres=gpu:a100` asks for one); a count may carry Slurm's K, M, G, T or P
suffix (multiples of 1024); flags such as no_consume are not types. Items that follow none of these forms are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_COUNT = re.compile(r"(?P<number>[0-9]{1,12})(?P<suffix>[KMGTP]?)", re.IGNORECASE)
_SUFFIX = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_FLAGS = frozenset({"no_consume"})


@dataclass(frozen=True)
class Gres:
    name: str  # gpu, shard, mps...
    type: str  # "" when the string names none
    count: int


def parse_gres(text: str) -> list[Gres]:
    """The items of a GRES string, in its order."""
    found = []
    for item in _items(text):
        item = item.strip()
        if "(" in item:
            item = item[: item.index("(")]
        for prefix in ("gres:", "gres/"):
            item = item.removeprefix(prefix)
        head, equals, count_text = item.partition("=")  # the TRES form: gres/gpu:a100=2
        parts = [part for part in head.split(":") if part not in _FLAGS]
        if equals:
            parts.append(count_text)
        if not parts or not parts[0] or parts[0] in ("N/A", "(null)"):
            continue
        count = _count(parts[-1]) if len(parts) > 1 else 1
        if len(parts) == 1:
            found.append(Gres(parts[0], "", 1))
        elif len(parts) == 2:
            # gpu:4 names a count, gpu:a100 a type (of one)
            found.append(Gres(parts[0], "", count) if count is not None else Gres(parts[0], parts[1], 1))
        elif len(parts) == 3 and count is not None and parts[1]:
            found.append(Gres(parts[0], parts[1], count))
    return found


def gpu_counts(text: str) -> dict[str, int]:
    """GPUs by GRES type ("" for untyped), in the string's order, a type named twice counted once with both counts."""
    counts: dict[str, int] = {}
    for gres in parse_gres(text):
        if gres.name == "gpu":
            counts[gres.type] = counts.get(gres.type, 0) + gres.count
    return counts


def _items(text: str) -> list[str]:
    """Split at the commas outside parentheses: gpu:a100:2(IDX:0,2),shard:8 -> two items."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
            continue
        depth = depth + 1 if char == "(" else max(depth - 1, 0) if char == ")" else depth
        current.append(char)
    items.append("".join(current))
    return items


def _count(text: str) -> int | None:
    match = _COUNT.fullmatch(text)
    if match is None:
        return None
    return int(match.group("number")) * _SUFFIX[match.group("suffix").upper()]


# MIG slices: Slurm names a slice's GRES type after its MIG profile, "<slices>g.<size>gb", alone (1g.10gb) or behind
# the GPU's name (a100_3g.20gb; AutoDetect=nvml reports nvidia_a100_3g.20gb), and "<n>c.<slices>g.<size>gb" for a
# compute instance that shares its GPU instance's memory with others. The size is NVIDIA's, rounded up to whole GB.
_MIG_PROFILE = re.compile(
    r"(?:(?P<gpu>[a-z0-9][a-z0-9_.-]*?)[_-])?(?:(?P<ci>\d)c\.)?(?P<slices>\d)g\.(?P<gb>\d{1,4})gb", re.ASCII
)


@dataclass(frozen=True)
class MigProfile:
    gpu: str  # the GPU's name in front of the profile (a100, nvidia_a100); "" when the type is the profile alone
    compute_slices: int | None  # a compute instance's share of its GPU instance; None for a whole GPU instance
    gpu_slices: int
    memory_gb: int

    @property
    def name(self) -> str:
        """NVIDIA's name of the profile: 3g.40gb, 1c.3g.40gb."""
        ci = f"{self.compute_slices}c." if self.compute_slices is not None else ""
        return f"{ci}{self.gpu_slices}g.{self.memory_gb}gb"


def parse_mig_profile(gres_type: str) -> MigProfile | None:
    """The MIG profile a GRES type names (in any case); None when it names none."""
    match = _MIG_PROFILE.fullmatch(gres_type.lower())
    if match is None:
        return None
    return MigProfile(
        gpu=match.group("gpu") or "",
        compute_slices=int(match.group("ci")) if match.group("ci") else None,
        gpu_slices=int(match.group("slices")),
        memory_gb=int(match.group("gb")),
    )
