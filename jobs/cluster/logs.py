"""A job's log (its Slurm output, in its session directory): fetched over SSH by a worker and kept in the cache.

Pages read the cached tail and ask for a fresh one at most once every LOG_REFRESH_S per session, however many
browser tabs poll it; only the worker (and `manage.py sessions log`) runs the SSH command.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from jobs.cluster import remote
from portal import gate, ssh

if TYPE_CHECKING:
    from jobs.models import LLMSession

LOG_REFRESH_S = 5  # how old a live job's cached log may get before a page asks for a fresh one
KEEP_S = 24 * 3600  # how long a fetched log stays in the cache


@dataclass(frozen=True)
class LogTail:
    text: str
    error: str  # why the last fetch failed; empty when it worked
    fetched_at: datetime | None  # None: never fetched yet


def _key(session_id: object) -> str:
    return f"job-log:{session_id}"


def fetch(session: LLMSession, max_bytes: int | None = None) -> str:
    """The tail of the job's output, at most max_bytes, over SSH; raises ssh.SSHError when the cluster is away."""
    limit = max_bytes or settings.PORTAL_LOG_TAIL_BYTES
    account = session.account
    command = gate.command(remote.LOG, [str(session.pk), str(int(limit))], gated=account.restricted)
    return account.run(command, timeout_s=30, max_output_bytes=limit + 1024).stdout


def refresh(session: LLMSession) -> LogTail:
    """Fetch the tail and keep it; a failure is kept as the error, with the text fetched before it."""
    before = cached(session.pk)
    try:
        tail = LogTail(fetch(session), "", timezone.now())
    except ssh.SSHError as exc:
        text = before.text if before else ""
        tail = LogTail(text, f"The log cannot be read right now: {exc}", timezone.now())
    cache.set(_key(session.pk), tail, KEEP_S)
    return tail


def cached(session_id: object) -> LogTail | None:
    tail = cache.get(_key(session_id))
    return tail if isinstance(tail, LogTail) else None


def is_final(session: LLMSession, tail: LogTail | None) -> bool:
    """The tail was read after the job ended: the log will not change any more."""
    return bool(tail and not tail.error and session.ended_at and tail.fetched_at and tail.fetched_at > session.ended_at)


def claim_refresh(session: LLMSession, tail: LogTail | None) -> bool:
    """Whether this caller should ask for a fresh tail: the cached one is missing, or stale and not final, and no
    other caller asked within the last LOG_REFRESH_S."""
    if is_final(session, tail):
        return False
    if tail is not None and tail.fetched_at and timezone.now() - tail.fetched_at < timedelta(seconds=LOG_REFRESH_S):
        return False
    return bool(cache.add(f"{_key(session.pk)}:asked", True, LOG_REFRESH_S))
