"""The streaming proxy from the browser (session cookie) and scripts (personal token) to a session's model server.

Async views under ASGI: a stream holds no worker thread. The target is only ever the session record's host and port
(through the cluster's SSH tunnel when it has one); the backend key is added here and never shown; the caller's
cookies and Authorization header are not forwarded. Errors come back in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
from asgiref.sync import sync_to_async
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from jobs import backend
from jobs.models import ApiToken, Session, State

log = logging.getLogger(__name__)

# OpenAI-compatible routes that are forwarded; anything else is refused (no open proxy to the server's admin or
# slot endpoints).
ALLOWED = {"chat/completions": {"POST"}, "completions": {"POST"}, "embeddings": {"POST"}, "models": {"GET"}}
FORWARDED_HEADERS = ("content-type", "accept")
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # a long prompt on a big model can take minutes before the first token
ACTIVITY_EVERY = timedelta(seconds=30)

_clients: dict[int, httpx.AsyncClient] = {}


def _client() -> httpx.AsyncClient:
    """One pooled client per event loop (uvicorn runs one loop per worker process)."""
    loop = id(asyncio.get_running_loop())
    client = _clients.get(loop)
    if client is None or client.is_closed:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        client = _clients[loop] = httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)
    return client


def openai_error(status: int, message: str, kind: str, code: str | None = None) -> JsonResponse:
    return JsonResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status=status)


def _owned_session(user: Any, key: str) -> Session | None:
    """The user's session by uuid or alias (the newest live one with that alias); admins may use any by uuid."""
    sessions = Session.objects.select_related("cluster", "account__cluster", "variant__model")
    try:
        found = sessions.filter(pk=key).first()
    except (ValidationError, ValueError):  # not a uuid: maybe an alias
        found = None
    if found is None:
        found = (
            sessions.filter(owner=user, alias=key)
            .exclude(state__in=["completed", "cancelled", "failed", "timeout"])
            .first()
        )
    if found is None or (found.owner_id != user.pk and not user.is_staff):
        return None
    return found


def _target(session: Session) -> str:
    return backend.base_url(session)


def _note_activity(session: Session) -> None:
    now = timezone.now()
    if session.last_activity_at is None or now - session.last_activity_at > ACTIVITY_EVERY:
        Session.objects.filter(pk=session.pk).update(last_activity_at=now)


def _prepare(session: Session) -> tuple[str, str]:
    """The synchronous part of forwarding, in one thread hop: where the server is, its key, the activity mark."""
    _note_activity(session)
    return _target(session), session.api_key


async def _forward(request: HttpRequest, session: Session, path: str, body: bytes) -> HttpResponseBase:
    if session.state != State.RUNNING:
        return openai_error(409, f"session {session.pk} is {session.state}, not running", "session_not_running",
                            session.state)  # fmt: skip
    base, key = await sync_to_async(_prepare)(session)
    headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
    headers["authorization"] = f"Bearer {key}"
    client = _client()
    upstream_request = client.build_request(request.method or "GET", f"{base}/v1/{path}", content=body, headers=headers)
    try:
        upstream = await client.send(upstream_request, stream=True)
    except httpx.TimeoutException:
        return openai_error(504, f"the model server on {session.node_list} did not answer in time", "upstream_timeout")
    except httpx.HTTPError as exc:
        return openai_error(502, f"cannot reach the model server on {session.node_list}: {exc}", "upstream_error")
    content_type = upstream.headers.get("content-type", "application/json")
    if upstream.status_code >= 400 and "json" not in content_type:
        text = (await upstream.aread()).decode(errors="replace")[:500]
        await upstream.aclose()
        return openai_error(upstream.status_code, f"the model server answered: {text}", "upstream_error")

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            log.warning("stream from %s broke: %s", session.pk, exc)
            error = {"error": {"message": f"the stream broke: {exc}", "type": "upstream_error"}}
            yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            # Also reached when the client goes away: Django cancels this generator and the upstream is closed.
            await upstream.aclose()

    response = StreamingHttpResponse(relay(), status=upstream.status_code, content_type=content_type)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx in front must not buffer server-sent events
    return response


