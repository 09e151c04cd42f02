"""/metrics: refused without a scrape token in force, Prometheus text that the client's own parser reads, the
processes' counters (proxy, polls, SSH, submits) and the database's figures in it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from catalog.models import Cluster, ClusterAccount
from jobs import tasks
from jobs.models import TTFT_BOUNDS_MS, ApiToken, BatchRun, LLMSession, ScrapeToken, State, transition
from jobs.operations import metrics
from jobs.sessions import lifecycle
from jobs.sessions.actions import launch
from portal import ssh
from tests.conftest import LAUNCH
from tests.jobs.operations.conftest import Samples

pytestmark = pytest.mark.django_db


def bearer(client: Client, token: str, scheme: str = "Bearer") -> Any:
    return client.get("/metrics", headers={"authorization": f"{scheme} {token}"})


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


def test_metrics_refuse_requests_without_a_scrape_token_in_force(client: Client, owner: Any) -> None:
    row, token = ScrapeToken.issue("prometheus")
    _, api_token = ApiToken.issue(owner, "laptop")
    assert client.get("/metrics").status_code == 401
    assert bearer(client, token + "x").status_code == 401
    assert bearer(client, token, scheme="Basic").status_code == 401
    assert bearer(client, api_token).status_code == 401  # a personal API token is not one
    client.force_login(owner)
    assert client.get("/metrics").status_code == 401  # nor is being signed in
    assert bearer(client, token).status_code == 200
    assert client.post("/metrics", headers={"authorization": f"Bearer {token}"}).status_code == 405
    ScrapeToken.objects.filter(pk=row.pk).update(revoked_at=timezone.now())
    reply = bearer(client, token)
    assert reply.status_code == 401 and reply["WWW-Authenticate"].startswith("Bearer")
    assert b"# TYPE" not in reply.content


def test_a_scrape_notes_the_token_used_at_most_once_a_minute(client: Client) -> None:
    row, token = ScrapeToken.issue("prometheus")
    bearer(client, token)
    first = ScrapeToken.objects.get(pk=row.pk).last_used_at
    assert first is not None
    bearer(client, token)
    assert ScrapeToken.objects.get(pk=row.pk).last_used_at == first  # no write on every scrape
    ScrapeToken.objects.filter(pk=row.pk).update(last_used_at=first - timedelta(minutes=2))
    bearer(client, token)
    assert ScrapeToken.objects.get(pk=row.pk).last_used_at > first  # type: ignore[operator]


def test_the_text_parses_and_holds_every_family(client: Client, scrape_token: str) -> None:
    metrics.observe_request("api", "chat/completions", 200, 0.02, 0.5, 1000)
    metrics.observe_request("api", "chat/completions", 503, None, 0.5, 0)
    with metrics.polling("local"):
        pass
    metrics.poll_failed("local", "scheduler")
    metrics.ssh_error("local", "submit")
    metrics.submitted("4242")
    reply = bearer(client, scrape_token)
    assert reply["Content-Type"].startswith("text/plain; version=")  # the text format, not OpenMetrics
    families = {family.name: family.type for family in text_string_to_metric_families(reply.content.decode())}
    expected = {
        "portal_sessions": "gauge",
        "portal_queue_wait_longest_seconds": "gauge",
        "portal_batch_runs": "gauge",
        "portal_batch_lines": "gauge",
        "portal_sessions_submitted": "counter",
        "portal_sessions_submit_failed": "counter",
        "portal_proxy_requests_last_hour": "gauge",
        "portal_proxy_requests": "counter",
        "portal_proxy_errors": "counter",
        "portal_proxy_response_bytes": "counter",
        "portal_proxy_time_to_first_byte_seconds": "histogram",
        "portal_proxy_request_duration_seconds": "histogram",
        "portal_poll_duration_seconds": "histogram",
        "portal_poll_failures": "counter",
        "portal_ssh_errors": "counter",
        "portal_submit_attempts": "counter",
    }
    assert families.items() >= expected.items()


def test_observe_request_counts_requests_errors_bytes_and_times(scrape: Callable[[], Samples]) -> None:
    before = scrape()
    metrics.observe_request("api", "chat/completions", 200, 0.02, 0.5, 1000)  # a stream
    metrics.observe_request("api", "chat/completions", 200, None, 0.1, 10)
    metrics.observe_request("chat", "chat/completions", 502, None, 0.1, 0)
    metrics.observe_request("api", "models", 404, None, 0.01, 50)
    after = scrape()
    requests = "portal_proxy_requests_total"
    assert grew(before, after, requests, route="api", endpoint="chat/completions", status="2xx") == 2
    assert grew(before, after, requests, route="chat", endpoint="chat/completions", status="5xx") == 1
    assert grew(before, after, requests, route="api", endpoint="models", status="4xx") == 1
    assert grew(before, after, "portal_proxy_errors_total", route="chat", endpoint="chat/completions") == 1
    assert grew(before, after, "portal_proxy_errors_total", route="api", endpoint="models") == 1
    assert grew(before, after, "portal_proxy_errors_total", route="api", endpoint="chat/completions") == 0
    assert grew(before, after, "portal_proxy_response_bytes_total", route="api") == 1060
    ttft = "portal_proxy_time_to_first_byte_seconds"
    assert grew(before, after, f"{ttft}_count", route="api") == 1  # only the stream had a first byte
    assert grew(before, after, f"{ttft}_bucket", route="api", le="0.025") == 1
    assert grew(before, after, f"{ttft}_bucket", route="api", le="0.01") == 0
    duration = "portal_proxy_request_duration_seconds"
    assert grew(before, after, f"{duration}_count", route="api", endpoint="chat/completions") == 2
    assert grew(before, after, f"{duration}_sum", route="api", endpoint="chat/completions") == pytest.approx(0.6)


def test_the_histograms_use_the_usage_pages_bounds_in_seconds(scrape: Callable[[], Samples]) -> None:
    metrics.observe_request("api", "completions", 200, 0.3, 0.3, 1)
    bounds = {
        float(dict(labels)["le"])
        for name, labels in scrape()
        if name == "portal_proxy_time_to_first_byte_seconds_bucket" and dict(labels)["route"] == "api"
    }
    assert bounds == {ms / 1000 for ms in TTFT_BOUNDS_MS} | {float("inf")}


def test_status_classes_and_submit_outcomes(scrape: Callable[[], Samples]) -> None:
    assert [metrics._status_class(s) for s in (200, 302, 429, 504, 0)] == ["2xx", "3xx", "4xx", "5xx", "other"]
    before = scrape()
    for outcome in ("4242", "retry", "retry", "failed", "cancelled", "not claimed"):
        metrics.submitted(outcome)
    after = scrape()
    counts = {o: grew(before, after, "portal_submit_attempts_total", outcome=o) for o in
              ("submitted", "retry", "failed", "cancelled", "not claimed")}  # fmt: skip
    assert counts == {"submitted": 1, "retry": 2, "failed": 1, "cancelled": 1, "not claimed": 1}


def test_polls_and_ssh_errors_are_counted_by_cluster(scrape: Callable[[], Samples]) -> None:
    before = scrape()
    with metrics.polling("local"):
        pass
    metrics.poll_failed("local", "ssh")
    metrics.ssh_error("local", "cancel")
    after = scrape()
    assert grew(before, after, "portal_poll_duration_seconds_count", cluster="local") == 1
    assert grew(before, after, "portal_poll_failures_total", cluster="local", reason="ssh") == 1
    assert grew(before, after, "portal_ssh_errors_total", cluster="local", operation="poll") == 1  # the poll's SSH
    assert grew(before, after, "portal_ssh_errors_total", cluster="local", operation="cancel") == 1


def test_the_database_figures_by_state_and_cluster_in_a_fixed_number_of_queries(
    account: ClusterAccount, owner: Any, scrape: Callable[[], Samples], django_capture_on_commit_callbacks: Any,
    django_assert_num_queries: Any,
) -> None:  # fmt: skip
    """Sessions by state and cluster, the longest queue wait, batch progress, and the submits and submit failures
    that the sessions' histories record."""
    other = Cluster.objects.create(name="Other", slug="other", login_host="other.example.edu")
    with django_capture_on_commit_callbacks(execute=False):
        sessions: list[LLMSession] = [launch(owner, LAUNCH) for _ in range(4)]
    moved = timezone.now() - timedelta(minutes=5)
    for session in sessions[:3]:
        transition(session.pk, State.SUBMITTING, cause="test")
    transition(sessions[0].pk, State.QUEUED, cause="test", submitted_at=moved)
    transition(sessions[1].pk, State.QUEUED, cause="test")
    transition(sessions[1].pk, State.RUNNING, cause="test", host="127.0.0.7", port=8080)
    transition(sessions[2].pk, State.FAILED, cause="Slurm refused the job")
    LLMSession.objects.filter(pk__in=[sessions[1].pk, sessions[3].pk]).update(cluster=other)
    for state, done in ((BatchRun.State.RUNNING, 4), (BatchRun.State.RUNNING, 1), (BatchRun.State.FINISHED, 10)):
        BatchRun.objects.create(owner=owner, session=sessions[1], name="p.txt", input_format="text", endpoint="chat/"
                                "completions", prompts=10, done=done, failed=1, requests="x", state=state)  # fmt: skip
    # sessions, waits, batch runs, histories, last hour's requests, services (2), allocations (none here)
    with django_assert_num_queries(8):
        collected = list(metrics.DatabaseCollector().collect())
    assert len(collected) == 12  # with the allocations' three families
    found = scrape()
    on = {key[1]: value for key, value in found.items() if key[0] == "portal_sessions"}
    assert on == {
        (("cluster", "local"), ("state", "queued")): 1,
        (("cluster", "local"), ("state", "failed")): 1,
        (("cluster", "other"), ("state", "running")): 1,
        (("cluster", "other"), ("state", "pending")): 1,
    }
    wait = found[("portal_queue_wait_longest_seconds", (("cluster", "local"), ("partition", "gpu")))]
    assert 290 < wait < 400
    assert found[("portal_batch_runs", (("state", "running"),))] == 2
    assert found[("portal_batch_lines", (("kind", "done"), ("state", "running")))] == 5
    assert found[("portal_batch_lines", (("kind", "prompts"), ("state", "running")))] == 20
    assert found[("portal_batch_lines", (("kind", "failed"), ("state", "finished")))] == 1
    assert found[("portal_sessions_submitted_total", (("cluster", "local"),))] == 1
    assert found[("portal_sessions_submitted_total", (("cluster", "other"),))] == 1
    assert found[("portal_sessions_submit_failed_total", (("cluster", "local"),))] == 1
    assert found[("portal_sessions_submit_failed_total", (("cluster", "other"),))] == 0
    assert found[("portal_proxy_requests_last_hour", (("failed", "true"),))] == 0


