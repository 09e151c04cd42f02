"""The nodes a cluster's status account lists for each running portal job, kept for the owners' own polls.

A running job's nodes come to the portal from its owner's poll, which runs as the owner's cluster account: its user
can make `squeue` name any nodes (and `scontrol` give them any address). Where the cluster has a status account that
speaks for the site (listing.py: a service account or one an admin marked trusted), its listing already reads every
portal job's node list each cycle; the owner's poll that follows in the same cycle must agree with it
(lifecycle._serve_at). Kept in the shared cache like the queue order (queue_order.py), and believed for two poll
intervals.
"""

from __future__ import annotations

import time

from django.conf import settings
from django.core.cache import cache

from portal.slurm.errors import SlurmParseError
from portal.slurm.hostlist import expand_hostlist


def _key(cluster_id: int) -> str:
    return f"jobs:listed-nodes:{cluster_id}"


def publish(cluster_id: int, nodes: dict[str, str]) -> None:
    """This cycle's listing: job id -> its node list (Slurm's hostlist), for the running jobs it checked as the
    portal's (their id, name and owner)."""
    cache.set(_key(cluster_id), {"at": time.time(), "jobs": nodes}, timeout=3 * settings.PORTAL_POLL_INTERVAL_S)


def listed(cluster_id: int, job_id: str) -> str | None:
    """The job's node list as the status account last listed it running; None when no recent listing did (the
    cluster has no status account, its listing failed, it cannot see the job, or the job started since)."""
    entry = cache.get(_key(cluster_id))
    if entry is None or time.time() - entry["at"] > 2 * settings.PORTAL_POLL_INTERVAL_S:
        return None
    nodes: str | None = entry["jobs"].get(job_id)
    return nodes


def same_nodes(one: str, other: str) -> bool:
    """Whether two hostlists name the same nodes (node[1-2] and node1,node2 do); a list that does not parse names
    none, and agrees with nothing."""
    try:
        return set(expand_hostlist(one)) == set(expand_hostlist(other))
    except SlurmParseError:
        return False
