"""The proxy's door, in front of Django (portal/asgi.py sends the proxy's routes through it).

Django's ASGI handler reads a request's whole body, into memory and then a temporary file, before any view or
middleware runs. For the routes that reach model servers that would let anyone make the portal buffer unbounded
uploads. Here, for those routes:

1. the host is checked against ALLOWED_HOSTS;
2. the caller is authenticated from the headers alone, in one trip to the proxy's threads: a personal API token
   (/api/v1/; `Authorization: Bearer`, or `x-api-key` as Anthropic's clients send it), or the signed-in session
   cookie (/sessions/<uuid>/v1/, /services/<name>/v1/). The session is looked up in the same trip: the one the
   browser's path names (a service's ready replicas, and whether the conversation the chat names is the user's own
   with it), or for a token the model its previous request named (the body, which names it, is not read yet), which
   the view uses when the body names the same, and else looks up what it names;
3. a token is held to its rate (PORTAL_API_REQUESTS_PER_MINUTE, or its own), and its user, all their tokens
   together, to PORTAL_API_USER_REQUESTS_PER_MINUTE (allowance.py), counted in the store every web process shares
   in the same trip as step 2's lookup; and a caller whose allocation has spent its tokens (token or browser alike)
   is refused there too (jobs/allocations/door.py, which asks the database at most every few seconds);
4. only then is the body read, and at most PORTAL_MAX_REQUEST_BYTES of it, whether it declared its length or is
   chunked (portal/bodies.py reads it, as it reads every other route's). An upload to the Files API, only from a
   caller step 2 let in, may be as large as a batch file (PORTAL_BATCH_MAX_BYTES) within what is left of its owner's
   quota, and goes to a temporary file as it comes (UPLOAD), never whole into memory;
5. the proxy's own views (marked @served_here) are then called here, without Django's handler and middleware; the
   OpenAI Files and Batch views go on to Django with an empty body.

What was learnt travels in the ASGI scope (BODY, HOLDER, USER, TARGET), and the views of these routes are reached
only through here: a request that reaches one without it (admitted()) is refused, never served. Serving here saves
what Django's handler spends on every request and the proxy needs none of (profiled with bench/proxy.py): a thread
trip for the request signals, a temporary file for the body, and on the browser's route the session, CSRF, auth and
messages middleware, each a thread trip there and back (with the one lookup of step 2, 4 to 5 ms of the browser
route's 10 at p50). What those did for the proxy is done here: the session cookie is checked (2), CSRF is checked as
CsrfViewMiddleware checks it, and exceptions become a 500 in OpenAI's shape. A client that goes away cancels the
view, which closes the upstream request, as under Django.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import tempfile
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from django.conf import settings
from django.core.exceptions import SuspiciousOperation
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.http.request import split_domain_port, validate_host
from django.middleware.csrf import CsrfViewMiddleware
from django.urls import Resolver404, ResolverMatch, resolve
from django.utils.log import log_response
from django.views.decorators.debug import sensitive_variables

from catalog.runtime_rules import API_ROUTES, OPENAI
from jobs.allocations import door as allocation_door
from jobs.batch import files
from jobs.models import token_digest
from jobs.operations import metrics
from jobs.use import allowance, chat, targets
from jobs.use.headers import DATA_ONLY, api_error, data_only, error_body
from portal import bodies

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
App = Callable[[Any, Any, Any], Awaitable[None]]

API = re.compile(r"/api/v1/")
BROWSER = re.compile(r"/sessions/([0-9a-fA-F-]{36})/v1/")
SERVICE = re.compile(r"/services/([A-Za-z0-9][A-Za-z0-9_.-]{0,62})/v1/")  # the browser's chat with a service
BODY = "portal.body"  # the request body, read here (empty for an UPLOAD)
UPLOAD = "portal.upload"  # an upload to the Files API, read here into a temporary file (binary, at its start)
HOLDER = "portal.holder"  # the API token's holder (targets.Holder), looked up here
USER = "portal.user"  # the signed-in user's pk (the browser's route), looked up here
TARGET = "portal.target"  # (the key looked up, what targets.find found: Target, Replicas, None, Ambiguous or NotReady)
AFFINITY = "portal.affinity"  # a service's browser chat: its conversation's affinity key, "" when none is honoured
CONVERSATION = "x-conversation"  # the header in which the chat page names its conversation
TOKEN = "portal.token"  # the API token's digest, under which the model it names is remembered (remember())
REMEMBERED = 10_000  # tokens whose last model is kept; past that the memory starts over
FILES = "/api/v1/files"  # OpenAI's Files API: uploads up to PORTAL_BATCH_MAX_BYTES (PORTAL_FINETUNE_MAX_BYTES)
SERVED_HERE = "served_at_the_door"
V = TypeVar("V")


def served_here(view: V) -> V:
    """Mark a view of the proxy's routes as called by the door itself (step 5), not by Django's handler."""
    setattr(view, SERVED_HERE, True)
    return view


def guards(path: str) -> bool:
    return bool(API.match(path) or BROWSER.match(path) or SERVICE.match(path))


def admitted(request: HttpRequest) -> Mapping[str, Any] | None:
    """The scope of a request the door let in, with what it learnt (BODY, and HOLDER and TOKEN or USER and TARGET);
    None for a request it never saw.

    portal.asgi sends every route of the proxy's views through the door, so a request that reaches one of them without
    it came another way (WSGI, Django's test client, a new entry point) past the door's checks: a wiring error, which
    the view answers with refused(), never by serving it."""
    if isinstance(request, ASGIRequest) and isinstance(request.scope.get(BODY), bytes):
        return request.scope
    return None


def refused(request: HttpRequest) -> JsonResponse:
    """The answer to a request that reached a view of the proxy's routes without the door (admitted())."""
    log.error("%s %s reached its view without the door (portal.asgi sends these routes through jobs.use.guard)",
              request.method, request.path)  # fmt: skip
    message = "the portal is misconfigured: this route is served only through its door"
    return api_error(api_of(request.path), 500, message, "server_error")


async def guard(app: App, scope: Scope, receive: Receive, send: Send) -> None:
    """Refuse before reading the body, or read it (bounded) and hand the request on to `app`."""
    headers = bodies.headers_of(scope)
    api = api_of(scope["path"])
    if not _host_allowed(headers.get("host", "")):
        await _reply(send, api, 400, "the Host header names no site this portal serves", "invalid_request_error")
        return
    extra: dict[str, Any] = {}
    if API.match(scope["path"]):
        credential = _credential(headers)
        digest = token_digest(credential) if credential else ""
        guess = _models.get(digest) if digest and scope["method"] == "POST" else None
        holder, found, refused = await targets.run(_api_door, credential, guess)
        if holder is None:
            await _reply(send, api, 401, "a valid personal API token is needed (Authorization: Bearer hpcllm_…, or "
                         "x-api-key: hpcllm_…)", "authentication_error", "invalid_api_key")  # fmt: skip
            return
        if refused is not None:
            await refused.reply(send, api)
            return
        extra[HOLDER], extra[TOKEN] = holder, digest
        if guess is not None:
            extra[TARGET] = guess, found
    elif browser := BROWSER.match(scope["path"]):
        signed_in = await targets.run(_browser_door, headers.get("cookie", ""), browser[1])
        if signed_in is None:
            await _reply(send, api, 401, "sign in first", "authentication_error")
            return
        if isinstance(signed_in, _Refused):
            await signed_in.reply(send, api)
            return
        extra[USER], extra[TARGET] = signed_in[0], (browser[1], signed_in[1])
    else:
        service = SERVICE.match(scope["path"])
        assert service is not None
        to_service = await targets.run(_service_door, headers.get("cookie", ""), service[1],
                                       headers.get(CONVERSATION, ""))  # fmt: skip
        if to_service is None:
            await _reply(send, api, 401, "sign in first", "authentication_error")
            return
        if isinstance(to_service, _Refused):
            await to_service.reply(send, api)
            return
        extra[USER], extra[TARGET], extra[AFFINITY] = to_service[0], (service[1], to_service[1]), to_service[2]
    uploading = HOLDER in extra and scope["path"] == FILES and scope["method"] == "POST"
    limit, refusal = settings.PORTAL_MAX_REQUEST_BYTES, ""
    if uploading:  # only once the caller is known: a token that is not valid never sends a large body
        limit, refusal = await _upload_limit(extra[HOLDER])
        if limit < 0:
            await _reply(send, api, 400, refusal, "invalid_request_error", "quota_exceeded")
            return
    if bodies.over(bodies.declared(headers), limit):
        await _too_large(send, api, limit, refusal)
        return
    upload: IO[bytes] | None = None
    try:
        if uploading:
            upload = await _spooled(receive, limit)
            body = b""
        else:
            body = b"".join([piece async for piece in bodies.pieces(receive, limit)])
    except bodies.TooLarge:
        await _too_large(send, api, limit, refusal)
        return
    except bodies.Disconnected:
        return
    try:
        await _admit({**scope, BODY: body, UPLOAD: upload, **extra}, app, receive, send)
    finally:
        if upload is not None:
            upload.close()


async def _admit(scope: Scope, app: App, receive: Receive, send: Send) -> None:
    """Serve a request whose body has been read: a @served_here view here, anything else through `app` (which
    finds its body already read: it gets an empty one)."""
    request = ASGIRequest(scope, io.BytesIO(scope[BODY]))
    match = _resolved(request.path_info)
    if match is not None and getattr(match.func, SERVED_HERE, False):
        await _serve(request, match, receive, send)
        return
    replayed = False

    async def replay() -> Any:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()

    await app(scope, replay, send)


async def _upload_limit(holder: targets.Holder) -> tuple[int, str]:
    """The bytes an upload to the Files API may send (a batch file or training data, whose purpose is in the body
    not yet read: the larger of their limits, each checked by the view; within what is left of its owner's quota)
    and what a refusal says; -1 when the owner may keep no more files."""
    left = await targets.run(files.room, holder.user_pk)
    if left.files < 1:
        return -1, f"no more files: {files.no_room_for_files()}"
    largest = max(settings.PORTAL_BATCH_MAX_BYTES, settings.PORTAL_FINETUNE_MAX_BYTES)
    if left.bytes < largest:
        return left.bytes + bodies.FORM_ROOM, files.no_room_for_bytes(left.bytes)
    return largest + bodies.FORM_ROOM, ""


async def _spooled(receive: Receive, limit: int) -> IO[bytes]:
    """An upload's body in a temporary file (in FILE_UPLOAD_TEMP_DIR, gone once closed), written as it comes: on the
    event loop, as Django's own handler writes the bodies it spools, since a piece is at most the server's read."""
    spool = tempfile.TemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR)  # noqa: SIM115 -- the caller closes it
    try:
        async for piece in bodies.pieces(receive, limit):
            spool.write(piece)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool


