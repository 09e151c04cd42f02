"""The usage pages with Django's test client: who sees what, sorting and grouping by plain links, the CSV and its
escaping, and query counts that do not grow with the rows."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.test import Client

from jobs.apps import USAGE_GROUP
from jobs.models import FineTuneRun, LLMSession
from tests.jobs.test_access_matrix import finetune_run
from tests.jobs.usage.conftest import at, batch_run, request

PERIOD = {"since": "2025-01-01", "until": "2025-05-31"}
MakeSession = Callable[..., LLMSession]


@pytest.fixture
def usage_user(django_user_model: Any) -> Any:
    """Someone an admin put in the "Site usage" group (not staff)."""
    user = django_user_model.objects.create_user("mary", "mary@example.edu", "correct horse battery")
    user.groups.add(Group.objects.get(name=USAGE_GROUP))
    return user


@pytest.fixture
def rows(make_session: MakeSession, owner: Any, other_user: Any, shared_user: Any) -> dict[str, LLMSession]:
    """ada's session (she made 1 request of 12,345 prompt tokens; alan 2 of 7), grace's own (4 requests of 777)."""
    mine = make_session(owner, start="2025-03-01 10:00", end="2025-03-01 12:00", gpus=2)
    request(mine, owner, "2025-03-01 10:10", prompt_tokens=12345)
    request(mine, shared_user, "2025-03-01 11:10", prompt_tokens=7)
    request(mine, shared_user, "2025-03-01 11:11", prompt_tokens=7, status=500)
    theirs = make_session(other_user, start="2025-04-01 10:00", end="2025-04-01 11:00", model="GPT-2")
    for minute in range(4):
        request(theirs, other_user, f"2025-04-01 10:1{minute}", prompt_tokens=777)
    batch_run(mine, owner, "2025-03-01 10:30", prompt=40000, completion=2000)
    return {"mine": mine, "theirs": theirs}


def signed_in(client: Client, user: Any) -> Client:
    client.force_login(user)
    return client


def test_the_usage_pages_need_a_signed_in_user(client: Client, db: None) -> None:
    for url in ("/usage/", "/usage/site/", "/usage/site.csv"):
        reply = client.get(url)
        assert reply.status_code == 302 and reply["Location"].startswith("/accounts/login/")


def test_my_usage_shows_my_figures_and_nobody_elses(client: Client, rows: Any, owner: Any) -> None:
    text = signed_in(client, owner).get("/usage/", PERIOD).content.decode()
    assert "12,345" in text and "42,000" in text  # my prompt tokens; my batch run's tokens
    assert "4.00" in text  # 2 GPUs for 2 hours
    assert "777" not in text and "3,108" not in text and "GPT-2" not in text  # grace's
    assert "tiny-llama" in text and "2025-03" in text and "<svg" in text
    assert 'href="/usage/"' in text  # the nav's link
    assert "Site usage" not in text and "/dashboard/" not in text


def test_the_usage_pages_count_each_api_route_apart(
    client: Client, make_session: MakeSession, owner: Any, other_user: Any, usage_user: Any
) -> None:
    """Anthropic's messages, OpenAI's responses and chat each have their row, with the prompt's cached tokens."""
    mine = make_session(owner, start="2025-03-01 10:00", end="2025-03-01 12:00")
    request(mine, owner, "2025-03-01 10:10", endpoint="messages", prompt_tokens=1234, cached_tokens=1000)
    request(mine, owner, "2025-03-01 10:11", endpoint="messages", prompt_tokens=10, status=401)
    request(mine, owner, "2025-03-01 10:12", endpoint="responses", prompt_tokens=55, completion_tokens=66)
    theirs = make_session(other_user, start="2025-03-01 10:00", end="2025-03-01 12:00")
    request(theirs, other_user, "2025-03-01 10:13", endpoint="rerank", prompt_tokens=9876)
    text = signed_in(client, owner).get("/usage/", PERIOD).content.decode()
    routes = text[text.index('id="routes"') :]
    assert "<code>messages</code></th><td>2</td><td>1</td><td>1,244</td><td>1,000</td>" in routes
    assert "<code>responses</code></th><td>1</td><td>0</td><td>55</td><td>0</td><td>66</td>" in routes
    assert routes.index(">messages<") < routes.index(">responses<") and "rerank" not in routes  # grace's
    site = signed_in(client, usage_user).get("/usage/site/", PERIOD).content.decode()
    assert "<code>rerank</code></th><td>1</td><td>0</td><td>9,876</td>" in site[site.index('id="routes"') :]


