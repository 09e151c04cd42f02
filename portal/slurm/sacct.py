"""sacct's rows: how the portal asks Slurm's accounting about jobs squeue no longer lists, and how it reads the answer.

`sacct SACCT_OPTIONS -j IDS` prints one row a job (`--allocations`: the job itself, not its steps), its fields
separated by "|" with none after the last (`--parsable2`), printed whole (no column widths to cut them), without a
header. The job's name is the one field its owner chooses: it comes last, so a "|" in it cannot shift the others.

A row becomes a record with the keys `scontrol show job -o` gives the same values (records.parse_job_records), so a
finished job reads alike whichever of the two answered: JobId, JobState, ExitCode, StartTime, EndTime, NodeList,
Reason, JobName. The state loses what sacct prints after it ("CANCELLED by 1001": jobstates.base_state).

Without slurmdbd (AccountingStorageType=accounting_storage/none, as on the local test cluster) sacct prints
"Slurm accounting storage is disabled" and exits 1 whatever it is asked: no rows, which a caller must read as "not
asked", never as "the job is gone". tests/portal/data/slurm/README.md says which rows were printed by Slurm and which
were written from its documentation.
"""

from __future__ import annotations

from portal import shellsafe
from portal.slurm.jobstates import base_state

# sacct's field (as --format names it) -> the key scontrol gives the same value. The name last (see above).
SACCT_KEYS = {
    "JobID": "JobId",
    "State": "JobState",
    "ExitCode": "ExitCode",
    "Start": "StartTime",
    "End": "EndTime",
    "NodeList": "NodeList",
    "Reason": "Reason",
    "JobName": "JobName",
}
SACCT_FORMAT = ",".join(SACCT_KEYS)
# Every flag parse_sacct relies on; the caller adds `-j IDS`.
SACCT_OPTIONS = ("--noheader", "--parsable2", "--allocations", f"--format={SACCT_FORMAT}")


def parse_sacct(text: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """sacct's output with SACCT_OPTIONS: the records by job id, and the lines that are no row of a job the portal
    submits (a message, a heterogeneous job's component `12+0`). A later row of the same job wins: slurmdbd answers
    with one row a job, but `--completion` and `--duplicates` give a requeued job a row a run, the latest last."""
    records: dict[str, dict[str, str]] = {}
    bad: list[str] = []
    # Only "\n" ends a row: splitlines() would also split on characters a job name may contain (\x1e, \x85).
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        values = line.split("|", len(SACCT_KEYS) - 1)
        if len(values) != len(SACCT_KEYS) or not shellsafe.JOB_ID.accepts(values[0]):
            bad.append(line)
            continue
        record = dict(zip(SACCT_KEYS.values(), values, strict=True))
        record["JobState"] = base_state(record["JobState"])
        records[values[0]] = record
    return records, bad
