"""The watch task's orchestration (jobs.tasks.watch_sessions): one at a time, a thread per account, accounts that
submit meanwhile taken in. What each account's watch does on a real cluster is tested in tests/e2e/test_watch.py."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.core.cache import cache

from jobs import tasks
from jobs.sessions import lifecycle


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch, settings: Any) -> list[tuple[int, str]]:
    """Accounts 7, then 7 and 9 (9 submits a little later); each watch records its account and thread, then waits."""
    settings.PORTAL_POLL_INTERVAL_S = 3
    started = time.monotonic()
    monkeypatch.setattr(lifecycle, "accounts_to_watch", lambda: [7] if time.monotonic() - started < 0.7 else [7, 9])
    seen: list[tuple[int, str]] = []

    def watch(account_id: int, seconds: float, *, after_poll: lifecycle.AfterPoll) -> int:
        # Each poll of the watch records the batch runs it read (and moves the comparisons on), as the poll task's does.
        assert after_poll is tasks.after_poll
        seen.append((account_id, threading.current_thread().name))
        time.sleep(min(seconds, 1.5))
        return account_id

    monkeypatch.setattr(lifecycle, "watch", watch)
    return seen


def test_the_watch_gives_each_account_a_thread_and_takes_in_new_ones(watched: list[tuple[int, str]]) -> None:
    assert tasks.watch_sessions() >= 7 + 9
    accounts = [account for account, _ in watched]
    assert accounts[:2] == [7, 9] and len({thread for _, thread in watched[:2]}) == 2
    assert cache.get(tasks.WATCH_LOCK) is None  # let go for the next beat


def test_only_one_watch_runs_at_a_time(watched: list[tuple[int, str]]) -> None:
    cache.add(tasks.WATCH_LOCK, True, timeout=60)  # another worker is watching
    assert tasks.watch_sessions() == 0 and watched == []


def test_with_nothing_submitted_the_watch_ends_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "accounts_to_watch", lambda: [])

    def no_waiting(seconds: float) -> None:
        raise AssertionError("the watch waited with nothing to watch")

    monkeypatch.setattr(time, "sleep", no_waiting)  # it must not hold a worker slot for the interval
    assert tasks.watch_sessions() == 0
