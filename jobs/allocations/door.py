"""Token allocations at the proxy's door: a user whose tokens are spent under an allocation that refuses gets 429 on
the API and in the chat until it resets.

Asked on every request, on the proxy's threads, inside the door's one trip there; what it found is kept per process
for CHECK_S (settings.PORTAL_ALLOCATION_CHECK_S): whether any allocation limits tokens at all (a site with none asks
nothing more), and each user's answer. Tokens are counted when a reply ends, so an allocation is overspent by the
replies under way when it runs out and by what the last CHECK_S let through; the usage pages show the overspend.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.utils import timezone

from jobs.allocations import spend
from jobs.allocations.check import period_phrase, resets
from jobs.models import Allocation

REMEMBERED = 10_000  # users whose answer is kept; past that the memory starts over


@dataclass(frozen=True)
class Refusal:
    retry_after_s: int
    message: str


_lock = threading.Lock()
_limits_at = -float("inf")  # time.monotonic() when it was last asked whether any allocation limits tokens
_any_limits = False
_users: dict[int, tuple[float, Refusal | None]] = {}


def refusal(user_pk: int, now: datetime | None = None) -> Refusal | None:
    """Why `user_pk`'s calls are refused now (an allocation of theirs, their group's or account's, spent its
    tokens), or None."""
    global _limits_at, _any_limits
    every = settings.PORTAL_ALLOCATION_CHECK_S
    moment = time.monotonic()
    if moment - _limits_at >= every:
        limited = Allocation.objects.filter(tokens__isnull=False, action=Allocation.Action.REFUSE).exists()
        with _lock:
            _any_limits, _limits_at = limited, moment
            _users.clear()
    if not _any_limits:
        return None
    kept = _users.get(user_pk)
    if kept is not None and moment - kept[0] < every:
        return kept[1]
    found = _refusal(user_pk, now or timezone.now())
    with _lock:
        if len(_users) >= REMEMBERED:
            _users.clear()
        _users[user_pk] = (moment, found)
    return found


def _refusal(user_pk: int, now: datetime) -> Refusal | None:
    rows = spend.applying(user_pk, token_limits=True).filter(action=Allocation.Action.REFUSE)
    for allocation in rows:
        standing = spend.standing(allocation, now)
        if standing is not None and standing.tokens_spent:
            wait = max(1, int((standing.window.resets_at - now).total_seconds()) + 1)
            message = (
                f"the allocation of {allocation.holder_label} has spent its {allocation.tokens:,} tokens "
                f"{period_phrase(allocation)} ({standing.tokens:,} used); it resets {resets(standing)}"
            )
            return Refusal(wait, message)
    return None


def forget() -> None:
    """Ask again on the next request (tests; an admin's change is seen within CHECK_S anyway)."""
    global _limits_at
    with _lock:
        _limits_at = -float("inf")
        _users.clear()
