"""How the portal calls Slurm's commands on a cluster's login host: which binaries, and for which Slurm cluster.

One definition for every Slurm command the portal runs there (submit, poll, cancel, discovery, the queue state, the
wizard's `--test-only`, the account test, sacctmgr). A login host may serve several Slurm clusters: each command then
names its own with `--clusters=NAME` (Open OnDemand's `job.cluster`); and Slurm's binaries may live off the login
shell's PATH (`job.bin`). Plain Python, no Django.

    SlurmCli(cluster, bin_dir).command("squeue", "-h")  -> "/opt/slurm/bin/squeue --clusters=c1 -h"
    SlurmCli(...).script(BODY)                          -> BODY for `bash -c`, its bare `squeue` calls made so

Slurm facts (checked in Slurm's sources, 20.11 to 25.x, and on 22.05 here):
- sbatch, squeue, sinfo, scontrol, scancel, sacct, sprio and sshare take `-M/--clusters`; sacctmgr does not (its
  records name the cluster: `cluster=NAME` in a query). Every one of them needs slurmdbd to look the name up: without
  it they fail with "'NAME' can't be reached now, or it is an invalid entry for --cluster".
- squeue and sinfo print a `CLUSTER: NAME` line before each cluster's rows unless `--noheader` is given (since
  19.05); sshare always does. sbatch says "Submitted batch job N on cluster NAME" (`--parsable`: "N;NAME").
- Inside a job nothing needs the flag: srun and scontrol talk to the job's own cluster.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from portal import shellsafe

PROGRAMS = ("sbatch", "squeue", "scontrol", "sacct", "scancel", "sinfo", "sprio", "sshare", "sacctmgr")
# sacctmgr has no --clusters: a query names the cluster instead (see `cluster_filter`).
_TAKES_CLUSTERS = frozenset(PROGRAMS) - {"sacctmgr"}


@dataclass(frozen=True)
class SlurmCli:
    cluster: str = ""  # the Slurm cluster every command names; "": the login host's own
    bin_dir: str = ""  # where sbatch, squeue... live; "": found on the PATH

    def __post_init__(self) -> None:
        # The models' validators check these too; checked again because they reach a shell, whatever way they came.
        if self.cluster:
            shellsafe.SLURM_NAME.check(self.cluster, "Slurm cluster name")
        if self.bin_dir:
            shellsafe.ABSOLUTE_PATH.check(self.bin_dir, "directory of Slurm's binaries")

    @property
    def is_plain(self) -> bool:
        """Nothing to add: the login host's own cluster, binaries on the PATH."""
        return not (self.cluster or self.bin_dir)

    def argv(self, program: str, *args: str) -> list[str]:
        """The words of one Slurm command: the binary (in bin_dir when set), --clusters when set, then args."""
        if program not in PROGRAMS:
            raise ValueError(f"not a Slurm command the portal runs: {program!r}")
        binary = f"{self.bin_dir.rstrip('/')}/{program}" if self.bin_dir else program
        flags = [f"--clusters={self.cluster}"] if self.cluster and program in _TAKES_CLUSTERS else []
        return [binary, *flags, *args]

    def command(self, program: str, *args: str) -> str:
        """argv as one shell-quoted command line."""
        return shlex.join(self.argv(program, *args))

    def cluster_filter(self) -> list[str]:
        """sacctmgr's way of naming the cluster: a `cluster=NAME` condition, when there is one."""
        return [f"cluster={self.cluster}"] if self.cluster else []

    def script(self, body: str) -> str:
        """A bash script whose bare Slurm commands (`squeue -h ...`) run as argv says: shell functions of the same
        names go in front of it. bin_dir also goes in front of PATH, so that a job submitted from the script
        (sbatch passes the environment on) finds srun and scontrol on its nodes where a shared install keeps them."""
        if self.is_plain:
            return body
        lines = []
        if self.bin_dir:
            lines.append(f'export PATH={shlex.quote(self.bin_dir)}:"$PATH"')
        # `command` skips the function itself when the binary is a bare name looked up on the PATH.
        call = "" if self.bin_dir else "command "
        lines += [f'{program}() {{ {call}{self.command(program)} "$@"; }}' for program in PROGRAMS]
        return "\n".join(lines) + "\n" + body


PLAIN = SlurmCli()


def is_cluster_header(line: str) -> bool:
    """squeue, sinfo and sshare's `CLUSTER: NAME` line before a cluster's rows (see the module's docstring)."""
    return line.startswith("CLUSTER: ") and shellsafe.SLURM_NAME.accepts(line[9:].strip())
