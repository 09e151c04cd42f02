"""The chat page of a running session: conversations, messages (Markdown, sanitised), export; a no-JavaScript send."""

from __future__ import annotations

import json
from typing import Any

import httpx
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from jobs import backend
from jobs.chat import messages_for_api, render_markdown
from jobs.models import ChatMessage, Conversation, Session, State
from jobs.views import get_session_for


def _conversation(session: Session, conversation_id: Any) -> Conversation:
    conversation = Conversation.objects.filter(session=session, pk=conversation_id).first()
    if conversation is None:
        raise Http404("no such conversation")
    return conversation


def _chat_url(session: Session, conversation: Conversation | None = None) -> str:
    url = reverse("jobs:chat", args=[session.pk])
    return f"{url}?c={conversation.pk}" if conversation else url


def _float(value: Any, default: float, low: float, high: float) -> float:
    try:
        return max(low, min(high, float(value)))
    except (TypeError, ValueError):
        return default


@login_required
@require_GET
def chat(request: HttpRequest, pk: Any) -> HttpResponse:
    session = get_session_for(request, pk)
    conversations = list(session.conversations.all())
    current = next((c for c in conversations if str(c.pk) == request.GET.get("c")), None) or (
        conversations[0] if conversations else None
    )
    history = [(m, render_markdown(m.content)) for m in current.messages.all()] if current else []
    context = {"s": session, "conversations": conversations, "current": current, "history": history}
    return render(request, "jobs/chat.html", context)


@login_required
@require_POST
def new_conversation(request: HttpRequest, pk: Any) -> HttpResponse:
    session = get_session_for(request, pk)
    conversation = Conversation.objects.create(session=session, system_prompt=request.POST.get("system_prompt", ""))
    if request.headers.get("accept", "").startswith("application/json"):
        return JsonResponse({"id": conversation.pk, "url": _chat_url(session, conversation)})
    return HttpResponseRedirect(_chat_url(session, conversation))


@login_required
@require_POST
def save_exchange(request: HttpRequest, pk: Any, conversation_id: int) -> JsonResponse:
    """After the browser streamed a reply: store the question and the answer with its timings; return safe HTML."""
    session = get_session_for(request, pk)
    conversation = _conversation(session, conversation_id)
    try:
        data = json.loads(request.body)
        user_text, reply = str(data["user"]), str(data["assistant"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return JsonResponse({"error": "expected JSON with user and assistant"}, status=400)
    stats = data.get("stats") or {}
    if user_text:
        ChatMessage.objects.create(conversation=conversation, role="user", content=user_text)
    message = ChatMessage.objects.create(
        conversation=conversation,
        role="assistant",
        content=reply,
        ttft_ms=_int_or_none(stats.get("ttft_ms")),
        tokens_per_s=_float(stats.get("tokens_per_s"), 0, 0, 1e6) if stats.get("tokens_per_s") is not None else None,
        prompt_tokens=_int_or_none(stats.get("prompt_tokens")),
        completion_tokens=_int_or_none(stats.get("completion_tokens")),
    )
    if conversation.title == "New chat" and user_text:
        conversation.title = user_text.strip().splitlines()[0][:80] or "New chat"
    if "system_prompt" in data:
        conversation.system_prompt = str(data["system_prompt"])
    conversation.save()
    return JsonResponse({"id": message.pk, "html": render_markdown(reply), "title": conversation.title})


def _int_or_none(value: Any) -> int | None:
    try:
        return max(0, int(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


@login_required
@require_POST
def truncate(request: HttpRequest, pk: Any, conversation_id: int) -> JsonResponse:
    """Regenerate / edit-and-resend: forget the messages from this one on."""
    session = get_session_for(request, pk)
    conversation = _conversation(session, conversation_id)
    start = conversation.messages.filter(pk=request.POST.get("from") or 0).first()
    if start is not None:
        conversation.messages.filter(created_at__gte=start.created_at, pk__gte=start.pk).delete()
    return JsonResponse({"ok": True})


@login_required
@require_POST
def send_without_js(request: HttpRequest, pk: Any, conversation_id: int) -> HttpResponse:
    """The plain-form send: ask the model without streaming, store both messages, show the page again."""
    session = get_session_for(request, pk)
    conversation = _conversation(session, conversation_id)
    text = (request.POST.get("message") or "").strip()
    if text and session.state == State.RUNNING:
        ChatMessage.objects.create(conversation=conversation, role="user", content=text)
        payload = {
            "model": session.served_model_name,
            "messages": messages_for_api(conversation.system_prompt, list(conversation.messages.all())),
            "max_tokens": int(_float(request.POST.get("max_tokens"), 512, 1, 32768)),
            "temperature": _float(request.POST.get("temperature"), 0.7, 0, 2),
        }
        try:
            reply = httpx.post(
                f"{backend.base_url(session)}/v1/chat/completions",
                json=payload,
                headers={"Authorization": f"Bearer {session.api_key}"},
                timeout=600,
            )
            body = reply.json()
            content = body["choices"][0]["message"]["content"]
            usage = body.get("usage") or {}
        except (httpx.HTTPError, KeyError, ValueError, IndexError) as exc:
            content, usage = f"(The model server did not answer: {exc})", {}
        ChatMessage.objects.create(
            conversation=conversation,
            role="assistant",
            content=content,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
        )
        if conversation.title == "New chat":
            conversation.title = text.splitlines()[0][:80]
        conversation.save()
    return HttpResponseRedirect(_chat_url(session, conversation))


@login_required
@require_POST
def manage_conversation(request: HttpRequest, pk: Any, conversation_id: int) -> HttpResponse:
    session = get_session_for(request, pk)
    conversation = _conversation(session, conversation_id)
    if "delete" in request.POST:
        conversation.delete()
        return HttpResponseRedirect(_chat_url(session))
    title = (request.POST.get("title") or "").strip()[:200]
    if title:
        conversation.title = title
        conversation.save(update_fields=["title", "updated_at"])
    return HttpResponseRedirect(_chat_url(session, conversation))


@login_required
@require_GET
def export(request: HttpRequest, pk: Any, conversation_id: int) -> HttpResponse:
    session = get_session_for(request, pk)
    conversation = _conversation(session, conversation_id)
    messages = list(conversation.messages.all())
    name = f"chat-{conversation.pk}"
    if request.GET.get("format") == "md":
        lines = [f"# {conversation.title}", "", f"Model: {session.served_model_name}", ""]
        for m in messages:
            lines += [f"## {m.get_role_display()}", "", m.content, ""]
        response = HttpResponse("\n".join(lines), content_type="text/markdown; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{name}.md"'
        return response
    data = {
        "title": conversation.title,
        "model": session.served_model_name,
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
            for m in messages
        ],
    }
    response = JsonResponse(data, json_dumps_params={"indent": 2})
    response["Content-Disposition"] = f'attachment; filename="{name}.json"'
    return response
