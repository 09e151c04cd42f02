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

from catalog.runtime_rules import ANTHROPIC, OPENAI

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


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors); its SDKs raise by status.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_body(api: str, status: int, message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    """An error in the shape of the route's API: OpenAI's (type and code as the portal names them) or Anthropic's
    (its type for the status; the portal's code goes along as `code`, which Anthropic's clients ignore)."""
    if api == ANTHROPIC:
        anthropic_type = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": anthropic_type, "message": message, "code": code or kind}}
    assert api == OPENAI, api
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def api_error(
    api: str, status: int, message: str, kind: str, code: str | None = None, retry_after: int | None = None
) -> JsonResponse:
    """The portal's own answer on these routes, in the shape of the route's API; with Retry-After (seconds) when
    the caller should try again later."""
    response = JsonResponse(error_body(api, status, message, kind, code), status=status, encoder=_InertJSON)
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    return response


def openai_error(status: int, message: str, kind: str, code: str | None = None) -> JsonResponse:
    """The portal's own answer on these routes, in OpenAI's error shape."""
    return api_error(OPENAI, status, message, kind, code)


def not_allowed(api: str, allowed_models: tuple[str, ...]) -> JsonResponse:
    """A scoped token naming a model outside its scope."""
    return api_error(api, 403, f"this token may only use {', '.join(allowed_models)}", "permission_error",
                     "model_not_allowed")  # fmt: skip
