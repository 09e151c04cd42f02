"""Counts every web process shares, decided atomically in one shared store: requests a minute under a limit (an API
token's, a user's tokens together, a user's Slurm questions) and requests in flight under a cap (fair share on a
shared server). Counted in one process's memory these hold per process only: with two uvicorn workers 120 calls
under a limit of 60 got 82 answers.

- Redis where REDIS_URL is set: one round trip a question, a Lua script that Redis runs alone. A minute's counts are
  keys that expire; a cap's requests are a sorted set of tickets scored by their deadline, so the entries of a
  worker that was killed count no more after LEASE_S.
- The database otherwise, in one transaction a question: a conditional upsert per name (SharedCount: one row a
  name, whose count starts again at 1 when its minute has passed, so old windows leave nothing to purge but the
  rows of names long unused), all or none; a cap's requests are InFlight rows with a deadline, counted and added
  under the name's SharedCount row, which serialises the callers of one name (a row lock on PostgreSQL; SQLite's
  transactions take the write lock at BEGIN, settings' transaction_mode).

When the store fails (Redis down or timing out, the database locked past its busy timeout) a question is answered
from this process's memory instead, never open and never closed: each process then holds every limit on its own
(at most as many times the limit as there are processes), and the store is tried again after DOWN_S. Each outage is
logged once, as an error.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import redis
from django.conf import settings
from django.db import DatabaseError, connection, models, transaction

log = logging.getLogger(__name__)

WINDOW_S = 60  # the counts are per minute
PREFIX = "hpcllm:"  # Redis keys: apart from the cache's (":1:..."), in the same database
TIMEOUT_S = 0.5  # a Redis question that takes longer falls back to memory rather than hold the request
DOWN_S = 5.0  # after a failure, the store is asked again only this much later
PURGE_EVERY = 60  # minutes between two purges of long-unused rows by one process
UNUSED_FOR = 24 * 60  # minutes after which a name's row goes


class SharedCount(models.Model):
    """A name's count in its latest minute (WINDOW_S); for a cap's name, the row its callers lock."""

    name = models.CharField(max_length=150, unique=True)
    minute = models.BigIntegerField(db_index=True)  # whole minutes since the epoch
    count = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.name}: {self.count} in minute {self.minute}"


class InFlight(models.Model):
    """A request in flight under a cap (fair share), until it ends or its deadline passes (a process that died)."""

    name = models.CharField(max_length=150, db_index=True)
    ticket = models.CharField(max_length=32, unique=True)
    deadline = models.FloatField()  # seconds since the epoch (clock())

    class Meta:
        verbose_name = "request in flight"
        verbose_name_plural = "requests in flight"

    def __str__(self) -> str:
        return f"{self.name}: {self.ticket}"


def clock() -> float:
    """The time the windows and deadlines are counted in (seconds since the epoch; tests hold it still)."""
    return time.time()


@dataclass(frozen=True)
class Full:
    """A request `take` did not count: the index of the first count it found full, and the seconds until the next
    minute (Retry-After)."""

    index: int
    wait_s: int


@dataclass(frozen=True)
class Ticket:
    """A request in flight under a cap, as `enter` let it in; `leave` with it. `store` is where it was counted."""

    name: str
    id: str
    store: str


REDIS, DATABASE, MEMORY = "redis", "database", "memory"


def take(counts: Sequence[tuple[str, int]]) -> Full | None:
    """Count one more request under each (name, limit) in this minute, all or none: None when every count was
    within its limit (a limit of 0: none), else what was full, and nothing is counted."""
    limited = [(i, name, limit) for i, (name, limit) in enumerate(counts) if limit > 0]
    if not limited:
        return None
    now = clock()
    minute = int(now // WINDOW_S)
    store = _store()
    try:
        if store == MEMORY:
            index = _memory_take(limited, minute)
        else:
            index = (_redis_take if store == REDIS else _database_take)(limited, minute)
    except (redis.RedisError, DatabaseError):
        _went_down(store)
        index = _memory_take(limited, minute)
    return None if index is None else Full(index, WINDOW_S - int(now % WINDOW_S))


def enter(name: str, cap: int, lease_s: float) -> Ticket | None:
    """One more request in flight under `name`, unless `cap` are already (0: no cap); None when full. The entry
    counts until `leave`, or for `lease_s` unless renewed (`renew`)."""
    ticket = uuid.uuid4().hex
    if cap <= 0:
        return Ticket(name, ticket, "")
    store = _store()
    if store != MEMORY:
        try:
            ask = _redis_enter if store == REDIS else _database_enter
            return Ticket(name, ticket, store) if ask(name, ticket, cap, clock(), lease_s) else None
        except (redis.RedisError, DatabaseError):
            _went_down(store)
    with _lock:
        if len(_open[name]) >= cap:
            return None
        _open[name].add(ticket)
    return Ticket(name, ticket, MEMORY)


def leave(ticket: Ticket) -> None:
    """The request `ticket` let in has ended."""
    try:
        if ticket.store == REDIS:
            _client().zrem(PREFIX + "inflight:" + ticket.name, ticket.id)
        elif ticket.store == DATABASE:
            _execute("leave", [ticket.id])
    except (redis.RedisError, DatabaseError):
        log.warning("could not end %s's request in flight: it counts until its deadline", ticket.name, exc_info=True)
    if ticket.store == MEMORY:
        with _lock:
            _open[ticket.name].discard(ticket.id)
            if not _open[ticket.name]:
                del _open[ticket.name]


def renew(ticket: Ticket, lease_s: float) -> None:
    """The request `ticket` let in is still going: it counts for `lease_s` more."""
    deadline = clock() + lease_s
    try:
        if ticket.store == REDIS:
            _client().zadd(PREFIX + "inflight:" + ticket.name, {ticket.id: deadline}, xx=True)
        elif ticket.store == DATABASE:
            _execute("renew", [deadline, ticket.id])
    except (redis.RedisError, DatabaseError):
        log.warning("could not renew %s's request in flight", ticket.name, exc_info=True)


# --- where to count -------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_down_until = 0.0  # time.monotonic() until which the store is not asked (it failed)
_minute = -1  # the minute _counted holds
_counted: dict[str, int] = {}  # this process's own counts this minute, while the store is down
_open: defaultdict[str, set[str]] = defaultdict(set)  # this process's own tickets, while the store is down


def _store() -> str:
    if time.monotonic() < _down_until:
        return MEMORY
    return REDIS if settings.REDIS_URL else DATABASE


def _went_down(store: str) -> None:
    global _down_until
    with _lock:
        logged = time.monotonic() < _down_until + DOWN_S  # failed again right after the last retry: one outage
        _down_until = time.monotonic() + DOWN_S
    if not logged:
        log.error("the shared counts' store (%s) failed: each web process counts on its own, and the store is tried "
                  "again every %s s", store, DOWN_S, exc_info=True)  # fmt: skip


def _memory_take(limited: list[tuple[int, str, int]], minute: int) -> int | None:
    global _minute
    with _lock:
        if minute != _minute:
            _counted.clear()  # past minutes count no more
            _minute = minute
        for index, name, limit in limited:
            if _counted.get(name, 0) >= limit:
                return index
        for _, name, _ in limited:
            _counted[name] = _counted.get(name, 0) + 1
    return None


# --- Redis ----------------------------------------------------------------------------------------------------------

# KEYS: the names' keys this minute; ARGV[1]: their expiry (s), ARGV[2...]: each key's limit. The index (1-based) of
# the first key at its limit, or 0 once every key is counted.
_TAKE = """
for i, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') >= tonumber(ARGV[i + 1]) then return i end
end
for _, key in ipairs(KEYS) do
  if redis.call('INCR', key) == 1 then redis.call('EXPIRE', key, ARGV[1]) end
