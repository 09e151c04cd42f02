"""Allocations: their periods, what a launch and the proxy's door refuse once one is spent, what each counts."""

from __future__ import annotations

import io
import json
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core import mail
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.utils import timezone

from catalog.models import ClusterAccount
from jobs.allocations import door, periods, spend
from jobs.allocations import mail as allocation_mail
from jobs.models import Allocation, LLMSession, ProxyRequest, State, summaries, transition
from jobs.operations import metrics
from jobs.sessions.actions import launch
from jobs.sessions.forms import LaunchForm
from tests.conftest import LAUNCH


def at(text: str) -> datetime:
    return timezone.make_aware(datetime.fromisoformat(text))


@pytest.fixture(autouse=True)
def _fresh_door(settings: Any) -> None:
    settings.PORTAL_ALLOCATION_CHECK_S = 0
    door.forget()


@pytest.mark.parametrize(
    ("period", "start", "resets"),
    [
        ("day", "2026-12-09T00:00", "2026-12-10T00:00"),
        ("week", "2026-12-07T00:00", "2026-12-14T00:00"),  # from Monday
        ("month", "2026-12-01T00:00", "2027-01-01T00:00"),  # across a year's end
    ],
)
def test_a_period_runs_from_its_start_to_when_it_resets(period: str, start: str, resets: str) -> None:
    window = periods.current(Allocation(period=period), at("2026-12-09T15:30"))
    assert window == periods.Window(at(start), at(resets))


