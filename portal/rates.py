"""Counting per minute in the shared cache: how often something may happen (API requests per token, Slurm questions
per user). Exact with Redis; close with the file cache, whose increments are not atomic across processes."""

from __future__ import annotations

import time

from django.core.cache import cache


def clock() -> float:
    """The time the windows are counted in (seconds; tests hold it still)."""
    return time.time()


def wait_s(key: str, limit: int) -> int:
    """Count one more under `key` in this minute's window; 0 while within `limit` (0: no limit), else the seconds
    until the next window."""
    if not limit:
        return 0
    now = clock()
    window = f"rate:{key}:{int(now // 60)}"
    try:
        count = 1 if cache.add(window, 1, 120) else cache.incr(window)
    except ValueError:  # the window's counter expired between the two calls
        count = 1
    return 0 if count <= limit else 60 - int(now % 60)
