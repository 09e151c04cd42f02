"""The Celery tasks: thin wrappers that take ids, call the plain functions that do the work (jobs/sessions/lifecycle.py,
jobs/batch/, jobs/cluster/), and decide what follows: a retry with backoff for transient errors, a cancel after a
submit. Every account poll they make (poll_account, the watch's, a cancel's) is followed by after_poll:
jobs.batch.progress.after_poll, which records the batch runs it read, then the fine-tune comparisons that wait for
(or are to end) a session it polled.

Beat runs poll_clusters, watch_sessions and keep_services (every PORTAL_POLL_INTERVAL_S), refresh_partitions (every
PORTAL_QUEUE_REFRESH_S), sync_groups (every PORTAL_GROUP_SYNC_S), rediscover (every PORTAL_DISCOVER_EVERY_S,
when set), expire_files (every PORTAL_FILES_SWEEP_S) and summarise_usage (every PORTAL_USAGE_SUMMARY_S).
Task names are explicit, so moving code never strands a queued message.
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from celery import Task, shared_task
from celery.exceptions import MaxRetriesExceededError
from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db import connections, transaction

from catalog import discover, inventory
from catalog.models import Cluster
from jobs.allocations import mail as allocation_mail
from jobs.batch import files, progress, staging
from jobs.cluster import capacity, logs
from jobs.finetune import advancing
from jobs.finetune import lifecycle as finetunes
from jobs.models import LLMSession, State
from jobs.operations import metrics
from jobs.services import health, keep
from jobs.sessions import groups, lifecycle, listing, measuring, notify
from jobs.usage import rollups
from portal import ssh

log = logging.getLogger(__name__)

SUBMIT_MAX_RETRIES = 8


def _backoff_s(retries: int) -> int:
    return min(5 << retries, 300)


@shared_task(bind=True, name="jobs.submit_session", max_retries=SUBMIT_MAX_RETRIES, acks_late=True)
def submit_session(self: Task[Any, Any], session_id: str) -> str:
    """Submit a session's job (lifecycle.submit); retry transient failures with backoff, then give up with the
    reason. A cancel asked for during the submit follows once the job id is known."""
    submitted = lifecycle.submit(session_id, self.request.id)
    metrics.submitted(submitted.outcome)
    if submitted.retry:
        log.warning("submit of %s will be retried: %s", session_id, submitted.message)
        try:
            raise self.retry(countdown=_backoff_s(self.request.retries))
        except MaxRetriesExceededError:
            why = f"could not submit after {SUBMIT_MAX_RETRIES + 1} attempts: {submitted.message}"
            lifecycle.fail(session_id, why, {State.SUBMITTING})
            metrics.submitted("failed")
            return "failed"
    if submitted.cancel_now:
        cancel_session.delay(session_id)
    elif submitted.outcome not in ("not claimed", "failed"):
        watch_sessions.delay()  # a small model may be ready before the next beat: watch it from now on
    return submitted.outcome


@shared_task(name="jobs.keep_services", ignore_result=True, soft_time_limit=60, time_limit=90)
def keep_services() -> int:
    """Beat (and a service created, scaled or woken): replicas that stopped answering their health checks are given
    up (jobs/services/health.py), then every running model service is brought to the replicas it keeps now
    (jobs/services/keep.py); the new replicas are submitted as a launch's are, and those let go cancelled."""
    for session_id in health.check_all():  # replicas that stopped answering: cancelled, and replaced just below
        cancel_session.delay(session_id)
    done = keep.reconcile_all()
    for session_id in done.created:
        submit_session.delay(session_id)
    for session_id in done.cancel:
        cancel_session.delay(session_id)
    return len(done.created)


