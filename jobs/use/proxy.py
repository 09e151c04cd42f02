"""The streaming proxy from the browser (session cookie) and scripts (personal token) to a session's model server.

Async views under ASGI: a stream holds no worker thread. The target is only ever the session record's host and port
(through the cluster's SSH tunnel when it has one); the backend key is added here and never shown; the caller's
cookies, Authorization and x-api-key headers are not forwarded. The routes are catalog.runtime_rules.API_ROUTES; errors
come back in the shape of the route's API (OpenAI's, Anthropic's for the Messages routes).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any

import httpx
from django.conf import settings
from django.contrib.auth import get_user_model
from django.http import HttpRequest, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.debug import sensitive_variables

from catalog.runtime_rules import ANTHROPIC, API_ROUTES, RUNTIMES, ApiRoute, serving
from jobs.models import SERVING_STATES, LLMSession, ModelService
from jobs.operations import metrics
from jobs.services import actions as service_actions
from jobs.services import affinity, replicas, timing
from jobs.sessions.access import shared_with
from jobs.usage.records import Meter, save
from jobs.use import chat, fairshare, targets
from jobs.use import relay as relay_module
from jobs.use.guard import AFFINITY, BODY, HOLDER, TARGET, USER, admitted, refused, remember, served_here
from jobs.use.headers import RELAYED_TYPES, api_error, data_only, error_body, not_allowed, openai_error
from jobs.use.targets import Target
from jobs.use.transport import LeanTransport
from portal import outbound

log = logging.getLogger(__name__)

# Only API_ROUTES are forwarded; anything else is refused (no open proxy to the server's admin or slot endpoints).
# Anthropic's clients name the version of its API they speak (and beta features) in headers the server may read.
FORWARDED_HEADERS = ("content-type", "accept", "anthropic-version", "anthropic-beta")
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # a long prompt on a big model can take minutes before the first token
TIMEOUTS = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S).as_dict()

_transports: dict[int, LeanTransport] = {}


def _transport() -> httpx.AsyncBaseTransport:
    """One pool of connections per event loop (uvicorn runs one loop per worker process): jobs/use/transport.py,
    called directly rather than through an httpx.AsyncClient, whose redirects, cookies and auth steps a request to a
    model server never uses but would pay for on every request.

    No limit on its connections: each serves one request of a client that uvicorn let in, so a cap here would only
    hold streams back behind others (1,000 at once through a worker is a target, bench/proxy.py)."""
    loop = id(asyncio.get_running_loop())
    transport = _transports.get(loop)
    if transport is None:
        transport = _transports[loop] = LeanTransport()
    return transport


def _ended(meter: Meter, response: JsonResponse) -> JsonResponse:
    """The portal answered for the server (it was not running, or could not be reached): recorded as such."""
    targets.later(save, meter.finish(response.status_code))
    return response


class _NotAnswered(Exception):
    """A service's replica could not be reached, or broke off before answering: another replica may take the
    request. Carries the answer and the meter the request would otherwise have ended with."""

    def __init__(self, response: JsonResponse, meter: Meter, reason: str) -> None:
        super().__init__(response.status_code)
        self.response, self.meter, self.reason = response, meter, reason


@sensitive_variables("headers", "upstream_request")
async def _forward(
    request: HttpRequest, target: Target, route: ApiRoute, body: bytes, meter: Meter, fail_over: bool = False
) -> HttpResponseBase:
    """Send the request to the target's server and relay its answer. With `fail_over` (a service's replica, not yet
    retried), a server that could not be reached or broke off before answering raises _NotAnswered instead."""
    api = route.api
    if target.base is None:
        return _ended(meter, api_error(api, 409, f"session {target.pk} is {target.state}, not running",
                                       "session_not_running", target.state))  # fmt: skip
    if unserved := _unserved(route, target):
        return _ended(meter, unserved)
    headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
    headers["authorization"] = f"Bearer {target.key}"
    transport = _transport()
    # The timeouts go along as httpx's build_request() sets them. The URL from its parts: the route's own path, and
    # the host and port were checked as an address.
    upstream_request = httpx.Request(request.method or "GET", _upstream_url(target.base, route.upstream),
                                     content=body, headers=headers, extensions={"timeout": TIMEOUTS})  # fmt: skip
    counted = bool(target.service)  # a replica's open requests, for choosing the least loaded (replicas.py)
    if counted:
        replicas.begin(target.pk)
    relaying = False
    try:
        try:
            upstream = await _sent(transport, upstream_request)
        except httpx.TimeoutException as exc:
            timed_out = api_error(api, 504, f"the model server on {target.node_list} did not answer in time",
                                  "upstream_timeout")  # fmt: skip
            if fail_over and isinstance(exc, httpx.ConnectTimeout):
                raise _NotAnswered(timed_out, meter, "timeout") from exc
            return _ended(meter, timed_out)
        except httpx.HTTPError as exc:
            unreachable = api_error(api, 502, f"cannot reach the model server on {target.node_list}: {exc}",
                                    "upstream_error")  # fmt: skip
            if fail_over:
                raise _NotAnswered(unreachable, meter, "unreachable") from exc
            return _ended(meter, unreachable)
        if fail_over and upstream.status_code >= 500:
            # A replica answering 5xx before any byte of an answer (llama-server's 503 while it loads, a crash):
            # another replica may answer instead. What it said is kept for when none can.
            said = (await outbound.read_start(upstream, 2048)).decode(errors="replace")[:500]
            await upstream.aclose()
            raise _NotAnswered(api_error(api, upstream.status_code, f"the model server answered: {said}",
                                         "upstream_error"), meter, "5xx")  # fmt: skip
        content_type = upstream.headers.get("content-type", "application/json")
        media_type = content_type.partition(";")[0].strip().lower()
        if media_type not in RELAYED_TYPES:
            # Only data is relayed: an error's text comes back inside a JSON error, anything else not at all.
            # Never read whole: the first bytes are all a message quotes (the server is the session owner's).
            text = ""
            if upstream.status_code >= 400:
                text = (await outbound.read_start(upstream, 2048)).decode(errors="replace")[:500]
            await upstream.aclose()
            if text:
                return _ended(meter, api_error(api, upstream.status_code, f"the model server answered: {text}",
                                               "upstream_error"))  # fmt: skip
            return _ended(meter, api_error(api, 502, f"the model server answered with {media_type or 'no content type'}"
                                           ", which the portal does not relay (only JSON and event streams)",
                                           "upstream_error"))  # fmt: skip
        meter.begin(upstream.status_code, content_type)
        relaying = True
    finally:
        if counted and not relaying:
            replicas.end(target.pk)

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in relay_module.coalesced(upstream.aiter_raw()):
                meter.feed(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            log.warning("stream from %s broke: %s", target.pk, exc)
            meter.status = 502
            error = json.dumps(error_body(api, 502, f"the stream broke: {exc}", "upstream_error"))
            # A blank line first ends an event the break cut short, so the error is an event of its own. Anthropic's
            # streams name each event; its clients read an `error` event as the stream's failure.
            yield (f"\n\nevent: error\ndata: {error}\n\n" if api == ANTHROPIC else f"\n\ndata: {error}\n\n").encode()
        finally:
            # Also reached when the client goes away: Django cancels this generator and the upstream is closed.
            # A stream counts as use until its last byte, however long it ran (idle auto-cancel), and what it used
            # is recorded then.
            if counted:
                replicas.end(target.pk)
            targets.later(targets.touch, target.pk)
            targets.later(save, meter.finish())
            await upstream.aclose()

    response = StreamingHttpResponse(relay(), status=upstream.status_code, content_type=content_type)
    response["X-Accel-Buffering"] = "no"  # nginx in front must not buffer server-sent events
    return response


@functools.lru_cache(maxsize=4096)
def _upstream_url(base: httpx.URL, path: str) -> httpx.URL:
    """The server's URL for a route's path, made once per server and route (httpx.URL never changes)."""
    return base.copy_with(path=path)


async def _sent(transport: httpx.AsyncBaseTransport, upstream_request: httpx.Request) -> httpx.Response:
    """The server's answer to the request. A kept-alive connection the server closed just as the pool handed it out
    (llama-server closes idle ones; the close can cross the reuse) ends with no answer at all: the request did not
    reach the server, so it goes once more, on a new connection (as browsers and urllib3 retry such a reuse)."""
    try:
        return await transport.handle_async_request(upstream_request)
    except httpx.RemoteProtocolError:
        log.info("the model server closed a kept-alive connection as it was reused; sending again")
        return await transport.handle_async_request(upstream_request)


async def _forward_or_fail_over(
    request: HttpRequest, replicas_of: targets.Replicas | None, target: Target, route: ApiRoute, payload: Any,
    meter_of: Callable[[Target, bytes], Meter],
) -> HttpResponseBase:  # fmt: skip
    """_forward, and for a service's replica that could not be reached, answered 5xx or broke off before answering,
    once more to another of its ready replicas (the failed one is cooled down: replicas.py). The answer of the first
    attempt stands when there is no other."""
    body = _with_model(payload, target) if payload is not None else b""
    if replicas_of is None:
        return await _forward(request, target, route, body, meter_of(target, body))
    try:
        return await _forward(request, target, route, body, meter_of(target, body), fail_over=True)
    except _NotAnswered as failed:
        replicas.cool_down(target.pk)
        other, _ = targets.pick(replicas_of, exclude={target.pk})
        metrics.service_failed_over(replicas_of.service, failed.reason, other is not None)
        if other is None:
            return _ended(failed.meter, failed.response)
        log.info("service %s: %s did not answer (%s), the request goes to %s", replicas_of.service, target.pk,
                 failed.reason, other.pk)  # fmt: skip
        failed.meter.done = True  # the caller sees one request: the one that was answered
        _note_use(other)
        retried = _with_model(payload, other) if payload is not None else b""
        return await _forward(request, other, route, retried, meter_of(other, retried))


async def _not_ready(api: str, waiting: targets.NotReady, find: Callable[[], Any]) -> Any:
    """A service the caller may use has no ready replica: wake it if it keeps none (min 0), then hold the request
    while one is expected within PORTAL_SERVICE_HOLD_S (looking again every second), else answer 503 with the
    expected wait as Retry-After. Returns what `find` found once a replica is ready, or the error."""
    await targets.run(service_actions.wake, waiting.service_pk)
    ready_in = await targets.run(timing.ready_in_s, waiting.service_pk)
    deadline = time.monotonic() + settings.PORTAL_SERVICE_HOLD_S
    while ready_in <= settings.PORTAL_SERVICE_HOLD_S and time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        try:
            found = await targets.run(find)
        except targets.NotReady:
            continue
        metrics.service_not_ready(waiting.service, "held")
        return found
    metrics.service_not_ready(waiting.service, "503")
    return api_error(api, 503, f"the service {waiting.service} has no replica ready yet; one is expected in about "
                     f"{ready_in} s", "service_unavailable", "service_starting", retry_after=ready_in)  # fmt: skip


def _rewrite_model(body: bytes, target: Target) -> bytes | None:
    """Scripts name the session as the model; the server knows its own model name."""
    if not body:
        return body
    try:
        payload = json.loads(body)
    except json.JSONDecodeError:
        return None
    return _with_model(payload, target)


def _with_model(payload: Any, target: Target) -> bytes:
    if isinstance(payload, dict):
        payload["model"] = target.served_model
        if target.lora is not None:  # llama-server with adapters: the named one, or none (the base weights)
            payload["lora"] = [{"id": adapter, "scale": scale} for adapter, scale in target.lora]
    return json.dumps(payload).encode()


def _route(request: HttpRequest, path: str) -> ApiRoute | JsonResponse:
    """The API route a path names, or the error for one that is not forwarded or not by this method."""
    route = API_ROUTES.get(path.strip("/"))
    if route is None:
        return openai_error(404, f"/{path} is not forwarded; the routes are {', '.join(API_ROUTES)}",
                            "invalid_request_error")  # fmt: skip
    if request.method not in route.methods:
        return api_error(route.api, 405, f"{request.method} is not allowed on /{path}", "invalid_request_error")
    return route


def _unserved(route: ApiRoute, target: Target) -> JsonResponse | None:
    """The error for a route the session's runtime does not serve, naming those that do."""
    rules = RUNTIMES.get(target.runtime)
    if rules is None or route.name in rules.routes:
        return None
    able = serving(route.name)
    named = f"{', '.join(able[:-1])} or {able[-1]}" if len(able) > 1 else "".join(able)
    others = f"; sessions of {named} answer it" if able else ""
    return api_error(route.api, 404, f"this session runs {rules.label}, whose server has no /{route.name}{others}",
                     "invalid_request_error", "route_not_served")  # fmt: skip