def test_requests_on_a_session_shared_with_me_are_in_my_usage(client: Client, rows: Any, shared_user: Any) -> None:
    text = signed_in(client, shared_user).get("/usage/", PERIOD).content.decode()
    assert "12,345" not in text and ">14<" in text and ">1<" in text  # two requests of 7 tokens, one failed


@pytest.mark.parametrize("who", ["owner", "staff_user", "support_user"])
def test_site_usage_is_refused_without_the_permission(client: Client, rows: Any, who: str, request: Any) -> None:
    """Staff (who open the admin) and support staff (who see every session) do not see the site's usage."""
    signed_in(client, request.getfixturevalue(who))
    page = client.get("/usage/site/")
    assert page.status_code == 403 and "“Site usage” group" in page.content.decode()
    assert "12,345" not in page.content.decode()
    download = client.get("/usage/site.csv")
    assert download.status_code == 403 and b"12345" not in download.content


@pytest.mark.parametrize("who", ["usage_user", "admin_user"])
def test_the_site_usage_group_and_superusers_see_every_users_usage(
    client: Client, rows: Any, who: str, request: Any
) -> None:
    signed_in(client, request.getfixturevalue(who))
    text = client.get("/usage/site/", PERIOD).content.decode()
    assert all(name in text for name in ("ada", "alan", "grace"))
    assert "12,345" in text and "3,108" in text
    assert 'href="/dashboard/"' in text and "Site dashboard" in text
    mine = client.get("/usage/").content.decode()
    assert "/usage/site/" in mine and "Site dashboard" in mine


def test_site_usage_sorts_and_groups_by_plain_links(client: Client, rows: Any, usage_user: Any) -> None:
    signed_in(client, usage_user)
    by_requests = client.get("/usage/site/", {**PERIOD, "by": "user", "sort": "requests", "dir": "desc"})
    text = by_requests.content.decode()
    assert text.index(">grace<") < text.index(">alan<") < text.index(">ada<")
    assert 'aria-sort="descending"' in text
    assert "sort=requests&amp;dir=asc" in text  # a second click turns it round
    ascending = client.get("/usage/site/", {**PERIOD, "by": "user", "sort": "requests", "dir": "asc"}).content.decode()
    assert ascending.index(">ada<") < ascending.index(">alan<") < ascending.index(">grace<")
    wrong_period = client.get("/usage/site/", {"by": "model", "since": "soon"}).content.decode()
    assert "Enter a valid date" in wrong_period and '<strong aria-current="page">Model</strong>' in wrong_period
    by_model = client.get("/usage/site/", {**PERIOD, "by": "model"}).content.decode()
    assert ">GPT-2<" in by_model and ">tiny-llama<" in by_model and "by=group" in by_model
    part = client.get("/usage/site/", {**PERIOD, "by": "model"}, headers={"HX-Request": "true"}).content.decode()
    assert part.lstrip().startswith('<div id="site-table"') and "<html" not in part


def test_a_group_table_says_why_it_has_no_total(client: Client, rows: Any, usage_user: Any, owner: Any) -> None:
    owner.groups.add(Group.objects.create(name="vision-lab"))  # ada is in nlp-lab too (shared_user's fixture)
    text = signed_in(client, usage_user).get("/usage/site/", {**PERIOD, "by": "group"}).content.decode()
    assert ">nlp-lab<" in text and ">vision-lab<" in text and "(no group)" in text
    assert "counts in both" in text and "<tfoot>" not in text


