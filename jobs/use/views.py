"""The pages for using a running model: the chat of a session (conversations, a no-JavaScript send, export) and the
personal API tokens scripts use. The chat's rules live in chat.py; the streaming itself goes through proxy.py."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import Http404, HttpResponse, HttpResponseRedirect, JsonResponse
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from jobs.models import ApiToken, Conversation, LLMSession
from jobs.sessions.access import get_session_to_chat
from jobs.use import chat as rules
from portal.bodies import takes_uploads
from portal.htmx import HtmxHttpRequest, render_page


def _chat_of(request: HtmxHttpRequest, pk: UUID) -> tuple[LLMSession, QuerySet[Conversation]]:
    """The session, if the user may chat with it, and the conversations on it they see: their own (the owner does
    not see those of the people the session is shared with, nor they the owner's), or all of them for support."""
    session, sees_every = get_session_to_chat(request, pk)
    conversations = session.conversations.all()
    return session, conversations if sees_every else conversations.filter(owner_id=request.user.pk)


def _conversation(request: HtmxHttpRequest, pk: UUID, conversation_id: int) -> tuple[LLMSession, Conversation]:
    session, conversations = _chat_of(request, pk)
    conversation = conversations.filter(pk=conversation_id).first()
    if conversation is None:
        raise Http404("no such conversation")
    return session, conversation


def _chat_url(session: LLMSession, conversation: Conversation | None = None) -> str:
    url = reverse("jobs:chat", args=[session.pk])
    return f"{url}?c={conversation.pk}" if conversation else url


def _number(value: Any, default: float, low: float, high: float) -> float:
    try:
        return max(low, min(high, float(value)))
    except (TypeError, ValueError):
        return default


@login_required
@require_GET
def chat(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    session, mine = _chat_of(request, pk)
    conversations = list(mine)
    current = next((c for c in conversations if str(c.pk) == request.GET.get("c")), None) or (
        conversations[0] if conversations else None
    )
    history = [rules.shown(m) for m in current.messages.all()] if current else []
    context = {"s": session, "conversations": conversations, "current": current, "history": history}
    return render_page(request, "jobs/chat.html", context)


@login_required
@require_POST
def new_conversation(request: HtmxHttpRequest, pk: UUID) -> HttpResponse:
    session, _ = _chat_of(request, pk)
    conversation = Conversation.objects.create(
        session=session, owner=request.user, system_prompt=request.POST.get("system_prompt", "")
    )
    if request.headers.get("accept", "").startswith("application/json"):
        return JsonResponse({"id": conversation.pk, "url": _chat_url(session, conversation)})
    return HttpResponseRedirect(_chat_url(session, conversation))


@takes_uploads("PORTAL_MAX_REQUEST_BYTES")  # the question may be as long as the proxy took it (portal/bodies.py)
@login_required
@require_POST
def save_exchange(request: HtmxHttpRequest, pk: UUID, conversation_id: int) -> JsonResponse:
    """After the browser streamed a reply: store the question and the answer with its timings and tool calls; return
    safe HTML."""
    _, conversation = _conversation(request, pk, conversation_id)
    try:
        data = json.loads(request.body)
        question, reply = str(data["user"]), str(data["assistant"])
        stats = data.get("stats") or {}
        if not isinstance(stats, dict):
            raise TypeError("stats")
    except (json.JSONDecodeError, KeyError, TypeError):
        return JsonResponse({"error": "expected JSON with user and assistant"}, status=400)
    system_prompt = str(data["system_prompt"]) if "system_prompt" in data else None
    message = rules.save_exchange(conversation, question, reply, stats, system_prompt, data.get("tool_calls"))
    html = rules.render_markdown(reply)
    # The tool calls as kept, so that the page sends back the same ones a reload of it would.
    return JsonResponse({"id": message.pk, "html": html, "title": conversation.title, "tool_calls": message.tool_calls})


@login_required
@require_POST
def truncate(request: HtmxHttpRequest, pk: UUID, conversation_id: int) -> JsonResponse:
    """Regenerate / edit-and-resend: forget the messages from this one on."""
    _, conversation = _conversation(request, pk, conversation_id)
    try:
        first = int(request.POST.get("from", ""))
    except ValueError:
        return JsonResponse({"error": "expected from= the id of the first message to forget"}, status=400)
    start = conversation.messages.filter(pk=first).first()
    if start is not None:
        conversation.messages.filter(created_at__gte=start.created_at, pk__gte=start.pk).delete()
    return JsonResponse({"ok": True})


@login_required
@require_POST
def send_without_js(request: HtmxHttpRequest, pk: UUID, conversation_id: int) -> HttpResponse:
    """The plain-form send: ask the model without streaming, store both messages, show the page again."""
    session, conversation = _conversation(request, pk, conversation_id)
    text = (request.POST.get("message") or "").strip()
    if text and session.serving:
        max_tokens = int(_number(request.POST.get("max_tokens"), 512, 1, 32768))
        temperature = _number(request.POST.get("temperature"), 0.7, 0, 2)
        rules.ask(session, conversation, text, max_tokens, temperature, request.user.pk)
    return HttpResponseRedirect(_chat_url(session, conversation))


@login_required
@require_POST
def manage_conversation(request: HtmxHttpRequest, pk: UUID, conversation_id: int) -> HttpResponse:
    session, conversation = _conversation(request, pk, conversation_id)
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
def export(request: HtmxHttpRequest, pk: UUID, conversation_id: int) -> HttpResponse:
    session, conversation = _conversation(request, pk, conversation_id)
    name = f"chat-{conversation.pk}"
    if request.GET.get("format") == "md":
        text = rules.export_markdown(conversation, session.served_model_name)
        response = HttpResponse(text, content_type="text/markdown; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{name}.md"'
        return response
    data = rules.export_json(conversation, session.served_model_name)
    response = JsonResponse(data, json_dumps_params={"indent": 2})
    response["Content-Disposition"] = f'attachment; filename="{name}.json"'
    return response


@login_required
@require_http_methods(["GET", "POST"])
@sensitive_variables("created")
def api_tokens(request: HtmxHttpRequest) -> HttpResponse:
    """Create (shown once), list and revoke personal API tokens."""
    created = ""
    if request.method == "POST":
        if "revoke" in request.POST:
            ApiToken.objects.filter(pk=request.POST.get("revoke") or 0, user_id=request.user.pk).update(
                revoked_at=timezone.now()
            )
            messages.info(request, "Token revoked: scripts using it are refused from now on.")
            return HttpResponseRedirect(reverse("jobs:tokens"))
        name = (request.POST.get("name") or "").strip()[:100]
        if not name:
            messages.error(request, "Give the token a name, e.g. the machine or script that uses it.")
        else:
            try:
                _, created = ApiToken.issue(request.user, name)
            except ValidationError as exc:
                messages.error(request, " ".join(exc.messages))
    tokens = ApiToken.objects.filter(user_id=request.user.pk)
    base = request.build_absolute_uri(reverse("jobs:api", args=["x"])).removesuffix("/x")
    return render_page(request, "jobs/tokens.html", {"tokens": tokens, "created": created, "base": base})