def _rewrite_model(body: bytes, session: Session) -> bytes | None:
    """Scripts name the session as the model; the server knows its own model name."""
    if not body:
        return body
    try:
        payload = json.loads(body)
    except json.JSONDecodeError:
        return None
    if isinstance(payload, dict):
        payload["model"] = session.served_model_name
    return json.dumps(payload).encode()


def _check_route(request: HttpRequest, path: str) -> JsonResponse | None:
    methods = ALLOWED.get(path.strip("/"))
    if methods is None:
        return openai_error(404, f"/{path} is not forwarded; use chat/completions, completions, embeddings or models",
                            "invalid_request_error")  # fmt: skip
    if request.method not in methods:
        return openai_error(405, f"{request.method} is not allowed on /{path}", "invalid_request_error")
    return None


async def session_proxy(request: HttpRequest, pk: Any, path: str) -> HttpResponseBase:
    """The browser's route: /sessions/<uuid>/v1/<path>, signed in with the session cookie (CSRF applies)."""
    user = await request.auser()
    if not user.is_authenticated:
        return openai_error(401, "sign in first", "authentication_error")
    if refused := _check_route(request, path):
        return refused
    session = await sync_to_async(_owned_session)(user, str(pk))
    if session is None:
        return openai_error(404, "no such session", "invalid_request_error")
    body = request.body
    if path.strip("/") != "models":
        rewritten = _rewrite_model(body, session)
        if rewritten is None:
            return openai_error(400, "the request body is not JSON", "invalid_request_error")
        body = rewritten
    return await _forward(request, session, path.strip("/"), body)


def _token_user(request: HttpRequest) -> Any:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    row = ApiToken.authenticate(token.strip())
    return row.user if row else None


def _api_lookup(request: HttpRequest, model: Any) -> tuple[Any, Session | None]:
    """Token and session in one thread hop."""
    user = _token_user(request)
    if user is None or not isinstance(model, str) or not model:
        return user, None
    return user, _owned_session(user, model)


def _running_models(user: Any) -> list[dict[str, Any]]:
    sessions = Session.objects.filter(owner=user, state=State.RUNNING).select_related("variant__model")
    return [
        {"id": s.alias or str(s.pk), "object": "model", "created": int(s.created_at.timestamp()),
         "owned_by": "hpc-llm-portal", "session": str(s.pk), "served_model": s.served_model_name}
        for s in sessions
    ]  # fmt: skip


@csrf_exempt  # scripts authenticate with a bearer token, not a cookie, so there is nothing to forge
async def api_proxy(request: HttpRequest, path: str) -> HttpResponseBase:
    """The scripts' route: /api/v1/<path> with a personal token; `model` names the session (uuid or alias)."""
    if refused := _check_route(request, path):
        return refused
    try:
        payload = json.loads(request.body or b"{}") if path.strip("/") != "models" else {}
    except json.JSONDecodeError:
        return openai_error(400, "the request body is not JSON", "invalid_request_error")
    model = payload.get("model") if isinstance(payload, dict) else None
    user, session = await sync_to_async(_api_lookup)(request, model)
    if user is None:
        return openai_error(401, "a valid personal API token is needed (Authorization: Bearer hpcllm_…)",
                            "authentication_error", "invalid_api_key")  # fmt: skip
    if path.strip("/") == "models":
        return JsonResponse({"object": "list", "data": await sync_to_async(_running_models)(user)})
    if not isinstance(model, str) or not model:
        return openai_error(400, "name the session as the model (its uuid or alias)", "invalid_request_error")
    if session is None:
        return openai_error(404, f"you have no session {model!r}", "invalid_request_error", "model_not_found")
    body = _rewrite_model(request.body, session) or b""
    return await _forward(request, session, path.strip("/"), body)
