"""Fair share on shared servers: the requests one user may have in flight at once on a session others use too (a
grant is in force on it, or the caller is not its owner) or on a model service, through the browser and the API
together: the service's own cap (ModelService.max_inflight_per_user), else the site's PORTAL_MAX_INFLIGHT_PER_USER.
Past it the request is answered 429 with Retry-After at once, never queued: a queue in the portal would only hold
the connection longer and hide from the caller that they are the one who is using the server.

Counted in the store every web process shares (jobs/models/counts.py: a sorted set in Redis, rows in the database),
so the cap holds across workers and hosts. A request is let in before anything is sent upstream and leaves when its
answer ends: the last byte of a stream, the client gone, an error. Each entry has a deadline, renewed while the
answer goes on, so the entries of a worker that was killed stop counting after LEASE_S. A session its owner alone
uses (no grant in force) is not counted: its owner's requests cost nothing here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from django.conf import settings
from django.http import HttpResponseBase, StreamingHttpResponse

from jobs.models import counts
from jobs.models.services import inflight_cap
from jobs.operations import metrics
from jobs.use import targets
from jobs.use.headers import api_error

LEASE_S = 90.0  # an entry counts this long unless renewed: how long a killed worker's requests keep their slots
RENEW_EVERY_S = 30.0  # while an answer goes on (a model may think for minutes before its first token)
RETRY_AFTER_S = 2  # what the 429 asks the caller to wait: a chat reply or a tool call ends within seconds
# An answer with no byte for this long is no more renewed: past the proxy's read timeout (600 s) its upstream has
# failed, so an answer whose end was never seen (a reply the client left before its first byte) frees its slot.
QUIET_S = 660.0


@dataclass(frozen=True)
class Share:
    """One user's requests on one shared server: the name they are counted under, the cap, and how a refusal names
    the server."""

    name: str
    cap: int
    server: str


def of_session(user_pk: int, target: targets.Target) -> Share | None:
    """The share a request to a session counts under; None where none is counted (its owner's own, not shared)."""
    return session_share(user_pk, target.pk, target.shared)


def of_service(user_pk: int, service: targets.Replicas) -> Share | None:
    """The share a request to a service counts under, whichever replica answers; None without a cap."""
    return service_share(user_pk, service.service_pk, service.service, service.max_inflight_per_user)


def session_share(user_pk: int, session_pk: str, shared: bool) -> Share | None:
    cap = settings.PORTAL_MAX_INFLIGHT_PER_USER
    if not shared or not cap:
        return None
    return Share(f"session:{session_pk}:user:{user_pk}", cap, "this shared session")


def service_share(user_pk: int, service_pk: int, name: str, own_cap: int | None) -> Share | None:
    cap = inflight_cap(own_cap)
    if not cap:
        return None
    return Share(f"service:{service_pk}:user:{user_pk}", cap, f"the service {name}")


def refusal(share: Share) -> str:
    """What a request past its share is told."""
    return (f"you have {share.cap} request{'s' if share.cap != 1 else ''} in flight on {share.server}, the most one "
            f"user may have at once there; try again in {RETRY_AFTER_S} s")  # fmt: skip


@contextlib.contextmanager
def holding(share: Share | None, lease_s: float) -> Iterator[bool]:
    """within() for a synchronous request (the chat's plain-form send, which asks the server from a view): whether
    the user has room, counted until the block ends; nothing renews it, so the lease covers the whole request."""
    ticket = counts.enter(share.name, share.cap, lease_s) if share is not None else None
    if share is not None and ticket is None:
        metrics.proxy_refused("fair_share")
    try:
        yield share is None or ticket is not None
    finally:
        if ticket is not None:
            counts.leave(ticket)


async def within(share: Share | None, api: str, answer: Callable[[], Awaitable[HttpResponseBase]]) -> HttpResponseBase:
    """`answer()` if the user has room on the server, counted until the answer ends; else a 429 with Retry-After in
    the shape of the route's API, and nothing is sent upstream."""
    if share is None:
        return await answer()
    ticket = await targets.run(counts.enter, share.name, share.cap, LEASE_S)
    if ticket is None:
        metrics.proxy_refused("fair_share")
        return api_error(api, 429, refusal(share), "requests", "too_many_requests_in_flight",
                         retry_after=RETRY_AFTER_S)  # fmt: skip
    held = _Held(ticket)
    try:
        response = await answer()
    except BaseException:
        held.end()
        raise
    content = response.streaming_content if isinstance(response, StreamingHttpResponse) else None
    if isinstance(response, StreamingHttpResponse) and isinstance(content, AsyncIterator):
        response.streaming_content = _until_the_end(content, held)
    else:
        held.end()
    return response


class _Held:
    """A ticket while its request goes on: its deadline renewed every RENEW_EVERY_S on the event loop while bytes
    still come (QUIET_S), and left once (on the proxy's threads: the end of a stream may await nothing more)."""

    def __init__(self, ticket: counts.Ticket) -> None:
        self.ticket, self.loop, self.ended = ticket, asyncio.get_running_loop(), False
        self.seen = time.monotonic()  # when the answer last moved
        self.timer = self.loop.call_later(RENEW_EVERY_S, self._renew)

    def _renew(self) -> None:
        if time.monotonic() - self.seen < QUIET_S:
            targets.later(counts.renew, self.ticket, LEASE_S)
            self.timer = self.loop.call_later(RENEW_EVERY_S, self._renew)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.timer.cancel()
            targets.later(counts.leave, self.ticket)


async def _until_the_end(content: AsyncIterator[bytes], held: _Held) -> AsyncIterator[bytes]:
    """The answer's bytes; the request leaves its share once they end, also when the client goes away (the view's
    cancellation passes through here) or the stream breaks."""
    try:
        async for chunk in content:
            held.seen = time.monotonic()
            yield chunk
    finally:
        held.end()
