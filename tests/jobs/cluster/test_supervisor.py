"""supervisor.py, batch supervision on the compute node, as real processes: which runs get a runner, the one restart
policy, giving a run up, stop marks, and ending with the job. A stand-in runner (a script that fails, hangs or
finishes as its run's folder says) tests the policy; the real batchrun.py against a real HTTP server tests the whole."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from jobs.batch.inputs import Options, normalize
from jobs.cluster import layout
from jobs.cluster.jobscript import SCRIPTS_DIR
from tests.jobs.cluster.modelserver import KEY, serving

SUPERVISOR = SCRIPTS_DIR / "supervisor.py"
NAMES = layout.NAMES
# A runner that does, on its Nth start, the Nth word of its folder's `plan` (the last word ever after): "ok" writes the
# output and exits 0, "fail" exits 3, "killed" dies of SIGKILL, "hang" waits to be stopped (SIGTERM: exit 143).
STAND_IN = """
import os, pathlib, signal, sys, time
args = sys.argv[1:]
folder = pathlib.Path(args[args.index("--requests") + 1]).parent
starts = folder / "starts"
count = int(starts.read_text()) + 1 if starts.exists() else 1
(folder / "starts.tmp").write_text(str(count))
(folder / "starts.tmp").replace(starts)  # whole or not at all: the test reads it meanwhile
plan = (folder / "plan").read_text().split()
what = plan[min(count, len(plan)) - 1]
(folder / "argv").write_text("\\n".join(args))
if what == "ok":
    pathlib.Path(args[args.index("--output") + 1]).write_text("{}\\n")
    sys.exit(0)
if what == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
if what == "hang":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    time.sleep(60)
sys.exit(3)
"""


def layout_env() -> dict[str, str]:
    """The names the job's shell hands the supervisor, from the layout as the job script gets them."""
    return {**os.environ, **{f.name.upper(): getattr(NAMES, f.name) for f in fields(NAMES)}}


@pytest.fixture
def batch_dir(tmp_path: Path) -> Path:
    (tmp_path / NAMES.api_key_file).write_text(KEY)
    (tmp_path / "runner.py").write_text(STAND_IN)
    path = tmp_path / NAMES.batch_dir
    path.mkdir()
    return path


def add_run(batch_dir: Path, plan: str = "ok", start: bool = True, lines: int = 3) -> Path:
    folder = batch_dir / str(uuid.uuid4())
    folder.mkdir()
    prompts = (json.dumps({"line": i, "body": {"messages": []}}) + "\n" for i in range(1, lines + 1))
    (folder / NAMES.requests_file).write_text("".join(prompts))
    (folder / "plan").write_text(plan)
    if start:
        (folder / NAMES.start_mark).touch()
    return folder


def supervise(batch_dir: Path, *args: str, runner: Path | None = None, server: str = "http://127.0.0.1:9") -> list[str]:
    runner = runner or batch_dir.parent / "runner.py"
    return [
        sys.executable, str(SUPERVISOR), "--batch-dir", str(batch_dir), "--runner", str(runner),
        "--key-file", str(batch_dir.parent / NAMES.api_key_file), "--model", "served", "--server", server,
        "--interval", "0.05", *args,
    ]  # fmt: skip


def starts(folder: Path) -> int:
    path = folder / "starts"
    return int(path.read_text()) if path.exists() else 0


