"""A batch run's results as jobs.batch.staging.results streams them from the cluster (runner records, one a line), for
the tests of the downloads: the first record at once, the others only once the test has seen the first bytes, and
whether the stream from the cluster was closed."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator

import pytest

from jobs.batch import staging

WAIT_S = 10.0  # how long the cluster's stream waits for the client to see its first record


def record(n: int) -> bytes:
    response = {"choices": [{"message": {"role": "assistant", "content": f"answer {n}"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2}}  # fmt: skip
    return json.dumps({"line": n, "id": f"line-{n}", "attempts": 1, "latency_s": 0.1, "error": None,
                       "response": response}).encode()  # fmt: skip


class Results:
    """staging.results for every run: `count` records (endless when None), held back after the first until `seen`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int | None = 3) -> None:
        self.count = count
        self.seen = threading.Event()
        self.closed = threading.Event()
        monkeypatch.setattr(staging, "results", lambda run: (False, self.stream()))

    def stream(self) -> Iterator[bytes]:
        try:
            yield record(1)
            if not self.seen.wait(WAIT_S):
                raise AssertionError("the download held its first bytes back until the cluster had sent the rest")
            rest = itertools.count(2) if self.count is None else range(2, self.count + 1)
            yield from (record(n) for n in rest)
        finally:
            self.closed.set()
