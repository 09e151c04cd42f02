"""Bounded request bodies for every HTTP request, before Django reads a byte of them (portal/asgi.py).

Django's ASGI handler reads a request's whole body, into memory and then a temporary file, before it routes the
request: unbounded, anyone, signed in or not, could fill the portal host's disk with one chunked upload to the sign-in
page. So every HTTP request passes here first (the routes to model servers pass the proxy's door, jobs/use/guard.py,
which reads its bodies with pieces() below):

1. a body that declares a length over the route's limit is answered with 413 before any of it is read;
2. a body that declares none (chunked) is counted as Django reads it, and the read that would take it past the limit
   is answered with 413 instead: Django hears the client leave and reads, and keeps, no more.

The limit is PORTAL_MAX_FORM_BYTES for every page and form. A view marked @takes_uploads(SETTING) takes up to that
setting's bytes, from a signed-in user only: whether the caller is signed in (the session cookie, checked as Django's
auth checks it) is asked before any of the body is read, and only when it may be larger than the default.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from importlib import import_module
from types import SimpleNamespace
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django import db
from django.conf import settings
from django.contrib import auth
from django.http.cookie import parse_cookie
from django.urls import Resolver404, resolve
from django.views.decorators.debug import sensitive_variables

log = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
App = Callable[[Any, Any, Any], Awaitable[None]]
V = TypeVar("V")

UPLOADS = "portal_takes_uploads"  # a view's attribute: the setting that bounds what a signed-in user may send it
FORM_ROOM = 1 << 20  # an upload's room besides its file: the multipart framing and the form's other fields
DATA_ONLY = {"x-content-type-options": "nosniff", "cache-control": "no-store"}


class TooLarge(Exception):
    """The body is (or declares itself) larger than `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"the request body is larger than {limit:,} bytes")


class Disconnected(Exception):
    """The client went away before the body's end."""


def takes_uploads(setting: str) -> Callable[[V], V]:
    """Mark a view whose requests may carry up to settings.<setting> bytes (and FORM_ROOM for the rest of the form)
    from a signed-in user; everyone else, and every other view, is held to PORTAL_MAX_FORM_BYTES."""

    def mark(view: V) -> V:
        setattr(view, UPLOADS, setting)
        return view

    return mark


def headers_of(scope: Mapping[str, Any]) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}


def declared(headers: Mapping[str, str]) -> int | None:
    """The Content-Length the request declares: None for none (a chunked body, or no body), -1 for one that is not a
    length (which no limit admits)."""
    value = headers.get("content-length")
    if value is None:
        return None
    return int(value) if value.isdigit() else -1


def over(length: int | None, limit: int) -> bool:
    """Whether a declared length is refused unread."""
    return length is not None and (length < 0 or length > limit)


async def pieces(receive: Receive, limit: int) -> AsyncIterator[bytes]:
    """The body's pieces as they arrive, at most `limit` bytes in all: TooLarge at the piece that would pass it (no
    later piece is read), Disconnected when the client leaves first."""
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        piece: bytes = message.get("body", b"")
        total += len(piece)
        if total > limit:
            raise TooLarge(limit)
        if piece:
            yield piece
        if not message.get("more_body", False):
            return


async def bounded(app: App, scope: Message, receive: Receive, send: Send) -> None:
    """Hand the request on to `app` (Django) with its body bounded: refused at once if it declares too much, cut off
    with a 413 at the read that passes the limit."""
    headers = headers_of(scope)
    length = declared(headers)
    limit = settings.PORTAL_MAX_FORM_BYTES
    if over(length, limit) or (length is None and "transfer-encoding" in headers):
        limit = max(limit, await _upload_limit(scope, headers))
    if over(length, limit):
        await too_large(send, limit)
        return
    read, refused = 0, False

    async def counted() -> Any:
        nonlocal read, refused
        if refused:
            return {"type": "http.disconnect"}
        message = await receive()
        if message["type"] == "http.request":
            read += len(message.get("body", b""))
            if read > limit:
                # Django reads the whole body before it routes or answers anything, so nothing has been sent yet; it
                # hears the client leave, drops what it read (in memory below FILE_UPLOAD_MAX_MEMORY_SIZE) and
                # answers nothing itself.
                refused = True
                log.warning("%s %s: a body past %d bytes refused", scope["method"], scope["path"], limit)
                await too_large(send, limit)
                return {"type": "http.disconnect"}
        return message

    await app(scope, counted, send)


async def too_large(send: Send, limit: int) -> None:
    body = f"{TooLarge(limit)}\n".encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    headers += [(name.encode(), value.encode()) for name, value in DATA_ONLY.items()]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _upload_limit(scope: Mapping[str, Any], headers: Mapping[str, str]) -> int:
    """What the view the path names takes from this caller: its @takes_uploads setting's bytes for a signed-in user,
    else 0 (the default holds)."""
    if scope["method"] != "POST":
        return 0
    try:
        match = resolve(scope["path"].removeprefix(scope.get("root_path", "")) or "/")
    except Resolver404:
        return 0
    setting = getattr(match.func, UPLOADS, None)
    if setting is None:
        return 0
    user_pk = await sync_to_async(_signed_in_here, thread_sensitive=False)(headers.get("cookie", ""))
    return int(getattr(settings, setting)) + FORM_ROOM if user_pk is not None else 0


@sensitive_variables("cookie")
def _signed_in_here(cookie: str) -> int | None:
    """signed_in(), on a thread no request signal tidies: its connection is closed once it is too old or broken."""
    try:
        return signed_in(cookie)
    finally:
        db.close_old_connections()


@sensitive_variables("cookie")
def signed_in(cookie: str) -> int | None:
    """The signed-in user's pk from a Cookie header: Django's own check of the session cookie (it also refuses a
    session whose password changed, and an inactive user)."""
    session_key = parse_cookie(cookie).get(settings.SESSION_COOKIE_NAME)
    if not session_key:
        return None
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    user = auth.get_user(SimpleNamespace(session=store))  # type: ignore[arg-type]
    return int(user.pk) if user.is_authenticated else None
