"""Chat storage and rendering without a cluster: sanitised Markdown, owner-only routes, export, API tokens page."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from http.server import ThreadingHTTPServer
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
from jobs.use.chat import MAX_TOOL_CALLS, TOOL_NAME_CHARS, messages_for_api, render_markdown, tool_calls_of
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
        self.tool_calls: list[str] = []  # the summary of each tool call's block, as a browser shows it
        self._in_summary = self._in_tool_call = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += [(name, value or "") for name, value in attrs]
        if tag == "details":
            self._in_tool_call = ("class", "tool-call") in attrs
        if tag == "summary" and self._in_tool_call:
            self._in_summary = True
            self.tool_calls.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_summary = self._in_summary and tag != "summary"

    def handle_data(self, data: str) -> None:
        if self._in_summary:
            self.tool_calls[-1] += data


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


# A model's tool call is as hostile as its text: a name and arguments that would be markup if they reached a page raw.
HOSTILE_NAME = '<script>alert("name")</script>'
HOSTILE_ARGUMENTS = '{"query": "<img src=x onerror=alert(1)>", "n": 3}'
HOSTILE_CALLS = [
    {"id": "call_1", "type": "function", "function": {"name": HOSTILE_NAME, "arguments": HOSTILE_ARGUMENTS}},
    {"id": "call_2", "type": "function", "function": {"name": "search", "arguments": "<svg onload=alert(2)> not JSON"}},
]


def chat_page(client: Client, session: LLMSession, conversation: Conversation) -> tuple[str, Elements]:
    page = client.get(f"/sessions/{session.pk}/chat/?c={conversation.pk}").content.decode()
    parsed = Elements()
    parsed.feed(page)
    return page, parsed


def assert_inert(parsed: Elements) -> None:
    assert not {"img", "svg"} & set(parsed.tags)
    assert not [name for name, _ in parsed.attributes if name.startswith("on")]
    # The page's own scripts have a src; a model's would not.
    scripts = [value for name, value in parsed.attributes if name == "src" and value.endswith(".js")]
    assert parsed.tags.count("script") == len(scripts)


def test_saved_tool_calls_show_as_collapsed_escaped_blocks_and_export(
    client: Client, owner: Any, session: LLMSession
) -> None:
    client.force_login(owner)
    conversation = Conversation.objects.create(session=session, owner=session.owner)
    reply = client.post(
        f"/sessions/{session.pk}/chat/{conversation.pk}/save",
        json.dumps({"user": "look it up", "assistant": "", "tool_calls": HOSTILE_CALLS, "stats": {}}),
        content_type="application/json",
    )
    assert reply.status_code == 200 and reply.json()["tool_calls"] == HOSTILE_CALLS
    assert conversation.messages.last().tool_calls == HOSTILE_CALLS  # type: ignore[union-attr]
    page, parsed = chat_page(client, session, conversation)
    assert parsed.tool_calls == [f"Tool call: {HOSTILE_NAME}", "Tool call: search"]
    assert "<details open" not in page  # collapsed
    assert "&quot;query&quot;: &quot;&lt;img src=x onerror=alert(1)&gt;&quot;,\n  &quot;n&quot;: 3" in page  # pretty
    assert "&lt;svg onload=alert(2)&gt; not JSON" in page  # not JSON: as the model wrote it
    assert_inert(parsed)
    # The page's script sends them back with the conversation: the attribute holds them as stored.
    stored = [json.loads(value) for name, value in parsed.attributes if name == "data-tool-calls"]
    assert stored == [HOSTILE_CALLS]
    exported = client.get(f"/sessions/{session.pk}/chat/{conversation.pk}/export?format=json").json()
    assert exported["messages"][1]["tool_calls"] == HOSTILE_CALLS and exported["messages"][0]["tool_calls"] == []
    markdown = client.get(f"/sessions/{session.pk}/chat/{conversation.pk}/export?format=md").content.decode()
    assert f"Tool call: {HOSTILE_NAME}" in markdown


def test_a_reply_without_tool_calls_shows_no_block(client: Client, owner: Any, session: LLMSession) -> None:
    client.force_login(owner)
    conversation = Conversation.objects.create(session=session, owner=session.owner)
    save = f"/sessions/{session.pk}/chat/{conversation.pk}/save"
    client.post(save, json.dumps({"user": "hi", "assistant": "hello"}), content_type="application/json")
    page, parsed = chat_page(client, session, conversation)
    assert parsed.tool_calls == [] and "tool-call" not in page and "data-tool-calls" not in page


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (None, []),
        ("call it", []),
        ({"function": {"name": "f"}}, []),
        ([1, "x", None, {"id": "a"}, {"function": "f"}], []),
        # Arguments as an object (some servers) become its JSON text; unknown keys and non-strings are dropped.
        ([{"id": 7, "type": "code", "function": {"name": "f", "arguments": {"a": 1}, "extra": 1}, "x": 2}],
         [{"id": "", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]),
        ([{"function": {"name": ["f"], "arguments": None}}],
         [{"id": "", "type": "function", "function": {"name": "", "arguments": ""}}]),
    ],
)  # fmt: skip
def test_tool_calls_are_kept_in_openai_shape_whatever_was_sent(sent: Any, kept: list[dict[str, Any]]) -> None:
    assert tool_calls_of(sent) == kept


def test_tool_calls_are_bounded() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "n" * 10_000, "arguments": "{}"}}
    kept = tool_calls_of([call] * (MAX_TOOL_CALLS + 10))
    assert len(kept) == MAX_TOOL_CALLS and {len(c["function"]["name"]) for c in kept} == {TOOL_NAME_CHARS}


def test_a_reply_with_tool_calls_goes_back_to_the_model_in_openai_shape(session: LLMSession) -> None:
    conversation = Conversation.objects.create(session=session, owner=session.owner)
    ChatMessage.objects.create(conversation=conversation, role="user", content="look it up")
    ChatMessage.objects.create(conversation=conversation, role="assistant", content="", tool_calls=HOSTILE_CALLS)
    ChatMessage.objects.create(conversation=conversation, role="assistant", content="Let me.", tool_calls=HOSTILE_CALLS)
    ChatMessage.objects.create(conversation=conversation, role="user", content="and?", tool_calls=HOSTILE_CALLS)
    assert messages_for_api("Be brief.", list(conversation.messages.all())) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "content": None, "tool_calls": HOSTILE_CALLS},
        {"role": "assistant", "content": "Let me.", "tool_calls": HOSTILE_CALLS},
        {"role": "user", "content": "and?"},  # only a reply calls tools; no tool results are made up
    ]


class ToolCallingServer(Server):
    """A model server whose every reply only calls tools (content null, as OpenAI sends it); it keeps what it is
    asked."""

    asked: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        ToolCallingServer.asked.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
        message = {"role": "assistant", "content": None, "tool_calls": HOSTILE_CALLS}
        body = {"choices": [{"message": message, "finish_reason": "tool_calls"}], "usage": {"completion_tokens": 9}}
        self.answer(json.dumps(body).encode())


@contextlib.contextmanager
def tool_calling_server() -> Iterator[int]:
    ToolCallingServer.asked = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ToolCallingServer)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_plain_form_send_shows_the_replys_tool_calls_and_sends_them_back(
    client: Client, owner: Any, session: LLMSession
) -> None:
    client.force_login(owner)
    conversation = Conversation.objects.create(session=session, owner=session.owner)
    send = f"/sessions/{session.pk}/chat/{conversation.pk}/send"
    with tool_calling_server() as port:
        LLMSession.objects.filter(pk=session.pk).update(port=port)
        client.post(send, {"message": "look it up"})
        reply = conversation.messages.last()
        assert reply is not None and reply.content == "" and reply.tool_calls == HOSTILE_CALLS
        page, parsed = chat_page(client, session, conversation)
        assert parsed.tool_calls == [f"Tool call: {HOSTILE_NAME}", "Tool call: search"]
        assert "did not answer" not in page and "9 tokens" in page
        assert_inert(parsed)
        client.post(send, {"message": "never mind"})
    assert ToolCallingServer.asked[1]["messages"] == [
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "content": None, "tool_calls": HOSTILE_CALLS},
        {"role": "user", "content": "never mind"},
    ]