@shared_task(name="jobs.poll_clusters", ignore_result=True)
def poll_clusters() -> int:
    """Beat: one poll per (cluster, account) with live sessions, or per cluster where it has a status account; a new
    submit for sessions whose submit was lost; expiry warnings; idle auto-cancel."""
    for session_id in lifecycle.lost_submits():
        submit_session.delay(session_id)
    for session_id in lifecycle.lost_cancels():
        cancel_session.delay(session_id)
    for run_id in staging.lost():
        stage_batch.delay(run_id)
    for comparison_id in advancing.to_advance():  # a session that ended unpolled (its submit refused) included
        advance_comparison.delay(comparison_id)
    planned = listing.plan()
    for cluster_id in planned.clusters:
        poll_cluster.apply_async((cluster_id,), expires=settings.PORTAL_POLL_INTERVAL_S * 2)
    for account_id in planned.accounts:
        poll_account.apply_async((account_id,), expires=settings.PORTAL_POLL_INTERVAL_S * 2)
    notify.warn_expiring()
    cancel_idle()
    return len(planned.clusters) + len(planned.accounts)


@shared_task(name="jobs.poll_cluster", ignore_result=True, soft_time_limit=120, time_limit=150)
def poll_cluster(cluster_id: int) -> int:
    """A cluster with a status account: one listing of all its portal jobs settles the accounts whose sessions all
    wait in the queue; the others are polled on their own (listing.py)."""
    cycle = listing.cycle(cluster_id)
    for account_id in cycle.own:
        poll_account.apply_async((account_id,), expires=settings.PORTAL_POLL_INTERVAL_S * 2)
    return cycle.settled


def cancel_idle() -> int:
    """Cancel the running sessions that were idle as long as their owners allowed, and tell the owners."""
    idle = lifecycle.idle_sessions()
    for session in idle:
        why = f"idle for {session.idle_cancel_min} minutes: cancelled automatically"
        if lifecycle.mark_cancel(session.pk, why, end_reason=why):
            cancel_session.delay(str(session.pk))
        notify.session_idle_cancelled(str(session.pk))
    return len(idle)


WATCH_LOCK = "jobs:watch-sessions"
WATCH_NEW_ACCOUNTS_S = 0.5  # how often the watch looks for accounts that have just submitted


@shared_task(name="jobs.watch_sessions", ignore_result=True)
def watch_sessions() -> int:
    """Beat, with each poll, and after each submit: until the next beat, every account with submitted sessions waits
    on its login host for a server to become ready or a job to stop, and is polled the moment one does
    (lifecycle.watch), so a session shows Running within a second of its health check rather than at the next poll.
    One task at a time does it for all accounts, in one worker slot (a thread each over the pooled connections);
    accounts that submit meanwhile join it within WATCH_NEW_ACCOUNTS_S."""
    seconds = max(1.0, settings.PORTAL_POLL_INTERVAL_S - 0.5)
    if not cache.add(WATCH_LOCK, True, timeout=int(seconds) + 30):
        return 0
    try:
        deadline = time.monotonic() + seconds
        watching: dict[int, Future[int]] = {}
        with ThreadPoolExecutor(max_workers=settings.PORTAL_WATCH_THREADS) as threads:
            while (left := deadline - time.monotonic()) >= 1:
                for account_id in lifecycle.accounts_to_watch():
                    if account_id not in watching or watching[account_id].done():
                        watching[account_id] = threads.submit(_watch_one, account_id, left)
                if not watching:
                    break  # nothing submitted anywhere: the next beat or submit starts the watch again
                time.sleep(WATCH_NEW_ACCOUNTS_S)
        return sum(f.result() for f in watching.values())
    finally:
        cache.delete(WATCH_LOCK)


def _watch_one(account_id: int, seconds: float) -> int:
    try:
        return lifecycle.watch(account_id, seconds, after_poll=after_poll)
    except Exception:  # one account's trouble must not end the others' watch; the regular poll still runs
        log.exception("watching the sessions of account %s failed", account_id)
        return 0
    finally:
        connections.close_all()  # this thread's own database connection


@shared_task(name="jobs.poll_account", ignore_result=True)
def poll_account(account_id: int) -> dict[str, int]:
    """One account's poll (lifecycle.poll), then its batch runs from what it read (the engine sits above the
    sessions, so the poll leaves them to its caller)."""
    polled = lifecycle.poll(account_id)
    after_poll(polled)
    return polled.counts