def _at_the_door(
    view: Callable[..., Coroutine[Any, Any, HttpResponseBase]],
) -> Callable[..., Coroutine[Any, Any, HttpResponseBase]]:
    """The view gets what the door learnt (guard.admitted), or the request is refused: these routes are served only
    through the door. Every answer, the portal's own errors included, carries the data-only headers."""

    @functools.wraps(view)
    @sensitive_variables("door")  # the request's headers: its cookie or token
    async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        door = admitted(request)
        if door is None:
            return data_only(refused(request))
        return data_only(await view(request, door, *args, **kwargs))

    return wrapper


@served_here
@_at_the_door
@sensitive_variables("door")
async def session_proxy(request: HttpRequest, door: Mapping[str, Any], pk: Any, path: str) -> HttpResponseBase:
    """The browser's route: /sessions/<uuid>/v1/<path>, signed in with the session cookie (CSRF applies). The door
    signed the user in and looked the session up for them."""
    route = _route(request, path)
    if isinstance(route, JsonResponse):
        return route
    user_pk, (_, found) = door[USER], door[TARGET]
    if not isinstance(found, Target):
        return api_error(route.api, 404, "no such session", "invalid_request_error")
    target = found
    body = door[BODY]
    if "POST" in route.methods:
        rewritten = _rewrite_model(body, target)
        if rewritten is None:
            return api_error(route.api, 400, "the request body is not JSON", "invalid_request_error")
        body = rewritten
    meter = Meter(target.pk, user_pk, "chat", route.name, bytes_in=len(body), tokens=route.tokens)
    share = fairshare.of_session(user_pk, target)
    return await fairshare.within(share, route.api, lambda: _forward(request, target, route, body, meter))