def test_a_term_is_in_force_from_its_first_day_to_its_last() -> None:
    term = Allocation(period="term", starts_on=date(2026, 10, 1), ends_on=date(2027, 3, 31))
    assert periods.current(term, at("2026-09-30T23:59")) is None
    assert periods.current(term, at("2027-03-31T23:59")) == periods.Window(
        at("2026-10-01T00:00"), at("2027-04-01T00:00")
    )
    assert periods.current(term, at("2027-04-01T00:00")) is None


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"gpu_hours": 1}, "exactly one of"),  # no holder
        ({"slurm_account": "nlp"}, "Give GPU-hours, tokens or both"),
        ({"slurm_account": "nlp", "tokens": 10, "period": "term"}, "first and last day"),
        (
            {
                "slurm_account": "nlp",
                "tokens": 10,
                "period": "term",
                "starts_on": date(2027, 1, 2),
                "ends_on": date(2027, 1, 1),
            },
            "cannot come before",
        ),
        ({"slurm_account": "nlp", "tokens": 10, "starts_on": date(2027, 1, 1)}, "Dates are for a term"),
        ({"slurm_account": "bad name;", "tokens": 10}, "slurm"),
    ],
)
def test_an_allocation_that_makes_no_sense_is_refused_with_its_reason(
    db: None, fields: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Allocation(**fields).full_clean()
    assert says.lower() in str(caught.value).lower()


def test_a_token_allocation_counts_on_every_cluster_together(account: ClusterAccount) -> None:
    with pytest.raises(ValidationError, match="every cluster together"):
        Allocation(slurm_account="nlp", tokens=10, cluster=account.cluster).full_clean()


def test_a_launch_over_a_gpu_hour_allocation_is_refused_before_any_session_exists(
    account: ClusterAccount, owner: Any
) -> None:
    Allocation.objects.create(user=owner, gpu_hours=Decimal("0.75"), period="month")
    form = LaunchForm({**LAUNCH, "gpus": 2, "walltime": 30}, user=owner)  # 1 GPU-hour
    assert not form.is_valid()
    said = str(form.non_field_errors())
    assert "reserves up to 1 GPU-hours (2 GPUs for 30 min)" in said
    assert "allocation of user ada has 0.75 of 0.75 GPU-hours left this month" in said
    assert "it resets on " in said and "at 00:00" in said
    with pytest.raises(ValidationError, match="allocation of user ada"):
        launch(owner, {**LAUNCH, "gpus": 2})
    assert not LLMSession.objects.exists()
    assert LaunchForm({**LAUNCH, "gpus": 1, "walltime": 30}, user=owner).is_valid()  # half an hour fits


def test_a_launch_reserves_its_worst_case_and_what_it_did_not_use_returns_when_it_ends(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    Allocation.objects.create(user=owner, gpu_hours=1, period="day")
    with django_capture_on_commit_callbacks(execute=False):
        first = launch(owner, {**LAUNCH, "walltime": 60})  # reserves the whole hour
    with pytest.raises(ValidationError, match="has 0 of 1 GPU-hours left today"):
        launch(owner, {**LAUNCH, "walltime": 30})
    transition(first.pk, State.RUNNING, cause="test", host="127.0.0.1", port=9)
    started = timezone.now() - timedelta(minutes=15)
    LLMSession.objects.filter(pk=first.pk).update(started_at=started)
    transition(first.pk, State.CANCELLED, cause="test")
    LLMSession.objects.filter(pk=first.pk).update(ended_at=started + timedelta(minutes=15))
    standing = spend.standing(Allocation.objects.get())
    assert standing is not None and standing.gpu_hours == pytest.approx(0.25) and standing.reserved_gpu_hours == 0
    with django_capture_on_commit_callbacks(execute=False):
        launch(owner, {**LAUNCH, "walltime": 45})  # 0.75 of what is left


def test_a_warning_allocation_lets_the_launch_through(account: ClusterAccount, owner: Any) -> None:
    Allocation.objects.create(user=owner, gpu_hours=0, period="month", action="warn")
    assert LaunchForm(LAUNCH, user=owner).is_valid()


def test_a_group_allocation_counts_every_members_sessions(
    account: ClusterAccount, owner: Any, shared_user: Any, lab: Group, django_capture_on_commit_callbacks: Any
) -> None:
    ClusterAccount.objects.create(cluster=account.cluster, user=shared_user, username="alan")
    Allocation.objects.create(group=lab, gpu_hours=1, period="week")
    with django_capture_on_commit_callbacks(execute=False):
        launch(owner, {**LAUNCH, "walltime": 40})
    refused = LaunchForm({**LAUNCH, "walltime": 30}, user=shared_user)
    assert not refused.is_valid() and "allocation of group nlp-lab has 0.33 of 1 GPU-hours left this week" in str(
        refused.errors
    )


def test_an_account_allocation_counts_the_sessions_charged_to_it_on_its_cluster(
    account: ClusterAccount, owner: Any, other_user: Any, django_capture_on_commit_callbacks: Any
) -> None:
    ClusterAccount.objects.filter(pk=account.pk).update(slurm_account="physics")
    Allocation.objects.create(slurm_account="physics", cluster=account.cluster, gpu_hours=1, period="month")
    Allocation.objects.create(slurm_account="chemistry", gpu_hours=0, period="month")  # another account's
    with django_capture_on_commit_callbacks(execute=False):
        launch(owner, {**LAUNCH, "walltime": 60})
    with pytest.raises(ValidationError, match="allocation of Slurm account physics on Local test cluster"):
        launch(owner, {**LAUNCH, "walltime": 1})
    assert spend.standing(Allocation.objects.get(slurm_account="chemistry")).gpu_hours == 0  # type: ignore[union-attr]


def tokens_used(user: Any, session: LLMSession, n: int, moment: datetime | None = None) -> None:
    ProxyRequest.objects.create(
        session=session,
        user=user,
        route="api",
        endpoint="chat/completions",
        status=200,
        prompt_tokens=n // 2,
        completion_tokens=n - n // 2,
        duration_ms=5,
        at=moment or timezone.now(),
    )


def test_spent_tokens_stop_the_users_calls_until_the_period_resets(
    running: LLMSession, owner: Any, other_user: Any
) -> None:
    Allocation.objects.create(user=owner, tokens=1000, period="day")
    tokens_used(owner, running, 999)
    assert door.refusal(owner.pk) is None
    tokens_used(other_user, running, 5000)  # someone else's tokens count for them
    assert door.refusal(owner.pk) is None
    tokens_used(owner, running, 1)
    now = timezone.now()
    refusal = door.refusal(owner.pk, now)
    assert refusal is not None
    assert "allocation of user ada has spent its 1,000 tokens today (1,000 used); it resets on" in refusal.message
    midnight = summaries.midnight(timezone.localdate(now) + timedelta(days=1))
    assert refusal.retry_after_s == pytest.approx((midnight - now).total_seconds(), abs=2)
    assert door.refusal(owner.pk, midnight + timedelta(seconds=1)) is None  # a new day
    assert door.refusal(other_user.pk) is None


def test_the_door_asks_again_only_after_its_check_interval(
    running: LLMSession, owner: Any, settings: Any, django_assert_num_queries: Any
) -> None:
    settings.PORTAL_ALLOCATION_CHECK_S = 3600
    door.forget()
    with django_assert_num_queries(1):  # a site with no token allocations: one question, then none
        assert door.refusal(owner.pk) is None
    with django_assert_num_queries(0):
        assert door.refusal(owner.pk) is None


def test_a_soft_threshold_mails_the_user_and_the_managers_once_a_period(
    running: LLMSession, owner: Any, other_user: Any
) -> None:
    allocation = Allocation.objects.create(user=owner, tokens=100, period="month", soft_percent=50)
    allocation.managers.add(other_user)
    tokens_used(owner, running, 49)
    assert allocation_mail.send_due() == 0
    tokens_used(owner, running, 1)
    assert allocation_mail.send_due() == 1 and allocation_mail.send_due() == 0
    assert mail.outbox[-1].to == ["ada@example.edu", "grace@example.edu"]
    assert "50 of 100 tokens spent this month" in mail.outbox[-1].body
    tokens_used(owner, running, 50)
    assert allocation_mail.send_due() == 1 and "spent" in mail.outbox[-1].subject


def test_metrics_export_each_allocations_limit_spend_and_what_is_left(running: LLMSession, owner: Any) -> None:
    Allocation.objects.create(user=owner, tokens=100, gpu_hours=2, period="month")
    tokens_used(owner, running, 30)
    text = metrics.exposition()[0].decode()
    assert 'portal_allocation_spent{allocation="user:ada",unit="tokens"} 30.0' in text
    assert 'portal_allocation_remaining{allocation="user:ada",unit="tokens"} 70.0' in text
    assert 'portal_allocation_limit{allocation="user:ada",unit="gpu_hours"} 2.0' in text
    assert 'portal_allocation_spent{allocation="user:ada",unit="gpu_hours"} 0.5' in text  # the running session's 30 min


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("allocations", *args, stdout=out)
    return out.getvalue()


def test_the_command_sets_replaces_lists_shows_and_clears(account: ClusterAccount, owner: Any, lab: Group) -> None:
    said = run("set", "--group", "nlp-lab", "--gpu-hours", "100", "--period", "month", "--soft", "90")
    assert said.startswith("added allocation")
    said = run(
        "set",
        "--group",
        "nlp-lab",
        "--tokens",
        "5000",
        "--period",
        "term",
        "--from",
        "2026-10-01",
        "--to",
        "2027-03-31",
        "--action",
        "warn",
        "--manager",
        "ada",
    )
    assert said.startswith("replaced allocation")
    allocation = Allocation.objects.get()
    assert (allocation.gpu_hours, allocation.tokens, allocation.action) == (None, 5000, "warn")
    shown = json.loads(run("show", str(allocation.pk), "--json"))
    assert shown["holder"] == "group:nlp-lab" and shown["managers"] == ["ada"] and shown["tokens_left"] == 5000
    assert "group:nlp-lab: 5,000 tokens a term 2026-10-01..2027-03-31" in run("list")
    assert [row["id"] for row in json.loads(run("list", "--json"))] == [allocation.pk]
    run("set", "--user", "ada", "--cluster", "local", "--gpu-hours", "1.5", "--period", "day")
    assert Allocation.objects.count() == 2
    assert "cleared" in run("clear", str(allocation.pk))
    assert Allocation.objects.count() == 1


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--user", "nobody", "--tokens", "1", "--period", "day"], "nobody"),
        (["--group", "missing", "--tokens", "1", "--period", "day"], "no group 'missing'"),
        (["--user", "ada", "--cluster", "mars", "--gpu-hours", "1", "--period", "day"], "no cluster 'mars'"),
        (["--user", "ada", "--gpu-hours", "lots", "--period", "day"], "not a number"),
        (["--user", "ada", "--gpu-hours", "-1", "--period", "day"], "must be 0 or more"),
        (["--user", "ada", "--gpu-hours", "NaN", "--period", "day"], "must be 0 or more"),
        (["--user", "ada", "--tokens", "-5", "--period", "day"], "cannot be negative"),
        (["--user", "ada", "--period", "day"], "Give GPU-hours, tokens or both"),
        (
            ["--user", "ada", "--tokens", "1", "--period", "term", "--from", "2027-02-30", "--to", "2027-03-01"],
            "not a date",
        ),
        (["--slurm-account", "x;rm", "--tokens", "1", "--period", "day"], "slurm"),
    ],
)
def test_the_command_refuses_bad_input_with_a_clear_error(
    account: ClusterAccount, owner: Any, args: list[str], says: str
) -> None:
    with pytest.raises(CommandError) as caught:
        run("set", *args)
    assert says.lower() in str(caught.value).lower()
    assert not Allocation.objects.exists()
    with pytest.raises(CommandError, match="no allocation 99"):
        run("show", "99")


