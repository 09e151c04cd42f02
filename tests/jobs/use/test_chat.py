"""Chat storage and rendering without a cluster: sanitised Markdown, owner-only routes, export, API tokens page."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from catalog.models import ClusterAccount
from jobs.models import ApiToken, ChatMessage, Conversation, LLMSession, State, transition
from jobs.sessions.actions import launch
from jobs.use import targets
from jobs.use.chat import render_markdown
from portal import outbound
from tests.conftest import LAUNCH
from tests.portal.test_outbound import Server, proxy_named_in_env, serving

HOSTILE = [
    "<script>alert(1)</script>",
    '<img src=x onerror="alert(1)">',
    "[click](javascript:alert(1))",
    '<a href="#" onclick="alert(1)">x</a>',
    "<iframe src=//evil></iframe>",
    '<svg onload="alert(1)"></svg>',
]


class Elements(HTMLParser):
    """Every element and attribute a browser would build from the HTML (escaped text is not an element)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += [(name, value or "") for name, value in attrs]


@pytest.mark.parametrize("text", HOSTILE)
def test_model_output_with_script_renders_inert(text: str) -> None:
    html = render_markdown(f"Here you go:\n\n{text}\n\n```html\n{text}\n```")
    parsed = Elements()
    parsed.feed(html)
    assert not {"script", "img", "iframe", "svg"} & set(parsed.tags), html
    assert not [name for name, _ in parsed.attributes if name.startswith("on")], html
    assert not [v for name, v in parsed.attributes if name == "href" and "javascript" in v.lower()], html
    assert "<pre><code" in html  # the code block survives, as text


def test_markdown_formatting_survives_sanitising() -> None:
    html = render_markdown("**bold** and `code`\n\n- one\n- two\n\n| a | b |\n|---|---|\n| 1 | 2 |")
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html and "<li>one</li>" in html
    assert "<table>" in html


