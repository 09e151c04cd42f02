"""The summaries the usage figures read (jobs/usage/rollups.py): every figure is the same read from them as from the raw
request rows, for periods of whole months, of days, ending now or cut anywhere; the same after the raw rows are
deleted; live for requests after the last run and for those recorded late; the same when summarised twice or after
downtime; in a fixed number of queries."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import date
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from jobs import tasks
from jobs.models import LLMSession, ProxyRequest, UsageRollup, UsageWatermark, UsageWindow
from jobs.usage import figures, memo, rollups
from jobs.usage.figures import Period, Scope
from tests.jobs.usage.conftest import at, batch_run, request

MakeSession = Callable[..., LLMSession]
SUMMARISED_AT = at("2025-05-20 12:07")  # the watermark: 12:00
NOW = at("2025-05-20 12:30")
PERIODS = {
    "the last five months, up to now": Period.months(5, now=NOW),
    "a whole month and days": Period.between(date(2025, 3, 1), date(2025, 4, 15), now=NOW),
    "days, a month, and this month up to now": Period.between(date(2025, 3, 2), date(2025, 5, 20), now=NOW),
    "all time": Period.all_time(now=NOW),
}
PERIOD = {"since": "2025-01-01", "until": "2025-05-31"}  # the pages'
# Cut anywhere, before the watermark: its edges come from the raw rows.
CUT = Period(at("2025-03-01 11:00"), at("2025-04-01 01:30"))


@pytest.fixture
def rows(make_session: MakeSession, owner: Any, other_user: Any, shared_user: Any) -> list[LLMSession]:
    """Sessions over three months, one still running, with requests of every kind by three users (ada in two
    groups), some outside their session's run, some after the watermark, and batch runs."""
    owner.groups.add(Group.objects.create(name="vision-lab"))
    crossing = make_session(owner, start="2025-03-01 10:07", end="2025-03-02 01:00", gpus=2)
    request(crossing, owner, "2025-03-01 09:40")  # a window wholly before Slurm's start (an earlier run's)
    request(crossing, owner, "2025-03-01 10:05", ttft_ms=40.0)  # before Slurm's start, in its first window
    request(crossing, owner, "2025-03-01 10:20", ttft_ms=12.5, tokens_per_s=33.0, cached_tokens=4)
    request(crossing, shared_user, "2025-03-01 10:29", ttft_ms=260.0, tokens_per_s=8.0, endpoint="messages")
    request(crossing, shared_user, "2025-03-01 23:59", status=502, ttft_ms=9000.0)
    request(crossing, owner, "2025-03-02 00:10", ttft_ms=70.0, tokens_per_s=120.0, prompt_tokens=999)
    request(crossing, owner, "2025-03-02 03:00")  # after its end
    months = make_session(other_user, start="2025-03-31 22:00", end="2025-04-01 03:00", model="GPT-2")
    for minute in range(0, 300, 17):
        request(months, other_user, "2025-03-31 22:00", ttft_ms=float(minute + 1), tokens_per_s=float(minute % 90))
    request(months, other_user, "2025-04-01 02:59", endpoint="responses", completion_tokens=77)
    short = make_session(owner, start="2025-04-10 10:05", end="2025-04-10 10:10", model="GPT-2")
    request(short, owner, "2025-04-10 10:06", ttft_ms=5.0)
    running = make_session(shared_user, start="2025-05-19 08:00", end=None, gpus=4)
    for when in ("2025-05-19 08:01", "2025-05-20 11:59", "2025-05-20 12:00", "2025-05-20 12:20"):
        request(running, shared_user, when, ttft_ms=30.0, tokens_per_s=55.5)
        request(running, owner, when, endpoint="messages", prompt_tokens=3)
    batch_run(crossing, owner, "2025-03-01 12:00", prompt=100, completion=20)
    batch_run(running, shared_user, "2025-05-19 09:00", prompt=7, completion=1)
    return [crossing, months, short, running]


