"""A token's requests a minute, counted in memory and added to the shared count now and then (jobs/use/allowance.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from django.core.cache import cache

from jobs.use import allowance
from portal import rates

NOW = 1_800_000_015.0  # 45 s left in this minute
KEY = "rate:api-token:test:30000000"


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    moment = SimpleNamespace(now=100.0)
    monkeypatch.setattr(rates, "clock", lambda: NOW)
    monkeypatch.setattr(allowance, "time", SimpleNamespace(monotonic=lambda: moment.now))
    monkeypatch.setattr(allowance, "_windows", {})
    monkeypatch.setattr(allowance, "_minute", -1)
    cache.delete(KEY)
    yield moment
    if KEY in allowance._windows:
        added()  # nothing of this test's may land in the next one's count
    cache.delete(KEY)


def added() -> allowance._Window:
    """The window once its addition under way has ended."""
    deadline = time.monotonic() + 10
    window = allowance._windows[KEY]
    while window.busy:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return window


def test_one_process_counts_exactly() -> None:
    assert [allowance.wait_s("api-token:test", 3) for _ in range(5)] == [0, 0, 0, 45, 45]
    assert allowance.wait_s("api-token:test", 0) == 0  # no limit


def test_the_shared_count_is_added_to_at_most_once_a_second(fresh: SimpleNamespace) -> None:
    assert allowance.wait_s("api-token:test", 100) == 0
    assert added().shared == 1 and cache.get(KEY) == 1
    for _ in range(4):
        assert allowance.wait_s("api-token:test", 100) == 0
    assert cache.get(KEY) == 1  # within the second: counted here only
    fresh.now += allowance.ADD_EVERY_S
    assert allowance.wait_s("api-token:test", 100) == 0
    assert added().shared == 6 and cache.get(KEY) == 6  # the five since, in one addition


def test_what_other_processes_counted_holds_once_read_back() -> None:
    cache.set(KEY, 4, 120)  # another worker's requests this minute
    assert allowance.wait_s("api-token:test", 5) == 0
    assert added().shared == 5
    assert allowance.wait_s("api-token:test", 5) == 45


def test_a_request_refused_by_one_count_counts_in_none() -> None:
    user = ("api-user:test", 3)
    assert [allowance.wait_s("api-token:test", 2, user) for _ in range(3)] == [0, 0, 45]
    assert allowance.wait_s("api-token:other", 2, user) == 0  # the user's third: their count is full now
    assert allowance.wait_s("api-token:other", 2, user) == 45
    assert allowance.wait_s("api-token:test", 2) == 45 and allowance.wait_s("api-token:other", 2) == 0
