"""The chat's rules, apart from its pages: Markdown to safe HTML, the history sent to the model, a conversation's
title, saving a reply with its timings and the tool calls it asked for, asking without streaming, the replica of a
service a conversation goes to, and the export formats."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import markdown
import nh3

from jobs.cluster import backend
from jobs.models import ChatMessage, Conversation, LLMSession, ModelService, ProxyRequest
from jobs.operations import metrics
from jobs.services import actions as service_actions
from jobs.services import affinity, replicas, timing
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
# A reply's tool calls are kept whole (bounded, as its content is, by the request or reply that carried them), but a
# reply asking for more calls than a person reads, or with a name or id longer than any real one, is a model
# misbehaving: the rest is dropped rather than stored.
MAX_TOOL_CALLS = 64
TOOL_NAME_CHARS = TOOL_ID_CHARS = 256
CONVERSATION_ID = re.compile(r"[0-9]{1,18}")  # a conversation's pk as the page sends it (X-Conversation)


def render_markdown(text: str) -> str:
    html = markdown.markdown(text, extensions=["fenced_code", "tables"], output_format="html")
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )


def tool_calls_of(value: Any) -> list[dict[str, Any]]:
    """The tool calls of a reply (the browser's gathering of a stream, or the server's own message) in OpenAI's shape,
    every field a string: anything else is dropped, not refused, as the timings are, since the reply matters more.
    The arguments stay the model's own text, JSON or not, so that they go back to it unchanged."""
    if not isinstance(value, list):
        return []
    calls: list[dict[str, Any]] = []
    for item in value[:MAX_TOOL_CALLS]:
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            # Some servers hand over the arguments as an object rather than as its JSON text.
            arguments = "" if arguments is None else json.dumps(arguments)
        calls.append({
            "id": _text(item.get("id"), TOOL_ID_CHARS),
            "type": "function",
            "function": {"name": _text(function.get("name"), TOOL_NAME_CHARS), "arguments": arguments},
        })  # fmt: skip
    return calls


def _text(value: Any, chars: int) -> str:
    return value[:chars] if isinstance(value, str) else ""


@dataclass(frozen=True)
class ShownToolCall:
    name: str
    arguments: str  # pretty-printed when they are JSON, else as the model wrote them


@dataclass(frozen=True)
class Shown:
    """A stored message as the chat page shows it; the template escapes the tool calls' text like any other."""

    message: ChatMessage
    html: str  # the content, sanitised
    tool_calls: list[ShownToolCall]
    tool_calls_json: str  # for the page's script, which sends them back with the conversation; "" when none