def everything(period: Period, sessions: list[LLMSession]) -> dict[Any, Any]:
    """Every figure the pages, the CSV, the command line and the session cards show, for a period."""
    found: dict[Any, Any] = {}
    for by in figures.BY:
        found["site", by] = {row.key: row.tally for row in figures.table(Scope(period), by)}
    for user_id in {s.owner_id for s in sessions}:  # everyone who made a request owns a session here
        found["mine", user_id] = figures.my_usage(user_id, period)
        found["routes", user_id] = figures.by_route(Scope(period, user_id=user_id))
        found["by model", user_id] = figures.table(Scope(period, user_id=user_id), "model")
    found["routes"] = figures.by_route(Scope(period))
    found["sessions"] = figures.for_sessions([s.pk for s in sessions], period)
    found["on session"] = figures.by_user_on_session([s.pk for s in sessions])
    return found


def from_raw_rows(period: Period, sessions: list[LLMSession]) -> dict[Any, Any]:
    """The figures with no summaries at all: every raw row read."""
    for model in (UsageRollup, UsageWindow, UsageWatermark):
        model.objects.all().delete()
    return everything(period, sessions)


@pytest.mark.parametrize("name", [*PERIODS, "cut"])
def test_the_summaries_give_the_figures_of_the_raw_rows(rows: list[LLMSession], name: str) -> None:
    period = PERIODS.get(name, CUT)
    rollups.summarise(SUMMARISED_AT)
    assert UsageRollup.objects.exists() and UsageWindow.objects.exists()
    summarised = everything(period, rows)
    assert summarised == from_raw_rows(period, rows)
    assert summarised["site", "user"]["ada"].requests > 0


def test_the_totals_are_the_same_after_the_raw_rows_are_deleted(rows: list[LLMSession], settings: Any) -> None:
    settings.PORTAL_USAGE_RAW_DAYS = 2
    before = {name: everything(period, rows) for name, period in PERIODS.items()}
    rollups.summarise(NOW)
    kept = {at("2025-05-19 08:01"), at("2025-05-20 11:59"), at("2025-05-20 12:00"), at("2025-05-20 12:20")}
    assert set(ProxyRequest.objects.values_list("at", flat=True)) == kept  # from May 18 on
    assert {name: everything(period, rows) for name, period in PERIODS.items()} == before


def test_requests_after_the_last_run_count_at_once(rows: list[LLMSession], owner: Any) -> None:
    rollups.summarise(SUMMARISED_AT)
    before = figures.my_usage(owner.pk, PERIODS["all time"]).total
    request(rows[3], owner, "2025-05-20 12:25", prompt_tokens=1000)
    after = figures.my_usage(owner.pk, PERIODS["all time"]).total
    assert (after.requests, after.prompt_tokens) == (before.requests + 1, before.prompt_tokens + 1000)


def test_a_request_recorded_late_counts_at_once_and_its_traffic_after_the_next_run(
    rows: list[LLMSession], owner: Any
) -> None:
    """A long stream is recorded when it ends: after the run that summarised the moment it started."""
    period = PERIODS["all time"]
    rollups.summarise(SUMMARISED_AT)
    before = figures.for_sessions([rows[3].pk], period)[rows[3].pk]
    request(rows[3], owner, "2025-05-20 09:50", completion_tokens=500)  # a window that had no request
    now = figures.for_sessions([rows[3].pk], period)[rows[3].pk]
    assert (now.requests, now.completion_tokens) == (before.requests + 1, before.completion_tokens + 500)
    assert now.traffic_gpu_hours == before.traffic_gpu_hours  # until the next run
    rollups.summarise(SUMMARISED_AT)
    later = figures.for_sessions([rows[3].pk], period)[rows[3].pk]
    assert later.traffic_gpu_hours == pytest.approx(before.traffic_gpu_hours + 4 * 0.25)  # a window on 4 GPUs
    summarised = everything(period, rows)
    assert summarised == from_raw_rows(period, rows)


def test_the_figures_read_again_from_what_was_remembered_are_the_same(rows: list[LLMSession]) -> None:
    rollups.summarise(SUMMARISED_AT)
    for period in (*PERIODS.values(), CUT):
        first = everything(period, rows)
        with CaptureQueriesContext(connection) as again:
            assert everything(period, rows) == first
        read = " ".join(query["sql"] for query in again.captured_queries)
        assert "jobs_usagerollup" not in read and "jobs_usagewindow" not in read  # the summaries were not read twice
        assert first == from_raw_rows(period, rows)
        rollups.summarise(SUMMARISED_AT)  # the summaries again, for the next period


