"""Every portal job of a cluster from one command a cycle: the listing of the cluster's status account.

Without one, each account with live sessions runs its own poll (remote.POLL_SCRIPT) every cycle: fifty researchers
mean fifty SSH commands and fifty squeue RPCs to slurmctld a cycle. With a status account (Cluster.status_account,
chosen by the admin) one squeue lists every portal job with its owner and, for those pending, its place in the
queue. What it prints is believed for everyone's jobs, so it must be an account that sees all users' jobs and whose
shell no researcher controls: a service account or one an admin marked trusted (ClusterAccount.reads_for_site; a
researcher's own account there counts as no status account at all). The listing is checked against what the portal
knows (the job id, its name, which is the session's, and its owner, who is the session account's user) before it is
used.

An account whose sessions all wait in the queue needs nothing more: the listing gives each its reason, estimated
start and place. An account with a session the listing cannot settle runs its own poll, as without a status account:
a job that runs (its connection, staging and batch files are read with the owner's login), one the listing lacks
(it ended, and sacct says how; or the status account cannot see it, e.g. under PrivateData=jobs), a cancel asked
for, a server that was serving. A listing that fails leaves every account to its own poll.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from django.db.models import Case, When
from django.utils import timezone

from catalog.models import Cluster, ClusterAccount
from jobs.cluster import remote, slurm
from jobs.models import POLLED_STATES, LLMSession, State
from jobs.operations import metrics
from jobs.sessions import lifecycle, listed_nodes, queue_order
from portal import ssh
from portal.slurm import jobstates

log = logging.getLogger(__name__)

WAITING = (State.QUEUED, State.UNKNOWN)  # the portal's states a listing can settle
CHUNK = 2000  # sessions per statement (SQLite caps a statement's parameters)


@dataclass(frozen=True)
class Plan:
    clusters: list[int]  # listed with their status account
    accounts: list[int]  # polled on their own (clusters without a status account)


def plan() -> Plan:
    """What this cycle polls: the clusters with a status account and live sessions, and every other live account. A
    status account that is a researcher's own (not a service account, not marked trusted) counts as none."""
    live = LLMSession.objects.filter(state__in=POLLED_STATES).exclude(job_id="")
    listed = ClusterAccount.reads_for_site_q("account__cluster__status_account__")
    rows = set(live.values_list("account_id", "account__cluster_id", Case(When(listed, then=True), default=False)))
    clusters = sorted({cluster for _, cluster, status in rows if status})
    return Plan(clusters, sorted({account for account, _, status in rows if not status}))


@dataclass(frozen=True)
class Cycle:
    own: list[int]  # accounts that need their own poll
    settled: int  # sessions the listing settled
    changed: int  # of which changed


