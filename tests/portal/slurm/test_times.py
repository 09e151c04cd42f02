"""Slurm's times and durations (portal/slurm/times.py): read as sbatch reads a time limit on the local cluster
(tests/portal/data/slurm/sbatch-time.jsonl), and the forms Slurm prints."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portal.slurm.errors import SlurmParseError
from portal.slurm.times import format_duration, parse_duration, parse_limit_min, parse_time
from tests.portal.slurm.data import TIMES_PRINTED_ONLY, TIMES_SBATCH_READS_OTHERWISE, cases, sbatch_time_of

RECORDED = [case for case in cases("sbatch-time.jsonl") if case["input"] not in TIMES_PRINTED_ONLY]


@pytest.mark.parametrize("case", RECORDED, ids=[case["input"] for case in RECORDED])
def test_time_limits_are_read_as_sbatch_reads_them(case: dict[str, Any]) -> None:
    read = sbatch_time_of(case["stderr"])
    if case["input"] in TIMES_SBATCH_READS_OTHERWISE:
        return  # zero, negative and "1-": see tests/portal/slurm/data.py
    if read is None:
        with pytest.raises(SlurmParseError):
            parse_limit_min(case["input"])
    else:
        # sbatch prints how it read the limit in the form Slurm prints limits: the two must say the same.
        assert parse_limit_min(case["input"]) == parse_limit_min(read)


def test_the_forms_the_old_parsers_read_differently() -> None:
    # inventory.minutes read "1-02:03" as a day, 2 minutes and 3 seconds; slurm.parse_duration refused it; sbatch
    # reads days-hours:minutes.
    assert parse_limit_min("1-02:03") == 1563
    assert parse_duration("1-02") == 26 * 3600
    assert parse_duration("90") == 5400  # minutes: both refused it
    # scontrol's DefaultTime=NONE: parse_duration refused it; INFINITE is Slurm's other word for UNLIMITED.
    for word in ("NONE", "UNLIMITED", "INFINITE", "unlimited", "NOT_SET", "INVALID", "N/A", "Partition_Limit", ""):
        assert parse_duration(word) is None
    # A limit is whole minutes, seconds rounded up, as sbatch keeps it; a duration keeps its seconds.
    assert (parse_limit_min("00:00:30"), parse_duration("00:00:30")) == (1, 30)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0:01", 1), ("0:00", 0), ("59:59", 3599), ("1:00:00", 3600), ("2-00:00:00", 172800), ("0:90", 90)],
)
def test_durations_as_squeue_prints_them(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "1:2:3:4", "1-2-3", "1.5", "-1", "1-", "1-1:1:1:1", "\u0661:\u0660\u0660"])
def test_what_is_no_duration_is_refused(text: str) -> None:
    with pytest.raises(SlurmParseError):
        parse_duration(text)


def test_times_are_naive_as_slurm_prints_them_and_its_words_for_none_are_none() -> None:
    assert parse_time("2026-11-21T12:29:07") == datetime(2026, 11, 21, 12, 29, 7)
    assert parse_time("N/A") is None and parse_time("Unknown") is None and parse_time("(null)") is None
    with pytest.raises(SlurmParseError):
        parse_time("tomorrow")


@given(st.integers(0, 10**8))
def test_durations_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.text(max_size=60))
def test_anything_is_a_duration_or_the_librarys_own_error(text: str) -> None:
    for parse in (parse_duration, parse_limit_min, parse_time):
        with contextlib.suppress(SlurmParseError):
            parse(text)
