"""A lab shares one running model: through the real portal (uvicorn), the local cluster's llama-server and Chromium,
a member of the owner's group chats with it in the browser and calls it with the openai client; a non-member and,
once the grant is revoked, the member get 404; the member cannot cancel it; and what each used is recorded, with
GPU-hours from Slurm's own start and end of the job."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from django.conf import settings
from django.contrib.auth.models import Group
from django.test import Client
from django.utils import timezone
from playwright.sync_api import Browser, expect
from prometheus_client.parser import text_string_to_metric_families

from jobs.models import ApiToken, LLMSession, ProxyRequest, ScrapeToken, SessionShare, State
from jobs.sessions.actions import launch, request_cancel
from jobs.tasks import submit_session
from jobs.usage import figures
from portal import ssh
from portal.slurm.records import parse_key_values
from portal.slurm.times import parse_time
from tests.browser.test_flow import PASSWORD, shot
from tests.conftest import LAUNCH
from tests.e2e.sessions import cancel_all_jobs, drive, local_account
from tests.e2e.test_worker import worker_env
from tests.worker import PortalServer

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
HELLO: list[Any] = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def lab_session(
    local_catalog: dict[str, Any], owner: Any, shared_user: Any, lab: Group, tmp_path: Path,
    django_capture_on_commit_callbacks: Any,
) -> Iterator[tuple[LLMSession, str]]:  # fmt: skip
    for user in (owner, shared_user):
        user.set_password(PASSWORD)
        user.save()
    local_account(owner, local_catalog)
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**LAUNCH, "alias": "lab-model"})
    submit_session.apply(args=(str(session.pk),))
    session = drive(LLMSession.objects.get(pk=session.pk), lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    server = PortalServer(worker_env(), tmp_path / "uvicorn.log")
    yield session, server.start()
    server.stop()
    cancel_all_jobs()
    ssh.pool.close_all()


def client_of(user: Any) -> Client:
    client = Client()
    # A sign-in through the real portal re-hashes the tests' one-round password at full strength (Django upgrades a
    # weaker hash when it checks one), and a session is bound to the password hash it was made with.
    user.refresh_from_db()
    client.force_login(user)
    return client


def api(portal: str, user: Any) -> openai.OpenAI:
    _, token = ApiToken.issue(user, "script")
    return openai.OpenAI(base_url=f"{portal}/api/v1", api_key=token, max_retries=0)


def recorded(session: LLMSession, count: int) -> list[ProxyRequest]:
    """The session's request records once `count` are in (the proxy writes them just after each reply)."""
    deadline = time.monotonic() + 15
    while len(rows := list(ProxyRequest.objects.filter(session=session).order_by("at"))) < count:
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    return rows


def slurm_times(job_id: str) -> tuple[Any, Any]:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    fields = parse_key_values(shown.stdout.strip())
    start, end = parse_time(fields["StartTime"]), parse_time(fields["EndTime"])
    assert start and end, shown.stdout
    return start, end