@served_here
@_at_the_door
@sensitive_variables("door")
async def service_proxy(request: HttpRequest, door: Mapping[str, Any], name: str, path: str) -> HttpResponseBase:
    """The browser's route to a service: /services/<name>/v1/<path>, signed in with the session cookie (CSRF applies),
    for those who may use it. The door looked up its ready replicas and the affinity key of the conversation the page
    named (X-Conversation); the request goes to that conversation's replica, with a failover to another as the API's,
    and a service with no replica ready is woken and answered 503 with Retry-After, which the page turns into "try
    again in N s". Its use is the chatting user's, on the replica that answered."""
    route = _route(request, path)
    if isinstance(route, JsonResponse):
        return route
    api, body = route.api, door[BODY]
    user_pk, (_, found), key = door[USER], door[TARGET], door[AFFINITY]
    if isinstance(found, targets.NotReady):
        waiting = functools.partial(chat.to_service, user_pk, name, request.headers.get("x-conversation", ""))
        held = await _not_ready(api, found, waiting)
        if isinstance(held, JsonResponse):
            return held
        found, key = held
    if not isinstance(found, targets.Replicas):
        return api_error(api, 404, "no such service", "invalid_request_error")
    try:
        payload = json.loads(body) if body else None
    except json.JSONDecodeError:
        return api_error(api, 400, "the request body is not JSON", "invalid_request_error")
    # No conversation of the user's named: routed by the prompt's head, as the API routes it.
    target = _replica_for(found, key or affinity.key_of(route.name, payload))
    if target is None:
        return api_error(api, 404, "no such service", "invalid_request_error")

    def meter_of(replica: Target, sent: bytes) -> Meter:
        return Meter(replica.pk, user_pk, "chat", route.name, bytes_in=len(sent), tokens=route.tokens)

    replicas_of = found
    return await fairshare.within(
        fairshare.of_service(user_pk, replicas_of),
        api,
        lambda: _forward_or_fail_over(request, replicas_of, target, route, payload, meter_of),
    )


