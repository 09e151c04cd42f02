"""Pages that htmx updates: the typed request and the one way to render a page or one of its partials.

A page is one template with named partials ({% partialdef %}); htmx asks for a part of it (HX-Request), plain
browsers get the whole page, so every link and form also works without JavaScript.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django_htmx.middleware import HtmxDetails


class HtmxHttpRequest(HttpRequest):
    """A request to a signed-in page (login_required), as django-htmx's middleware leaves it."""

    htmx: HtmxDetails
    user: User


def render_page(request: HtmxHttpRequest, template: str, context: dict[str, Any], partial: str = "") -> HttpResponse:
    """The whole page, or only its `partial` when htmx asks for it."""
    if partial and request.htmx:
        return render_partial(request, template, partial, context)
    return render(request, template, context)


def render_partial(request: HttpRequest, template: str, partial: str, context: dict[str, Any]) -> HttpResponse:
    """One named partial of a page on its own (a URL that only ever serves that part, such as one session's card)."""
    return render(request, f"{template}#{partial}", context)
