"""Who reaches what: every route of the jobs app that names a session, a conversation or a batch run, for every role
(owner, someone it is shared with, the same after the grant expired or was revoked, another user, staff without the
support permission). The routes come from the URL configuration itself, so a new route is in the matrix the moment
it exists, and one that forgets the access rule fails here."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone

from catalog.models import ClusterAccount
from jobs.batch.actions import launch
from jobs.models import BatchRun, Conversation, LLMSession, SessionShare, State, transition
from tests.conftest import LAUNCH
from tests.jobs.batch.test_progress import batch_form

pytestmark = pytest.mark.django_db

# What someone the session is shared with (chat and API) may reach: the chat, on their own conversations.
# Everything else about the session is its owner's. The browser's proxy route (session-proxy) looks the session up
# on its own database connections, which a test's transaction hides: tests/jobs/sessions/test_sharing.py checks its
# lookup for every role and tests/browser/test_sharing.py the route itself.
SHARED_MAY = {"chat", "chat-new", "chat-save", "chat-truncate", "chat-send", "chat-manage", "chat-export"}
NOT_HERE = {"session-proxy"}
OUR_OWN = {"chat-new", "chat-save", "chat-truncate", "chat-send", "chat-manage", "chat-export"}


def routes() -> list[tuple[str, str]]:
    """(name, pattern) of every jobs route with an object in its path."""
    found: list[tuple[str, str]] = []

    def walk(patterns: Any, prefix: str) -> None:
        for p in patterns:
            if isinstance(p, URLResolver):
                walk(p.url_patterns, prefix + str(p.pattern))
            elif isinstance(p, URLPattern) and "<" in str(p.pattern) and p.name:
                found.append((p.name, prefix + str(p.pattern)))

    walk(get_resolver().url_patterns, "/")
    mine = [(n, p) for n, p in found if p.startswith(("/sessions/<", "/batch/<")) and n not in NOT_HERE]
    assert len(mine) >= 19, mine
    return mine


@pytest.fixture
def world(
    account: ClusterAccount, owner: Any, shared_user: Any, other_user: Any, django_capture_on_commit_callbacks: Any
) -> dict[str, Any]:
    form = batch_form(b"one\ntwo\n", max_tokens=5)
    assert form.is_valid(), form.errors
    assert form.checked is not None
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, {**LAUNCH, "purpose": "batch"}, batch=form.checked)
    transition(session.pk, State.RUNNING, cause="test", host="10.0.0.7", port=8080)
    grant = SessionShare.objects.create(session=session, user=shared_user, created_by=owner)
    return {
        "session": LLMSession.objects.get(pk=session.pk),
        "run": BatchRun.objects.get(session=session),
        "grant": grant,
        "owners_chat": Conversation.objects.create(session=session, owner=owner),
        "members_chat": Conversation.objects.create(session=session, owner=shared_user),
    }


def url_of(name: str, pattern: str, world: dict[str, Any], conversation: Conversation) -> str:
    values = {
        "pk": world["run"].pk if pattern.startswith("/batch/") else world["session"].pk,
        "conversation_id": conversation.pk,
        "share_pk": world["grant"].pk,
        "path": "models",
        "fmt": "jsonl",
    }
    return re.sub(r"<(?:\w+:)?(\w+)>", lambda m: str(values[m.group(1)]), pattern)


def reached(client: Client, url: str) -> bool:
    """Whether the route answered with anything but 404 (for GET, else for POST when GET is not its method)."""
    reply = client.get(url)
    if reply.status_code == 405:
        reply = client.post(url, {"message": "", "from": "0"})
    return reply.status_code != 404


def test_the_matrix_covers_the_routes_it_should() -> None:
    names = {name for name, _ in routes()}
    assert names >= SHARED_MAY
    assert {"session", "card", "cancel", "delete", "relaunch", "log", "share", "unshare", "batch", "batch-output",
            "batch-stop", "session-batch-new"} <= names  # fmt: skip


@pytest.mark.parametrize("role", ["shared_user", "expired", "revoked", "other_user", "staff_user"])
def test_each_role_reaches_exactly_what_it_may(
    role: str, world: dict[str, Any], request: pytest.FixtureRequest, client: Client, shared_user: Any
) -> None:
    user = shared_user if role in ("shared_user", "expired", "revoked") else request.getfixturevalue(role)
    if role == "expired":
        SessionShare.objects.update(expires_at=timezone.now() - timedelta(minutes=1))
    if role == "revoked":
        SessionShare.objects.update(revoked_at=timezone.now())
    client.force_login(user)
    wrong = []
    for name, pattern in routes():
        for conversation in (world["members_chat"], world["owners_chat"]):
            url = url_of(name, pattern, world, conversation)
            may = role == "shared_user" and name in SHARED_MAY
            if name in OUR_OWN and conversation == world["owners_chat"]:
                may = False  # never the owner's conversations
            if reached(client, url) != may:
                wrong.append(f"{name} {url}: {'reached' if not may else 'refused'}")
            if "<int:conversation_id>" not in pattern:
                break
    assert not wrong, "\n".join(wrong)
    assert LLMSession.objects.get(pk=world["session"].pk).state == State.RUNNING
    assert SessionShare.objects.count() == 1 and Conversation.objects.filter(owner=world["session"].owner).count() == 1


def test_the_owner_reaches_every_route(world: dict[str, Any], client: Client, owner: Any) -> None:
    client.force_login(owner)
    refused = [
        name
        for name, pattern in routes()
        # they act, or reach the cluster; what they refuse is tested elsewhere
        if name not in ("delete", "cancel", "unshare", "batch-stop", "batch-output")
        and not reached(client, url_of(name, pattern, world, world["owners_chat"]))
    ]
    assert not refused
