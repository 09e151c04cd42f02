"""The browser chat with a model service by its name (issue 28): /services/<name>/chat/ (the session chat's pages) and
its proxy route /services/<name>/v1/ at the door. Each conversation's turns reach one replica, a conversation of
someone else's is not honoured, an outsider gets 404, a service with no replica ready 503 with Retry-After, and each
user sees only their own conversations with it.

The replicas' servers are the proxy tests' stand-in (tests/jobs/use/upstream.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.db import IntegrityError, transaction
from django.test import Client

from catalog.models import ClusterAccount
from jobs.models import ChatMessage, Conversation, LLMSession, ModelService
from jobs.services import actions, affinity, keep
from jobs.use import chat as rules
from jobs.use import targets
from tests.asgi import Portal, browser
from tests.conftest import LAUNCH
from tests.jobs.services.test_services import ready
from tests.jobs.use.upstream import ANSWER, Server, recorded

pytestmark = pytest.mark.django_db(transaction=True)

SERVICE = "llama-lab"
PROXY = f"/services/{SERVICE}/v1/chat/completions"


@pytest.fixture
def service(
    account: ClusterAccount, owner: Any, lab: Group, shared_user: Any, django_capture_on_commit_callbacks: Any
) -> ModelService:
    """The owner's service for the lab, which alan (shared_user) is in; no replica yet."""
    with django_capture_on_commit_callbacks(execute=False):
        return actions.create(owner, SERVICE, LAUNCH, min_replicas=2, max_replicas=2, audience="groups",
                              groups=[lab])  # fmt: skip


def turn(conversation: Conversation | int | str | None, *questions: str) -> dict[str, Any]:
    """The page's request: the whole conversation so far, and the header naming it."""
    messages = [{"role": "user", "content": q} for q in questions]
    headers = {"x-conversation": str(conversation.pk if isinstance(conversation, Conversation) else conversation)}
    return {"json": {"model": SERVICE, "messages": messages, "stream": True}, "headers": headers}


