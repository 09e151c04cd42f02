"""Which replica of a service takes a request. Plain Python, in memory, off the database.

Affinity first: a request with an affinity key (the browser chat's conversation, or for the API a hash of the system
prompt and the first messages: routing.py) goes where the same key went before, so the server's prompt cache is
reused. Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded
Loads", 2018; the scheme of HAProxy's `hash-balance-factor` and of KubeAI's prefix-hash router): each replica holds
VNODES points on a ring; a key goes to the first replica clockwise from its hash whose load stays within BALANCE times
the average. Adding or removing a replica moves only the keys of its own arcs. A request without a key, or whose
replica is over the bound, goes to the least loaded replica.

Load = requests open on the replica through this process (counted here, live) plus through the other portal processes
(load.others(), as they last published it). A replica that failed a request before answering is cooled down: it takes
none for COOL_DOWN_S unless every candidate is cooled.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from jobs.services import load

COOL_DOWN_S = 30.0  # a replica that failed before answering takes no request for this long (unless it is the last)
VNODES = 64  # points per replica on the ring: enough that two replicas split keys within a few percent
BALANCE = 1.25  # a replica takes a key's request while its load stays within this factor of the average

# What a choice was, as /metrics counts it (portal_service_routes_total{decision}).
AFFINITY, SPILLED, LEAST_LOADED = "affinity", "spilled", "least_loaded"

_lock = threading.Lock()
_inflight: Counter[str] = Counter()
_cooled: dict[str, float] = {}


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@lru_cache(maxsize=256)
def _ring(replicas: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The ring of a set of replicas (sorted points and the replica of each); cached, as sets change rarely."""
    points = sorted((_point(f"{pk}#{i}"), pk) for pk in replicas for i in range(VNODES))
    return tuple(p for p, _ in points), tuple(pk for _, pk in points)


def _load(pk: str) -> int:
    return _inflight[pk] + load.others(pk)


def choose(candidates: Sequence[str], key: str = "") -> tuple[str, str] | tuple[None, str]:
    """The replica to send a request to and how it was chosen (AFFINITY, SPILLED or LEAST_LOADED); (None, "") when
    there is no candidate. A cooled-down replica only when every candidate is."""
    if not candidates:
        return None, ""
    now = time.monotonic()
    with _lock:
        warm = sorted(pk for pk in candidates if _cooled.get(pk, 0.0) <= now) or sorted(candidates)
        loads = {pk: _load(pk) for pk in warm}
        if key and len(warm) > 1:
            bound = math.ceil(BALANCE * (sum(loads.values()) + 1) / len(warm))
            points, owners = _ring(tuple(warm))
            start = bisect_right(points, _point(key))
            seen: set[str] = set()
            for step in range(len(points)):
                pk = owners[(start + step) % len(points)]
                if pk in seen:
                    continue
                if loads[pk] + 1 <= bound:
                    return pk, AFFINITY if not seen else SPILLED
                seen.add(pk)
        elif key:
            return warm[0], AFFINITY
        least = min(loads.values())
        return random.choice([pk for pk in warm if loads[pk] == least]), LEAST_LOADED


def begin(replica: str) -> None:
    """A request is open on the replica (until end())."""
    load.ensure_publishing(open_counts)
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
    """Requests open on the replica through this process."""
    with _lock:
        return _inflight[replica]


def open_counts() -> dict[str, int]:
    """Requests open per replica through this process (what load.publish() writes)."""
    with _lock:
        return dict(_inflight)