async def _too_large(send: Send, api: str, limit: int, refusal: str) -> None:
    message = f"the request body is larger than {limit:,} bytes"
    await _reply(send, api, 413, f"{message}: {refusal}" if refusal else message, "request_too_large",
                 "quota_exceeded" if refusal else None)  # fmt: skip


_routes: dict[str, ResolverMatch | None] = {}
ROUTES = 10_000  # paths whose view is kept; past that the memory starts over


def _resolved(path: str) -> ResolverMatch | None:
    """Django's URL resolution, kept per path: the URL patterns do not change while the process runs, and the API's
    few paths come again and again."""
    if path not in _routes:
        if len(_routes) >= ROUTES:
            _routes.clear()
        try:
            _routes[path] = resolve(path)
        except Resolver404:
            _routes[path] = None
    return _routes[path]


def _host_allowed(host: str) -> bool:
    domain, _port = split_domain_port(host)
    return bool(domain) and validate_host(domain, settings.ALLOWED_HOSTS)


def api_of(path: str) -> str:
    """The API whose shape a route's answers take (OpenAI's, or Anthropic's for the Messages routes), from its path
    alone: the door answers before anything else is known."""
    prefix = API.match(path) or BROWSER.match(path) or SERVICE.match(path)
    route = API_ROUTES.get(path[prefix.end() :].strip("/")) if prefix else None
    return route.api if route else OPENAI