def test_the_csv_has_every_column_and_defuses_formulas(
    client: Client, rows: Any, usage_user: Any, other_user: Any, django_user_model: Any, make_session: MakeSession
) -> None:
    other_user.groups.add(Group.objects.create(name='=HYPERLINK("http://evil")'))
    mallory = django_user_model.objects.create_user("@mallory", "m@example.edu", "correct horse battery")
    request(rows["theirs"], mallory, "2025-04-01 10:30")
    signed_in(client, usage_user)
    reply = client.get("/usage/site.csv", {**PERIOD, "by": "user"})
    assert reply["Content-Type"].startswith("text/csv")
    assert 'filename="site-usage-by-user-2025-01-01-to-2025-05-31.csv"' in reply["Content-Disposition"]
    table = list(csv.reader(io.StringIO(reply.content.decode())))
    assert table[0][:4] == ["user", "sessions", "requests", "errors"] and "traffic_gpu_hours" in table[0]
    names = [line[0] for line in table[1:]]
    assert "'@mallory" in names and "(total)" in names
    ada = dict(zip(table[0], table[names.index("ada") + 1], strict=True))
    assert ada["prompt_tokens"] == "12345" and ada["batch_tokens"] == "42000" and ada["gpu_hours"] == "4.0"
    groups = client.get("/usage/site.csv", {**PERIOD, "by": "group"}).content.decode()
    assert "'=HYPERLINK" in groups and "\n=HYPERLINK" not in groups and "(total)" not in groups


def test_a_wrong_period_says_so_and_shows_the_default(client: Client, rows: Any, owner: Any) -> None:
    page = signed_in(client, owner).get("/usage/", {"months": "many"})
    assert page.status_code == 200 and "Enter a whole number" in page.content.decode()
    backwards = client.get("/usage/", {"since": "2025-05-01", "until": "2025-01-01"}).content.decode()
    assert "comes before" in backwards
    by_month = client.get("/usage/", {"since": "2025-03"}).content.decode()
    assert "from 2025-03-01" in by_month and "12,345" in by_month
    future = client.get("/usage/", {"since": "2099-01-01"})
    assert future.status_code == 200 and "has not come yet" in future.content.decode()


@pytest.mark.parametrize("sessions", [1, 10])
def test_the_usage_pages_take_a_fixed_number_of_queries(
    client: Client, make_session: MakeSession, owner: Any, usage_user: Any, sessions: int,
    django_assert_num_queries: Any,
) -> None:  # fmt: skip
    for i in range(sessions):
        session = make_session(owner, start=f"2025-03-0{1 + i % 9} 10:00", end=f"2025-03-0{1 + i % 9} 12:00")
        for minute in range(i + 1):
            request(session, usage_user if minute % 2 else owner, f"2025-03-0{1 + i % 9} 10:{minute:02}")
        batch_run(session, owner, f"2025-03-0{1 + i % 9} 10:30", prompt=1, completion=1)
    signed_in(client, owner)
    # The browser session and user, the figures' four and the names their keys join (the sessions' or the users';
    # none by month), the routes' one, where the summaries stand (for each of the two), the user's and their groups'
    # permissions (the link to Site usage), the allocations (none here) and the fine-tune runs' GPU-hours. The CSV
    # has no routes' table, no allocations and no fine-tune runs.
    with django_assert_num_queries(14):
        client.get("/usage/", PERIOD)
    signed_in(client, usage_user)
    for by in ("user", "group", "model", "month"):
        with django_assert_num_queries(13 + (by != "month")):
            client.get("/usage/site/", {**PERIOD, "by": by})
        with django_assert_num_queries(9 + (by != "month")):
            client.get("/usage/site.csv", {**PERIOD, "by": by})


def trained(session: LLMSession, start: str, end: str) -> FineTuneRun:
    """A fine-tune run of the session's owner, where the session ran, whose job ran from `start` to `end`."""
    run = finetune_run(session)
    FineTuneRun.objects.filter(pk=run.pk).update(
        state=FineTuneRun.State.COMPLETED, started_at=at(start), finished_at=at(end)
    )
    return run


def test_the_usage_pages_show_fine_tune_runs_gpu_hours_in_the_period(
    client: Client, rows: dict[str, LLMSession], owner: Any, usage_user: Any
) -> None:
    trained(rows["mine"], "2025-03-02 10:00", "2025-03-02 11:30")
    trained(rows["mine"], "2024-12-31 23:00", "2025-01-01 01:00")  # one of its two hours in the period (2 GPUs)
    trained(rows["mine"], "2024-06-01 10:00", "2024-06-01 12:00")  # before it
    signed_in(client, owner)
    page = client.get("/usage/", PERIOD).content.decode()
    assert "Fine-tune runs: <strong>5.00 GPU-hours</strong> of 2 runs in this period" in page
    assert "none ran in this period" in client.get("/usage/", {"since": "2025-04-01"}).content.decode()
    signed_in(client, usage_user)
    assert "<strong>5.00 GPU-hours</strong> of 2 runs" in client.get("/usage/site/", PERIOD).content.decode()