def keys_picked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The affinity key of each request the proxy routes to a replica."""
    keys: list[str] = []
    pick = targets.pick

    def spied(replicas: targets.Replicas, key: str = "", exclude: Any = ()) -> Any:
        keys.append(key)
        return pick(replicas, key, exclude)

    monkeypatch.setattr(targets, "pick", spied)
    return keys


def test_a_member_chats_with_the_service_and_each_conversation_stays_on_one_replica(
    service: ModelService, shared_user: Any, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready(service)
    keys = keys_picked(monkeypatch)
    page = Client()
    page.force_login(shared_user)
    assert page.get(f"/services/{SERVICE}/").content.decode().count(f"/services/{SERVICE}/chat/") == 1  # the link
    made = page.post(f"/services/{SERVICE}/chat/new", {"system_prompt": "Be brief."}, HTTP_ACCEPT="application/json")
    conversations = [Conversation.objects.get(pk=made.json()["id"])]
    conversations += [Conversation.objects.create(service=service, owner=shared_user) for _ in range(7)]
    assert conversations[0].service_id == service.pk and conversations[0].session_id is None
    chat = Portal(browser(shared_user))
    for conversation in conversations:
        server.got.clear()
        for n in range(3):  # every turn differs, and the first message stays: only the conversation keys them
            reply = chat.post(PROXY, **turn(conversation, f"question {conversation.pk}", *["more"] * n))
            assert reply.status_code == 200 and reply.json() == ANSWER
        assert len({r.url.port for r in server.got}) == 1
        served = LLMSession.objects.get(service=service, port=server.got[0].url.port).served_model_name
        assert {json.loads(r.content)["model"] for r in server.got} == {served}  # the replica's own name
    assert set(keys) == {affinity.conversation_key(str(c.pk)) for c in conversations}
    # Usage: the chatting user's, on the replica that answered.
    replica = LLMSession.objects.get(service=service, port=server.got[-1].url.port)
    row = recorded(user=shared_user, session=replica)
    assert row.route == "chat"


def test_the_page_saves_and_exports_a_service_conversation_and_lists_only_its_owners(
    service: ModelService, owner: Any, shared_user: Any, other_user: Any
) -> None:
    mine = Conversation.objects.create(service=service, owner=shared_user, title="alan's")
    Conversation.objects.create(service=service, owner=owner, title="ada's")
    page = Client()
    page.force_login(shared_user)
    saved = page.post(f"/services/{SERVICE}/chat/{mine.pk}/save",
                      json.dumps({"user": "hi", "assistant": "**hello**", "stats": {"ttft_ms": 9}}),
                      content_type="application/json")  # fmt: skip
    assert saved.status_code == 200 and "<strong>hello</strong>" in saved.json()["html"]
    shown = page.get(f"/services/{SERVICE}/chat/").content.decode()
    assert "alan&#x27;s" in shown and "ada&#x27;s" not in shown
    assert f'data-api="{PROXY}"' in shown and f'data-conversation="{mine.pk}"' in shown
    assert f'data-model="{SERVICE}"' in shown
    exported = page.get(f"/services/{SERVICE}/chat/{mine.pk}/export?format=json").json()
    assert exported["model"] == SERVICE and [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    # The owner does not reach alan's conversation, nor anyone outside the lab the service's chat.
    page.force_login(owner)
    assert page.get(f"/services/{SERVICE}/chat/{mine.pk}/export").status_code == 404
    assert "alan&#x27;s" not in page.get(f"/services/{SERVICE}/chat/").content.decode()
    page.force_login(other_user)
    assert page.get(f"/services/{SERVICE}/chat/").status_code == 404
    assert page.post(f"/services/{SERVICE}/chat/new").status_code == 404
    assert ChatMessage.objects.filter(conversation=mine).count() == 2


def test_another_users_conversation_is_not_honoured(
    service: ModelService, owner: Any, shared_user: Any, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready(service)
    keys = keys_picked(monkeypatch)
    owners = Conversation.objects.create(service=service, owner=owner)
    elsewhere = Conversation.objects.create(session=LLMSession.objects.filter(service=service).first(),
                                            owner=shared_user)  # fmt: skip
    chat = Portal(browser(shared_user))
    for named in (owners, elsewhere, "not-a-number", 10**30):
        assert chat.post(PROXY, **turn(named, "hi")).status_code == 200
    # Routed by the prompt's head instead, as the API routes it.
    by_prompt = affinity.key_of("chat/completions", turn(None, "hi")["json"])
    assert keys == [by_prompt] * 4 and affinity.conversation_key(str(owners.pk)) not in keys


def test_outsiders_get_404_and_csrf_is_checked_at_the_door(
    service: ModelService, shared_user: Any, other_user: Any, support_user: Any, server: Server
) -> None:
    ready(service)
    conversation = Conversation.objects.create(service=service, owner=shared_user)
    for outsider in (other_user, support_user):  # support staff see the service's page, but may not use it
        assert Portal(browser(outsider)).post(PROXY, **turn(conversation, "hi")).status_code == 404
    assert Portal({}).post(PROXY, **turn(conversation, "hi")).status_code == 401
    signed_in = browser(shared_user)
    for headers in ({"cookie": signed_in["cookie"]}, {**signed_in, "x-csrftoken": "x" * 32}):
        refused = Portal(headers).post(PROXY, **turn(conversation, "hi"))
        assert (refused.status_code, refused.json()["error"]["code"]) == (403, "csrf_failed")
    assert server.got == []
    assert Portal(signed_in).post("/services/no-such/v1/chat/completions", **turn(None, "hi")).status_code == 404


def test_a_service_with_no_ready_replica_answers_503_with_retry_after(
    service: ModelService, shared_user: Any, settings: Any
) -> None:
    settings.PORTAL_SERVICE_HOLD_S, settings.PORTAL_SERVICE_READY_S = 0, 90
    keep.reconcile(service.pk)  # replicas on their way, none ready
    conversation = Conversation.objects.create(service=service, owner=shared_user)
    reply = Portal(browser(shared_user)).post(PROXY, **turn(conversation, "hi"))
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "service_starting"
    assert 1 <= int(reply.headers["retry-after"]) <= 90
    # Without JavaScript, the page says when to try again, and keeps nothing.
    page = Client()
    page.force_login(shared_user)
    sent = page.post(f"/services/{SERVICE}/chat/{conversation.pk}/send", {"message": "hi"}, follow=True)
    assert "is starting: try again in about" in sent.content.decode()
    assert not conversation.messages.exists()


def test_the_plain_form_send_asks_the_conversations_replica(
    service: ModelService, shared_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = ready(service)
    conversation = Conversation.objects.create(service=service, owner=shared_user)
    asked: list[int | None] = []

    def answered(method: str, url: Any, **kwargs: Any) -> Any:
        asked.append(url.port)
        return type("Reply", (), {"status_code": 200, "headers": {"content-type": "application/json"},
                                  "content": json.dumps(ANSWER).encode(), "json": lambda self: ANSWER})()  # fmt: skip

    monkeypatch.setattr("jobs.use.chat.outbound.request", answered)
    page = Client()
    page.force_login(shared_user)
    for question in ("one", "two"):
        page.post(f"/services/{SERVICE}/chat/{conversation.pk}/send", {"message": question})
    assert [m.content for m in conversation.messages.all()] == ["one", "hello", "two", "hello"]
    assert len(set(asked)) == 1 and asked[0] in (first.port, second.port)
    found, key = rules.to_service(shared_user.pk, SERVICE, str(conversation.pk))
    assert found is not None and key == affinity.conversation_key(str(conversation.pk))
    home, _ = targets.pick(found, key)
    assert home is not None and LLMSession.objects.get(pk=home.pk).port == asked[0]


def test_a_conversation_has_a_session_or_a_service_never_both(service: ModelService, owner: Any) -> None:
    replica, _ = ready(service)
    for both_or_neither in ({"session": replica, "service": service}, {}):
        with pytest.raises(IntegrityError), transaction.atomic():
            Conversation.objects.create(owner=owner, **both_or_neither)