end
return 0
"""
# KEYS[1]: the name's sorted set; ARGV: now, the new ticket's deadline, the ticket, the cap, the set's expiry (s).
_ENTER = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


@lru_cache(maxsize=4)
def _redis_of(url: str) -> tuple[redis.Redis, Any, Any]:
    client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
    return client, client.register_script(_TAKE), client.register_script(_ENTER)


def _client() -> redis.Redis:
    return _redis_of(settings.REDIS_URL)[0]


def _redis_take(limited: list[tuple[int, str, int]], minute: int) -> int | None:
    _, script, _ = _redis_of(settings.REDIS_URL)
    keys = [f"{PREFIX}rate:{name}:{minute}" for _, name, _ in limited]
    found = int(script(keys=keys, args=[2 * WINDOW_S, *(limit for _, _, limit in limited)]))
    return limited[found - 1][0] if found else None


def _redis_enter(name: str, ticket: str, cap: int, now: float, lease_s: float) -> bool:
    _, _, script = _redis_of(settings.REDIS_URL)
    args = [now, now + lease_s, ticket, cap, int(lease_s) + 1]
    return bool(script(keys=[PREFIX + "inflight:" + name], args=args))


# --- the database ---------------------------------------------------------------------------------------------------


@cache
def _sql(vendor: str) -> dict[str, str]:
    """The statements, plain SQL as the proxy's lookups (jobs/use/targets.py): a queryset would cost more to compile
    than these take to run. Every value is a parameter."""
    q = connection.ops.quote_name
    counts, name, minute, count = (q(SharedCount._meta.db_table), q("name"), q("minute"), q("count"))
    flights, ticket, deadline = q(InFlight._meta.db_table), q("ticket"), q("deadline")
    return {
        # The row whose lock serialises one name's entries (PostgreSQL locks it until the commit).
        "lock": f"INSERT INTO {counts} ({name}, {minute}, {count}) VALUES (%s, %s, 0) "
        f"ON CONFLICT ({name}) DO UPDATE SET {minute} = excluded.{minute}",
        "expired": f"DELETE FROM {flights} WHERE {name} = %s AND {deadline} < %s",
        "enter": f"INSERT INTO {flights} ({name}, {ticket}, {deadline}) SELECT %s, %s, %s "
        f"WHERE (SELECT COUNT(*) FROM {flights} WHERE {name} = %s) < %s",
        "leave": f"DELETE FROM {flights} WHERE {ticket} = %s",
        "renew": f"UPDATE {flights} SET {deadline} = %s WHERE {ticket} = %s",
        "purge": f"DELETE FROM {counts} WHERE {minute} < %s",
        "purge_flights": f"DELETE FROM {flights} WHERE {deadline} < %s",
    }


@lru_cache(maxsize=8)
def _take_sql(vendor: str, names: int) -> str:
    """One more for each of `names` names in this minute, in one statement; a name whose count has reached its limit
    is left as it is and returns no row. A row of an older minute starts again at 1. Parameters: (name, minute) per
    name, then (name, limit) per name."""
    q = connection.ops.quote_name
    counts, name, minute, count = (q(SharedCount._meta.db_table), q("name"), q("minute"), q("count"))
    limits = " ".join(["WHEN %s THEN %s"] * names)
    return (
        f"INSERT INTO {counts} ({name}, {minute}, {count}) VALUES {', '.join(['(%s, %s, 1)'] * names)} "
        f"ON CONFLICT ({name}) DO UPDATE SET {count} = CASE WHEN {counts}.{minute} = excluded.{minute} "
        f"THEN {counts}.{count} + 1 ELSE 1 END, {minute} = excluded.{minute} "
        f"WHERE {counts}.{minute} <> excluded.{minute} OR {counts}.{count} < CASE excluded.{name} {limits} END "
        f"RETURNING {name}"
    )


def _execute(statement: str, params: list[Any]) -> int:
    with connection.cursor() as cursor:
        cursor.execute(_sql(connection.vendor)[statement], params)
        return int(cursor.rowcount)


_purged_at = -PURGE_EVERY  # the minute of this process's last purge


def _database_take(limited: list[tuple[int, str, int]], minute: int) -> int | None:
    global _purged_at
    # The same order in every statement: two callers that share names never wait on each other in a circle.
    ordered = sorted(limited, key=lambda counted: counted[1])
    params = [p for _, name, _ in ordered for p in (name, minute)] + [p for _, n, limit in ordered for p in (n, limit)]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_take_sql(connection.vendor, len(ordered)), params)
        counted = {str(name) for (name,) in cursor.fetchall()}
        full = [index for index, name, _ in ordered if name not in counted]
        if full:
            transaction.set_rollback(True)  # all or none: what this request counted is taken back
            return full[0]
    if minute - _purged_at >= PURGE_EVERY:
        _purged_at = minute
        _execute("purge", [minute - UNUSED_FOR])
        _execute("purge_flights", [clock() - UNUSED_FOR * 60])
    return None


def _database_enter(name: str, ticket: str, cap: int, now: float, lease_s: float) -> bool:
    with transaction.atomic():
        _execute("lock", [f"inflight:{name}", int(now // WINDOW_S)])
        _execute("expired", [name, now])
        return _execute("enter", [name, ticket, now + lease_s, name, cap]) == 1