def _running_models(user_pk: int) -> list[dict[str, Any]]:
    """Every name a script can use as the model now, each with the session it names (targets.target's rules): each
    running session by its alias (else its uuid), then each model by its catalog name, NAME:QUANT always and NAME
    where it runs in one quantisation only, naming the newest such session; then each session shared with the caller
    for the API as owner/alias (else its uuid); then the adapters those sessions loaded, by their model names."""
    serving = LLMSession.objects.filter(owner_id=user_pk, state__in=SERVING_STATES).exclude(host="")
    sessions = list(serving.select_related("variant__model").order_by("-created_at"))
    names: dict[str, LLMSession] = {}
    for s in sessions:
        names[s.alias or str(s.pk)] = s
    newest: dict[str, dict[str, LLMSession]] = {}
    for s in sessions:
        newest.setdefault(s.variant.model.name, {}).setdefault(s.variant.quantization, s)
    for name, quants in newest.items():
        if len(quants) == 1:
            names.setdefault(name, *quants.values())  # an alias of the same spelling wins, as in the lookup
        for quant, s in quants.items():
            names.setdefault(f"{name}:{quant}", s)
    user = get_user_model().objects.get(pk=user_pk)
    shared = list(shared_with(user, api=True).filter(state__in=SERVING_STATES).exclude(host="").order_by("-created_at"))
    for s in shared:
        names.setdefault(s.name_for_others, s)  # owner/alias or uuid: never one of the caller's own names
    # The fine-tune runs' adapters these sessions loaded, by the runs' model names (ft:...), in by_adapter's order:
    # the caller's own sessions first, the newest first.
    by_pk = {s.pk: s for s in [*sessions, *shared]}
    order = {pk: (s.owner_id != user_pk, -s.created_at.timestamp()) for pk, s in by_pk.items()}
    links = LLMSession.adapters.through.objects.filter(llmsession__in=list(by_pk)) if by_pk else None
    loaded = links.select_related("finetunerun__owner", "finetunerun__variant__model") if links is not None else []
    for link in sorted(loaded, key=lambda link: order[link.llmsession_id]):
        names.setdefault(link.finetunerun.model_name, by_pk[link.llmsession_id])
    listed = [
        {"id": name, "object": "model", "created": int(s.created_at.timestamp()),
         "owned_by": s.owner.get_username() if s.owner_id != user_pk else "hpc-llm-portal", "session": str(s.pk),
         "served_model": s.served_model_name, "shared": s.owner_id != user_pk}
        for name, s in names.items()
    ]  # fmt: skip
    # Then the services the caller may use that have a replica ready: each once, by its name (one query).
    for service in ModelService.objects.usable_by(user).filter(stopped_at__isnull=True).with_ready():
        ready: int = service.ready  # type: ignore[attr-defined]  # with_ready()'s annotation
        if ready and service.name not in names:
            listed.append({"id": service.name, "object": "model", "created": int(service.created_at.timestamp()),
                           "owned_by": service.owner.get_username(), "service": True, "replicas": ready})  # fmt: skip
    return listed


