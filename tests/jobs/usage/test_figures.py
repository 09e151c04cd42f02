"""The usage figures on hand-made rows: percentiles from buckets, GPU-hours split by overlap, traffic windows, who a
request counts for, batch tokens, groups, and a fixed number of queries."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.utils import timezone

from catalog.models import Cluster, ClusterAccount
from jobs.models import LLMSession
from jobs.usage import figures
from jobs.usage.figures import Histogram, Period, Scope
from tests.jobs.usage.conftest import at, batch_run, request

LATER = at("2025-06-01 00:00")  # "now" for the tests' periods: after every row
JAN_TO_MAY = Period.between(date(2025, 1, 1), date(2025, 5, 31), now=LATER)
MakeSession = Callable[..., LLMSession]


def rows_of(scope: Scope, by: str) -> dict[Any, figures.Tally]:
    return {row.key: row.tally for row in figures.table(scope, by)}


def test_a_percentile_within_one_bucket_is_interpolated_between_its_smallest_and_largest_values() -> None:
    histogram = Histogram((10, 100))
    histogram.add(1, 50, 50.0, 99.0)  # 50 values from 50 to 99
    assert histogram.quantile(0.5) == pytest.approx(74.5)
    one = Histogram((10, 100))
    one.add(1, 1, 42.0, 42.0)
    assert one.quantile(0.5) == one.quantile(0.95) == 42.0
    assert Histogram((10,)).quantile(0.5) is None


def test_percentiles_come_from_bucket_counts_and_leave_out_failed_requests(
    make_session: MakeSession, owner: Any
) -> None:
    session = make_session(start="2025-03-01 00:00", end="2025-03-02 00:00")
    for ms in range(1, 101):  # 1..100 ms: the true p50 is 50.5, p95 95.05
        request(session, owner, "2025-03-01 10:00", ttft_ms=float(ms), tokens_per_s=float(ms))
    request(session, owner, "2025-03-01 10:00", status=502, ttft_ms=60000.0, tokens_per_s=9999.0)
    request(session, owner, "2025-03-01 10:00", ttft_ms=None, tokens_per_s=None)  # neither: not in the percentiles
    tally = figures.for_sessions([session.pk], JAN_TO_MAY)[session.pk]
    assert tally.requests == 102 and tally.errors == 1
    assert tally.ttft.count == 100 and tally.speed.count == 100
    # 49 values below 50 ms; the bucket 50-100 ms holds 50..99 (interpolated) and the 100 ms is the next bucket's.
    assert tally.ttft_p50_ms == pytest.approx(50 + 49 * 1 / 50)
    assert tally.ttft_p95_ms == pytest.approx(50 + 49 * 46 / 50)
    assert abs(tally.ttft_p95_ms - 95.05) < 0.1 and abs(tally.tokens_per_s_p50 - 50.5) < 1  # type: ignore[operator]


def test_reserved_gpu_hours_split_across_months_by_overlap(make_session: MakeSession, owner: Any) -> None:
    make_session(start="2025-01-31 22:00", end="2025-02-01 02:00", gpus=2)  # 2 h in each month, 2 GPUs
    make_session(start="2025-03-10 00:00", end="2025-03-10 01:30", gpus=2, nodes=2)  # 4 GPUs for 1.5 h
    months = rows_of(Scope(JAN_TO_MAY, user_id=owner.pk), figures.MONTH)
    assert months["2025-01"].gpu_hours == pytest.approx(4.0)
    assert months["2025-02"].gpu_hours == pytest.approx(4.0)
    assert months["2025-03"].gpu_hours == pytest.approx(6.0)
    assert months["2025-01"].sessions == months["2025-02"].sessions == 1


def test_a_period_counts_only_the_part_of_a_run_inside_it(make_session: MakeSession, owner: Any) -> None:
    make_session(start="2024-12-31 12:00", end="2025-01-01 12:00")
    make_session(start="2025-05-31 20:00", end=None)  # still running at LATER: 4 hours so far
    usage = figures.my_usage(owner.pk, JAN_TO_MAY)
    assert usage.total.gpu_hours == pytest.approx(12.0 + 4.0)
    assert [row.key for row in usage.by_month] == ["2025-01", "2025-05"]
    assert len(usage.days) == 151 and usage.days[0].key == date(2025, 1, 1)
    assert usage.days[0].tally.gpu_hours == pytest.approx(12.0) and usage.days[1].tally.gpu_hours == 0


def test_gpu_hours_with_traffic_count_the_quarter_hours_in_which_a_request_started(
    make_session: MakeSession, owner: Any
) -> None:
    """10:07-12:00: requests in the windows 10:00 (from 10:07 only), 10:15 (twice) and 11:45."""
    session = make_session(start="2025-03-01 10:07", end="2025-03-01 12:00", gpus=2)
    for when in ("2025-03-01 10:08", "2025-03-01 10:20", "2025-03-01 10:29", "2025-03-01 11:59"):
        request(session, owner, when)
    request(session, owner, "2025-03-01 09:00")  # before Slurm's start (a clock's skew): no window
    tally = figures.for_sessions([session.pk], JAN_TO_MAY)[session.pk]
    assert tally.gpu_hours == pytest.approx(2 * (1 + 53 / 60))
    assert tally.traffic_gpu_hours == pytest.approx(2 * (3 * 0.25 - 7 / 60))
    assert tally.traffic_pct == pytest.approx(100 * (0.75 - 7 / 60) / (1 + 53 / 60))


def test_traffic_in_the_last_window_counts_up_to_the_end_and_an_idle_session_shows_none(
    make_session: MakeSession, owner: Any
) -> None:
    short = make_session(start="2025-03-01 10:05", end="2025-03-01 10:10")  # one window, five minutes of it
    request(short, owner, "2025-03-01 10:06")
    ends = make_session(start="2025-03-02 10:00", end="2025-03-02 11:50")
    request(ends, owner, "2025-03-02 11:49")
    idle = make_session(start="2025-03-03 00:00", end="2025-03-04 00:00")
    found = figures.for_sessions([short.pk, ends.pk, idle.pk], JAN_TO_MAY)
    assert found[short.pk].traffic_gpu_hours == pytest.approx(5 / 60) == pytest.approx(found[short.pk].gpu_hours)
    assert found[ends.pk].traffic_gpu_hours == pytest.approx(5 / 60)
    assert found[idle.pk].gpu_hours == 24 and found[idle.pk].traffic_gpu_hours == 0
    assert found[idle.pk].traffic_pct == 0


def test_requests_count_for_whoever_made_them_and_gpu_hours_for_the_owner(
    make_session: MakeSession, owner: Any, shared_user: Any
) -> None:
    session = make_session(owner, start="2025-03-01 10:00", end="2025-03-01 12:00")
    request(session, owner, "2025-03-01 10:01")
    for minute in range(3):
        request(session, shared_user, f"2025-03-01 11:0{minute}", prompt_tokens=100, completion_tokens=5)
    mine = figures.my_usage(owner.pk, JAN_TO_MAY).total
    theirs = figures.my_usage(shared_user.pk, JAN_TO_MAY).total
    assert (mine.requests, mine.tokens, mine.gpu_hours) == (1, 30, 2.0)
    assert (theirs.requests, theirs.prompt_tokens, theirs.gpu_hours) == (3, 300, 0)
    # The owner's GPU-hours had traffic in two windows, whoever made the requests.
    assert mine.traffic_gpu_hours == pytest.approx(0.5)
    on_it = figures.by_user_on_session([session.pk])[session.pk]
    assert [(row.key, row.tally.requests) for row in on_it] == [("alan", 3), ("ada", 1)]


def test_batch_tokens_count_for_the_runs_owner_on_the_day_it_started(
    make_session: MakeSession, owner: Any, other_user: Any
) -> None:
    session = make_session(owner, start="2025-03-01 10:00", end="2025-03-01 12:00")
    batch_run(session, other_user, "2025-03-01 10:30", prompt=1000, completion=500)
    batch_run(session, owner, "2025-04-01 10:30", prompt=7, completion=3)
    users = rows_of(Scope(JAN_TO_MAY), "user")
    assert users["grace"].batch_tokens == 1500 and users["grace"].tokens == 0
    assert users["ada"].batch_tokens == 10 and users["ada"].gpu_hours == 2.0
    months = rows_of(Scope(JAN_TO_MAY, user_id=owner.pk), figures.MONTH)
    assert months["2025-04"].batch_tokens == 10 and "2025-03" in months


def test_a_session_its_owner_deleted_still_counts(make_session: MakeSession, owner: Any) -> None:
    session = make_session(start="2025-03-01 10:00", end="2025-03-01 11:00", deleted_at=timezone.now())
    request(session, owner, "2025-03-01 10:30")
    usage = figures.my_usage(owner.pk, JAN_TO_MAY).total
    assert usage.gpu_hours == 1.0 and usage.requests == 1


def test_a_user_in_two_groups_counts_in_both_and_one_in_none_under_no_group(
    make_session: MakeSession, owner: Any, other_user: Any
) -> None:
    owner.groups.add(Group.objects.create(name="nlp-lab"), Group.objects.create(name="vision-lab"))
    session = make_session(owner, start="2025-03-01 10:00", end="2025-03-01 11:00")
    request(session, owner, "2025-03-01 10:30")
    request(session, other_user, "2025-03-01 10:31")
    groups = rows_of(Scope(JAN_TO_MAY), "group")
    assert groups["nlp-lab"].requests == groups["vision-lab"].requests == 1
    assert groups["nlp-lab"].gpu_hours == groups["vision-lab"].gpu_hours == 1.0
    assert groups["(no group)"].requests == 1 and groups["(no group)"].gpu_hours == 0
    assert figures.DIMENSIONS["group"].overlaps


def test_rows_by_account_cluster_partition_gpu_and_model(
    make_session: MakeSession, owner: Any, account: ClusterAccount
) -> None:
    v100 = Cluster.objects.get(slug="v100")  # its default Slurm account is "llm"
    on_v100 = ClusterAccount.objects.create(cluster=v100, user=owner, username="ada")
    lab = ClusterAccount.objects.get(pk=account.pk)
    lab.slurm_account = "nlp"
    lab.save()
    make_session(start="2025-03-01 10:00", end="2025-03-01 11:00", account=lab)
    make_session(start="2025-03-01 10:00", end="2025-03-01 12:00", account=on_v100, cluster="v100", gpu="v100-32g",
                 model="Llama-3.1-8B-Instruct")  # fmt: skip
    scope = Scope(JAN_TO_MAY)
    assert {k: t.gpu_hours for k, t in rows_of(scope, "account").items()} == {"nlp on local": 1, "llm on v100": 2}
    assert set(rows_of(scope, "cluster")) == {"Local test cluster", "V100 cluster"}
    assert set(rows_of(scope, "partition")) == {"gpu on local", "gpu on v100"}
    assert set(rows_of(scope, "gpu_type")) == {"a100-80g", "v100-32g"}
    assert rows_of(scope, "model")["Llama-3.1-8B-Instruct"].gpu_hours == 2


def test_other_users_rows_stay_out_of_my_usage(make_session: MakeSession, owner: Any, other_user: Any) -> None:
    theirs = make_session(other_user, start="2025-03-01 10:00", end="2025-03-01 11:00")
    request(theirs, other_user, "2025-03-01 10:30")
    batch_run(theirs, other_user, "2025-03-01 10:30", prompt=5, completion=5)
    usage = figures.my_usage(owner.pk, JAN_TO_MAY)
    assert usage.total.requests == 0 and usage.total.gpu_hours == 0 and usage.total.batch_tokens == 0
    assert usage.by_month == [] and len(usage.days) == 151


@pytest.mark.parametrize("sessions", [1, 12])
def test_the_figures_take_a_fixed_number_of_queries(
    make_session: MakeSession, owner: Any, shared_user: Any, sessions: int, django_assert_num_queries: Any
) -> None:
    made = []
    for i in range(sessions):
        day = f"2025-0{1 + i % 5}-0{1 + i % 9}"
        end = None if i == 0 else f"{day} 12:00"  # one still running
        session = make_session(owner, start=f"{day} 10:00", end=end, model="GPT-2" if i % 2 else "tiny-llama")
        for minute in range(i + 1):
            request(session, shared_user if minute % 2 else owner, f"{day} 10:{minute:02}")
        batch_run(session, owner, f"{day} 10:30", prompt=1, completion=1)
        made.append(session.pk)
    # The four of the module's docstring, where the summaries stand (summaries.Mark) and one for each kind of name
    # the keys join (the users', the sessions'; none by month or by session, whose key is its id).
    with django_assert_num_queries(6):
        figures.my_usage(owner.pk, JAN_TO_MAY)
    for by in figures.BY:
        with django_assert_num_queries(5 if by == figures.MONTH else 6):
            figures.table(Scope(JAN_TO_MAY), by)
    with django_assert_num_queries(5):
        figures.for_sessions(made, JAN_TO_MAY)
    with django_assert_num_queries(3):
        figures.by_user_on_session(made)


def test_days_and_months_are_the_portals_local_ones(make_session: MakeSession, owner: Any, settings: Any) -> None:
    settings.TIME_ZONE = "America/New_York"  # UTC-5 in winter
    session = make_session(start="2025-02-01 03:00", end="2025-02-01 06:00")  # Jan 31 22:00 to Feb 1 01:00 there
    request(session, owner, "2025-02-01 04:10")  # Jan 31 23:10 there
    months = rows_of(Scope(JAN_TO_MAY, user_id=owner.pk), figures.MONTH)
    assert months["2025-01"].gpu_hours == pytest.approx(2.0) and months["2025-02"].gpu_hours == pytest.approx(1.0)
    assert months["2025-01"].requests == 1 and months["2025-01"].traffic_gpu_hours == pytest.approx(0.25)