def test_observe_request_counts_from_threads_and_the_event_loop(scrape: Callable[[], Samples]) -> None:
    """The proxy calls it from its worker threads and from the event loop (a stream's end)."""
    before = scrape()
    threads = [threading.Thread(target=metrics.observe_request, args=("api", "embeddings", 200, None, 0.01, 5))
               for _ in range(8)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    async def stream_ended() -> None:
        metrics.observe_request("api", "embeddings", 200, 0.05, 0.2, 5)

    asyncio.run(stream_ended())
    after = scrape()
    assert grew(before, after, "portal_proxy_requests_total", route="api", endpoint="embeddings", status="2xx") == 9


def test_ssh_failures_are_counted_where_submits_polls_and_refreshes_catch_them(
    account: ClusterAccount, owner: Any, scrape: Callable[[], Samples], monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    def refuse(*args: Any, **kwargs: Any) -> ssh.CommandResult:
        raise ssh.ConnectionRefused(None, "connection refused")

    monkeypatch.setattr(ssh.pool, "run", refuse)
    with django_capture_on_commit_callbacks(execute=False):
        queued: LLMSession = launch(owner, LAUNCH)
        submitting: LLMSession = launch(owner, LAUNCH)
    transition(queued.pk, State.QUEUED, cause="test", job_id="42")
    before = scrape()
    assert lifecycle.submit(str(submitting.pk), None).retry
    lifecycle.poll(account.pk)
    ClusterAccount.objects.filter(pk=account.pk).update(trusted=True)  # the queue figures need a trusted account
    tasks.refresh_partitions()
    after = scrape()
    for operation in ("submit", "poll", "partitions"):
        assert grew(before, after, "portal_ssh_errors_total", cluster="local", operation=operation) == 1
    assert grew(before, after, "portal_poll_failures_total", cluster="local", reason="ssh") == 1
    assert grew(before, after, "portal_poll_duration_seconds_count", cluster="local") == 1