@sensitive_variables("headers", "scheme", "token")
def _credential(headers: Mapping[str, str]) -> str:
    """The personal API token a request carries: `Authorization: Bearer TOKEN` (OpenAI's clients), else
    `x-api-key: TOKEN` (Anthropic's)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key", "").strip()


_models: dict[str, str] = {}  # a token's digest: the model its last request named


def remember(scope: Mapping[str, Any], model: Any) -> None:
    """The model a token's request named, looked up ahead with its next request (step 2)."""
    digest = scope.get(TOKEN)
    if digest and isinstance(model, str) and model and _models.get(digest) != model:
        if len(_models) >= REMEMBERED:
            _models.clear()
        _models[digest] = model


@dataclass(frozen=True)
class _Refused:
    """A caller the door knows, refused for now with 429: over a rate (allowance.py), or an allocation of theirs has
    spent its tokens (jobs/allocations/door.py)."""

    message: str
    wait_s: int
    kind: str
    code: str
    reason: str  # portal_proxy_refused's label

    async def reply(self, send: Send, api: str) -> None:
        metrics.proxy_refused(self.reason)
        await _reply(send, api, 429, self.message, self.kind, self.code, retry_after=self.wait_s)


def _spent(user_pk: int) -> _Refused | None:
    found = allocation_door.refusal(user_pk)
    if found is None:
        return None
    return _Refused(found.message, found.retry_after_s, "insufficient_quota", "insufficient_quota", "allocation")


