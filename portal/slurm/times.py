"""Slurm's times and durations.

Times are the cluster's local wall-clock time, ISO-like, without a zone (`2026-11-21T12:29:07`).

Durations are read as Slurm reads a time limit (src/common/parse_time.c, time_str2secs): `MM`, `MM:SS`, `HH:MM:SS`,
`D-HH`, `D-HH:MM` and `D-HH:MM:SS`, each field any number of digits (`0:90` is 90 seconds). Slurm prints only the
`[D-]HH:MM:SS` and `M:SS` forms (squeue's TIME, scontrol's MaxTime), and words for no value: UNLIMITED (INFINITE
as input), NONE (a partition's DefaultTime), NOT_SET, INVALID, N/A, Partition_Limit. A time limit is whole minutes,
seconds rounded up: `sbatch -t 0:30 -vv` says `time : 00:01:00`; tests/e2e/test_slurm_text.py asks it live.
"""

from __future__ import annotations

import math
import re
from datetime import datetime

from portal.slurm.errors import SlurmParseError

NO_TIME = frozenset({"", "N/A", "Unknown", "None", "(null)"})
# Upper-cased: Slurm reads "unlimited" and "Infinite" as UNLIMITED too.
NO_DURATION = frozenset({"", "UNLIMITED", "INFINITE", "NONE", "NOT_SET", "INVALID", "N/A", "PARTITION_LIMIT"})

_DURATION = re.compile(
    r"(?:(?P<days>\d+)-(?P<day_hours>\d+)(?::(?P<day_minutes>\d+)(?::(?P<day_seconds>\d+))?)?"
    r"|(?:(?:(?P<hours>\d+):)?(?P<minutes>\d+):)?(?P<last>\d+))",
    re.ASCII,
)
_DIGITS_MAX = 12  # no Slurm duration needs more; int() of thousands of digits is slow or refused


def parse_time(text: str) -> datetime | None:
    """A Slurm time, naive as Slurm prints it; None for N/A and friends. Raises SlurmParseError."""
    text = text.strip()
    if text in NO_TIME:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise SlurmParseError(f"not a Slurm time: {text!r}") from None


def parse_duration(text: str) -> int | None:
    """Seconds in a Slurm duration; None for UNLIMITED and the other words for no value. Raises SlurmParseError."""
    text = text.strip()
    if text.upper() in NO_DURATION:
        return None
    match = _DURATION.fullmatch(text)
    if match is None or any(len(value) > _DIGITS_MAX for value in match.groupdict("").values()):
        raise SlurmParseError(f"not a Slurm duration: {text!r}")
    part = {key: int(value) if value else 0 for key, value in match.groupdict().items()}
    if match.group("days") is not None:
        hours = part["days"] * 24 + part["day_hours"]
        return (hours * 60 + part["day_minutes"]) * 60 + part["day_seconds"]
    if match.group("minutes") is None:  # a bare number is minutes
        return part["last"] * 60
    return (part["hours"] * 60 + part["minutes"]) * 60 + part["last"]


def parse_limit_min(text: str) -> int | None:
    """A time limit in whole minutes as Slurm keeps it, seconds rounded up; None for UNLIMITED, NONE and the like."""
    seconds = parse_duration(text)
    return None if seconds is None else math.ceil(seconds / 60)


def format_duration(seconds: int) -> str:
    """The [D-]HH:MM:SS form sbatch --time accepts and Slurm prints."""
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock
