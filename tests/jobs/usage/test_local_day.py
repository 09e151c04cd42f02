"""The raw rows' local day (jobs/models/summaries.py LocalDay): the CASE over the midnights of the days after the
summaries gives every row the day TruncDate gives it, in a time zone with a daylight-saving change inside the days,
and rows before those midnights (late rows) fall back to TruncDate itself."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

import pytest
from django.db.models.functions import TruncDate
from django.utils import timezone

from jobs.models import LLMSession, ProxyRequest
from jobs.models.summaries import EPOCH, Cover, LocalDay, Mark, midnight
from tests.jobs.usage.conftest import at, request

# Berlin's clocks went forward at 01:00 UTC on 2025-03-30: that day is 23 hours long.
ZONE = "Europe/Berlin"
MOMENTS = ["2025-03-27 22:59", "2025-03-28 23:00", "2025-03-29 22:59:59", "2025-03-29 23:00", "2025-03-30 00:30",
           "2025-03-30 21:59", "2025-03-30 22:00", "2025-03-31 12:00", "2025-04-01 21:59"]  # fmt: skip


def days_of(expression: Any) -> dict[int, Any]:
    return dict(ProxyRequest.objects.annotate(day=expression).values_list("pk", "day").order_by())


@pytest.fixture
def rows(make_session: Callable[..., LLMSession], owner: Any) -> list[ProxyRequest]:
    session = make_session(owner, start="2025-03-27 00:00", end=None)
    return [request(session, owner, when) for when in MOMENTS]


@pytest.mark.parametrize("summaries_until", ["2025-03-26 00:00", "2025-03-29 12:00", "2025-04-02 00:00"])
def test_the_raw_rows_local_day_is_truncdates_across_a_clock_change(
    rows: list[ProxyRequest], summaries_until: str
) -> None:
    with timezone.override(ZONE):
        end = at("2025-04-01 22:00")
        cover = Cover.of(at("2025-03-20 23:00"), end, False, Mark(at(summaries_until), 0, "r"))
        expected = days_of(TruncDate("at"))
        assert days_of(cover.local_day("at")) == expected
        # The days differ from UTC's where the zone's midnight is not UTC's: the test can tell them apart.
        assert expected[rows[3].pk] != rows[3].at.date()


def test_rows_before_the_written_midnights_fall_back_to_truncdate(rows: list[ProxyRequest]) -> None:
    with timezone.override(ZONE):
        last_two = tuple((midnight(day), day) for day in (date(2025, 4, 1), date(2025, 3, 31)))
        assert days_of(LocalDay("at", last_two)) == days_of(TruncDate("at"))
        assert days_of(LocalDay("at", ())) == days_of(TruncDate("at"))


def test_a_cover_writes_out_at_most_max_days_midnights() -> None:
    end = EPOCH + timedelta(days=400)
    local = Cover.of(EPOCH, end, False, Mark()).local_day("at")
    assert len(local.midnights) == LocalDay.MAX_DAYS
    assert local.midnights[0][1] == timezone.localdate(end - timedelta(microseconds=1))
