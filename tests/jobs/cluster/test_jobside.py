"""The job side's shell by concern (skeleton.sh, server.sh, keyproxy.sh, batch.sh), run by bash on this machine as a
job runs it, against real processes: a Python HTTP server as the model server, the real keyproxy.py, supervisor.py
and batchrun.py. staging.sh has its own file (test_staging.py)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from jobs.batch.inputs import Options, normalize
from jobs.cluster import layout
from jobs.cluster.jobscript import SCRIPTS_DIR
from tests.jobs.cluster import jobside
from tests.jobs.cluster.modelserver import KEY, Model, serving

NAMES = layout.NAMES


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def session() -> str:
    return str(uuid.uuid4())


def directory(home: Path, session: str) -> Path:
    return jobside.session_dir(home, session)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1][:1]
    except OSError:
        return False
    return state != "Z"


class Health(BaseHTTPRequestHandler):
    """A model server's health and one API route: /health 200, /loading 503, /v1/models says who asked."""

    def do_GET(self) -> None:
        status = {"/health": 200, "/loading": 503}.get(self.path, 200)
        body = json.dumps({"path": self.path, "authorization": self.headers.get("Authorization")}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield int(httpd.server_address[1])
    httpd.shutdown()


# ---- skeleton.sh ---------------------------------------------------------------------------------------------------


def test_a_failing_job_says_why_in_its_error_file_and_exits_non_zero(home: Path, session: str) -> None:
    done = jobside.run(home, 'start_traps\nfail "no GPU on $(hostname -s)"', {"SESSION_ID": session})
    assert done.returncode == 1
    error = directory(home, session) / NAMES.error_file
    assert error.read_text().startswith("no GPU on ") and oct(error.stat().st_mode & 0o777) == "0o600"
    assert "portal: error: no GPU on" in done.stdout and "portal: stopped (exit 1)" in done.stdout


def test_a_stopping_job_stops_its_children_runs_its_hooks_and_withdraws_its_address(home: Path, session: str) -> None:
    body = """start_traps
sleep 60 & CHILDREN+=("$!"); echo "child $!"
hook() { touch "$SESSION_DIR/hook-ran"; }
ON_EXIT+=(hook)
write_connection 127.0.0.1 4321
exit 0"""
    done = jobside.run(home, body, {"SESSION_ID": session})
    assert done.returncode == 0, done.stdout + done.stderr
    child = int(done.stdout.split("child ", 1)[1].split()[0])
    folder = directory(home, session)
    assert not alive(child) and (folder / "hook-ran").exists() and not (folder / NAMES.connection_file).exists()


def test_a_requeued_job_gets_a_new_key_and_forgets_where_it_served(home: Path, session: str) -> None:
    folder = directory(home, session)
    (folder / NAMES.api_key_file).write_text("sk-hpcllm-old")
    (folder / NAMES.connection_file).write_text('{"host": "127.0.0.3", "port": 1}')
    stale = folder / f"{NAMES.replica_addr_prefix}1{NAMES.addr_suffix}"
    stale.write_text("127.0.0.1:1")
    probe = 'if test -e "$SESSION_DIR/$CONNECTION_FILE"; then echo stale-address; fi'
    done = jobside.run(home, probe, {"SESSION_ID": session}, env={"SLURM_RESTART_COUNT": "1"})
    assert done.returncode == 0 and "stale-address" not in done.stdout and not stale.exists()
    key = (folder / NAMES.api_key_file).read_text()
    assert (
        key.startswith("sk-hpcllm-")
        and len(key) == 53
        and oct((folder / NAMES.api_key_file).stat().st_mode)[-3:] == "600"
    )
    slurm = {"SLURM_RESTART_COUNT": "1", "SLURM_JOB_ID": "42", "SLURMD_NODENAME": "node7"}
    connection = jobside.run(home, "write_connection 127.0.0.1 4321", {"SESSION_ID": session}, env=slurm)
    assert connection.returncode == 0
    written = json.loads((folder / NAMES.connection_file).read_text())
    key = (folder / NAMES.api_key_file).read_text()  # this start's own: the portal learns it from the file
    assert written == {"host": "127.0.0.1", "port": 4321, "node": "node7", "job_id": "42", "restarts": 1, "key": key}


def test_a_first_run_hands_over_no_key_and_only_its_owner_reads_the_address(home: Path, session: str) -> None:
    done = jobside.run(home, "write_connection 127.0.0.1 4321", {"SESSION_ID": session}, env={"SLURM_JOB_ID": "7"})
    assert done.returncode == 0
    path = directory(home, session) / NAMES.connection_file
    assert json.loads(path.read_text())["key"] == "" and oct(path.stat().st_mode)[-3:] == "600"
    replica = jobside.run(home, "JOB_MODE=replica\nwrite_connection 127.0.0.1 5555", {"SESSION_ID": session},
                          env={"SLURM_PROCID": "2"})  # fmt: skip
    assert replica.returncode == 0
    assert (path.parent / f"{NAMES.replica_addr_prefix}2{NAMES.addr_suffix}").read_text() == "127.0.0.1:5555\n"


# ---- server.sh -----------------------------------------------------------------------------------------------------


def test_http_status_tells_ready_loading_and_nothing_apart(home: Path, upstream: int) -> None:
    body = f"""for path in /health /loading; do http_status GET 127.0.0.1 {upstream} "$path"; done
http_status GET 127.0.0.1 {closed_port()} /health"""
    done = jobside.run(home, body)
    assert done.stdout.split() == ["200", "503", "000"], done.stderr


def test_a_free_port_is_below_the_ephemeral_range_and_nothing_listens_there(home: Path) -> None:
    done = jobside.run(home, "for _ in 1 2 3 4 5; do free_port 127.0.0.1; done")
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in map(int, done.stdout.split()):
        assert 10000 <= port < low
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_server_that_dies_before_it_is_ready_fails_the_job_in_its_own_words(home: Path, session: str) -> None:
    body = f"""start_traps
(echo "llama_model_load: error: the model file is truncated" >>"$SESSION_DIR/$JOB_LOG"; exit 2) &
wait_ready "$!" 127.0.0.1 {closed_port()} /health"""
    done = jobside.run(home, body, {"SESSION_ID": session, "READY_TIMEOUT_S": 60})
    assert done.returncode == 1
    assert (directory(home, session) / NAMES.error_file).read_text() == (
        "the server exited with code 2 before it was ready: llama_model_load: error: the model file is truncated\n"
    )


def test_a_server_that_never_gets_ready_fails_the_job_at_the_timeout(home: Path, session: str, upstream: int) -> None:
    body = f"start_traps\nsleep 30 & CHILDREN+=($!)\nwait_ready $! 127.0.0.1 {upstream} /loading"
    done = jobside.run(home, body, {"SESSION_ID": session, "READY_TIMEOUT_S": 1})
    assert done.returncode == 1
    assert (directory(home, session) / NAMES.error_file).read_text() == "the server was not ready after 1s\n"


@pytest.mark.parametrize("code", [0, 3])
def test_the_servers_exit_is_the_jobs(home: Path, session: str, code: int) -> None:
    body = f"start_traps\nwrite_connection 127.0.0.1 4321\n(sleep 0.2; exit {code}) &\nserve_until_end $!"
    done = jobside.run(home, body, {"SESSION_ID": session, "BATCH_RUN": ""})
    folder = directory(home, session)
    assert done.returncode == (1 if code else 0) and not (folder / NAMES.connection_file).exists()
    if code:
        assert (folder / NAMES.error_file).read_text().startswith("the server stopped with code 3")
    else:
        assert "portal: the server exited" in done.stdout and not (folder / NAMES.error_file).exists()


# ---- keyproxy.sh ---------------------------------------------------------------------------------------------------


def start_job(home: Path, body: str, values: dict[str, object], helpers: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """A job script in the background, with its helpers beside it, as a running session's job."""
    folder = directory(home, str(values["SESSION_ID"]))
    for name in helpers:
        shutil.copy(SCRIPTS_DIR / name, folder / name)
    (folder / NAMES.api_key_file).write_text(KEY)
    # node_addr asks Slurm for the node's address: here the job is on this machine, at 127.0.0.1.
    script = jobside.script(values, "node_addr() { echo 127.0.0.1; }\n" + body)
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    return subprocess.Popen(
        ["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def stop_job(job: subprocess.Popen[str]) -> str:
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=30)
    return out


def test_a_server_behind_the_key_proxy_answers_only_with_the_key(home: Path, session: str, upstream: int) -> None:
    values = {"SESSION_ID": session, "READY_TIMEOUT_S": 60, "BATCH_RUN": ""}
    body = 'start_traps\nsleep 60 &\nSERVER_PID=$!\nCHILDREN+=("$SERVER_PID")\n'
    body += f'serve_behind_key_proxy "$SERVER_PID" --upstream-port {upstream} /health'
    job = start_job(home, body, values, helpers=("keyproxy.py",))
    connection = directory(home, session) / NAMES.connection_file
    try:
        wait_until(connection.exists)
        where = json.loads(connection.read_text())
        url = f"http://{where['host']}:{where['port']}/v1/models"
        assert httpx.get(url).status_code == 401
        answer = httpx.get(url, headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200 and answer.json() == {"path": "/v1/models", "authorization": None}
    finally:
        out = stop_job(job)
    assert not connection.exists() and "portal: ready at 127.0.0.1:" in out
    with socket.socket() as s:  # the proxy went with the job
        assert s.connect_ex((where["host"], where["port"])) != 0


# ---- batch.sh ------------------------------------------------------------------------------------------------------


def stage_run(folder: Path, prompts: list[str], start: bool) -> Path:
    run = folder / NAMES.batch_dir / str(uuid.uuid4())
    run.mkdir(parents=True)
    requests = io.BytesIO()
    normalize(io.BytesIO("\n".join(prompts).encode()), requests, Options(format="text"))
    (run / NAMES.requests_file).write_bytes(requests.getvalue())
    if start:
        (run / NAMES.start_mark).touch()
    return run


def output_lines(run: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / NAMES.output_file).read_text().splitlines()]


def batch_values(session: str, run: Path | None = None) -> dict[str, object]:
    return {"SESSION_ID": session, "BATCH_RUN": run.name if run else "", "BATCH_CONCURRENCY": 2, "REPLICAS": 1,
            "SERVED_NAME": "served", "READY_TIMEOUT_S": 60, "BATCH_LOOK_S": "0.1"}  # fmt: skip


def test_a_batch_launch_answers_its_run_then_ends_the_job(home: Path, session: str) -> None:
    run = stage_run(directory(home, session), [f"q{i}" for i in range(12)], start=False)
    with serving() as url:
        body = f'start_traps\nsleep 60 & CHILDREN+=("$!")\nwrite_connection 127.0.0.1 {url.rsplit(":", 1)[1]}\n'
        body += 'run_batch "${CHILDREN[0]}"'
        job = start_job(home, body, batch_values(session, run), helpers=("supervisor.py", "batchrun.py"))
        out, _ = job.communicate(timeout=60)
    assert job.returncode == 0, out
    assert [r["line"] for r in output_lines(run)] == list(range(1, 13))
    assert f"batch run {run.name}: 12 requests, 2 at a time on each of 1 server(s)" in out
    assert not (directory(home, session) / NAMES.connection_file).exists()


def test_a_batch_launch_whose_server_stops_first_fails_and_keeps_what_was_answered(home: Path, session: str) -> None:
    run = stage_run(directory(home, session), [f"q{i}" for i in range(200)], start=False)
    with serving() as url:
        Model.delay_s = 0.05
        body = f"start_traps\nwrite_connection 127.0.0.1 {url.rsplit(':', 1)[1]}\n(sleep 1.5; exit 5) &\n"
        body += 'run_batch "$!"'
        job = start_job(home, body, batch_values(session, run), helpers=("supervisor.py", "batchrun.py"))
        out, _ = job.communicate(timeout=60)
    assert job.returncode == 1, out
    error = (directory(home, session) / NAMES.error_file).read_text()
    assert error.startswith("the server stopped with code 5 during the batch run; what it answered is kept")
    assert (run / NAMES.results_file).exists() and not (run / NAMES.output_file).exists()


def test_a_batch_launch_given_up_fails_the_job_with_the_runs_reason(home: Path, session: str) -> None:
    folder = directory(home, session)
    run = stage_run(folder, ["q"], start=False)
    (folder / "batchrun.py").write_text("import sys\nsys.exit(3)\n")  # a runner that can never get anywhere
    job = start_job(home, 'start_traps\nsleep 60 & CHILDREN+=("$!")\nSERVED_AT=127.0.0.1:9\nrun_batch "$!"',
                    batch_values(session, run), helpers=("supervisor.py",))  # fmt: skip
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 1, out
    assert (folder / NAMES.error_file).read_text() == (
        "the batch run was given up: its runner stopped with code 3, 6 times; what it answered is kept\n"
    )


def test_a_serving_session_takes_a_run_once_it_is_staged(home: Path, session: str) -> None:
    folder = directory(home, session)
    with serving() as url:
        body = 'start_traps\nsleep 60 &\nSERVER_PID=$!\nCHILDREN+=("$SERVER_PID")\n'
        body += f'write_connection 127.0.0.1 {url.rsplit(":", 1)[1]}\nserve_until_end "$SERVER_PID"'
        job = start_job(home, body, batch_values(session), helpers=("supervisor.py", "batchrun.py"))
        try:
            time.sleep(1.5)  # a session with no run starts no Python for runs (the job looks every second)
            assert not any("supervisor.py" in " ".join(argv) for argv in argvs_under(folder))
            run = stage_run(folder, [f"q{i}" for i in range(5)], start=True)
            wait_until((run / NAMES.output_file).exists)
            assert [r["line"] for r in output_lines(run)] == [1, 2, 3, 4, 5]
        finally:
            out = stop_job(job)
    assert f"starting the runner of batch run {run.name}" in out
    wait_until(lambda: not argvs_under(folder), timeout_s=15)  # supervisor and runner went with the job


def argvs_under(folder: Path) -> list[list[str]]:
    """Command lines of this machine's live processes that name a file in the folder."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not alive(int(entry.name)):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
        except OSError:
            continue
        if any(str(folder) in word for word in argv) and not argv[0].endswith("bash"):
            found.append(argv)
    return found