def cycle(cluster_id: int) -> Cycle:
    """List the cluster's portal jobs with its status account, apply the listing to every account it settles, and
    return the accounts that still need their own poll."""
    cluster = Cluster.objects.select_related("status_account__cluster").get(pk=cluster_id)
    live = LLMSession.objects.filter(account__cluster_id=cluster_id, state__in=POLLED_STATES).exclude(job_id="")
    fields = ("pk", "account_id", "account__username", "job_id", "host", "cancel_requested_at")
    rows = list(live.values_list(*fields, *lifecycle.WAITING_FIELDS, named=True))
    accounts = sorted({row.account_id for row in rows})
    status = cluster.status_account
    if status is None or not rows:
        return Cycle(accounts, 0, 0)
    if not status.reads_for_site:  # what its squeue prints would be believed for everyone's jobs
        log.warning("%s: %s; each account polls itself", cluster.slug, status.not_for_site("the status listing"))
        return Cycle(accounts, 0, 0)
    try:
        with metrics.polling(cluster.slug):
            command = remote.listing_command(cluster.slurm_cli, gated=status.restricted)
            result = status.run(command.command, stdin=command.stdin, timeout_s=60,
                                max_output_bytes=remote.LISTING_MAX_BYTES)  # fmt: skip
    except ssh.SSHError as exc:
        metrics.ssh_error(cluster.slug, "listing")
        log.warning("%s: the status account's listing failed, each account polls itself: %s", cluster.slug, exc)
        return Cycle(accounts, 0, 0)
    listing = remote.parse_listing(result.stdout, command.frame)
    if not listing.ok:
        metrics.poll_failed(cluster.slug, "scheduler")
        log.warning("%s: the status account's listing failed, each account polls itself: %s", cluster.slug,
                    listing.error or result.stderr.strip()[:300])  # fmt: skip
        return Cycle(accounts, 0, 0)
    polled = _as_poll(listing)
    queue_order.publish(
        cluster_id, {job_id: (partition, place) for (partition, job_id), place in polled.positions.items()}
    )
    listed_nodes.publish(cluster_id, _running_nodes(listing, rows))
    by_account: dict[int, list[Any]] = defaultdict(list)
    for row in rows:
        by_account[row.account_id].append(row)
    own, settled, changed = [], [], []
    for account_id, sessions in by_account.items():
        if all(_settles(listing, row) for row in sessions):
            settled += [row.pk for row in sessions]
            changed += [row.pk for row in sessions if _differs(polled, row)]
        else:
            own.append(account_id)
    moved = 0
    for start in range(0, len(changed), CHUNK):
        batch = LLMSession.objects.filter(pk__in=changed[start : start + CHUNK])
        moved += sum(lifecycle.apply_poll(session, polled) for session in batch)
    now = timezone.now()
    for start in range(0, len(settled), CHUNK):
        LLMSession.objects.filter(pk__in=settled[start : start + CHUNK]).update(last_seen_at=now)
    return Cycle(sorted(own), len(settled), moved)


def _settles(listing: remote.Listing, row: Any) -> bool:
    """The listing alone says all there is about this session: it waits in the queue as the portal knows it, under
    its own name and owner, with nothing asked of it."""
    entry = listing.jobs.get(row.job_id)
    if entry is None or row.state not in WAITING or row.host or row.cancel_requested_at is not None:
        return False
    owner, job = entry
    return (
        owner == row.account__username and job.name == slurm.job_name(str(row.pk))
        and job.state in jobstates.PENDING_STATES
    )  # fmt: skip


def _running_nodes(listing: remote.Listing, rows: list[Any]) -> dict[str, str]:
    """Job id -> node list of each session's job the listing shows running under its own name and owner: what the
    owner's own poll must agree with before its server is sent anything (lifecycle._serve_at)."""
    nodes: dict[str, str] = {}
    for row in rows:
        entry = listing.jobs.get(row.job_id)
        if entry is None:
            continue
        owner, job = entry
        if (
            owner == row.account__username and job.name == slurm.job_name(str(row.pk))
            and job.state in jobstates.ACTIVE_STATES and job.node_list not in {"", "(null)"}
        ):  # fmt: skip
            nodes[row.job_id] = job.node_list
    return nodes


def _differs(polled: remote.PollResult, row: Any) -> bool:
    """Whether what the portal keeps of a waiting session differs from the listing (the rule apply_poll compares by)."""
    job = polled.queued[row.job_id]
    seen = lifecycle.waiting_as(job, polled.queue_position(job.partition, job.job_id))
    return tuple(getattr(row, name) for name in lifecycle.WAITING_FIELDS) != seen


def _as_poll(listing: remote.Listing) -> remote.PollResult:
    """The listing as a poll that saw the queue and read nothing else (what apply_poll needs for pending jobs)."""
    return remote.PollResult(
        squeue_ok=True,
        complete=True,
        queued={job_id: job for job_id, (_, job) in listing.jobs.items()},
        positions={(job.partition, job_id): listing.places[job_id] for job_id, (_, job) in listing.jobs.items()
                   if job_id in listing.places},
    )  # fmt: skip
