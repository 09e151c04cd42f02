"""A token's requests a minute (PORTAL_API_REQUESTS_PER_MINUTE), and its user's, all their tokens together
(PORTAL_API_USER_REQUESTS_PER_MINUTE), decided without waiting for the shared cache.

portal.rates counts in the shared cache, which with the file cache is a read, a pickle, a directory listing and a
rename per request: 0.3 to 0.4 ms of CPU here, more as the cache directory fills, taken from the request itself or
from the one after it (profiled with bench/proxy.py). Here each process counts in memory the requests it let through
in the current minute, and adds them to the shared count (the same key as portal.rates) on the proxy's threads, at
most every ADD_EVERY_S, in one addition; a request is refused when the shared count as last read back, plus what this
process has not added to it yet, has reached the limit. Within one process that is exact; several processes may
together let through what the others counted and had not added yet, a second's worth at most, as counting in the
file cache already may let a few through.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from django.core.cache import cache

from jobs.use import targets
from portal import rates

log = logging.getLogger(__name__)
ADD_EVERY_S = 1.0


@dataclass
class _Window:
    shared: int = 0  # the shared count as last read back (every process's requests)
    adding: int = 0  # being added to it now
    unsent: int = 0  # let through here, not yet added
    busy: bool = False  # an addition is under way (one at a time per window: it takes whatever is unsent)
    added_at: float = -ADD_EVERY_S  # time.monotonic() of the last addition's start


_lock = threading.Lock()
_windows: dict[str, _Window] = {}
_minute = -1


def wait_s(key: str, limit: int, *also: tuple[str, int]) -> int:
    """Count one more request under `key` in this minute, and under each (key, limit) of `also` (a token's request
    counts for its user too); 0 while every count is within its limit (0: no limit), else the seconds until the next
    minute, and the request counts nowhere. Never waits for the cache."""
    global _minute
    counts = [(k, n) for k, n in ((key, limit), *also) if n]
    if not counts:
        return 0
    now = rates.clock()
    minute = int(now // 60)
    started: list[tuple[str, _Window]] = []
    with _lock:
        if minute != _minute:
            _windows.clear()  # past minutes count no more
            _minute = minute
        windows = [(f"rate:{k}:{minute}", n) for k, n in counts]
        held = [(name, _windows.setdefault(name, _Window()), n) for name, n in windows]
        if any(w.shared + w.adding + w.unsent >= n for _, w, n in held):
            return 60 - int(now % 60)
        moment = time.monotonic()
        for name, window, _ in held:
            window.unsent += 1
            if not window.busy and moment - window.added_at >= ADD_EVERY_S:
                window.busy, window.added_at = True, moment
                started.append((name, window))
    for name, window in started:
        targets.later(_add, name, window)
    return 0


def full(key: str, limit: int) -> bool:
    """Whether `key`'s count has reached `limit` this minute (what a refusal says), counting nothing."""
    name = f"rate:{key}:{int(rates.clock() // 60)}"
    with _lock:
        window = _windows.get(name)
        return bool(limit) and window is not None and window.shared + window.adding + window.unsent >= limit


def _add(name: str, window: _Window) -> None:
    """Add what this process let through and has not added yet to the shared count, and read the total back."""
    with _lock:
        count, window.adding, window.unsent = window.unsent, window.unsent, 0
    try:
        total = count if cache.add(name, count, 120) else cache.incr(name, count)
    except ValueError:  # the count expired between the two calls
        total = count
        cache.add(name, count, 120)
    except Exception:  # the cache is down: this process's own count still holds
        log.exception("cannot add to the request count %s", name)
        total = 0
    with _lock:
        window.adding, window.busy = 0, False
        window.shared = max(window.shared + count, total)
