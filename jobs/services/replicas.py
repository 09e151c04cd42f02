"""Which replica of a service takes a request: the least loaded of its ready replicas in this process, leaving out
those that failed a request moments ago (cooled down). Plain Python, per process: each uvicorn worker counts the
requests it has open itself (a first step; routing by affinity and by load across workers are issue 28's later parts).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Sequence

COOL_DOWN_S = 30.0  # a replica that failed before answering takes no request for this long (unless it is the last)

_lock = threading.Lock()
_inflight: Counter[str] = Counter()
_cooled: dict[str, float] = {}


def choose(candidates: Sequence[str]) -> str | None:
    """The replica to send a request to: the fewest requests open here, ties broken at random; one cooled down only
    when every candidate is."""
    if not candidates:
        return None
    now = time.monotonic()
    with _lock:
        warm = [pk for pk in candidates if _cooled.get(pk, 0.0) <= now] or list(candidates)
        least = min(_inflight[pk] for pk in warm)
        return random.choice([pk for pk in warm if _inflight[pk] == least])


def begin(replica: str) -> None:
    """A request is open on the replica (until end())."""
    with _lock:
        _inflight[replica] += 1


def end(replica: str) -> None:
    with _lock:
        _inflight[replica] -= 1
        if _inflight[replica] <= 0:
            del _inflight[replica]


def cool_down(replica: str, seconds: float = COOL_DOWN_S) -> None:
    """A replica failed a request before answering: send it none for a while."""
    with _lock:
        _cooled[replica] = time.monotonic() + seconds
        if len(_cooled) > 10_000:  # forget the long-expired
            now = time.monotonic()
            for pk in [pk for pk, until in _cooled.items() if until <= now]:
                del _cooled[pk]


def open_requests(replica: str) -> int:
    with _lock:
        return _inflight[replica]
