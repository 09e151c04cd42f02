"""What every answer relayed from a model server carries: it is data for scripts and the chat page's JavaScript,
never a page of the portal.

A session's owner controls what answers at the session's address (they run the job), so whatever it sends must not
be rendered with the portal's origin: only JSON and event streams are relayed (proxy.py), the browser may not sniff
another type, and a sandboxing content security policy stops anything that did render from running script, loading
resources or being framed.
"""

from __future__ import annotations

from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpResponseBase, JsonResponse

# The media types a model server's answer may have; anything else is refused, not relayed.
RELAYED_TYPES = frozenset({"application/json", "text/event-stream"})

DATA_ONLY = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def data_only(response: HttpResponseBase) -> HttpResponseBase:
    for name, value in DATA_ONLY.items():
        response[name] = value
    return response


class _InertJSON(DjangoJSONEncoder):
    """JSON whose text holds no markup characters: an error may quote what a model server said."""

    def encode(self, o: Any) -> str:
        return super().encode(o).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def openai_error(status: int, message: str, kind: str, code: str | None = None) -> JsonResponse:
    """The portal's own answer on these routes, in OpenAI's error shape."""
    error = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JsonResponse(error, status=status, encoder=_InertJSON)