def wait_until(condition: Callable[[], bool], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def session_mode(batch_dir: Path) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    """Start the supervisor for runs on a running session; it is stopped (SIGTERM) at the end."""
    started: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        process = subprocess.Popen(supervise(batch_dir), env=layout_env(), stdout=subprocess.PIPE, text=True)
        started.append(process)
        return process

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


def test_a_launch_ends_with_its_run_once_the_runner_finished(batch_dir: Path) -> None:
    run = add_run(batch_dir, "ok", start=False)  # a launch's run has no start mark: it came with the job
    done = subprocess.run(supervise(batch_dir, "--run", run.name, "--concurrency", "7"), env=layout_env(),
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert starts(run) == 1 and (run / NAMES.output_file).exists()
    argv = (run / "argv").read_text().split("\n")
    assert argv[argv.index("--concurrency") + 1] == "7" and argv[argv.index("--model") + 1] == "served"
    assert "--base-weights" not in argv


def test_a_llama_server_with_adapters_has_its_runners_ask_for_the_base_weights(batch_dir: Path) -> None:
    run = add_run(batch_dir, "ok", start=False)
    done = subprocess.run(supervise(batch_dir, "--run", run.name, "--base-weights"), env=layout_env(),
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--base-weights" in (run / "argv").read_text().split("\n")


def test_a_runner_that_stops_is_started_again_and_goes_on(batch_dir: Path) -> None:
    run = add_run(batch_dir, "fail fail ok", start=False)
    done = subprocess.run(supervise(batch_dir, "--run", run.name), env=layout_env(), capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stdout
    assert starts(run) == 3 and not (run / NAMES.run_error_file).exists()
    assert f"starting the runner of batch run {run.name} again (2 of 5 restarts)" in done.stdout


def test_a_runner_killed_by_a_signal_is_reported_as_the_shell_would(batch_dir: Path) -> None:
    run = add_run(batch_dir, "killed ok", start=False)
    done = subprocess.run(supervise(batch_dir, "--run", run.name), env=layout_env(), capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert done.returncode == 0 and f"the runner of batch run {run.name} stopped with code 137" in done.stdout


@pytest.mark.parametrize("launch", [True, False], ids=["launch", "on a session"])
def test_a_runner_that_keeps_stopping_is_given_up_after_the_same_restarts_either_way(
    batch_dir: Path, launch: bool, session_mode: Callable[[], subprocess.Popen[str]]
) -> None:
    """One restart policy for both kinds of run: RESTARTS more starts after the first, then the run's error file."""
    run = add_run(batch_dir, "fail", start=not launch)
    if launch:
        done = subprocess.run(supervise(batch_dir, "--run", run.name), env=layout_env(), capture_output=True,
                              text=True, timeout=30)  # fmt: skip
        assert done.returncode == 1
    else:
        session_mode()
        wait_until((run / NAMES.run_error_file).exists)
        time.sleep(0.3)  # nothing starts it again
    assert starts(run) == 6
    assert (run / NAMES.run_error_file).read_text() == (
        "its runner stopped with code 3, 6 times; what it answered is kept\n"
    )


def test_a_launch_whose_requests_are_missing_is_given_up(batch_dir: Path) -> None:
    run = add_run(batch_dir, start=False)
    (run / NAMES.requests_file).unlink()
    done = subprocess.run(supervise(batch_dir, "--run", run.name), env=layout_env(), capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert done.returncode == 1 and starts(run) == 0
    assert "its requests are missing" in (run / NAMES.run_error_file).read_text()


def test_on_a_session_only_runs_with_a_start_mark_get_a_runner(
    batch_dir: Path, session_mode: Callable[[], subprocess.Popen[str]]
) -> None:
    staged, uploading = add_run(batch_dir, "ok"), add_run(batch_dir, "ok", start=False)
    session_mode()
    wait_until((staged / NAMES.output_file).exists)
    later = add_run(batch_dir, "ok")  # a run staged while the supervisor runs
    wait_until((later / NAMES.output_file).exists)
    assert starts(uploading) == 0
    (uploading / NAMES.start_mark).touch()
    wait_until((uploading / NAMES.output_file).exists)
    time.sleep(0.3)
    assert [starts(r) for r in (staged, uploading, later)] == [1, 1, 1]  # a finished run is not started again


def test_a_stop_mark_stops_the_runner_and_nothing_starts_it_again(
    batch_dir: Path, session_mode: Callable[[], subprocess.Popen[str]]
) -> None:
    run = add_run(batch_dir, "hang")
    session_mode()
    wait_until(lambda: starts(run) == 1)
    (run / NAMES.stop_mark).touch()
    wait_until(lambda: not any(f"--requests {run}" in " ".join(p) for p in running_argvs()))
    time.sleep(0.3)
    assert starts(run) == 1 and not (run / NAMES.run_error_file).exists()


def test_a_run_ended_before_a_requeue_is_left_alone(batch_dir: Path) -> None:
    finished, given_up = add_run(batch_dir, start=False), add_run(batch_dir, start=False)
    (finished / NAMES.output_file).write_text("{}\n")
    (given_up / NAMES.run_error_file).write_text("its runner stopped with code 3, 6 times\n")
    codes = [
        subprocess.run(supervise(batch_dir, "--run", r.name), env=layout_env(), timeout=30).returncode
        for r in (finished, given_up)
    ]
    assert codes == [0, 1] and starts(finished) == starts(given_up) == 0


def test_the_supervisor_stops_its_runners_when_the_job_stops_it(
    batch_dir: Path, session_mode: Callable[[], subprocess.Popen[str]]
) -> None:
    run = add_run(batch_dir, "hang")
    supervisor = session_mode()
    wait_until(lambda: starts(run) == 1)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(10) == 143
    assert not any(f"--requests {run}" in " ".join(p) for p in running_argvs())


def test_the_supervisor_ends_with_the_jobs_shell(batch_dir: Path) -> None:
    """A job shell killed outright (SIGKILL: no trap runs) leaves no supervisor or runner behind."""
    run = add_run(batch_dir, "hang")
    command = " ".join(f"'{word}'" for word in supervise(batch_dir)) + " & wait"
    shell = subprocess.Popen(["bash", "-c", command], env=layout_env())
    wait_until(lambda: starts(run) == 1)
    shell.kill()
    shell.wait(10)
    wait_until(
        lambda: not any(str(SUPERVISOR) in " ".join(p) and str(batch_dir) in " ".join(p) for p in running_argvs())
    )
    wait_until(lambda: not any(f"--requests {run}" in " ".join(p) for p in running_argvs()))


def test_without_the_layouts_names_it_refuses_to_guess(batch_dir: Path) -> None:
    env = {k: v for k, v in layout_env().items() if k != "STOP_MARK"}
    done = subprocess.run(supervise(batch_dir), env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "STOP_MARK" in done.stderr


def test_with_the_real_runner_every_line_is_answered_once(batch_dir: Path) -> None:
    run = add_run(batch_dir, start=False, lines=0)
    requests = io.BytesIO()
    normalize(io.BytesIO("\n".join(f"prompt {i}" for i in range(1, 21)).encode()), requests, Options(format="text"))
    (run / NAMES.requests_file).write_bytes(requests.getvalue())
    with serving() as url:
        argv = supervise(batch_dir, "--run", run.name, runner=SCRIPTS_DIR / "batchrun.py", server=url)
        done = subprocess.run(argv, env=layout_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    output = [json.loads(line) for line in (run / NAMES.output_file).read_text().splitlines()]
    assert [r["line"] for r in output] == list(range(1, 21))
    assert output[0]["response"]["choices"][0]["message"]["content"] == "PROMPT 1"


def running_argvs() -> list[list[str]]:
    """The command lines of this machine's processes (a runner's shows its run folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw, stat = (entry / "cmdline").read_bytes(), (entry / "stat").read_text()
            except OSError:  # it ended meanwhile
                continue
            if raw and stat.rsplit(") ", 1)[-1][:1] != "Z":
                found.append(raw.decode(errors="replace").rstrip("\0").split("\0"))
    return found
