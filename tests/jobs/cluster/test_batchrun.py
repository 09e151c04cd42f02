"""batchrun.py, the batch runner on the compute node: real runner processes against small real HTTP servers that
answer as llama-server does, fail on purpose, or stop answering; killed and started again, it answers every line
exactly once."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.batch.inputs import Options, normalize
from jobs.cluster.jobscript import SCRIPTS_DIR
from tests.jobs.cluster.modelserver import KEY, Model, serving


@pytest.fixture
def server() -> Iterator[str]:
    with serving() as url:
        yield url


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def prepare(tmp_path: Path, prompts: list[str]) -> Path:
    out = io.BytesIO()
    normalize(io.BytesIO("\n".join(prompts).encode()), out, Options(format="text"))
    (tmp_path / "requests.jsonl").write_bytes(out.getvalue())
    (tmp_path / "api_key").write_text(KEY)
    return tmp_path


def command(run_dir: Path, *servers: str, concurrency: int = 2) -> list[str]:
    args = [sys.executable, str(SCRIPTS_DIR / "batchrun.py"), "--requests", str(run_dir / "requests.jsonl"),
            "--results", str(run_dir / "results.jsonl"), "--progress", str(run_dir / "progress.json"),
            "--output", str(run_dir / "output.jsonl"), "--key-file", str(run_dir / "api_key"), "--model", "served",
            "--concurrency", str(concurrency), "--timeout", "10"]  # fmt: skip
    for url in servers:
        args += ["--server", url]
    return args


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def test_every_line_is_answered_once_and_the_output_keeps_the_input_order(server: str, tmp_path: Path) -> None:
    prompts = [f"prompt {i}" for i in range(40)]
    run_dir = prepare(tmp_path, prompts)
    done = subprocess.run(command(run_dir, server, concurrency=4), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    output = records(run_dir / "output.jsonl")
    assert [r["line"] for r in output] == list(range(1, 41))
    assert [r["response"]["choices"][0]["message"]["content"] for r in output] == [p.upper() for p in prompts]
    assert sorted(r["line"] for r in records(run_dir / "results.jsonl")) == list(range(1, 41))
    assert {s["model"] for s in Model.seen} == {"served"} and {s["auth"] for s in Model.seen} == {f"Bearer {KEY}"}
    progress = json.loads((run_dir / "progress.json").read_text())
    assert (progress["state"], progress["done"], progress["failed"], progress["remaining"]) == ("finished", 40, 0, 0)
    assert (progress["prompt_tokens"], progress["completion_tokens"]) == (120, 80)


def test_errors_that_may_pass_are_tried_again_and_a_refused_prompt_is_recorded_and_passed(
    server: str, tmp_path: Path
) -> None:
    run_dir = prepare(tmp_path, ["fine", "FLAKY one", "FAIL this", "fine again"])
    done = subprocess.run(command(run_dir, server), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    output = {r["id"]: r for r in records(run_dir / "output.jsonl")}
    assert output["line-2"]["attempts"] == 3 and output["line-2"]["error"] is None
    assert output["line-3"]["response"] is None and "HTTP 400" in output["line-3"]["error"]
    assert "too long" in output["line-3"]["error"] and Model.tries["FAIL this"] == 1  # a 400 is not tried again
    progress = json.loads((run_dir / "progress.json").read_text())
    assert (progress["done"], progress["failed"]) == (3, 1)


def test_a_dead_replicas_prompts_go_to_the_live_one(server: str, tmp_path: Path) -> None:
    run_dir = prepare(tmp_path, [f"p{i}" for i in range(20)])
    done = subprocess.run(command(run_dir, closed_port(), server), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    output = records(run_dir / "output.jsonl")
    assert len(output) == 20 and all(r["error"] is None for r in output)


def test_killed_mid_run_and_started_again_it_answers_each_line_exactly_once(server: str, tmp_path: Path) -> None:
    Model.delay_s = 0.05
    run_dir = prepare(tmp_path, [f"q{i}" for i in range(60)])
    first = subprocess.Popen(command(run_dir, server, concurrency=3))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until some, not all, are recorded
        results = run_dir / "results.jsonl"
        if results.exists() and len(results.read_bytes().splitlines()) >= 15:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    recorded = len(records(run_dir / "results.jsonl"))
    assert 15 <= recorded < 60
    with open(run_dir / "results.jsonl", "ab") as f:
        f.write(b'{"line": 59, "id": "line-59", "err')  # a write the kill tore in half
    Model.delay_s = 0.0
    again = subprocess.run(command(run_dir, server), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    answered = records(run_dir / "results.jsonl")
    assert sorted(r["line"] for r in answered) == list(range(1, 61))  # each once: none lost, none twice
    assert [r["line"] for r in records(run_dir / "output.jsonl")] == list(range(1, 61))
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["answered_this_start"] == 60 - recorded


def test_sigterm_stops_it_and_keeps_what_is_done(server: str, tmp_path: Path) -> None:
    Model.delay_s = 0.1
    run_dir = prepare(tmp_path, [f"s{i}" for i in range(100)])
    runner = subprocess.Popen(command(run_dir, server))
    time.sleep(1.0)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 3  # not complete
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["state"] == "stopped" and 0 < progress["done"] < 100
    assert progress["done"] == len(records(run_dir / "results.jsonl"))
    assert not (run_dir / "output.jsonl").exists()


def test_a_second_runner_of_the_same_run_is_refused(server: str, tmp_path: Path) -> None:
    Model.delay_s = 0.2
    run_dir = prepare(tmp_path, [f"r{i}" for i in range(20)])
    first = subprocess.Popen(command(run_dir, server))
    try:
        time.sleep(0.5)
        second = subprocess.run(command(run_dir, server), capture_output=True, text=True, timeout=30)
        assert second.returncode != 0 and "another runner" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
    assert os.path.exists(run_dir / "results.jsonl")


def test_on_a_llama_server_with_adapters_every_request_asks_for_the_base_weights(server: str, tmp_path: Path) -> None:
    run_dir = prepare(tmp_path, ["a", "b"])
    done = subprocess.run([*command(run_dir, server), "--base-weights"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [s["lora"] for s in Model.seen] == [[{"id": 0, "scale": 0.0}]] * 2  # adapters it does not list: at 0