@sensitive_variables("token")
def _api_door(token: str, guess: str | None) -> tuple[targets.Holder | None, Any, _Refused | None]:
    """The token's holder; why it is refused for now (an allocation spent, else the request counted under its rates:
    allowance.refusal), or None; and the session (or service) `guess` names for them (not noted as used: the request
    may name another), an error the lookup raised handed on for the view to raise."""
    holder = targets.holder(token) if token else None
    if holder is None:
        return None, None, None
    refused = _spent(holder.user_pk)
    if refused is None and (over_rate := allowance.refusal(holder)) is not None:
        message, wait_s = over_rate
        refused = _Refused(f"{message}; try again in {wait_s} s", wait_s, "requests", "rate_limit_exceeded", "rate")
    if refused is not None or guess is None:
        return holder, None, refused
    try:
        return holder, targets.find(holder, guess, "api", note=False), None
    except (targets.Ambiguous, targets.NotReady) as exc:
        return holder, exc, None


@sensitive_variables("cookie")
def _browser_door(
    cookie: str, session_pk: str
) -> tuple[int, targets.Target | targets.Ambiguous | None] | _Refused | None:
    """The signed-in user, and the session the path names as targets.target finds it for them on the chat route
    (None: not theirs to use); None when nobody is signed in; why they are refused for now (their tokens spent)."""
    user_pk = bodies.signed_in(cookie)
    if user_pk is None:
        return None
    if (refused := _spent(user_pk)) is not None:
        return refused
    try:
        return user_pk, targets.target(targets.Holder(user_pk), session_pk, "chat")
    except targets.Ambiguous as exc:  # not for a uuid; the view answers it as it would have
        return user_pk, exc


@sensitive_variables("cookie")
def _service_door(
    cookie: str, name: str, conversation: str
) -> tuple[int, targets.Replicas | targets.NotReady | None, str] | _Refused | None:
    """The signed-in user, the service the path names as the chat finds it for them (None: not theirs to use), and
    their conversation's affinity key (chat.to_service); None when nobody is signed in; why they are refused for now
    (their tokens spent)."""
    user_pk = bodies.signed_in(cookie)
    if user_pk is None:
        return None
    if (refused := _spent(user_pk)) is not None:
        return refused
    try:
        return user_pk, *chat.to_service(user_pk, name, conversation)
    except targets.NotReady as exc:  # the view wakes the service, and holds the request or answers 503
        return user_pk, exc, ""


class _Csrf(CsrfViewMiddleware):
    """Django's CSRF check, as its middleware makes it for a view; a refusal is an error in OpenAI's shape."""

    def _reject(self, request: HttpRequest, reason: str) -> HttpResponseBase:
        response = api_error(api_of(request.path), 403, f"CSRF check failed: {reason}", "permission_error",
                             "csrf_failed")  # fmt: skip
        log_response("Forbidden (%s): %s", reason, request.path, response=response, request=request)
        return response


_csrf = _Csrf(lambda request: None)  # type: ignore[arg-type]


async def _serve(request: ASGIRequest, match: ResolverMatch, receive: Receive, send: Send) -> None:
    """Call a @served_here view and send its answer; a client that goes away cancels both (the view's stream closes
    its upstream request)."""
    serving = asyncio.current_task()
    assert serving is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        serving.cancel()

    watcher = asyncio.create_task(watch())
    try:
        await _send_response(await _response(request, match), send)
    except asyncio.CancelledError:
        if not gone:
            raise
        serving.uncancel()
    finally:
        watcher.cancel()


async def _response(request: ASGIRequest, match: ResolverMatch) -> HttpResponseBase:
    request.resolver_match = match
    try:
        _csrf.process_request(request)
        refused = _csrf.process_view(request, match.func, match.args, match.kwargs)
        if refused is not None:
            return data_only(refused)
        response: HttpResponseBase = await match.func(request, *match.args, **match.kwargs)
        return response
    except SuspiciousOperation as exc:
        return data_only(api_error(api_of(request.path), 400, f"bad request: {exc}", "invalid_request_error"))
    except Exception:
        log.exception("the proxy failed on %s", request.path)
        return data_only(api_error(api_of(request.path), 500, "the portal failed on this request", "server_error"))


async def _send_response(response: HttpResponseBase, send: Send) -> None:
    """As Django's ASGI handler sends a response (the proxy sets no cookies)."""
    headers = [(name.encode("ascii"), value.encode("latin-1")) for name, value in response.items()]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    if isinstance(response, StreamingHttpResponse):
        async with contextlib.aclosing(aiter(response)) as content:  # type: ignore[type-var]  # a generator
            async for chunk in content:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body"})
    else:
        await send({"type": "http.response.body", "body": response.content})  # type: ignore[attr-defined]


async def _reply(
    send: Send, api: str, status: int, message: str, kind: str, code: str | None = None, retry_after: int = 0
) -> None:
    body = json.dumps(error_body(api, status, message, kind, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after:
        headers.append((b"retry-after", str(retry_after).encode()))
    headers += [(name.lower().encode(), value.encode()) for name, value in DATA_ONLY.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
