"""The counts every web process shares (jobs/models/counts.py), in both stores: requests a minute under limits, all
or none, and requests in flight under a cap whose entries expire; and this process's own count while the store is
down. The Redis store's tests need REDIS_URL (make test runs them with scripts/local-services' Redis)."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.db import DatabaseError, connection

from jobs.models import InFlight, SharedCount, counts

pytestmark = pytest.mark.django_db(transaction=True)

NOW = 1_800_000_015.0  # 45 s left in its minute


@pytest.fixture(params=[counts.DATABASE, counts.REDIS])
def store(request: pytest.FixtureRequest, settings: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test once with the database as the store, once with Redis; the clock held still, the store up."""
    url = os.environ.get("REDIS_URL", "")
    if request.param == counts.REDIS and not url:
        pytest.skip("REDIS_URL is not set (make test runs these with scripts/local-services)")
    settings.REDIS_URL = url if request.param == counts.REDIS else ""
    monkeypatch.setattr(counts, "clock", lambda: NOW)
    monkeypatch.setattr(counts, "_down_until", 0.0)
    yield request.param


def fresh(what: str) -> str:
    """A name no other test (nor an earlier run, in Redis) counted under."""
    return f"test-{what}:{uuid.uuid4().hex[:12]}"


def test_a_limit_lets_through_exactly_its_count_in_a_minute(store: str) -> None:
    name = fresh("token")
    answers = [counts.take([(name, 3)]) for _ in range(5)]
    assert answers[:3] == [None, None, None]
    assert answers[3:] == [counts.Full(0, 45), counts.Full(0, 45)]
    assert counts.take([(name, 0)]) is None  # no limit


def test_a_request_refused_by_one_count_counts_in_none(store: str) -> None:
    token, other, user = fresh("token"), fresh("token"), fresh("user")
    assert [counts.take([(token, 2), (user, 3)]) for _ in range(3)] == [None, None, counts.Full(0, 45)]
    assert counts.take([(other, 2), (user, 3)]) is None  # the user's third: their count is full now
    assert counts.take([(other, 2), (user, 3)]) == counts.Full(1, 45)  # the user's, not the token's
    assert counts.take([(token, 2)]) == counts.Full(0, 45)
    assert counts.take([(other, 2)]) is None  # the refused request took nothing of the token's own count


def test_every_count_starts_again_in_the_next_minute(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = fresh("token")
    assert [counts.take([(name, 1)]) for _ in range(2)] == [None, counts.Full(0, 45)]
    monkeypatch.setattr(counts, "clock", lambda: NOW + 60)
    assert [counts.take([(name, 1)]) for _ in range(2)] == [None, counts.Full(0, 45)]


def test_concurrent_callers_on_their_own_connections_never_pass_the_limit_together(store: str) -> None:
    """As web workers do: each thread has a connection of its own (Django's are per thread), all at once."""
    name, user = fresh("token"), fresh("user")
    answers: list[counts.Full | None] = []
    start = threading.Barrier(12)

    def caller() -> None:
        start.wait()
        try:
            for _ in range(5):
                answers.append(counts.take([(name, 25), (user, 100)]))
        finally:
            connection.close()

    threads = [threading.Thread(target=caller) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 60 and answers.count(None) == 25


def test_a_cap_lets_that_many_in_until_one_leaves(store: str) -> None:
    name = fresh("share")
    first, second = counts.enter(name, 2, 90), counts.enter(name, 2, 90)
    assert first is not None and second is not None
    assert counts.enter(name, 2, 90) is None
    assert counts.enter(fresh("share"), 2, 90) is not None  # another user's share
    counts.leave(first)
    third = counts.enter(name, 2, 90)
    assert third is not None and counts.enter(name, 2, 90) is None
    assert counts.enter(name, 0, 90) is not None  # no cap


def test_the_entries_of_a_worker_that_died_count_no_more_after_their_lease(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = fresh("share")
    assert counts.enter(name, 1, 90) is not None  # never left: its worker was killed
    monkeypatch.setattr(counts, "clock", lambda: NOW + 89)
    assert counts.enter(name, 1, 90) is None
    monkeypatch.setattr(counts, "clock", lambda: NOW + 91)
    assert counts.enter(name, 1, 90) is not None


def test_a_renewed_entry_keeps_its_slot_past_its_first_lease(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = fresh("share")
    ticket = counts.enter(name, 1, 90)
    assert ticket is not None
    monkeypatch.setattr(counts, "clock", lambda: NOW + 60)
    counts.renew(ticket, 90)
    monkeypatch.setattr(counts, "clock", lambda: NOW + 120)
    assert counts.enter(name, 1, 90) is None


def test_the_database_store_keeps_one_row_a_name_whatever_the_minute(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.REDIS_URL = ""
    monkeypatch.setattr(counts, "_down_until", 0.0)
    name = fresh("token")
    for minute in range(3):
        monkeypatch.setattr(counts, "clock", lambda minute=minute: NOW + 60 * minute)
        assert counts.take([(name, 5)]) is None
    assert list(SharedCount.objects.filter(name=name).values_list("count", flat=True)) == [1]


def test_a_store_that_fails_is_replaced_by_this_process_count_logged_once_and_asked_again_later(
    store: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any) -> Any:
        raise redis.ConnectionError("refused") if store == counts.REDIS else DatabaseError("locked")

    asked = {"n": 0}

    def counted(*args: Any) -> Any:
        asked["n"] += 1
        return broken()

    monkeypatch.setattr(counts, "_redis_take" if store == counts.REDIS else "_database_take", counted)
    monkeypatch.setattr(counts, "_redis_enter" if store == counts.REDIS else "_database_enter", broken)
    monkeypatch.setattr(counts, "_counted", {})
    moment = {"now": 1000.0}
    monkeypatch.setattr(time, "monotonic", lambda: moment["now"])
    name = fresh("token")
    with caplog.at_level(logging.ERROR, logger="jobs.models.counts"):
        assert [counts.take([(name, 2)]) for _ in range(3)] == [None, None, counts.Full(0, 45)]  # neither open
        assert asked["n"] == 1  # nor asked again on every request
        moment["now"] += counts.DOWN_S
        assert counts.take([(name, 2)]) == counts.Full(0, 45) and asked["n"] == 2  # asked again, still down
    assert len([r for r in caplog.records if "each web process counts on its own" in r.message]) == 1
    share = fresh("share")
    ticket = counts.enter(share, 1, 90)
    assert ticket is not None and ticket.store == counts.MEMORY and counts.enter(share, 1, 90) is None
    counts.leave(ticket)
    assert counts.enter(share, 1, 90) is not None


def test_a_database_entry_is_a_row_until_it_leaves(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.REDIS_URL = ""
    monkeypatch.setattr(counts, "_down_until", 0.0)
    name = fresh("share")
    ticket = counts.enter(name, 3, 90)
    assert ticket is not None and InFlight.objects.filter(name=name).count() == 1
    counts.leave(ticket)
    assert not InFlight.objects.filter(name=name).exists()