def pretty_arguments(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        return arguments


def shown(message: ChatMessage) -> Shown:
    calls = tool_calls_of(message.tool_calls)
    return Shown(
        message,
        render_markdown(message.content),
        [ShownToolCall(c["function"]["name"], pretty_arguments(c["function"]["arguments"])) for c in calls],
        json.dumps(calls) if calls else "",
    )


def api_message(message: ChatMessage) -> dict[str, Any]:
    """A stored message as the model takes it back. A reply that called tools goes back in OpenAI's shape, content
    null when it had no text, as the server sent it; no tool results are made up (the portal runs no tool)."""
    calls = tool_calls_of(message.tool_calls) if message.role == ChatMessage.Role.ASSISTANT else []
    if not calls:
        return {"role": message.role, "content": message.content}
    return {"role": message.role, "content": message.content or None, "tool_calls": calls}


def messages_for_api(system_prompt: str, history: list[ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return out + [api_message(m) for m in history]


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
    tool_calls: Any = None,
) -> ChatMessage:
    """Keep a question (if any) and the model's reply with the timings the browser measured and the tool calls it
    gathered from the stream. Timings that are not numbers are dropped rather than refused: the reply matters more
    than its statistics."""
    if question:
        ChatMessage.objects.create(conversation=conversation, role=ChatMessage.Role.USER, content=question)
    message = ChatMessage.objects.create(
        conversation=conversation,
        role=ChatMessage.Role.ASSISTANT,
        content=reply,
        tool_calls=tool_calls_of(tool_calls),
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
    if session.runtime.kind == "llama.cpp" and session.adapters.exists():  # the base weights, as the proxy asks
        payload["lora"] = [{"id": adapter, "scale": scale} for adapter, scale in targets.BASE_WEIGHTS]
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
        message, usage = body["choices"][0]["message"], body.get("usage") or {}
        calls = tool_calls_of(message.get("tool_calls"))
        content = message.get("content")
        if content is None and calls:
            content = ""  # a reply that only calls tools has no text
        if not isinstance(content, str):
            raise TypeError("the reply has no text")
    except (httpx.HTTPError, KeyError, ValueError, IndexError, TypeError, AttributeError) as exc:
        content, usage, calls = f"(The model server did not answer: {exc})", {}, []
        meter.status = meter.status if meter.status >= 400 else 502
    save(meter.finish())
    ChatMessage.objects.create(
        conversation=conversation,
        role=ChatMessage.Role.ASSISTANT,
        content=content,
        tool_calls=calls,
        prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
        completion_tokens=_int_or_none(usage.get("completion_tokens")),
    )
    _name_after(conversation, question)
    conversation.save()
    targets.touch(str(session.pk))


def to_service(user_pk: int, name: str, conversation: str) -> tuple[targets.Replicas | None, str]:
    """The service `name` for the browser chat of this user (its ready replicas; None when they may not use it, as
    for a name that does not exist; targets.NotReady raised when none is ready) and the affinity key of the
    conversation the page named: every turn of one conversation goes to one replica, whose server holds the
    conversation in its prompt cache. A conversation that is not the user's own with this service is not honoured
    (""): the request goes by its prompt, as the API's.

    The service is looked up by name only: on this route a session alias of the user's spelt like the service (which
    targets.find would take first) must not stand in for it."""
    found = targets.by_service(targets.Holder(user_pk), name, "chat")
    if found is None or not CONVERSATION_ID.fullmatch(conversation):
        return found, ""
    mine = Conversation.objects.filter(pk=int(conversation), owner_id=user_pk, service_id=found.service_pk).exists()
    return found, affinity.conversation_key(conversation) if mine else ""


def ask_service(
    service: ModelService, conversation: Conversation, question: str, max_tokens: int, temperature: float,
    user_pk: int,
) -> str:  # fmt: skip
    """The plain-form send to a service: ask() of the replica the conversation goes to (as the streamed send's),
    counted in its load. Returns "" once asked, else why not: no replica is ready (the service is woken, and the
    answer says when to try again), or the user may no longer use it."""
    try:
        found, key = to_service(user_pk, service.name, str(conversation.pk))
    except targets.NotReady as waiting:
        service_actions.wake(waiting.service_pk)
        return f"{service.name} is starting: try again in about {timing.ready_in_s(waiting.service_pk)} s."
    target, decision = targets.pick(found, key) if found is not None else (None, "")
    if found is None or target is None:
        return f"{service.name} is not available."
    metrics.service_routed(found.service, decision)
    replicas.begin(target.pk)
    try:
        ask(LLMSession.objects.get(pk=target.pk), conversation, question, max_tokens, temperature, user_pk)
    finally:
        replicas.end(target.pk)
    return ""


def export_markdown(conversation: Conversation, served_model: str) -> str:
    lines = [f"# {conversation.title}", "", f"Model: {served_model}", ""]
    for m in conversation.messages.all():
        lines += [f"## {m.get_role_display()}", "", m.content, ""]
        for call in tool_calls_of(m.tool_calls):
            function = call["function"]
            lines += [f"Tool call: {function['name']}", "", "```", pretty_arguments(function["arguments"]), "```", ""]
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
                "tool_calls": tool_calls_of(m.tool_calls),
                "at": m.created_at.isoformat(),
                "ttft_ms": m.ttft_ms,
                "tokens_per_s": m.tokens_per_s,
                "completion_tokens": m.completion_tokens,
            }
            for m in conversation.messages.all()
        ],
    }
