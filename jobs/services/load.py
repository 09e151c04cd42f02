"""The load of a service's replicas across every portal worker process: each process publishes the requests it has
open per replica (ReplicaLoad rows), about once a second while it has any, and reads the others' rows at the same
time. Routing (replicas.py) adds its own live count to the others' last published ones; the keeper (keep.py) scales
and drains by the sum of fresh rows. Both stay off a request's path: a request only counts up and down in memory.

A row not refreshed for STALE is of a process that stopped or hung, and counts no more.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping

from django import db
from django.conf import settings
from django.db.models import Sum
from django.utils import timezone

from jobs.models import ReplicaLoad

log = logging.getLogger(__name__)

STALE = ReplicaLoad.FRESH
# This process, as its rows name it: host, pid, and a random part (a pid is reused after a restart).
WORKER = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

_lock = threading.Lock()
_others: dict[str, int] = {}  # replica: requests open on it through the other processes, as last read
_published: set[str] = set()  # the replicas this process has a row for
_thread: threading.Thread | None = None


def others(replica: str) -> int:
    """The requests open on a replica through the other portal processes, as they last published them."""
    return _others.get(replica, 0)


def ensure_publishing(counts: Callable[[], Mapping[str, int]]) -> None:
    """Start this process's publisher of `counts` (requests open per replica here), once: replicas.py starts it when
    a request is first routed to a replica. Off where PORTAL_SERVICE_LOAD_EVERY_MS is 0 (the unit tests publish by
    calling publish())."""
    global _thread
    every = settings.PORTAL_SERVICE_LOAD_EVERY_MS / 1000
    if _thread is not None or every <= 0:
        return
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_loop, args=(every, counts), name="service-load", daemon=True)
            _thread.start()


def _loop(every: float, counts: Callable[[], Mapping[str, int]]) -> None:
    while True:
        time.sleep(every)
        try:
            publish(counts())
        except Exception:  # a database hiccup: the next round publishes again; routing goes on with what it has
            log.warning("could not publish the load of service replicas", exc_info=True)
            db.connection.close()


def publish(open_here: Mapping[str, int]) -> None:
    """Write this process's open requests per replica, drop its rows of replicas it has none open on, and read the
    other processes' fresh rows."""
    now = timezone.now()
    counts = {pk: n for pk, n in open_here.items() if n > 0}
    for pk, n in counts.items():
        ReplicaLoad.objects.update_or_create(worker=WORKER, session_id=pk, defaults={"inflight": n, "updated_at": now})
    gone = _published - set(counts)
    if gone:
        ReplicaLoad.objects.filter(worker=WORKER, session_id__in=gone).delete()
    _published.clear()
    _published.update(counts)
    fresh = ReplicaLoad.objects.filter(updated_at__gt=now - STALE).exclude(worker=WORKER)
    read = {str(pk): int(n or 0) for pk, n in fresh.values("session_id").annotate(n=Sum("inflight")).values_list(
        "session_id", "n")}  # fmt: skip
    _others.clear()
    _others.update(read)
    if now.second % 30 == 0:  # now and then: rows of processes long gone
        ReplicaLoad.objects.filter(updated_at__lt=now - STALE * 12).delete()


def site_inflight(replicas: Iterable[str]) -> dict[str, int]:
    """The requests open on each replica through every portal process, by their fresh rows (the keeper's and the
    pages' view; a process publishes within a second of a request starting)."""
    pks = [str(pk) for pk in replicas]
    fresh = ReplicaLoad.objects.filter(session_id__in=pks, updated_at__gt=timezone.now() - STALE)
    summed = dict(fresh.values("session_id").annotate(n=Sum("inflight")).values_list("session_id", "n"))
    return {pk: int(summed.get(uuid.UUID(pk), 0) or 0) for pk in pks}
