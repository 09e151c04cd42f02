"""Pending portal jobs' places in their partitions' queues, shared by the accounts of a cluster.

A place needs the cluster's whole pending queue (remote.POLL_SCRIPT's order section): on a busy cluster, reading it
is most of a poll's cost, and every account's poll would read the same queue. So one account's poll a cycle reads
it for every portal job it can see, and the polls of the others take their places from that (the cache). An
account whose pending jobs it lacks (Slurm's PrivateData=jobs hides them from other users, or they are new) reads
its own. Places are at most a poll interval old. A cluster's status account (listing.py) reads them for all.
"""

from __future__ import annotations

import time

from django.conf import settings
from django.core.cache import cache

from jobs.cluster.remote import PollResult

ALL, OWN, NONE = "all", "own", ""


def _keys(cluster_id: int) -> tuple[str, str]:
    return f"jobs:queue-order:{cluster_id}", f"jobs:queue-order-reader:{cluster_id}"


def _shared(cluster_id: int) -> dict[str, tuple[str, int]] | None:
    """job id -> (partition, place), when read within the last two intervals."""
    entry = cache.get(_keys(cluster_id)[0])
    if entry is None or time.time() - entry["at"] > 2 * settings.PORTAL_POLL_INTERVAL_S:
        return None
    jobs: dict[str, tuple[str, int]] = entry["jobs"]
    return jobs


def to_read(cluster_id: int, pending_job_ids: list[str]) -> str:
    """Whether this poll reads the queue: for all (this cycle's reader), for its own jobs, or not at all."""
    if not pending_job_ids:
        return NONE
    shared = _shared(cluster_id)
    if shared is not None and any(job_id not in shared for job_id in pending_job_ids):
        return OWN
    return ALL if cache.add(_keys(cluster_id)[1], True, timeout=settings.PORTAL_POLL_INTERVAL_S) else NONE


def share(cluster_id: int, polled: PollResult, read: str, pending_job_ids: list[str]) -> None:
    """Keep what this poll read (all of it: the cluster's new order; its own: added to it), then give the poll the
    places of its pending jobs that it did not read itself. A poll without pending jobs that read nothing does
    nothing: the shared order is not even fetched."""
    if not read and not pending_job_ids:
        return
    places = {job_id: (partition, place) for (partition, job_id), place in polled.positions.items()}
    shared = places if read == ALL else {**(_shared(cluster_id) or {}), **places}
    if read:
        cache.set(
            _keys(cluster_id)[0], {"at": time.time(), "jobs": shared}, timeout=3 * settings.PORTAL_POLL_INTERVAL_S
        )
    for job_id in pending_job_ids:
        if job_id in shared:
            partition, place = shared[job_id]
            polled.positions.setdefault((partition, job_id), place)


def publish(cluster_id: int, places: dict[str, tuple[str, int]]) -> None:
    """The places a status account's listing read (listing.py): this cycle's order, so that no account's own poll
    reads the queue again for jobs it covers."""
    key, reader = _keys(cluster_id)
    cache.set(key, {"at": time.time(), "jobs": places}, timeout=3 * settings.PORTAL_POLL_INTERVAL_S)
    cache.set(reader, True, timeout=settings.PORTAL_POLL_INTERVAL_S)
