"""The portal's own jobs in Slurm: the job name that finds a session's job again, and the squeue that lists them.
Slurm's text itself is read by the library both apps share, portal/slurm/."""

from __future__ import annotations

from portal import shellsafe
from portal.slurm.cli import PLAIN, SlurmCli
from portal.slurm.squeue import SQUEUE_FORMAT

# The one spelling: the scripts on a login host get it as $JOB_NAME_PREFIX (remote.script()).
JOB_NAME_PREFIX = "hpcllm-"


def job_name(session_id: str) -> str:
    """The Slurm job name of a session: a fixed prefix and the session's uuid, so retries can find the job."""
    shellsafe.UUID.check(session_id, "session uuid")
    return f"{JOB_NAME_PREFIX}{session_id}"


def squeue_command(*, job_names: list[str] | None = None, user: str | None = None, cli: SlurmCli = PLAIN) -> str:
    """squeue for the given job names (or a user's jobs), one "|"-separated line per job, all states."""
    words = ["--noheader", "--states=all", f"--format={SQUEUE_FORMAT}"]
    if job_names:
        words.append("--name=" + ",".join(job_names))
    if user:
        words.append(f"--user={user}")
    return cli.command("squeue", *words)
