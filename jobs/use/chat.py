"""The chat's rules, apart from its pages: Markdown to safe HTML, the history sent to the model, a conversation's
title, saving a reply with its timings, asking without streaming, and the export formats."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import markdown
import nh3

from jobs.cluster import backend
from jobs.models import ChatMessage, Conversation, LLMSession, ProxyRequest
from jobs.usage.records import Meter, save
from jobs.use import targets
from portal import outbound

# What Markdown produces for prose, lists, tables and code; no attributes but links (made safe by nh3) and code
# language classes. Script, style, event handlers and javascript: URLs never pass.
ALLOWED_TAGS = {
    "p", "br", "hr", "em", "strong", "del", "code", "pre", "blockquote", "ul", "ol", "li", "a",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "code": {"class"}}
NEW_TITLE = "New chat"  # until the first question names the conversation
TITLE_CHARS = 80
ASK_TIMEOUT_S = 600  # a long prompt on a big model can take minutes


def render_markdown(text: str) -> str:
    html = markdown.markdown(text, extensions=["fenced_code", "tables"], output_format="html")
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )


def messages_for_api(system_prompt: str, history: list[ChatMessage]) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return out + [{"role": m.role, "content": m.content} for m in history]


def _name_after(conversation: Conversation, question: str) -> None:
    """A new conversation takes its first question's first line as its title."""
    if conversation.title == NEW_TITLE and question.strip():
        conversation.title = question.strip().splitlines()[0][:TITLE_CHARS] or NEW_TITLE


def _int_or_none(value: Any) -> int | None:
    try:
        return max(0, int(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def _rate_or_none(value: Any) -> float | None:
    try:
        return max(0.0, min(1e6, float(value))) if value is not None else None
    except (TypeError, ValueError):
        return None


def save_exchange(
    conversation: Conversation,
    question: str,
    reply: str,
    stats: Mapping[str, Any],
    system_prompt: str | None = None,
) -> ChatMessage:
    """Keep a question (if any) and the model's reply with the timings the browser measured. Timings that are not
    numbers are dropped rather than refused: the reply matters more than its statistics."""
    if question:
        ChatMessage.objects.create(conversation=conversation, role=ChatMessage.Role.USER, content=question)
    message = ChatMessage.objects.create(
        conversation=conversation,
        role=ChatMessage.Role.ASSISTANT,
        content=reply,
        ttft_ms=_int_or_none(stats.get("ttft_ms")),
        tokens_per_s=_rate_or_none(stats.get("tokens_per_s")),
        prompt_tokens=_int_or_none(stats.get("prompt_tokens")),
        completion_tokens=_int_or_none(stats.get("completion_tokens")),
    )
    _name_after(conversation, question)
    if system_prompt is not None:
        conversation.system_prompt = system_prompt
    conversation.save()
    return message


def ask(
    session: LLMSession, conversation: Conversation, question: str, max_tokens: int, temperature: float, user_pk: int
) -> None:
    """The plain-form send: the question, the model's whole reply (not streamed), both kept. A server that does not
    answer leaves its error as the reply, so nothing the researcher typed is lost. Both ends of the wait count as use
    of the session (idle auto-cancel)."""
    targets.touch(str(session.pk))
    ChatMessage.objects.create(conversation=conversation, role=ChatMessage.Role.USER, content=question)
    payload = {
        "model": session.served_model_name,
        "messages": messages_for_api(conversation.system_prompt, list(conversation.messages.all())),
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    meter = Meter(str(session.pk), user_pk, ProxyRequest.Route.CHAT, "chat/completions")
    base = backend.base_url(session)
    try:
        if base is None:
            raise ValueError(f"the session is {session.state}, not serving")
        answer = outbound.request(
            "POST",
            base.copy_with(path="/v1/chat/completions"),
            json=payload,
            headers={"Authorization": f"Bearer {session.api_key}"},
            timeout=ASK_TIMEOUT_S,
        )
        meter.begin(answer.status_code, answer.headers.get("content-type", ""))
        meter.feed(answer.content)
        body = answer.json()
        content, usage = body["choices"][0]["message"]["content"], body.get("usage") or {}
    except (httpx.HTTPError, KeyError, ValueError, IndexError, TypeError) as exc:
        content, usage = f"(The model server did not answer: {exc})", {}
        meter.status = meter.status if meter.status >= 400 else 502
    save(meter.finish())
    ChatMessage.objects.create(
        conversation=conversation,
        role=ChatMessage.Role.ASSISTANT,
        content=content,
        prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
        completion_tokens=_int_or_none(usage.get("completion_tokens")),
    )
    _name_after(conversation, question)
    conversation.save()
    targets.touch(str(session.pk))


def export_markdown(conversation: Conversation, served_model: str) -> str:
    lines = [f"# {conversation.title}", "", f"Model: {served_model}", ""]
    for m in conversation.messages.all():
        lines += [f"## {m.get_role_display()}", "", m.content, ""]
    return "\n".join(lines)


def export_json(conversation: Conversation, served_model: str) -> dict[str, Any]:
    return {
        "title": conversation.title,
        "model": served_model,
        "system_prompt": conversation.system_prompt,
        "messages": [
            {
                "role": m.role,
                "content": m.content,
                "at": m.created_at.isoformat(),
                "ttft_ms": m.ttft_ms,
                "tokens_per_s": m.tokens_per_s,
                "completion_tokens": m.completion_tokens,
            }
            for m in conversation.messages.all()
        ],
    }
