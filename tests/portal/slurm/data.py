"""The local cluster's recorded output (tests/portal/data/slurm/README.md says which command printed each file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from portal.slurm.hostlist import NO_NODES

DATA = Path(__file__).resolve().parent.parent / "data" / "slurm"


def text(name: str) -> str:
    return (DATA / name).read_text()


def cases(name: str) -> list[dict[str, Any]]:
    """The cases of a .jsonl file, one JSON object a line."""
    return [json.loads(line) for line in text(name).splitlines() if line.strip()]


# Hostlists Slurm 22.05 reads without complaint into names no node has (`n[1-2` -> "n]", `n[ 1-2]` -> n01 n02):
# the library refuses them (portal/slurm/hostlist.py).
HOSTLISTS_SLURM_MISREADS = frozenset({"node[1-", "n[1-2", "n[1-2],x[", "n[1-]", "n[ 1-2]", "n[+1]", "n[1- 2]"})
# Time limits sbatch reads as something else than their length: zero as no limit at all (its `-t 0`), a negative one
# as no limit, `1-` as a day. The library reads zero as zero (squeue's TIME 0:00) and refuses the others.
TIMES_SBATCH_READS_OTHERWISE = frozenset({"0", "0:0", "00:00:00", "-1", "1-"})
# Words Slurm prints for "no value" (scontrol's DefaultTime=NONE, sacct's N/A) that sbatch -t does not take.
TIMES_PRINTED_ONLY = frozenset({"NONE", "N/A"})


def hostnames_of(stdout: str, stderr: str) -> list[str] | None:
    """What `scontrol show hostnames` said: the names, or None when it refused the list (its exit status is 0)."""
    return None if "Invalid hostlist" in stderr else stdout.split("\n")[:-1]


def hostnames_expected(text: str, stdout: str, stderr: str) -> list[str] | None:
    """What the library should make of a hostlist `scontrol show hostnames` printed this for: Slurm's names, or None
    where the library refuses it (where Slurm did, and where Slurm misreads it)."""
    if text in HOSTLISTS_SLURM_MISREADS:
        return None
    if text.strip() in NO_NODES:  # Slurm prints "(null)" back as a name; the library reads Slurm's word for none
        return []
    return hostnames_of(stdout, stderr)


def sbatch_time_of(stderr: str) -> str | None:
    """How `sbatch -t X -vv` read the time (`1-02:03:00`, `UNLIMITED`), or None when it refused it."""
    for line in stderr.splitlines():
        if line.startswith("sbatch: time "):
            return line.rpartition(": ")[2].strip()
    assert "Invalid --time specification" in stderr, stderr
    return None