def test_a_change_of_names_users_or_runs_after_a_read_shows_at_once(
    rows: list[LLMSession], owner: Any, other_user: Any
) -> None:
    """What was read from the summaries is remembered with whose it was and what they were called (memo.py)."""
    period = PERIODS["all time"]
    rollups.summarise(SUMMARISED_AT)
    everything(period, rows)  # remembered
    other_user.groups.add(Group.objects.get(name="vision-lab"))  # a user put in a group
    owner.username = "ada-lovelace"  # renamed
    owner.save()
    variant = rows[1].variant
    variant.model.name = "GPT-2 (renamed)"
    variant.model.save()
    rows[0].ended_at = at("2025-03-01 20:00")  # a run that ended earlier (as Slurm corrected it)
    rows[0].save()
    now = everything(period, rows)
    memo.forget()
    assert now == everything(period, rows)  # as read with nothing remembered
    assert "ada-lovelace" in now["site", "user"] and "GPT-2 (renamed)" in now["site", "model"]
    users = now["site", "user"]
    assert (
        now["site", "group"]["vision-lab"].requests
        == users["ada-lovelace"].requests + users[other_user.username].requests
    )


def test_a_session_deleted_after_a_read_leaves_the_figures_at_once(rows: list[LLMSession]) -> None:
    period = PERIODS["all time"]
    rollups.summarise(SUMMARISED_AT)
    everything(period, rows)  # remembered
    LLMSession.objects.filter(pk=rows[2].pk).delete()  # with its summaries
    kept = [rows[0], rows[1], rows[3]]
    now = everything(period, kept)
    memo.forget()
    assert now == everything(period, kept)  # as read with nothing remembered


def test_summarising_again_or_after_downtime_gives_the_same_summaries(rows: list[LLMSession]) -> None:
    def kept() -> list[str]:
        return sorted(map(repr, UsageRollup.objects.values_list(*(f.attname for f in UsageRollup._meta.fields[1:]))))

    assert rollups.summarise(at("2025-03-05 00:00")) == 1  # the first run: from the first row, a few days
    assert rollups.summarise(SUMMARISED_AT) == 3  # downtime: from Mar 31, Apr 10 and May 19 on (no empty week)
    once = kept()
    assert rollups.summarise(SUMMARISED_AT) == 0 and kept() == once
    UsageWatermark.objects.update(until=at("2025-03-01 00:00"))  # as if the last runs had not happened
    assert rollups.summarise(SUMMARISED_AT) > 0 and kept() == once


def test_days_and_months_are_the_local_ones_when_summarised(rows: list[LLMSession], settings: Any) -> None:
    settings.TIME_ZONE = "Asia/Kolkata"  # UTC+5:30: its midnights fall at half past the hour in UTC
    period = Period.between(date(2025, 3, 1), date(2025, 4, 30), now=NOW)
    rollups.summarise(SUMMARISED_AT)
    assert everything(period, rows) == from_raw_rows(period, rows)


def test_beat_summarises_every_request(rows: list[LLMSession], settings: Any) -> None:
    assert settings.CELERY_BEAT_SCHEDULE["summarise-usage"]["task"] == tasks.summarise_usage.name
    last = max(ProxyRequest.objects.values_list("pk", flat=True))
    tasks.summarise_usage()
    assert UsageWatermark.objects.get().last_request_id == last
    assert not ProxyRequest.objects.exists()  # all of 2025's: more than PORTAL_USAGE_RAW_DAYS ago


def test_my_usage_and_the_command_read_the_summaries_in_the_same_number_of_queries(
    client: Client, rows: list[LLMSession], owner: Any, django_assert_num_queries: Any
) -> None:
    client.force_login(owner)
    with CaptureQueriesContext(connection) as from_raw_rows:
        client.get("/usage/", PERIOD)
    rollups.summarise()
    assert not ProxyRequest.objects.exists()  # the summaries alone
    with django_assert_num_queries(len(from_raw_rows)):
        page = client.get("/usage/", PERIOD).content.decode()
    assert ">1,061<" in page  # ada's prompt tokens: 10 + 10 + 10 + 999 + 10 (on her two sessions) + 10 + 4 x 3
    out = io.StringIO()
    call_command("usage", "--user", "ada", "--since", PERIOD["since"], "--until", PERIOD["until"], stdout=out)
    assert "1,061" in out.getvalue().splitlines()[-1]
