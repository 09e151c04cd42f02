"""/metrics: refused without a scrape token in force, Prometheus text that the client's own parser reads, the
proxy's counters and the database's gauges in it; and the site dashboard's access and figures."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from catalog.models import ClusterAccount
from jobs.apps import USAGE_GROUP
from jobs.models import ApiToken, LLMSession, ProxyRequest, ScrapeToken, State, transition
from jobs.operations import metrics
from jobs.sessions.actions import launch
from tests.conftest import LAUNCH

pytestmark = pytest.mark.django_db


def scrape(client: Client, token: str) -> Any:
    return client.get("/metrics", headers={"authorization": f"Bearer {token}"})


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_refuse_requests_without_a_scrape_token_in_force(client: Client, owner: Any) -> None:
    row, token = ScrapeToken.issue("prometheus")
    _, api_token = ApiToken.issue(owner, "laptop")
    assert client.get("/metrics").status_code == 401
    assert scrape(client, token + "x").status_code == 401
    assert scrape(client, api_token).status_code == 401  # a personal API token is not one
    client.force_login(owner)
    assert client.get("/metrics").status_code == 401  # nor is being signed in
    assert scrape(client, token).status_code == 200
    assert ScrapeToken.objects.get(pk=row.pk).last_used_at is not None
    ScrapeToken.objects.filter(pk=row.pk).update(revoked_at=timezone.now())
    reply = scrape(client, token)
    assert reply.status_code == 401 and reply["WWW-Authenticate"].startswith("Bearer")


def test_the_text_parses_and_counts_proxy_requests_and_sessions(
    client: Client, account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    _, token = ScrapeToken.issue("prometheus")
    with django_capture_on_commit_callbacks(execute=False):
        queued = launch(owner, LAUNCH)
        launch(owner, LAUNCH)
    transition(queued.pk, State.QUEUED, cause="test", submitted_at=timezone.now() - timedelta(minutes=5))
    before = samples(scrape(client, token).content.decode())
    ok = ("portal_proxy_requests_total", (("endpoint", "chat/completions"), ("route", "api"), ("status", "2xx")))
    failed = ("portal_proxy_errors_total", (("endpoint", "chat/completions"), ("route", "chat")))
    metrics.observe_request("api", "chat/completions", 200, 0.02, 0.5, 1000)
    metrics.observe_request("api", "chat/completions", 200, None, 0.1, 10)
    metrics.observe_request("chat", "chat/completions", 502, None, 0.1, 0)
    reply = scrape(client, token)
    assert reply["Content-Type"].startswith("text/plain")
    after = samples(reply.content.decode())
    assert after[ok] - before.get(ok, 0) == 2
    assert after[failed] - before.get(failed, 0) == 1
    ttft = ("portal_proxy_time_to_first_byte_seconds_count", (("route", "api"),))
    assert after[ttft] - before.get(ttft, 0) == 1  # only the stream had a first byte
    assert after[("portal_sessions", (("cluster", "local"), ("state", "queued")))] == 1
    assert after[("portal_sessions", (("cluster", "local"), ("state", "pending")))] == 1
    wait = after[("portal_queue_wait_longest_seconds", (("cluster", "local"), ("partition", "gpu")))]
    assert 290 < wait < 400


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


def test_the_dashboard_shows_states_waits_and_errors_in_a_fixed_number_of_queries(
    client: Client, viewer: Any, account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any,
    django_assert_num_queries: Any, admin_user: Any,
) -> None:  # fmt: skip
    now = timezone.now()
    for minutes in (10, 30):
        with django_capture_on_commit_callbacks(execute=False):
            session: LLMSession = launch(owner, LAUNCH)
        transition(session.pk, State.RUNNING, cause="test", submitted_at=now - timedelta(minutes=minutes + 2),
                   started_at=now - timedelta(minutes=2), host="10.0.0.7", port=8080)  # fmt: skip
    for status in (200, 200, 200, 500):
        ProxyRequest.objects.create(session=session, user=owner, route="api", endpoint="chat/completions",
                                    status=status, duration_ms=5)  # fmt: skip
    client.force_login(viewer)
    # the browser session, the user, the permission (two), sessions by state, waits, traffic, batch runs
    with django_assert_num_queries(8):
        page = client.get("/dashboard/").content.decode()
    assert "<strong>2</strong> running" in page
    assert "<td>20.0</td><td>30.0</td>" in page  # median and longest wait, minutes
    assert "<td>4</td><td>1</td><td>25.0 %</td>" in page
    partial = client.get("/dashboard/", headers={"HX-Request": "true"}).content.decode()
    assert "<html" not in partial and 'hx-trigger="every 10s"' in partial
    client.force_login(admin_user)
    assert client.get("/dashboard/").status_code == 200


def test_the_command_issues_lists_and_revokes_scrape_tokens(client: Client) -> None:
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command("metrics", "issue", "prometheus-main", stdout=out)
    token = out.getvalue().strip()
    assert token.startswith(ScrapeToken.PREFIX) and scrape(client, token).status_code == 200
    listing = StringIO()
    call_command("metrics", "tokens", stdout=listing)
    assert "prometheus-main" in listing.getvalue() and token not in listing.getvalue()
    call_command("metrics", "revoke", str(ScrapeToken.objects.get().pk), stdout=StringIO())
    assert scrape(client, token).status_code == 401