@pytest.fixture
def session(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> LLMSession:
    with django_capture_on_commit_callbacks(execute=False):
        s = launch(owner, LAUNCH)
    transition(s.pk, State.RUNNING, cause="test", host="127.0.0.1", port=9)
    return LLMSession.objects.get(pk=s.pk)


def test_a_saved_exchange_shows_as_safe_html_and_exports(client: Client, owner: Any, session: LLMSession) -> None:
    client.force_login(owner)
    conversation = Conversation.objects.create(session=session, owner=session.owner)
    reply = client.post(
        f"/sessions/{session.pk}/chat/{conversation.pk}/save",
        json.dumps({"user": "hi", "assistant": "**hello** <script>alert(1)</script>",
                    "stats": {"ttft_ms": 12, "tokens_per_s": 250.5, "completion_tokens": 7}}),
        content_type="application/json",
    )  # fmt: skip
    assert reply.status_code == 200 and "<strong>hello</strong>" in reply.json()["html"]
    assert "<script" not in reply.json()["html"]
    page = client.get(f"/sessions/{session.pk}/chat/?c={conversation.pk}").content.decode()
    assert "first token 12 ms" in page and "250.5 tokens/s" in page and "<script>alert(1)" not in page
    exported = client.get(f"/sessions/{session.pk}/chat/{conversation.pk}/export?format=json").json()
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"] and exported["title"] == "hi"
    markdown = client.get(f"/sessions/{session.pk}/chat/{conversation.pk}/export?format=md").content.decode()
    assert markdown.startswith("# hi") and "## Model" in markdown


def test_regenerate_forgets_the_last_reply(client: Client, owner: Any, session: LLMSession) -> None:
    client.force_login(owner)
    conversation = Conversation.objects.create(session=session, owner=session.owner)
    ChatMessage.objects.create(conversation=conversation, role="user", content="q")
    answer = ChatMessage.objects.create(conversation=conversation, role="assistant", content="a")
    client.post(f"/sessions/{session.pk}/chat/{conversation.pk}/truncate", {"from": answer.pk})
    assert [m.role for m in conversation.messages.all()] == ["user"]


@pytest.mark.parametrize("value", ["abc", "", "1.5", "1e9999"])
def test_a_malformed_truncate_is_a_clear_400_and_forgets_nothing(
    client: Client, owner: Any, session: LLMSession, value: str
) -> None:
    client.force_login(owner)
    conversation = Conversation.objects.create(session=session, owner=session.owner)
    ChatMessage.objects.create(conversation=conversation, role="user", content="q")
    reply = client.post(f"/sessions/{session.pk}/chat/{conversation.pk}/truncate", {"from": value})
    assert reply.status_code == 400 and "first message" in reply.json()["error"]
    assert conversation.messages.count() == 1


def test_other_users_cannot_read_or_write_a_chat(client: Client, other_user: Any, session: LLMSession) -> None:
    conversation = Conversation.objects.create(session=session, owner=session.owner)
    client.force_login(other_user)
    base = f"/sessions/{session.pk}/chat"
    assert client.get(f"{base}/").status_code == 404
    assert client.get(f"{base}/{conversation.pk}/export").status_code == 404
    for action in ("save", "truncate", "send", "manage"):
        assert client.post(f"{base}/{conversation.pk}/{action}").status_code == 404, action
    assert client.post(f"{base}/new").status_code == 404
    assert Conversation.objects.filter(pk=conversation.pk).exists()


def test_api_tokens_are_shown_once_stored_hashed_and_revocable(client: Client, owner: Any, other_user: Any) -> None:
    client.force_login(owner)
    page = client.post("/tokens/", {"name": "laptop"}).content.decode()
    token_row = ApiToken.objects.get(user=owner)
    token = page.split('id="new-token" readonly value="')[1].split('"')[0]
    assert token.startswith("hpcllm_") and token not in token_row.digest
    assert targets.holder(token) == targets.Holder(owner.pk, sees_all=False)
    assert token not in client.get("/tokens/").content.decode()  # only once
    other = Client()
    other.force_login(other_user)
    other.post("/tokens/", {"revoke": token_row.pk})
    assert targets.holder(token) is not None  # someone else cannot revoke it
    client.post("/tokens/", {"revoke": token_row.pk})
    assert targets.holder(token) is None


def test_the_plain_form_send_counts_as_use_of_the_session(client: Client, owner: Any, session: LLMSession) -> None:
    """Idle auto-cancel counts every request: the no-JavaScript send too, also when the server does not answer."""
    transition(session.pk, State.RUNNING, cause="test", host="127.0.0.1", port=1)  # nothing listens there
    client.force_login(owner)
    conversation = Conversation.objects.create(session=session, owner=session.owner)
    client.post(f"/sessions/{session.pk}/chat/{conversation.pk}/send", {"message": "hello"})
    session.refresh_from_db()
    assert session.last_activity_at is not None
    assert "did not answer" in conversation.messages.last().content  # type: ignore[union-attr]


def test_a_user_holds_no_more_api_tokens_than_the_site_allows(client: Client, owner: Any, settings: Any) -> None:
    settings.PORTAL_MAX_API_TOKENS_PER_USER = 2
    client.force_login(owner)
    for name in ("laptop", "cluster"):
        assert 'id="new-token"' in client.post("/tokens/", {"name": name}).content.decode()
    page = client.post("/tokens/", {"name": "third"}).content.decode()
    assert 'id="new-token"' not in page and "ada already holds 2 API tokens in force" in page
    with pytest.raises(CommandError, match=r"already holds 2 API tokens in force.*revoke one"):
        call_command("apitoken", "create", "ada", "--name", "script")
    assert ApiToken.objects.filter(user=owner).count() == 2
    ApiToken.objects.filter(user=owner, name="laptop").update(revoked_at=timezone.now())  # revoked ones do not count
    out = StringIO()
    call_command("apitoken", "create", "ada", "--name", "script", stdout=out)
    assert out.getvalue().startswith("hpcllm_")


def test_the_plain_form_send_goes_straight_to_the_server_and_refuses_an_oversized_reply(
    client: Client, owner: Any, session: LLMSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.force_login(owner)
    conversation = Conversation.objects.create(session=session, owner=session.owner)
    send = f"/sessions/{session.pk}/chat/{conversation.pk}/send"
    # HTTP_PROXY and the like name a listener on this machine, as a site's outbound proxy: it must hear nothing.
    with serving() as server, proxy_named_in_env(monkeypatch) as proxy:
        LLMSession.objects.filter(pk=session.pk).update(port=server.port)
        client.post(send, {"message": "hello"})
        assert conversation.messages.last().content == "hello back"  # type: ignore[union-attr]
        Server.pad = outbound.MAX_REPLY_BYTES + 1
        client.post(send, {"message": "again"})
        last = conversation.messages.last().content  # type: ignore[union-attr]
        assert last == f"(The model server did not answer: the reply is larger than {outbound.MAX_REPLY_BYTES:,} bytes)"
    assert proxy.heard == 0
