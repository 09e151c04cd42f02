"""sacct's rows (portal/slurm/sacct.py): what sacct 22.05 printed from the local cluster's completion records, what it
says without slurmdbd, and rows written after Slurm's documentation (tests/portal/data/slurm/README.md says which)."""

from __future__ import annotations

from datetime import datetime

from hypothesis import given
from hypothesis import strategies as st

from portal.slurm.hostlist import expand_hostlist
from portal.slurm.jobstates import FINISHED_STATES
from portal.slurm.sacct import SACCT_KEYS, SACCT_OPTIONS, parse_sacct
from portal.slurm.times import parse_time
from tests.portal.slurm.data import text

# The keys `scontrol show job -o` gives the same values: a finished job reads alike from either.
SCONTROL_KEYS = {"JobId", "JobState", "ExitCode", "StartTime", "EndTime", "NodeList", "Reason", "JobName"}


def test_the_rows_sacct_printed_for_the_local_clusters_finished_jobs_are_read() -> None:
    records, bad = parse_sacct(text("sacct-completion.txt"))
    assert bad == []
    assert sorted(records, key=int) == [str(n) for n in [*range(38, 43), *range(59, 72)]]
    assert all(set(record) == SCONTROL_KEYS for record in records.values())
    assert all(record["JobState"] in FINISHED_STATES for record in records.values())
    failed = records["71"]
    assert (failed["JobState"], failed["ExitCode"], failed["NodeList"]) == ("FAILED", "1:0", "node1")
    assert parse_time(failed["EndTime"]) == datetime(2026, 12, 7, 2, 35, 28)
    assert failed["JobName"] == "hpcllm-272d67c2-87c8-47b9-9d5e-edfd30f4fef8"
    assert expand_hostlist(records["70"]["NodeList"]) == ["node1", "node2"]


def test_a_requeued_jobs_latest_row_is_the_one_read() -> None:
    # Job 62 was requeued: sacct --completion prints its first run (PENDING) and then how it ended.
    records, _ = parse_sacct(text("sacct-completion.txt"))
    assert records["62"]["JobState"] == "COMPLETED"
    assert records["62"]["StartTime"] == "2026-12-07T02:33:14"


def test_sacct_without_slurmdbd_gives_no_row_and_reports_its_message() -> None:
    message = text("sacct-disabled.txt")
    assert parse_sacct(message) == ({}, ["Slurm accounting storage is disabled"])


def test_what_only_a_cluster_with_slurmdbd_prints_is_read() -> None:
    records, bad = parse_sacct(text("sacct-documented.txt"))
    assert records["72"]["JobState"] == "CANCELLED"  # "CANCELLED by 1001": the uid is not part of the state
    assert {records[job]["JobState"] for job in ("73", "74", "75")} == {"TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
    never_started = records["76"]
    assert (never_started["JobState"], never_started["Reason"]) == ("CANCELLED", "Resources")
    assert parse_time(never_started["StartTime"]) is None and expand_hostlist(never_started["NodeList"]) == []
    assert records["77_3"]["JobState"] == "COMPLETED"
    assert records["79"]["JobName"] == "a|name|with|bars" and records["79"]["Reason"] == "NonZeroExitCode"
    assert "78+0" not in records and bad == [
        line for line in text("sacct-documented.txt").split("\n") if "78+0" in line
    ]


def test_the_options_ask_for_the_rows_the_reader_reads() -> None:
    assert {"--noheader", "--parsable2", "--allocations"} <= set(SACCT_OPTIONS)
    assert f"--format={','.join(SACCT_KEYS)}" in SACCT_OPTIONS
    assert list(SACCT_KEYS)[-1] == "JobName"  # the one field a user chooses, last: a "|" in it shifts nothing


FIELD = st.text(alphabet=st.characters(exclude_characters="|\n\r", exclude_categories=["Cs"]), max_size=20)
# Only "\n" ends a row; "\r" before it is taken for a line end's.
NAME = st.text(alphabet=st.characters(exclude_characters="\n\r", exclude_categories=["Cs"]), max_size=30)


@given(
    st.lists(
        st.tuples(st.integers(1, 10**9), st.sampled_from(sorted(FINISHED_STATES)), FIELD, NAME),
        max_size=10,
        unique_by=lambda row: row[0],
    )
)
def test_any_row_in_the_format_reads_back_whatever_the_job_is_named(rows: list[tuple[int, str, str, str]]) -> None:
    lines = [
        f"{job}|{state} by 1001|0:0|Unknown|Unknown|None assigned|{reason}|{name}" for job, state, reason, name in rows
    ]
    records, bad = parse_sacct("\r\n".join(lines))
    assert bad == []
    assert {job: (r["JobState"], r["Reason"], r["JobName"]) for job, r in records.items()} == {
        str(job): (state, reason, name) for job, state, reason, name in rows
    }