def test_my_usage_shows_the_allocations_that_apply_to_me_and_site_usage_all_of_them(
    client: Any, running: LLMSession, owner: Any, other_user: Any, lab: Group
) -> None:
    owner.groups.add(lab)
    Allocation.objects.create(group=lab, tokens=1000, period="month", soft_percent=50)
    Allocation.objects.create(user=other_user, gpu_hours=3, period="day")
    tokens_used(owner, running, 600)
    client.force_login(owner)
    page = client.get("/usage/").content.decode()
    assert "Your allocations" in page and "group nlp-lab" in page and "600 of 1,000" in page
    assert "near its end" in page and "user grace" not in page
    client.force_login(other_user)
    theirs = client.get("/usage/").content.decode()
    assert "user grace" in theirs and "group nlp-lab" not in theirs
    admin = type(owner).objects.create_superuser("root", "root@example.edu", "correct horse battery")
    client.force_login(admin)
    site = client.get("/usage/site/").content.decode()
    assert site.index("group nlp-lab") < site.index("user grace")  # the nearest to its end first


def test_a_terms_tokens_count_from_the_summaries_once_the_raw_rows_are_gone(
    running: LLMSession, owner: Any, shared_user: Any, lab: Group, settings: Any
) -> None:
    from jobs.usage import rollups

    settings.PORTAL_USAGE_RAW_DAYS = 30
    today = timezone.localdate()
    mine = Allocation.objects.create(user=owner, tokens=10**6, period="term", starts_on=today - timedelta(days=100),
                                     ends_on=today + timedelta(days=20))  # fmt: skip
    labs = Allocation.objects.create(group=lab, tokens=10**6, period="term", starts_on=today - timedelta(days=50),
                                     ends_on=today + timedelta(days=20))  # fmt: skip
    used = [(120, owner, 1), (80, owner, 10), (40, shared_user, 100), (10, owner, 1000), (0, owner, 7)]
    for days_ago, who, n in used:
        tokens_used(who, running, n, timezone.now() - timedelta(days=days_ago, minutes=30))
    before = [spend.standing(a).tokens for a in (mine, labs)]  # type: ignore[union-attr]
    assert before == [1017, 1107]
    rollups.summarise()
    assert ProxyRequest.objects.count() < 5  # the rows older than 30 days are gone
    assert [spend.standing(a).tokens for a in (mine, labs)] == before  # type: ignore[union-attr]
