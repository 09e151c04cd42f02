"""What the usage figures remember of the summaries (jobs/usage/memo.py): kept while the summaries' revision stays the
same, forgotten at a new one, never kept before the first run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from jobs.usage import memo


@pytest.fixture(autouse=True)
def nothing_kept() -> Iterator[None]:
    memo.forget()
    yield
    memo.forget()


def test_an_answer_is_kept_while_the_revision_is_the_same() -> None:
    reads: list[str] = []

    def read() -> tuple[str]:
        reads.append("read")
        return ("answer",)

    for _ in range(3):
        assert memo.remembered("r1", "key", read) == ("answer",)
    assert reads == ["read"]
    assert memo.kept("r1", "other key") is None


def test_a_new_revision_forgets_what_was_kept_under_the_old_one() -> None:
    memo.keep("r1", "key", "old")
    assert memo.kept("r2", "key") is None
    memo.keep("r2", "key", "new")
    assert memo.kept("r2", "key") == "new"
    assert memo.kept("r1", "key") is None  # the old revision is never read again once a newer one was


def test_nothing_is_kept_before_the_summaries_first_run() -> None:
    memo.keep("", "key", "answer")
    assert memo.kept("", "key") is None


def test_at_most_size_answers_are_kept_the_least_recently_used_going_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memo, "SIZE", 2)
    memo.keep("r1", "a", 1)
    memo.keep("r1", "b", 2)
    assert memo.kept("r1", "a") == 1  # used: "b" is now the least recently used
    memo.keep("r1", "c", 3)
    assert (memo.kept("r1", "a"), memo.kept("r1", "b"), memo.kept("r1", "c")) == (1, None, 3)
