"""The embedded broker (kombu's filesystem transport) carries a task to a real Celery worker process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.worker import clean_env, ping_through_worker


def test_a_worker_runs_a_task_sent_through_the_filesystem_broker(tmp_path: Path) -> None:
    log = ping_through_worker(clean_env(tmp_path / "var"))
    assert any("portal.broker:Transport://" in line for line in log)  # kombu filesystem, atomic writes


def test_messages_are_never_seen_half_written(tmp_path: Path) -> None:
    """Writers and a reader race on the broker folder; every message read is whole (kombu's own transport can hand
    a worker an empty file and stop it)."""
    import threading

    from kombu import Connection

    options = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path), "polling_interval": 0.01,
               "control_folder": str(tmp_path / "control")}  # fmt: skip
    body = "x" * 200_000
    sent = 300

    def write(n: int) -> None:
        with Connection("filesystem://", transport="portal.broker:Transport", transport_options=options) as conn:
            queue = conn.SimpleQueue("q")
            for i in range(n):
                queue.put({"i": i, "body": body})

    writers = [threading.Thread(target=write, args=(sent // 3,)) for _ in range(3)]
    for w in writers:
        w.start()
    received = 0
    with Connection("filesystem://", transport="portal.broker:Transport", transport_options=options) as conn:
        queue = conn.SimpleQueue("q")
        while received < sent:
            message = queue.get(timeout=20)
            assert message.payload["body"] == body
            message.ack()
            received += 1
    for w in writers:
        w.join()
    assert received == sent


@pytest.mark.parametrize("transport, torn", [("portal.broker:Transport", False), ("filesystem", True)])
def test_a_reader_in_the_middle_of_a_write_sees_no_torn_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str, torn: bool
) -> None:
    """Run a worker's read while the message is being serialised: kombu's own transport has created the empty file
    by then (the reader gets undecodable bytes); ours has not written anything visible yet."""
    import json
    import queue

    from kombu import Connection
    from kombu.transport import filesystem
    from kombu.utils import json as kombu_json

    import portal.broker

    options = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path), "control_folder": str(tmp_path / "c")}
    seen: list[str] = []
    with Connection("filesystem://", transport=transport, transport_options=options) as conn:
        channel: Any = conn.default_channel

        def dumps_while_reading(payload: object) -> str:
            try:
                filesystem.Channel._get(channel, "q")  # kombu's reader, without our guard
                seen.append("message")
            except json.JSONDecodeError:
                seen.append("torn")
            except queue.Empty:
                seen.append("nothing")
            return kombu_json.dumps(payload)

        monkeypatch.setattr(filesystem, "dumps", dumps_while_reading)
        monkeypatch.setattr(portal.broker, "dumps", dumps_while_reading)
        channel._put("q", {"hello": "world"})
    assert seen == (["torn"] if torn else ["nothing"])
