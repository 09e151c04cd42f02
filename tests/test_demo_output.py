"""What `make demo` prints: one line per setup step (a failed one with the end of its log), each process's output in
its own file under var/log/, and a short status that fits one screen with the steps above it."""

from __future__ import annotations

import io
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from jobs.management.commands.demo_status import (
    DemoState,
    describe_broker,
    describe_cluster,
    describe_database,
    status_lines,
)

REPO = Path(__file__).resolve().parent.parent
LOGINS = [
    "     admin: username 'admin'  password 'pw-admin'",
    "researcher: username 'researcher'  password 'pw-researcher'",
]
# The demo's setup lines: a heading, six steps (python, database, catalog, cluster, model, processes).
SETUP_LINES = 7


def _state(**over: Any) -> DemoState:
    values: dict[str, Any] = {
        "url": "http://127.0.0.1:8000/",
        "log_dir": "var/log",
        "pids": {"web": 101, "worker": 102, "beat": 103},
        "logins": LOGINS,
        "database": "SQLite var/portal.sqlite3",
        "broker": "Celery broker: files in var/broker (no Redis)",
        "cluster": "local Slurm: 3 nodes with fake GPUs, partitions gpu, gpu_devel; sshd 127.0.0.1:2222",
    }
    return DemoState(**{**values, **over})


def _demo(script: str, var_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `script` in bash after sourcing scripts/demo (which defines its functions and runs nothing)."""
    return subprocess.run(
        ["bash", "-c", f"source scripts/demo; {script}"],
        cwd=REPO,
        env={**os.environ, "PORTAL_VAR_DIR": str(var_dir), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_status_says_where_the_portal_is_how_to_sign_in_and_how_to_stop() -> None:
    text = "\n".join(status_lines(_state()))

    assert "Ready: http://127.0.0.1:8000/   (admin pages: http://127.0.0.1:8000/admin/)" in text
    assert "admin: username 'admin'  password 'pw-admin'" in text
    assert "researcher: username 'researcher'  password 'pw-researcher'" in text
    assert "Ctrl-C stops web, worker and beat; make cluster-down stops the cluster." in text


def test_the_status_names_each_process_with_its_pid_and_log_file() -> None:
    lines = status_lines(_state(process_notes={"worker": "Celery worker: submits, polls, cancels"}))

    worker = next(line for line in lines if line.strip().startswith("worker"))
    assert "Celery worker: submits, polls, cancels" in worker and "pid 102" in worker
    assert worker.endswith(" var/log/worker.log")
    assert any("pid 101" in line and "var/log/web.log" in line for line in lines)
    assert any("pid 103" in line and "var/log/beat.log" in line for line in lines)
    assert "  tail -f var/log/worker.log" in lines


def test_the_status_says_why_the_local_cluster_is_not_there() -> None:
    lines = status_lines(_state(cluster="", cluster_skipped="it needs root"))

    assert "  cluster none: it needs root" in lines
    assert not any("Launch SmolLM2" in line for line in lines)
    assert lines[-1] == "Stop: Ctrl-C stops web, worker and beat."


def test_setup_and_status_fit_one_screen() -> None:
    assert SETUP_LINES + len(status_lines(_state())) <= 40


def test_the_data_line_names_sqlite_or_postgresql_without_a_password(tmp_path: Path) -> None:
    sqlite = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp_path / "var" / "portal.sqlite3")}
    postgres = {
        "ENGINE": "django.db.backends.postgresql", "NAME": "portal", "HOST": "127.0.0.1", "PORT": 55432,
        "PASSWORD": "secret",
    }  # fmt: skip

    assert describe_database(sqlite, tmp_path) == "SQLite var/portal.sqlite3"
    assert describe_database(postgres, tmp_path) == "PostgreSQL 127.0.0.1:55432/portal"


def test_the_broker_is_the_folder_or_redis_without_a_password(tmp_path: Path) -> None:
    assert describe_broker("filesystem://", str(tmp_path / "var" / "broker"), tmp_path) == (
        "Celery broker: files in var/broker (no Redis)"
    )
    assert describe_broker("redis://:secret@127.0.0.1:56379/0", "", tmp_path) == "Celery broker: Redis 127.0.0.1:56379"


def test_the_cluster_line_comes_from_local_clusters_cluster_json(tmp_path: Path) -> None:
    facts = tmp_path / "cluster.json"
    facts.write_text(
        '{"host": "127.0.0.1", "port": 2222, "nodes": ["node1", "node2", "node3"], "partitions": ["gpu", "gpu_devel"]}'
    )

    assert describe_cluster(facts) == (
        "local Slurm: 3 nodes with fake GPUs, partitions gpu, gpu_devel; sshd 127.0.0.1:2222"
    )


def test_the_command_reads_the_sign_ins_from_stdin(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(LOGINS) + "\n"))

    call_command(
        "demo_status", "--url", "http://127.0.0.1:8000/", "--log-dir", "var/log", "--pid", "web=1", "--pid",
        "worker=2", "--pid", "beat=3", "--cluster-skipped", "it needs root",
    )  # fmt: skip

    out = capsys.readouterr().out
    assert "  researcher: username 'researcher'  password 'pw-researcher'" in out
    assert "  cluster none: it needs root" in out
    assert "  data    SQLite " in out


def test_a_setup_step_prints_one_line_and_keeps_its_output_in_a_log(tmp_path: Path) -> None:
    result = _demo("step chatty 'A chatty step' bash -c 'for i in $(seq 50); do echo detail $i; done'", tmp_path)

    assert result.returncode == 0, result.stderr
    # One line: the step, ok, and how long it took (a second or two on a busy machine).
    [line] = result.stdout.splitlines()
    assert re.fullmatch(rf"  {'A chatty step':<36} ok \([0-9]+s\)", line), line
    assert "detail 50" in (tmp_path / "log" / "setup-chatty.log").read_text()


def test_a_failed_step_shows_the_end_of_its_log_and_stops(tmp_path: Path) -> None:
    result = _demo(
        "step broken 'A broken step' bash -c 'echo working; echo no space left >&2; exit 3'; echo went on", tmp_path
    )

    assert result.returncode == 1
    assert "A broken step" in result.stdout and "FAILED (exit 3" in result.stdout
    assert f"The end of {tmp_path}/log/setup-broken.log:" in result.stdout
    assert "  | no space left" in result.stdout
    assert "went on" not in result.stdout


def test_a_step_function_stops_at_its_first_failing_command(tmp_path: Path) -> None:
    """Functions run by a step say `|| return`: bash runs them without `set -e`."""
    result = _demo(
        "local_cluster_fake() { false || return; echo went on; }; step fake 'Fake' local_cluster_fake", tmp_path
    )

    assert result.returncode == 1
    assert "went on" not in (tmp_path / "log" / "setup-fake.log").read_text()


def test_each_portal_process_logs_to_its_own_file_not_the_terminal(tmp_path: Path) -> None:
    serve = tmp_path / "serve"
    serve.write_text('#!/bin/sh\necho "$1: INFO polled 3 sessions"\necho "$1: a warning" >&2\n')
    serve.chmod(0o755)

    result = _demo("start_process web; start_process worker; wait", tmp_path, SERVE=str(serve))

    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    for name in ("web", "worker"):
        log = (tmp_path / "log" / f"{name}.log").read_text()
        assert f"{name}: INFO polled 3 sessions" in log and f"{name}: a warning" in log
