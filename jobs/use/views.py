"""The pages for using a running model: the chat of a session or of a model service (conversations, a no-JavaScript
send, export) and the personal API tokens scripts use. The chat's rules live in chat.py; the streaming itself goes
through proxy.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import Http404, HttpResponse, HttpResponseRedirect, JsonResponse
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from jobs.models import ApiToken, Conversation, LLMSession, ModelService, active_shares
from jobs.services import overview
from jobs.sessions.access import get_session_to_chat
from jobs.use import chat as rules
from jobs.use import fairshare
from portal.bodies import takes_uploads
from portal.htmx import HtmxHttpRequest, render_page


@dataclass(frozen=True)
class Place:
    """What a chat is with: a session (/sessions/<uuid>/chat/...) or a model service by its name
    (/services/<name>/chat/...), and the conversations on it the user sees. The pages, the rules and the script are
    the same for both; only their URLs and the proxy route they stream through differ."""

    session: LLMSession | None
    service: ModelService | None
    conversations: QuerySet[Conversation]

    @property
    def serving(self) -> bool:
        """Whether it takes new questions: a running session, or a service not stopped (with a replica ready or not:
        the proxy wakes it, and the page says when to try again)."""
        return self.service.running if self.service is not None else bool(self.session and self.session.serving)

    @property
    def model(self) -> str:
        """The model as the page names it in requests (the proxy sends the server's own name on)."""
        if self.service is not None:
            return self.service.name
        assert self.session is not None
        return self.session.served_model_name

    def url(self, name: str, *more: Any) -> str:
        """One of the chat's routes by its name for a session's (chat, chat-new, chat-save, ...; proxy: the browser's
        proxy route), each a service's of the same name after `service-`."""
        if self.service is not None:
            return reverse(f"jobs:service-{name}", args=[self.service.name, *more])
        assert self.session is not None
        return reverse("jobs:session-proxy" if name == "proxy" else f"jobs:{name}", args=[self.session.pk, *more])

    def urls(self, conversation: Conversation | None) -> dict[str, str]:
        """Every route the page links or posts to, by the name the template uses."""
        urls = {"new": self.url("chat-new"), "api": self.url("proxy", "chat/completions")}
        if conversation is not None:
            urls.update({name: self.url(f"chat-{name}", conversation.pk)
                         for name in ("save", "truncate", "send", "manage", "export")})  # fmt: skip
        return urls

    def create(self, owner: Any, system_prompt: str) -> Conversation:
        return Conversation.objects.create(
            session=self.session, service=self.service, owner=owner, system_prompt=system_prompt
        )


def _chat_of(request: HtmxHttpRequest, pk: UUID | None, name: str | None) -> Place:
    """The session or service, if the user may chat with it, and the conversations on it they see.

    A session's: their own (the owner does not see those of the people the session is shared with, nor they the
    owner's), or all of them for support staff. A service's: those who may use it (ModelService.may_use, the proxy's
    rule), each their own only; support staff who may not use it get 404 here, as from its proxy route."""
    if name is not None:
        service = ModelService.objects.usable_by(request.user).filter(name=name).select_related("owner").first()
        if service is None:
            raise Http404("no such service")
        return Place(None, service, service.conversations.filter(owner_id=request.user.pk))
    assert pk is not None
    session, sees_every = get_session_to_chat(request, pk)
    conversations = session.conversations.all()
    return Place(session, None, conversations if sees_every else conversations.filter(owner_id=request.user.pk))


def _conversation(
    request: HtmxHttpRequest, pk: UUID | None, name: str | None, conversation_id: int
) -> tuple[Place, Conversation]:
    place = _chat_of(request, pk, name)
    conversation = place.conversations.filter(pk=conversation_id).first()
    if conversation is None:
        raise Http404("no such conversation")
    return place, conversation


def _chat_url(place: Place, conversation: Conversation | None = None) -> str:
    url = place.url("chat")
    return f"{url}?c={conversation.pk}" if conversation else url


def _number(value: Any, default: float, low: float, high: float) -> float:
    try:
        return max(low, min(high, float(value)))
    except (TypeError, ValueError):
        return default


# Each chat view serves a session's chat (pk, from /sessions/<uuid>/chat/...) and a service's (name, from
# /services/<name>/chat/...): one set of views, rules and templates for both.


@login_required
@require_GET
def chat(request: HtmxHttpRequest, pk: UUID | None = None, name: str | None = None) -> HttpResponse:
    place = _chat_of(request, pk, name)
    conversations = list(place.conversations)
    current = next((c for c in conversations if str(c.pk) == request.GET.get("c")), None) or (
        conversations[0] if conversations else None
    )
    history = [rules.shown(m) for m in current.messages.all()] if current else []
    context = {
        "place": place, "s": place.session, "service": place.service, "conversations": conversations,
        "current": current, "history": history, "urls": place.urls(current),
        "launch": overview.launch_of(place.service) if place.service is not None else {},
    }  # fmt: skip
    return render_page(request, "jobs/chat.html", context)


@login_required
@require_POST
def new_conversation(request: HtmxHttpRequest, pk: UUID | None = None, name: str | None = None) -> HttpResponse:
    place = _chat_of(request, pk, name)
    conversation = place.create(request.user, request.POST.get("system_prompt", ""))
    if request.headers.get("accept", "").startswith("application/json"):
        return JsonResponse({"id": conversation.pk, "url": _chat_url(place, conversation)})
    return HttpResponseRedirect(_chat_url(place, conversation))


@takes_uploads("PORTAL_MAX_REQUEST_BYTES")  # the question may be as long as the proxy took it (portal/bodies.py)
@login_required
@require_POST
def save_exchange(
    request: HtmxHttpRequest, conversation_id: int, pk: UUID | None = None, name: str | None = None
) -> JsonResponse:
    """After the browser streamed a reply: store the question and the answer with its timings and tool calls; return
    safe HTML."""
    _, conversation = _conversation(request, pk, name, conversation_id)
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
def truncate(
    request: HtmxHttpRequest, conversation_id: int, pk: UUID | None = None, name: str | None = None
) -> JsonResponse:
    """Regenerate / edit-and-resend: forget the messages from this one on."""
    _, conversation = _conversation(request, pk, name, conversation_id)
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
def send_without_js(
    request: HtmxHttpRequest, conversation_id: int, pk: UUID | None = None, name: str | None = None
) -> HttpResponse:
    """The plain-form send: ask the model without streaming, store both messages, show the page again. A service
    with no replica ready says when to try again instead."""
    place, conversation = _conversation(request, pk, name, conversation_id)
    text = (request.POST.get("message") or "").strip()
    if text and place.serving:
        max_tokens = int(_number(request.POST.get("max_tokens"), 512, 1, 32768))
        temperature = _number(request.POST.get("temperature"), 0.7, 0, 2)
        share = _share(place, request.user.pk)
        with fairshare.holding(share, rules.ASK_TIMEOUT_S + fairshare.LEASE_S) as room:
            if not room:
                assert share is not None
                messages.warning(request, fairshare.refusal(share).capitalize() + ".")
            elif place.service is not None:
                why_not = rules.ask_service(place.service, conversation, text, max_tokens, temperature,
                                            request.user.pk)  # fmt: skip
                if why_not:
                    messages.warning(request, why_not)
            else:
                assert place.session is not None
                rules.ask(place.session, conversation, text, max_tokens, temperature, request.user.pk)
    return HttpResponseRedirect(_chat_url(place, conversation))


def _share(place: Place, user_pk: int) -> fairshare.Share | None:
    """The fair share the plain-form send counts under, as the proxy's route to the same place would."""
    if place.service is not None:
        service = place.service
        return fairshare.service_share(user_pk, service.pk, service.name, service.max_inflight_per_user)
    assert place.session is not None
    session = place.session
    shared = session.owner_id != user_pk or session.shares.filter(active_shares()).exists()
    return fairshare.session_share(user_pk, str(session.pk), shared)


@login_required
@require_POST
def manage_conversation(
    request: HtmxHttpRequest, conversation_id: int, pk: UUID | None = None, name: str | None = None
) -> HttpResponse:
    place, conversation = _conversation(request, pk, name, conversation_id)
    if "delete" in request.POST:
        conversation.delete()
        return HttpResponseRedirect(_chat_url(place))
    title = (request.POST.get("title") or "").strip()[:200]
    if title:
        conversation.title = title
        conversation.save(update_fields=["title", "updated_at"])
    return HttpResponseRedirect(_chat_url(place, conversation))


@login_required
@require_GET
def export(
    request: HtmxHttpRequest, conversation_id: int, pk: UUID | None = None, name: str | None = None
) -> HttpResponse:
    place, conversation = _conversation(request, pk, name, conversation_id)
    filename = f"chat-{conversation.pk}"
    if request.GET.get("format") == "md":
        text = rules.export_markdown(conversation, place.model)
        response = HttpResponse(text, content_type="text/markdown; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{filename}.md"'
        return response
    data = rules.export_json(conversation, place.model)
    response = JsonResponse(data, json_dumps_params={"indent": 2})
    response["Content-Disposition"] = f'attachment; filename="{filename}.json"'
    return response


@login_required
@require_http_methods(["GET", "POST"])
@sensitive_variables("created")
def api_tokens(request: HtmxHttpRequest) -> HttpResponse:
    """Create (shown once), list and revoke personal API tokens."""
    created = ""
    asked: dict[str, str] = {}
    if request.method == "POST":
        if "revoke" in request.POST:
            ApiToken.objects.filter(pk=request.POST.get("revoke") or 0, user_id=request.user.pk).update(
                revoked_at=timezone.now()
            )
            messages.info(request, "Token revoked: scripts using it are refused from now on.")
            return HttpResponseRedirect(reverse("jobs:tokens"))
        asked = {key: (request.POST.get(key) or "").strip() for key in ("name", "models", "days", "rate")}
        name = asked["name"][:100]
        if not name:
            messages.error(request, "Give the token a name, e.g. the machine or script that uses it.")
        else:
            try:
                _, created = ApiToken.issue(request.user, name, **_scope(asked))
            except ValidationError as exc:
                messages.error(request, " ".join(exc.messages))
            else:
                asked = {}
    tokens = ApiToken.objects.filter(user_id=request.user.pk)
    base = request.build_absolute_uri(reverse("jobs:api", args=["x"])).removesuffix("/x")
    context = {"tokens": tokens, "created": created, "base": base, "asked": asked,
               "site_rate": settings.PORTAL_API_REQUESTS_PER_MINUTE}  # fmt: skip
    return render_page(request, "jobs/tokens.html", context)


def _scope(asked: dict[str, str]) -> dict[str, Any]:
    """The token form's limits as ApiToken.issue takes them; a ValidationError for a number that is not one."""
    numbers = {}
    for key in ("days", "rate"):
        try:
            numbers[key] = int(asked[key]) if asked[key] else None
        except ValueError:
            raise ValidationError(f"{asked[key][:20]!r} is not a whole number.") from None
    days = numbers["days"]
    if days is not None and not 1 <= days <= 3650:
        raise ValidationError("A token expires after 1 to 3,650 days.")
    return {
        "allowed_models": asked["models"].replace(",", " ").split(),
        "expires_at": timezone.now() + timedelta(days=days) if days is not None else None,
        "requests_per_minute": numbers["rate"],
    }
