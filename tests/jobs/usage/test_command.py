"""`manage.py usage`: the pages' tables from the command line, with the same columns and CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from jobs.models import LLMSession
from jobs.usage.tables import COLUMNS
from tests.jobs.usage.conftest import batch_run, request

MakeSession = Callable[..., LLMSession]
PERIOD = ["--since", "2025-01", "--until", "2025-05-31"]


@pytest.fixture
def rows(make_session: MakeSession, owner: Any, other_user: Any) -> None:
    mine = make_session(owner, start="2025-03-01 10:00", end="2025-03-01 12:00", gpus=2)
    request(mine, owner, "2025-03-01 10:10", prompt_tokens=12345)
    request(mine, other_user, "2025-04-02 10:10", prompt_tokens=5)  # after the session: no window, still a request
    batch_run(mine, owner, "2025-03-01 10:30", prompt=100, completion=23)


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("usage", *args, stdout=out)
    return out.getvalue()


def test_the_site_table_by_user_has_every_column_and_a_total(rows: None) -> None:
    lines = run(*PERIOD).splitlines()
    assert lines[0] == "Site usage by user, 2025-01-01 to 2025-05-31"
    assert lines[1].split()[0] == "User" and all(c.label in lines[1] for c in COLUMNS)
    ada = next(line for line in lines if line.startswith("ada "))
    assert "12,345" in ada and "4.00" in ada and "123" in ada
    assert lines[-1].startswith("(total)") and "12,350" in lines[-1]


def test_one_users_usage_by_month_and_by_model(rows: None) -> None:
    by_month = run("--user", "grace", *PERIOD)
    assert by_month.startswith("grace's usage by month") and "2025-04" in by_month and "2025-03" not in by_month
    by_model = run("--user", "ada", "--by", "model", *PERIOD)
    assert "tiny-llama" in by_model and "12,345" in by_model


def test_csv_is_the_pages_csv(rows: None) -> None:
    table = list(csv.reader(io.StringIO(run("--by", "month", "--csv", *PERIOD))))
    assert table[0] == ["month", *(c.name for c in COLUMNS)]
    assert [line[0] for line in table[1:]] == ["2025-03", "2025-04", "(total)"]
    march = dict(zip(table[0], table[1], strict=True))
    assert march["prompt_tokens"] == "12345" and march["batch_tokens"] == "123" and march["gpu_hours"] == "4.0"


def test_groups_say_why_there_is_no_total(rows: None) -> None:
    out = run("--by", "group", *PERIOD)
    assert "(no group)" in out and "counts in both" in out and "(total)" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "nobody"], "no portal user 'nobody'"),
        (["--since", "March"], "since: Enter a valid date"),
        (["--since", "2025-05-01", "--until", "2025-01-01"], "comes before"),
    ],
)
def test_wrong_arguments_say_what_is_wrong(db: None, args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run(*args)