@served_here
@csrf_exempt  # scripts authenticate with a bearer token, not a cookie, so there is nothing to forge
@_at_the_door
@sensitive_variables("door")
async def api_proxy(request: HttpRequest, door: Mapping[str, Any], path: str) -> HttpResponseBase:
    """The scripts' route: /api/v1/<path> with a personal token; `model` names the session (uuid, alias, or the
    catalog name of the model it runs). The door checked the host and the token, and held it to its rate."""
    route = _route(request, path)
    if isinstance(route, JsonResponse):
        return route
    api, body = route.api, door[BODY]
    try:
        payload = json.loads(body or b"{}") if "POST" in route.methods else {}
    except json.JSONDecodeError:
        return api_error(api, 400, "the request body is not JSON", "invalid_request_error")
    model = payload.get("model") if isinstance(payload, dict) else None
    holder: targets.Holder = door[HOLDER]
    if route.name != "models" and isinstance(model, str) and model and not holder.may_name(model):
        return not_allowed(api, holder.allowed_models)  # before any lookup: a scoped token wakes nothing else
    ahead = door.get(TARGET)
    try:
        if ahead is not None and ahead[0] == model:
            found = ahead[1]  # the door looked it up with the token
        else:
            found = await targets.run(_found_named, holder, model)
        found = _used(found)
    except targets.Ambiguous as exc:
        return api_error(api, 400, str(exc), "invalid_request_error", "model_ambiguous")
    except targets.NotReady as waiting:
        if route.name == "models":
            found = None
        else:
            found = await _not_ready(api, waiting, functools.partial(_found_named, holder, model))
            if isinstance(found, JsonResponse):
                return found
    remember(door, model)
    if route.name == "models":
        listed = await targets.run(_running_models, holder.user_pk)
        return JsonResponse({"object": "list", "data": [m for m in listed if holder.may_name(m["id"])]})
    if not isinstance(model, str) or not model:
        return api_error(api, 400, "name the model: a session's uuid or alias, or a model's catalog name (NAME or "
                         "NAME:QUANT) that one of your sessions runs; GET /api/v1/models lists them",
                         "invalid_request_error")  # fmt: skip
    replicas_of = found if isinstance(found, targets.Replicas) else None
    target = _replica_for(replicas_of, affinity.key_of(route.name, payload)) if replicas_of is not None else found
    if target is None:
        return api_error(api, 404, f"no running session of yours answers to {model!r}; GET /api/v1/models lists "
                         "the names you can use", "invalid_request_error", "model_not_found")  # fmt: skip

    def meter_of(replica: Target, sent: bytes) -> Meter:
        return Meter(replica.pk, holder.user_pk, "api", route.name, bytes_in=len(sent), tokens=route.tokens)

    share = (fairshare.of_service(holder.user_pk, replicas_of) if replicas_of is not None
             else fairshare.of_session(holder.user_pk, target))  # fmt: skip
    sent = payload if body else None
    return await fairshare.within(
        share, api, lambda: _forward_or_fail_over(request, replicas_of, target, route, sent, meter_of)
    )


def _found_named(holder: targets.Holder, model: Any) -> Target | targets.Replicas | None:
    return targets.find(holder, model) if isinstance(model, str) and model else None


def _replica_for(replicas_of: targets.Replicas, key: str) -> Target | None:
    """The replica of a service that takes this request: by its affinity key (the API's: the prompt's head; the
    browser chat's: its conversation), else the least loaded (replicas.choose); the decision is counted in
    /metrics."""
    target, decision = targets.pick(replicas_of, key)
    if target is not None:
        metrics.service_routed(replicas_of.service, decision)
        _note_use(target)
    return target


def _note_use(target: Target) -> None:
    if target.activity_due:
        targets.later(targets.touch, target.pk)


def _used(found: Target | targets.Replicas | Exception | None) -> Target | targets.Replicas | None:
    """What the door looked up ahead, now that the request uses it: a session (its use noted) or a service's ready
    replicas (the one used is noted once chosen); an error the lookup raised is raised now."""
    if isinstance(found, Exception):
        raise found
    if isinstance(found, Target):
        _note_use(found)
    return found
