"""The proxy's door, in front of Django (portal/asgi.py sends the proxy's routes through it).

Django's ASGI handler reads a request's whole body, into memory and then a temporary file, before any view or
middleware runs. For the routes that reach model servers that would let anyone make the portal buffer unbounded
uploads. Here, for those routes:

1. the host is checked against ALLOWED_HOSTS;
2. the caller is authenticated from the headers alone: a personal API token (/api/v1/), or the signed-in session
   cookie (/sessions/<uuid>/v1/);
3. a token is held to PORTAL_API_REQUESTS_PER_MINUTE (portal/rates.py);
4. only then is the body read, and at most PORTAL_MAX_REQUEST_BYTES of it, whether it declared its length or is
   chunked.

The body and the token's holder then travel to the view in the ASGI scope (BODY, HOLDER), and Django gets an empty
body; later receive() calls still reach the client, so a disconnect still cancels the upstream request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from importlib import import_module
from types import SimpleNamespace
from typing import Any

from django.conf import settings
from django.contrib import auth
from django.http.cookie import parse_cookie
from django.http.request import split_domain_port, validate_host
from django.views.decorators.debug import sensitive_variables

from jobs.use import targets
from jobs.use.headers import DATA_ONLY
from portal import rates

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
App = Callable[[Any, Any, Any], Awaitable[None]]

API = re.compile(r"/api/v1/")
BROWSER = re.compile(r"/sessions/[0-9a-fA-F-]{36}/v1/")
BODY = "portal.body"  # the request body, read here
HOLDER = "portal.holder"  # the API token's holder (targets.Holder), looked up here
FILES = "/api/v1/files"  # OpenAI's Files API: uploads up to PORTAL_BATCH_MAX_BYTES


def guards(path: str) -> bool:
    return bool(API.match(path) or BROWSER.match(path))


async def guard(app: App, scope: Scope, receive: Receive, send: Send) -> None:
    """Refuse before reading the body, or read it (bounded) and hand the request on to `app`."""
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
    if not _host_allowed(headers.get("host", "")):
        await _reply(send, 400, "the Host header names no site this portal serves", "invalid_request_error")
        return
    limit = settings.PORTAL_MAX_REQUEST_BYTES
    if scope["path"] == FILES:  # a batch input file, checked line by line once it is in
        limit = max(limit, settings.PORTAL_BATCH_MAX_BYTES + (1 << 20))
    declared = headers.get("content-length", "")
    if declared and (not declared.isdigit() or int(declared) > limit):
        await _reply(send, 413, f"the request body is larger than {limit} bytes", "request_too_large")
        return
    extra: dict[str, Any] = {}
    if API.match(scope["path"]):
        holder, wait_s = await targets.run(_token_holder, headers.get("authorization", ""))
        if holder is None:
            await _reply(send, 401, "a valid personal API token is needed (Authorization: Bearer hpcllm_…)",
                         "authentication_error", "invalid_api_key")  # fmt: skip
            return
        if wait_s:
            limit_text = f"{settings.PORTAL_API_REQUESTS_PER_MINUTE} requests a minute"
            await _reply(send, 429, f"this token made more than {limit_text}; try again in {wait_s} s",
                         "requests", "rate_limit_exceeded", retry_after=wait_s)  # fmt: skip
            return
        extra[HOLDER] = holder
    elif not await targets.run(_signed_in, headers.get("cookie", "")):
        await _reply(send, 401, "sign in first", "authentication_error")
        return
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if len(body) > limit:
            await _reply(send, 413, f"the request body is larger than {limit} bytes", "request_too_large")
            return
        if not message.get("more_body", False):
            break
    replayed = False

    async def replay() -> Any:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()

    await app({**scope, BODY: bytes(body), **extra}, replay, send)


def _host_allowed(host: str) -> bool:
    domain, _port = split_domain_port(host)
    return bool(domain) and validate_host(domain, settings.ALLOWED_HOSTS)


@sensitive_variables("authorization", "token")
def _token_holder(authorization: str) -> tuple[targets.Holder | None, int]:
    """The token's holder, and how many seconds it must wait when it made too many requests this minute (0: none)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None, 0
    holder = targets.holder(token.strip())
    if holder is None or holder.token_pk is None:
        return holder, 0
    return holder, rates.wait_s(f"api-token:{holder.token_pk}", settings.PORTAL_API_REQUESTS_PER_MINUTE)


@sensitive_variables("cookie")
def _signed_in(cookie: str) -> bool:
    """Django's own check of the session cookie (it also refuses a session whose password changed)."""
    session_key = parse_cookie(cookie).get(settings.SESSION_COOKIE_NAME)
    if not session_key:
        return False
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    return bool(auth.get_user(SimpleNamespace(session=store)).is_authenticated)  # type: ignore[arg-type]


async def _reply(
    send: Send, status: int, message: str, kind: str, code: str | None = None, retry_after: int = 0
) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after:
        headers.append((b"retry-after", str(retry_after).encode()))
    headers += [(name.lower().encode(), value.encode()) for name, value in DATA_ONLY.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