def after_poll(polled: lifecycle.Polled) -> None:
    """What an account's poll read: on its batch runs, then on the comparisons with a session of their own among
    the sessions polled (a comparison waits for it to run, and ends it once both batch runs have)."""
    progress.after_poll(polled)
    for comparison_id in advancing.to_advance(polled.session_ids):
        try:
            _advance(comparison_id)
        except Exception:  # one comparison's trouble must not stop the poll's others; beat asks again
            log.exception("moving comparison %s along failed", comparison_id)


def _advance(comparison_id: str) -> str:
    """advancing.advance, then what it asks sent on once its writes have committed: the batch runs it started to
    the cluster, the session it ended to scancel."""
    step = advancing.advance(comparison_id)
    for run_id in step.staged:
        transaction.on_commit(functools.partial(stage_batch.delay, run_id))
    if step.cancel:
        transaction.on_commit(functools.partial(cancel_session.delay, step.cancel))
    return step.outcome


@shared_task(name="jobs.advance_comparison", ignore_result=True, acks_late=True)
def advance_comparison(comparison_id: str) -> str:
    """A comparison that launched its session, moved along (advancing.advance: each step claimed once)."""
    return _advance(comparison_id)


@shared_task(bind=True, name="jobs.cancel_session", max_retries=40, acks_late=True)
def cancel_session(self: Task[Any, Any], session_id: str) -> str:
    """scancel the session's job, then confirm through polls until Slurm says it has ended."""
    ended = lifecycle.cancel(session_id, after_poll=after_poll)
    if ended is None:
        raise self.retry(countdown=3)
    return ended


@shared_task(name="jobs.fetch_log", ignore_result=True)
def fetch_log(session_id: str) -> None:
    """Fetch a job's log tail into the cache, where its page reads it."""
    logs.refresh(LLMSession.objects.select_related("account__cluster").get(pk=session_id))


@shared_task(name="jobs.measure_sessions", ignore_result=True, soft_time_limit=240, time_limit=300)
def measure_sessions() -> int:
    """Beat: the measured figures of the sessions due (jobs/sessions/measuring.py), one bounded read of a job's log
    each."""
    return measuring.measure_due()


@shared_task(name="jobs.refresh_partitions", ignore_result=True)
def refresh_partitions() -> int:
    """Beat: idle GPUs and pending demand of every cluster with a service account or one marked trusted, one SSH
    command each. The other clusters' figures are off: whatever they had is dropped, and their queue is unknown."""
    capacity.forget_unread()
    refreshed = 0
    for cluster in capacity.readable_clusters().exclude(host_key=""):
        try:
            capacity.refresh_cluster(cluster)
            refreshed += 1
        except (capacity.QueueError, ssh.SSHError) as exc:
            if isinstance(exc, ssh.SSHError):
                metrics.ssh_error(cluster.slug, "partitions")
            log.warning("partition state of %s not refreshed: %s", cluster.slug, exc)
    return refreshed


@shared_task(name="jobs.sync_groups", ignore_result=True)
def sync_groups() -> int:
    """Beat: every group mapped to the cluster's groups or Slurm accounts reads its members (a source that cannot be
    read keeps its group as it was and its error for the admin)."""
    synced = groups.sync_all()
    for result in synced:
        for error in result.errors:
            log.warning("group %s not synced: %s", result.group, error)
    return len(synced)


@shared_task(name="jobs.rediscover", ignore_result=True)
def rediscover() -> int:
    """Beat (PORTAL_DISCOVER_EVERY_S): read each discovered cluster's Slurm again with the account it was discovered
    with; keep the differences as its drift and mark what Slurm no longer lists, change nothing else."""
    checked = 0
    for cluster in Cluster.objects.filter(discovered_with__isnull=False).select_related("discovered_with__cluster"):
        account = cluster.discovered_with
        assert account is not None
        try:
            discover.check(discover.plan(cluster, discover.read_slurm(account)), account)
            checked += 1
        except (ssh.SSHError, ValidationError, inventory.DiscoverError) as exc:
            if isinstance(exc, ssh.SSHError):
                metrics.ssh_error(cluster.slug, "discover")
            log.warning("%s not rediscovered: %s", cluster.slug, exc)
    return checked


