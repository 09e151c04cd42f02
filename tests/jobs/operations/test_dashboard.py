"""The site dashboard: for the "Site usage" permission only, its figures in a fixed number of queries, and the part
that htmx refreshes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from django.utils import timezone

from catalog.models import ClusterAccount
from jobs.apps import USAGE_GROUP
from jobs.models import BatchRun, LLMSession, ProxyRequest, State, transition
from jobs.sessions.actions import launch
from tests.conftest import LAUNCH

pytestmark = pytest.mark.django_db


@pytest.fixture
def viewer(django_user_model: Any) -> Any:
    user = django_user_model.objects.create_user("turing", "turing@example.edu", "correct horse battery")
    user.groups.add(Group.objects.get(name=USAGE_GROUP))
    return user


@pytest.mark.parametrize("who", ["owner", "staff_user", "support_user"])
def test_the_dashboard_is_for_the_site_usage_permission_only(
    client: Client, who: str, request: pytest.FixtureRequest
) -> None:
    client.force_login(request.getfixturevalue(who))
    assert client.get("/dashboard/").status_code == 403
    assert client.get("/dashboard/", headers={"HX-Request": "true"}).status_code == 403


def test_the_dashboard_asks_strangers_to_sign_in(client: Client) -> None:
    reply = client.get("/dashboard/")
    assert reply.status_code == 302 and "/login/" in reply["Location"]


@pytest.mark.parametrize("who", ["viewer", "admin_user"])
def test_the_site_usage_group_and_superusers_see_the_dashboard(
    client: Client, who: str, request: pytest.FixtureRequest
) -> None:
    client.force_login(request.getfixturevalue(who))
    page = client.get("/dashboard/")
    assert page.status_code == 200 and "Sessions now" in page.content.decode()


def test_the_dashboard_shows_states_waits_and_errors_in_a_fixed_number_of_queries(
    client: Client, viewer: Any, account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any,
    django_assert_num_queries: Any,
) -> None:  # fmt: skip
    now = timezone.now()
    for minutes in (10, 30):
        with django_capture_on_commit_callbacks(execute=False):
            session: LLMSession = launch(owner, LAUNCH)
        transition(session.pk, State.RUNNING, cause="test", submitted_at=now - timedelta(minutes=minutes + 2),
                   started_at=now - timedelta(minutes=2), host="127.0.0.7", port=8080)  # fmt: skip
    for status in (200, 200, 200, 500):
        ProxyRequest.objects.create(session=session, user=owner, route="api", endpoint="chat/completions",
                                    status=status, duration_ms=5)  # fmt: skip
    ProxyRequest.objects.create(session=session, user=owner, route="api", endpoint="chat/completions", status=429,
                                duration_ms=5, at=now - timedelta(hours=3))  # fmt: skip
    for name in ("first.jsonl", "second.jsonl"):
        BatchRun.objects.create(owner=owner, session=session, name=name, input_format="openai", prompts=10, done=3,
                                endpoint="chat/completions", requests="x", state=BatchRun.State.RUNNING)  # fmt: skip
    client.force_login(viewer)
    # the browser session, the user, the permission (two), sessions by state, waits, traffic, batch runs, the running
    # model services (none here: nothing more for their replicas)
    with django_assert_num_queries(9):
        page = client.get("/dashboard/").content.decode()
    assert "<strong>2</strong> running" in page
    assert "<td>20.0</td><td>30.0</td>" in page  # median and longest wait, minutes
    assert "<td>4</td><td>1</td><td>25.0 %</td>" in page  # the last hour
    assert "<td>5</td><td>2</td><td>40.0 %</td>" in page  # the last day
    assert "first.jsonl" in page and "second.jsonl" in page and "3 of 10" in page
    with django_assert_num_queries(9):
        partial = client.get("/dashboard/", headers={"HX-Request": "true"}).content.decode()
    assert "<html" not in partial and 'hx-trigger="every 10s"' in partial
    assert 'href="/dashboard/"' in partial  # a plain link refreshes it without JavaScript
