"""Spent token allocations at the proxy's door (jobs/use/guard.py): 429 with the reset on the API, Anthropic's route and
the browser's chat, for the allocation's users only; through the ASGI application as scripts and the chat page reach
it."""

from __future__ import annotations

from typing import Any

import pytest
from django.utils import timezone

from jobs.allocations import door
from jobs.models import Allocation, ApiToken, LLMSession, ProxyRequest
from jobs.operations import metrics
from tests.asgi import Portal, bearer, browser
from tests.jobs.use.upstream import Server

pytestmark = pytest.mark.django_db(transaction=True)
ASK = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def test_spent_tokens_are_answered_429_with_the_reset_on_every_route_of_their_users(
    owner: Any, other_user: Any, running: LLMSession, server: Server, settings: Any
) -> None:
    settings.PORTAL_ALLOCATION_CHECK_S = 0
    door.forget()
    api = Portal(bearer(ApiToken.issue(owner, "script")[1]))
    assert api.post("/api/v1/chat/completions", json=ASK).status_code == 200
    Allocation.objects.create(user=owner, tokens=10, period="week")
    ProxyRequest.objects.create(session=running, user=owner, route="api", endpoint="chat/completions", status=200,
                                prompt_tokens=4, completion_tokens=6, duration_ms=5, at=timezone.now())  # fmt: skip
    chat = Portal(browser(owner))
    refused_before = metrics.PROXY_REFUSED.labels("allocation")._value.get()
    refusals = [
        api.post("/api/v1/chat/completions", json=ASK),
        api.post("/api/v1/messages", json=ASK),
        chat.post(f"/sessions/{running.pk}/v1/chat/completions", json=ASK),
    ]
    for refused in refusals:
        assert refused.status_code == 429, refused.text
        assert 0 < int(refused.headers["retry-after"]) <= 7 * 86400 + 1
        assert "allocation of user ada has spent its 10 tokens this week (" in refused.text  # the first request's too
        assert " used); it resets on " in refused.text
    assert refusals[0].json()["error"]["code"] == "insufficient_quota"
    assert metrics.PROXY_REFUSED.labels("allocation")._value.get() == refused_before + 3  # /metrics counts them
    assert refusals[1].json()["type"] == "error"  # Anthropic's shape on its route
    before = len(server.got)
    running.shares.create(user=other_user, created_by=owner)
    theirs = Portal(bearer(ApiToken.issue(other_user, "theirs")[1]))
    assert theirs.post("/api/v1/chat/completions", json={**ASK, "model": "ada/tiny"}).status_code == 200
    assert len(server.got) == before + 1  # nothing of the refused reached the server
