"""The ASGI application: Django, with the scripts' API (/api/v1/) served without the cookie middleware.

Django's session, CSRF, auth and messages middleware each hop to a thread and back twice per request. The API
authenticates with bearer tokens and sets no cookies, so none of them does anything there, and skipping them takes
about 1.7 ms off every request's time to first token (bench/proxy.py). The routes to model servers (/api/v1/,
/sessions/<uuid>/v1/ and /services/<name>/v1/) pass the proxy's door first (jobs/use/guard.py), and their views
serve nothing that did not: a request from elsewhere (WSGI, Django's test client) is refused, so tests call this
application (tests/asgi.py). Every other HTTP request has its body bounded before Django reads it (portal/bodies.py):
no route takes an unbounded upload.
"""

from __future__ import annotations

import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_application = get_asgi_application()

from asgiref.sync import SyncToAsync, ThreadSensitiveContext  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402  (after django.setup())
from django.core.handlers.exception import convert_exception_to_response  # noqa: E402

from jobs.use import guard  # noqa: E402
from portal import bodies  # noqa: E402

API_PREFIX = "/api/v1/"


class BareHandler(ASGIHandler):
    """Django's ASGI handler with no middleware: URL resolution, the view, and Django's exception handling."""

    # Django gives each request a thread of its own for its thread-sensitive work, started and joined per request.
    # Here that work is only the request signals' connection housekeeping (the view's lookups run on jobs.use.proxy's
    # threads), so API requests share one long-lived context and thread instead: about 0.6 ms less per request.
    _shared_context = ThreadSensitiveContext()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"not an HTTP connection: {scope['type']}")
        SyncToAsync.thread_sensitive_context.set(self._shared_context)  # in this request's task only
        await self.handle(scope, receive, send)

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        self._middleware_chain = convert_exception_to_response(self._get_response_async)  # type: ignore[attr-defined]


api_application = BareHandler()


async def application(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        await django_application(scope, receive, send)
    elif guard.guards(scope["path"]):  # the routes to model servers: authenticated, then a bounded body
        app = api_application if scope["path"].startswith(API_PREFIX) else django_application
        await guard.guard(app, scope, receive, send)
    else:  # pages and forms: PORTAL_MAX_FORM_BYTES, more only for a signed-in user's upload to a view that takes one
        await bodies.bounded(django_application, scope, receive, send)
