"""The sign-in throttle's site-specific parts, named by the AXES_* settings: which address and name a sign-in counts
under, whose failures a success clears, and the page a locked-out sign-in gets. django-axes does the counting."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from axes.handlers.database import AxesDatabaseHandler
from axes.helpers import get_client_username
from axes.models import AccessAttempt
from django.conf import settings
from django.contrib.auth import get_user_model
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone


def client_address(request: HttpRequest) -> str | None:
    """The address a sign-in counts under: REMOTE_ADDR, never X-Forwarded-For read here.

    uvicorn (scripts/serve runs it with --proxy-headers) already puts the client's own address in REMOTE_ADDR when the
    request came through a proxy it trusts (FORWARDED_ALLOW_IPS; by default the proxy on this host) and leaves the
    header unread when anyone else sent it. Reading the header again here would let any client that reaches the port
    directly name its own address for each attempt and so escape the address counter.
    """
    address = request.META.get("REMOTE_ADDR")
    return address if isinstance(address, str) and address else None


def username_key(request: HttpRequest, credentials: dict[str, Any] | None) -> str | None:
    """The name a sign-in counts under, trimmed and in lower case: LDAP directories match names regardless of case, so
    counting "Ada" and "ada" apart would give a guesser the limit once per spelling."""
    field = get_user_model().USERNAME_FIELD
    name = credentials.get(field) if credentials else request.POST.get(field)
    return name.strip().lower() if isinstance(name, str) else None


class AttemptsHandler(AxesDatabaseHandler):
    """axes's database handler, with a narrower reset and the time a lockout ends."""

    def reset_user_attempts(self, request: HttpRequest, credentials: dict[str, Any] | None = None) -> int:
        """After a successful sign-in, delete that user's failures, from any address, and nothing else.

        axes's own reset deletes every failure that matches any lockout parameter, the address's included: anyone with
        an account could then guess at someone else's password without end, signing in as themselves between rounds
        to wipe their address's count (and the victim's rows from that address with it).
        """
        deleted, _ = AccessAttempt.objects.filter(username=get_client_username(request, credentials)).delete()
        return int(deleted)

    def locked_until(self, request: HttpRequest, credentials: dict[str, Any] | None) -> datetime:
        """When this request's lockout ends at the latest.

        Each counter (the name's, the address's) sums the failures of the attempt rows whose last failure is within the
        cool-off. Going from the newest row back, the row that brings a locked counter's sum to the limit is the one
        whose ageing out unlocks it; the answer is the latest such moment over the counters.
        """
        limit: int = settings.AXES_FAILURE_LIMIT
        until = timezone.now()
        for attempts in self.get_user_attempts(request, credentials):
            total = 0
            for attempt_time, failures in attempts.order_by("-attempt_time").values_list(
                "attempt_time", "failures_since_start"
            ):
                total += failures
                if total >= limit:
                    until = max(until, attempt_time + settings.AXES_COOLOFF_TIME)
                    break
        return until


def locked_out(request: HttpRequest, *_ignored: object) -> HttpResponse:
    """The answer to a refused sign-in: 429, a page that says until when, and Retry-After in seconds.

    axes passes the login view's response and the credentials, in an order that differs between its sync and async
    middleware; neither is needed, as the credentials the lockout was decided on are on the request.
    """
    until = AttemptsHandler().locked_until(request, getattr(request, "axes_credentials", None))
    wait_s = max(1, math.ceil((until - timezone.now()).total_seconds()))
    # The page names a whole minute, so round up: "after 10:41" must not be a minute the lock still holds.
    shown = (until + timedelta(seconds=59, microseconds=999999)).replace(second=0, microsecond=0)
    context = {"until": shown, "wait_min": math.ceil(wait_s / 60), "failure_limit": settings.AXES_FAILURE_LIMIT}
    response = render(request, "registration/locked_out.html", context, status=429)
    response["Retry-After"] = str(wait_s)
    return response