def test_a_lab_shares_one_model_and_each_member_sees_what_they_used(
    browser: Browser, lab_session: tuple[LLMSession, str], owner: Any, shared_user: Any, other_user: Any, lab: Group
) -> None:  # fmt: skip
    session, portal = lab_session
    owner_pages = client_of(owner)
    owner_pages.post(f"/sessions/{session.pk}/share", {"group": str(lab.pk), "chat": "on", "api": "on"})
    grant = SessionShare.objects.get()

    # The member chats in Chromium: found under "Shared with me", their own conversation, a streamed reply.
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{portal}/sessions/")
    page.get_by_label("Username").fill(shared_user.get_username())
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    shared_card = page.locator(f"#shared-{session.pk}")
    expect(shared_card).to_contain_text("ada's session")
    shot(page, "sharing/1-shared-with-me")
    shared_card.get_by_role("link", name="Open chat").click()
    page.get_by_role("button", name="New chat").click()
    page.locator("#id_message").fill("Say hello.")
    page.locator("#id_message").press("Enter")
    expect(page.locator("li.msg-assistant").last.locator(".stats")).to_contain_text("tokens", timeout=30_000)
    shot(page, "sharing/2-member-chat")

    # The member's script, by owner/alias (a bare alias names the member's own sessions only); the owner's own.
    member = api(portal, shared_user)
    assert "ada/lab-model" in [m.id for m in member.models.list()]
    stream = member.chat.completions.create(model="ada/lab-model", messages=HELLO, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    streamed = chunks[-1].usage
    assert streamed is not None and streamed.completion_tokens > 0
    whole = api(portal, owner).chat.completions.create(model="lab-model", messages=HELLO, max_tokens=8)
    assert whole.usage is not None and whole.usage.completion_tokens > 0

    # Someone outside the lab: 404 on every route, as for a session that does not exist.
    outsider = api(portal, other_user)
    with pytest.raises(openai.NotFoundError):
        outsider.chat.completions.create(model=str(session.pk), messages=HELLO, max_tokens=4)
    assert client_of(other_user).get(f"/sessions/{session.pk}/chat/").status_code == 404
    # The member cannot cancel it, nor read its log.
    member_pages = client_of(shared_user)
    assert member_pages.post(f"/sessions/{session.pk}/cancel").status_code == 404
    assert member_pages.get(f"/sessions/{session.pk}/log").status_code == 404
    assert LLMSession.objects.get(pk=session.pk).state == State.RUNNING

    # What each used: the member's requests (browser and script) and the owner's, on the one session.
    rows = recorded(session, 3)  # the member: chat and stream; the owner: one; the outsider never reached it
    by_user = {(r.user_id, r.route) for r in rows if r.endpoint == "chat/completions" and r.status == 200}
    assert {(shared_user.pk, "chat"), (shared_user.pk, "api"), (owner.pk, "api")} <= by_user
    member_stream = next(r for r in rows if r.user_id == shared_user.pk and r.route == "api" and r.ttft_ms)
    assert member_stream.completion_tokens == streamed.completion_tokens and member_stream.tokens_reported
    assert member_stream.prompt_tokens == streamed.prompt_tokens
    assert member_stream.prompt_tokens > 0 and (member_stream.ttft_ms or 0) <= member_stream.duration_ms
    owner_whole = next(r for r in rows if r.user_id == owner.pk and r.endpoint == "chat/completions")
    assert owner_whole.completion_tokens == whole.usage.completion_tokens
    card = owner_pages.get(f"/sessions/{session.pk}/card").content.decode()
    assert "Shared with group nlp-lab" in card and "alan 2, ada 1" in card
    shot(page, "sharing/3-before-revoke")

    # The usage pages add up exactly what was recorded, for whoever made it; /metrics, scraped from the real uvicorn,
    # counted the same requests in that process (prometheus_client's multiprocess files).
    for user in (owner, shared_user):
        theirs = [r for r in recorded(session, 3) if r.user_id == user.pk]
        usage = figures.my_usage(user.pk, figures.Period.all_time())
        assert usage.total.requests == len(theirs)
        assert usage.total.tokens == sum(r.prompt_tokens + r.completion_tokens for r in theirs) > 0
        usage_page = client_of(user).get("/usage/").content.decode()
        assert f"{usage.total.tokens:,}" in usage_page
    _, scrape_token = ScrapeToken.issue("prometheus")
    scraped = httpx.get(f"{portal}/metrics", headers={"authorization": f"Bearer {scrape_token}"})
    counted = {
        (s.labels.get("route"), s.labels.get("status")): s.value
        for family in text_string_to_metric_families(scraped.text)
        for s in family.samples
        if s.name == "portal_proxy_requests_total" and s.labels.get("endpoint") == "chat/completions"
    }
    assert counted[("api", "2xx")] >= 2 and counted[("chat", "2xx")] >= 1

    # Revoked: the member's next request is refused, their chat page gone.
    owner_pages.post(f"/sessions/{session.pk}/share/{grant.pk}/revoke")
    with pytest.raises(openai.NotFoundError):
        member.chat.completions.create(model="lab-model", messages=HELLO, max_tokens=4)
    assert member_pages.get(f"/sessions/{session.pk}/chat/").status_code == 404

    # GPU-hours from Slurm's own start and end of the job, within a poll interval.
    request_cancel(LLMSession.objects.get(pk=session.pk), "done")
    ended = drive(LLMSession.objects.get(pk=session.pk), lambda s: s.is_ended)
    start, end = slurm_times(ended.job_id)
    tolerance = timedelta(seconds=settings.PORTAL_POLL_INTERVAL_S)
    assert ended.started_at is not None and ended.ended_at is not None
    assert abs(ended.started_at - timezone.make_aware(start)) <= tolerance  # Slurm prints the cluster's local time
    assert abs(ended.ended_at - timezone.make_aware(end)) <= tolerance
    assert ended.gpu_hours == pytest.approx(ended.gpus * (end - start).total_seconds() / 3600, abs=0.01)
    owners = figures.my_usage(owner.pk, figures.Period.all_time()).total
    assert owners.gpu_hours == pytest.approx(ended.gpu_hours, rel=1e-6) and owners.gpu_hours > 0
    assert figures.my_usage(shared_user.pk, figures.Period.all_time()).total.gpu_hours == 0  # the owner's alone