@shared_task(bind=True, name="jobs.stage_batch", max_retries=SUBMIT_MAX_RETRIES, acks_late=True)
def stage_batch(self: Task[Any, Any], run_id: str) -> str:
    """Send a run on a running session to the cluster (staging.stage: once, however often it is asked); retry
    transient failures with backoff, then give the run up with the reason."""
    staged = staging.stage(run_id)
    if staged.outcome == "retry":
        try:
            raise self.retry(countdown=_backoff_s(self.request.retries))
        except MaxRetriesExceededError:
            staging.fail(run_id, f"could not send the run to the cluster: {staged.message}")
            return "failed"
    if staged.outcome == "failed":
        staging.fail(run_id, f"could not send the run to the cluster: {staged.message}")
    return staged.outcome


@shared_task(bind=True, name="jobs.stop_batch", max_retries=SUBMIT_MAX_RETRIES, acks_late=True)
def stop_batch(self: Task[Any, Any], run_id: str) -> bool:
    """Ask the job to stop a run's runner; retried while the cluster cannot be asked."""
    if not staging.stop(run_id):
        raise self.retry(countdown=_backoff_s(self.request.retries))
    return True


@shared_task(bind=True, name="jobs.submit_finetune", max_retries=SUBMIT_MAX_RETRIES, acks_late=True)
def submit_finetune(self: Task[Any, Any], run_id: str) -> str:
    """Submit a fine-tune run's job (jobs/finetune/lifecycle.submit), as a session's: transient failures retried with
    backoff, then the run failed with the reason; a cancel asked for meanwhile follows once the job id is known."""
    submitted = finetunes.submit(run_id, self.request.id)
    if submitted.retry:
        log.warning("submit of fine-tune run %s will be retried: %s", run_id, submitted.message)
        try:
            raise self.retry(countdown=_backoff_s(self.request.retries))
        except MaxRetriesExceededError:
            finetunes.fail(run_id, f"could not submit after {SUBMIT_MAX_RETRIES + 1} attempts: {submitted.message}")
            return "failed"
    if submitted.cancel_now:
        cancel_finetune.delay(run_id)
    return submitted.outcome


@shared_task(name="jobs.poll_finetunes", ignore_result=True, soft_time_limit=120, time_limit=150)
def poll_finetunes() -> int:
    """Beat: a new submit for runs whose submit was lost, then one poll per account with live fine-tune runs (their
    jobs and their trainers' progress)."""
    for run_id in finetunes.lost_submits():
        submit_finetune.delay(run_id)
    for account_id in finetunes.accounts_to_poll():
        poll_finetune_account.apply_async((account_id,), expires=settings.PORTAL_POLL_INTERVAL_S * 2)
    return len(finetunes.accounts_to_poll())


@shared_task(name="jobs.poll_finetune_account", ignore_result=True, soft_time_limit=90, time_limit=120)
def poll_finetune_account(account_id: int) -> int:
    return finetunes.poll(account_id)


@shared_task(bind=True, name="jobs.cancel_finetune", max_retries=40, acks_late=True)
def cancel_finetune(self: Task[Any, Any], run_id: str) -> str:
    """scancel a fine-tune run's job, then confirm through polls until Slurm says it has ended."""
    ended = finetunes.cancel(run_id)
    if ended is None:
        raise self.retry(countdown=3)
    return ended


@shared_task(name="jobs.mail_allocations", ignore_result=True, soft_time_limit=60, time_limit=90)
def mail_allocations() -> int:
    """Beat: mail the holders and managers of allocations at their soft threshold or spent (once per period each)."""
    return allocation_mail.send_due()


@shared_task(name="jobs.summarise_usage", ignore_result=True, soft_time_limit=540, time_limit=600)
def summarise_usage() -> int:
    """Beat: summarise the proxy's request rows for the usage pages, catching up after downtime a few days per
    transaction, and delete the raw rows past PORTAL_USAGE_RAW_DAYS (jobs/usage/rollups.py). Idempotent: whole days
    are rebuilt under a lock on the watermark, so a run cut short or run twice leaves the same figures."""
    return rollups.summarise()


@shared_task(name="jobs.expire_files", ignore_result=True)
def expire_files() -> int:
    """Beat: delete the Files API's uploads whose time has come (jobs/batch/files.py)."""
    return files.sweep()
