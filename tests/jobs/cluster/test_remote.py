"""The submit and poll commands' shell side, run here in bash with fake squeue/sacct/scontrol on PATH."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.cluster import layout, remote, slurm
from portal.slurm.cli import SlurmCli
from portal.slurm.errors import SlurmParseError
from tests.jobs.cluster.framing import fake_bin, run

A = "0f8e6c2a-1b2c-4d3e-8f90-123456789abc"
B = "1f8e6c2a-1b2c-4d3e-8f90-123456789abc"
C = "2f8e6c2a-1b2c-4d3e-8f90-123456789abc"
SLURM_DATA = Path(__file__).resolve().parents[2] / "portal" / "data" / "slurm"
FRAME = "0123456789abcdef0123456789abcdef"


def poll(framed: remote.Framed, env: dict[str, str]) -> remote.PollResult:
    """The poll script run here with its frame on standard input, and what the portal reads of its answer."""
    out = run(framed.command, env, framed.stdin)
    assert out.returncode == 0, out.stderr
    return remote.parse_poll(out.stdout, framed.frame)


def test_poll_reports_live_jobs_and_asks_sacct_and_scontrol_only_about_the_others(tmp_path: Path) -> None:
    env = fake_bin(
        tmp_path,
        squeue=f"echo '101|hpcllm-{A}|RUNNING|None|2026-11-21T12:00:00|node1|1:00|59:00|gpu|1'",
        sacct='echo "$@" >"$HOME/sacct-args"\n'
        'echo "102|CANCELLED by 1000|0:15|2026-11-21T11:00:00|2026-11-21T11:05:00|node2|None|hpcllm-x"',
        scontrol='[ "$4" = 103 ] && { echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; }\n'
        'echo "JobId=$4 JobName=x JobState=TIMEOUT Reason=TimeLimit ExitCode=0:0"',
    )
    session_dir = Path(env["HOME"]) / layout.SESSIONS_DIR / A
    session_dir.mkdir(parents=True)
    (session_dir / "connection.json").write_text('{"host": "127.0.0.1", "port": 4242, "node": "node1"}')
    result = poll(remote.poll_command([(A, "101"), (B, "102"), (C, "103")]), env)
    assert result.complete and result.squeue_ok
    assert list(result.queued) == ["101"] and result.queued["101"].state == "RUNNING"
    assert result.connections[A]["port"] == 4242
    assert "-j 102,103" in (Path(env["HOME"]) / "sacct-args").read_text()
    assert result.finished["102"]["JobState"] == "TIMEOUT"  # scontrol wins over sacct for jobs it still holds
    assert result.asked_gone == {"102", "103"}


def test_poll_reads_how_jobs_the_controller_forgot_ended_from_sacct(tmp_path: Path) -> None:
    # sacct prints the rows it printed on the local cluster (tests/portal/data/slurm/) for the jobs it is asked about.
    env = fake_bin(
        tmp_path,
        squeue="true",
        sacct='while [ $# -gt 0 ]; do [ "$1" = -j ] && ids=$2; shift; done\n'
        f'grep -E "^(${{ids//,/|}})\\|" {SLURM_DATA / "sacct-completion.txt"}',
        scontrol='echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1',
    )
    result = poll(remote.poll_command([(A, "62"), (B, "71"), (C, "999")]), env)
    assert result.complete and set(result.finished) == {"62", "71"}
    assert result.finished["62"]["JobState"] == "COMPLETED"  # requeued once: its last row
    assert (result.finished["71"]["JobState"], result.finished["71"]["ExitCode"]) == ("FAILED", "1:0")
    assert result.asked_gone == {"62", "71", "999"}  # 999: scontrol's answer, sacct has no row of it


def test_a_sacct_without_accounting_reads_as_no_answer(tmp_path: Path) -> None:
    env = fake_bin(
        tmp_path,
        squeue="true",
        sacct=f"cat {SLURM_DATA / 'sacct-disabled.txt'} >&2; exit 1",
        scontrol='[ "$4" = 71 ] && { echo "JobId=71 JobState=FAILED ExitCode=1:0"; exit 0; }; exit 1',
    )
    result = poll(remote.poll_command([(A, "62"), (B, "71")]), env)
    assert result.complete and set(result.finished) == {"71"} and result.asked_gone == {"71"}


def test_the_scripts_spell_the_job_name_prefix_only_where_they_assign_it() -> None:
    scripts = [remote.SUBMIT_SCRIPT, remote.CANCEL_SCRIPT, remote.POLL_SCRIPT, remote.LISTING_SCRIPT]
    for script in scripts:
        assert script.count(slurm.JOB_NAME_PREFIX) == 1
        assert f"JOB_NAME_PREFIX={slurm.JOB_NAME_PREFIX}\n" in script and "$JOB_NAME_PREFIX" in script


def test_poll_reads_each_batch_runs_progress_of_the_sessions_it_asks_about(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, squeue=f"echo '101|hpcllm-{A}|RUNNING|None|2026-11-21T12:00:00|node1|1:00|59:00|gpu|1'")
    runs = Path(env["HOME"]) / layout.SESSIONS_DIR / A / "batch"
    (runs / B).mkdir(parents=True)
    (runs / B / "progress.json").write_text('{"state": "running", "done": 7, "total": 200}')
    (runs / C).mkdir()
    (runs / C / "progress.json").write_text('{"state": "runn')  # torn: read next time
    (runs / "not-a-uuid").mkdir()
    (runs / "not-a-uuid" / "progress.json").write_text("{}")
    result = poll(remote.poll_command([(A, "101")]), env)
    assert result.progress == {B: {"state": "running", "done": 7, "total": 200}}


def test_a_failing_squeue_is_reported_not_read_as_every_job_gone(tmp_path: Path) -> None:
    env = fake_bin(
        tmp_path,
        squeue="echo 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)'; exit 1",
        sacct="echo should-not-run; exit 99",
        scontrol="echo should-not-run; exit 99",
    )
    result = poll(remote.poll_command([(A, "101")]), env)
    assert not result.squeue_ok
    assert "Unable to contact slurm controller" in result.squeue_error
    assert not result.finished and not result.asked_gone


def test_a_truncated_poll_output_is_not_complete() -> None:
    line = base64.b64encode(b"101|n|RUNNING|None|N/A|node1|1:00|1:00|gpu|1\n").decode()
    assert not remote.parse_poll(f"@@{FRAME} squeue 0 {line}\n", FRAME).complete


def test_submit_stages_the_files_privately_and_submits_once(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, squeue="true", sbatch='echo $((RANDOM + 1000)); echo "$PWD" >>"$HOME/sbatch-calls"')
    payload = remote.submit_payload("#!/bin/bash\necho hi\n", "sk-secret", {"keyproxy.py": "print(1)\n"})
    first = run(remote.submit_command(A, payload.sha256), env, payload.stdin)
    assert first.returncode == 0, first.stderr
    outcome = remote.parse_submit(first.stdout)
    assert not outcome.existing
    again = remote.parse_submit(run(remote.submit_command(A, payload.sha256), env, payload.stdin).stdout)
    assert again.existing and again.job_id == outcome.job_id
    assert len((Path(env["HOME"]) / "sbatch-calls").read_text().splitlines()) == 1
    d = Path(env["HOME"]) / layout.SESSIONS_DIR / A
    assert oct(d.stat().st_mode & 0o777) == "0o700"
    assert oct((d / "api_key").stat().st_mode & 0o777) == "0o600"
    assert (d / "api_key").read_text() == "sk-secret\n"
    assert (d / "keyproxy.py").exists()


def test_submit_finds_a_job_sbatch_created_before_its_reply_was_lost(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, squeue="echo 777", sbatch="echo SHOULD-NOT-RUN >&2; exit 1")
    payload = remote.submit_payload("#!/bin/bash\n", "k", {})
    out = remote.parse_submit(run(remote.submit_command(A, payload.sha256), env, payload.stdin).stdout)
    assert out.existing and out.job_id == "777"


def test_a_torn_upload_is_never_submitted(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, squeue="true", sbatch='echo 1; touch "$HOME/submitted"')
    payload = remote.submit_payload("#!/bin/bash\n" + "echo x\n" * 1000, "k", {})
    out = run(remote.submit_command(A, payload.sha256), env, payload.stdin[: len(payload.stdin) // 2])
    assert out.returncode == remote.SUBMIT_RETRY
    assert not (Path(env["HOME"]) / "submitted").exists()


def test_sbatchs_refusal_comes_back_with_its_message(tmp_path: Path) -> None:
    env = fake_bin(
        tmp_path,
        squeue="true",
        sbatch='echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2; exit 1',
    )
    payload = remote.submit_payload("#!/bin/bash\n", "k", {})
    out = run(remote.submit_command(A, payload.sha256), env, payload.stdin)
    assert out.returncode == 64 and "Invalid partition name specified" in out.stderr
    assert not remote.sbatch_is_transient(out.stderr)
    assert remote.sbatch_is_transient("sbatch: error: Batch job submission failed: Socket timed out on send/recv")


def test_the_payload_is_a_tar_with_the_right_modes() -> None:
    payload = remote.submit_payload("script", "key", {})
    with tarfile.open(fileobj=io.BytesIO(payload.stdin)) as tar:
        modes = {m.name: m.mode for m in tar.getmembers()}
    assert modes == {"job.sh": 0o700, "api_key": 0o600}


def test_ids_that_reach_the_command_line_are_checked() -> None:
    with pytest.raises(ValueError):
        remote.poll_command([("not-a-uuid; rm -rf ~", "1")])
    with pytest.raises(ValueError):
        remote.poll_command([(A, "1;reboot")])
    with pytest.raises(ValueError):
        remote.submit_command(A, "abc")


def test_submit_output_without_a_job_id_is_an_error() -> None:
    with pytest.raises(SlurmParseError):
        remote.parse_submit("something else\n")


@given(st.text(max_size=400) | st.builds(lambda t: f"@@{FRAME} " + t, st.text(max_size=400)))
def test_parse_poll_never_raises_on_garbage(text: str) -> None:
    result = remote.parse_poll(text, FRAME)
    assert isinstance(result.queued, dict)


def test_poll_reads_each_pending_jobs_place_in_its_partitions_queue(tmp_path: Path) -> None:
    env = fake_bin(
        tmp_path,
        squeue=(
            f'if [[ "$*" == *PENDING* ]]; then printf "$F%s\\n" "gpu|7|x" "gpu|101|hpcllm-{A}" "devel|9|y"; '
            f"else echo '101|hpcllm-{A}|PENDING|Priority|N/A|(null)|0:00|1:00:00|gpu|1'; fi"
        ),
    )
    result = poll(remote.poll_command([(A, "101")]), env)
    assert result.complete and result.queue_position("gpu", "101") == 2
    assert result.queue_position("devel", "101") is None
    # Not asked for the order (another account's poll read it this cycle): the queue is not read at all.
    unordered = poll(remote.poll_command([(A, "101")], order=False), env)
    assert unordered.complete and unordered.positions == {}


def test_a_poll_of_a_busy_cluster_stays_small(tmp_path: Path) -> None:
    """200,000 pending jobs on the cluster and 50,000 of the user's own outside the portal: the answer still holds
    only the portal's jobs and their places, far below the SSH read limit."""
    env = fake_bin(
        tmp_path,
        squeue=(
            'if [[ "$*" == *PENDING* ]]; then seq 1 200000 | sed "s/^/$F""gpu|/; s/$/|other/" | '
            f'sed "s/^$F""gpu|150000|other$/$F""gpu|150000|hpcllm-{A}/"; else '
            "seq 1000000 1050000 | sed 's/$/|array|PENDING|Priority|N/A|(null)|0:00|1:00:00|gpu|1/'; "
            f"echo '150000|hpcllm-{A}|PENDING|Priority|N/A|(null)|0:00|1:00:00|gpu|1'; fi"
        ),
    )
    framed = remote.poll_command([(A, "150000")])
    out = run(framed.command, env, framed.stdin)
    result = remote.parse_poll(out.stdout, framed.frame)
    assert len(out.stdout) < 4096 and result.complete and result.squeue_ok
    assert list(result.queued) == ["150000"] and result.queue_position("gpu", "150000") == 150000


def test_a_cancel_marks_the_session_so_no_later_submit_calls_sbatch(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, scancel='echo "$@" >>"$HOME/scancel-calls"', squeue="true",
                   sbatch='echo 1; touch "$HOME/submitted"')  # fmt: skip
    cancelled = run(remote.cancel_command(A, ""), env)
    assert cancelled.returncode == 0 and "marked" in cancelled.stdout
    calls = (Path(env["HOME"]) / "scancel-calls").read_text()
    assert f"--name hpcllm-{A}" in calls  # a job whose sbatch reply was lost is found by its name
    payload = remote.submit_payload("#!/bin/bash\n", "k", {})
    out = run(remote.submit_command(A, payload.sha256), env, payload.stdin)
    assert out.returncode == 0 and remote.parse_submit(out.stdout).cancelled
    assert not (Path(env["HOME"]) / "submitted").exists()


def test_a_cancel_with_a_job_id_cancels_it_by_id_and_by_name(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, scancel='echo "$@" >>"$HOME/scancel-calls"')
    assert run(remote.cancel_command(A, "4242"), env).returncode == 0
    me = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    assert (Path(env["HOME"]) / "scancel-calls").read_text().splitlines() == ["4242", f"--name hpcllm-{A} --user {me}"]


def test_a_batch_run_is_staged_once_beside_its_session_and_a_stop_leaves_a_mark(tmp_path: Path) -> None:
    env = fake_bin(tmp_path)
    session_dir = Path(env["HOME"]) / layout.SESSIONS_DIR / A
    payload = remote.tar_payload({"requests.jsonl": ('{"line": 1}\n', 0o600), "batchrun.py": ("# runner\n", 0o600)})
    command = remote.stage_batch_command(A, B, payload.sha256)
    refused = run(command, env, payload.stdin)
    assert refused.returncode == 3 and "directory is missing" in refused.stderr
    session_dir.mkdir(parents=True)
    assert run(command, env, payload.stdin).stdout.strip() == "staged"
    run_dir = session_dir / "batch" / B
    assert (run_dir / "start").exists() and (session_dir / "batchrun.py").read_text() == "# runner\n"
    assert oct((run_dir / "requests.jsonl").stat().st_mode & 0o777) == "0o600"
    (run_dir / "requests.jsonl").write_text("changed by the runner's job")
    assert run(command, env, b"different bytes").stdout.strip() == "staged"  # a second staging changes nothing
    assert (run_dir / "requests.jsonl").read_text() == "changed by the runner's job"
    torn = remote.stage_batch_command(A, C, payload.sha256)
    assert run(torn, env, payload.stdin[:100]).returncode == remote.SUBMIT_RETRY  # an incomplete upload: try again
    assert run(remote.stop_batch_command(A, B), env).stdout.strip() == "stopping" and (run_dir / "stop").exists()
    with pytest.raises(ValueError):
        remote.stage_batch_command(A, "../x", payload.sha256)


def test_poll_reports_why_the_job_gave_a_run_up(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, squeue=f"echo '101|hpcllm-{A}|RUNNING|None|2026-11-21T12:00:00|node1|1:00|59:00|gpu|1'")
    run_dir = Path(env["HOME"]) / layout.SESSIONS_DIR / A / "batch" / B
    run_dir.mkdir(parents=True)
    (run_dir / "error").write_text("its runner stopped 5 times; see the job log\n@@end\n")
    result = poll(remote.poll_command([(A, "101")]), env)
    assert result.complete and result.batch_errors == {B: "its runner stopped 5 times; see the job log\n@@end"}


def slurm_off_path(tmp_path: Path) -> tuple[dict[str, str], SlurmCli]:
    """Fake Slurm binaries in a folder that is not on PATH, each logging its arguments, and a cluster named c2 with
    them, so only the cluster's bin dir can find them; squeue prints the `CLUSTER:` line old Slurm prints."""
    env = fake_bin(tmp_path)
    slurm_dir = tmp_path / "slurm" / "bin"
    slurm_dir.mkdir(parents=True)
    bodies = {
        "squeue": 'echo "CLUSTER: c2"\n'  # and the portal's job, unless a submit asks for its own job's id
        f"""case " $* " in *" -o %i "*) ;; *) echo '101|hpcllm-{A}|PENDING|Priority|N/A||0:00|1:00:00|gpu|1' ;; esac""",
        "sbatch": 'echo "4242;c2"',
        "sacct": "true",
        "scontrol": "true",
        "scancel": "true",
    }
    for name, body in bodies.items():
        path = slurm_dir / name
        path.write_text(f'#!/bin/bash\necho "{name} $*" >>"$HOME/slurm-calls"\n{body}\n')
        path.chmod(0o755)
    return env, SlurmCli("c2", str(slurm_dir))


def test_submit_poll_and_cancel_call_the_clusters_binaries_with_its_cluster_name(tmp_path: Path) -> None:
    env, cli = slurm_off_path(tmp_path)
    payload = remote.submit_payload("#!/bin/bash\n", "k", {})
    submitted = run(remote.submit_command(B, payload.sha256, cli), env, payload.stdin)
    assert submitted.returncode == 0, submitted.stderr
    assert remote.parse_submit(submitted.stdout).job_id == "4242"  # "N;CLUSTER" from sbatch --clusters
    result = poll(remote.poll_command([(A, "101"), (C, "99")], cli), env)
    assert result.complete and list(result.queued) == ["101"] and not result.unreadable
    assert result.queue_position("gpu", "101") is None  # the CLUSTER line is neither a job nor a partition
    assert run(remote.cancel_command(A, "101", cli), env).returncode == 0
    calls = (Path(env["HOME"]) / "slurm-calls").read_text().splitlines()
    assert {call.split()[0] for call in calls} == {"squeue", "sbatch", "sacct", "scontrol", "scancel"}
    assert all(call.split()[1] == "--clusters=c2" for call in calls), calls


def test_a_submit_does_not_take_squeues_cluster_line_for_an_earlier_job(tmp_path: Path) -> None:
    env, cli = slurm_off_path(tmp_path)
    (tmp_path / "slurm" / "bin" / "squeue").write_text('#!/bin/bash\necho "CLUSTER: c2"\n')
    payload = remote.submit_payload("#!/bin/bash\n", "k", {})
    out = run(remote.submit_command(A, payload.sha256, cli), env, payload.stdin)
    assert remote.parse_submit(out.stdout) == remote.SubmitOutcome(job_id="4242", existing=False)


def test_poll_reads_each_sessions_staging_report(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, squeue=f"echo '101|hpcllm-{A}|RUNNING|None|2026-11-21T12:00:00|node1|1:00|59:00|gpu|1'")
    sessions = Path(env["HOME"]) / layout.SESSIONS_DIR
    (sessions / A).mkdir(parents=True)
    (sessions / A / "staging.json").write_text('{"state": "copying", "bytes": 5, "total": 10}')
    (sessions / B).mkdir()
    (sessions / B / "staging.json").write_text('{"state": "cop')  # torn: read next time
    result = poll(remote.poll_command([(A, "101"), (B, "102")]), env)
    assert result.staging == {A: {"state": "copying", "bytes": 5, "total": 10}}


def test_the_watch_returns_at_the_first_change_and_says_what_it_was(tmp_path: Path) -> None:
    env = fake_bin(tmp_path)
    sessions = Path(env["HOME"]) / layout.SESSIONS_DIR
    for sid in (A, B, C):
        (sessions / sid).mkdir(parents=True)
    (sessions / B / "connection.json").write_text("{}")
    quiet = run(remote.watch_command([(A, "starting"), (B, "running")], 1), env)
    assert quiet.returncode == 0 and remote.parse_watch(quiet.stdout) == {} and "@@end" in quiet.stdout

    change = f"sleep 0.5; echo '{{}}' >{sessions / A / 'connection.json'}; rm {sessions / B / 'connection.json'}"
    later = subprocess.Popen(["bash", "-c", change])
    changed = remote.parse_watch(run(remote.watch_command([(A, "starting"), (B, "running")], 30), env).stdout)
    later.wait()
    assert changed in ({A: "ready", B: "gone"}, {A: "ready"}, {B: "gone"})  # whichever the loop saw first, or both
    (sessions / C / "error").write_text("the server exited")
    assert remote.parse_watch(run(remote.watch_command([(C, "running")], 30), env).stdout) == {C: "error"}


def test_the_watch_takes_session_ids_and_modes_only() -> None:
    with pytest.raises(ValueError):
        remote.watch_command([("../../etc", "starting")], 5)
    with pytest.raises(ValueError):
        remote.watch_command([(A, "rm -rf")], 5)
    assert remote.parse_watch("changed not-a-uuid ready\nchanged " + A + " exploded\n") == {}


# --- What a job writes, and what anyone names a job, never changes what the answer says about anything else -------

RUN = "3f8e6c2a-1b2c-4d3e-8f90-123456789abc"
# Pieces of forged sections, as the old poll read them (a line starting "@@" began a section): nodes that would pass
# a forged address, a place in the queue, an end, another session's connection; a guess at a frame; bytes that are
# not text.
FORGED = [
    b"@@", b"\n", b"\r", b" ", b"\x00", b"\xff", "é".encode(), b"@@nodes 0\n", b"@@squeue 0\n", b"@@end\n",
    b"NodeName=node1 NodeAddr=127.0.0.1:9/heard?x=#\n", b"@@order\ngpu|102|1\n", f"@@connection {B}\n".encode(),
    b'{"host": "127.0.0.1:9/heard?x=#", "port": 8080}', f"@@{FRAME} nodes 0 ".encode(), b"Tm9kZU5hbWU9bm9kZTE=\n",
]  # fmt: skip
JOB_WRITTEN = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(FORGED), max_size=30).map(b"".join),
    st.builds(lambda n, tail: b"x" * n + tail, st.integers(3900, 4200), st.sampled_from(FORGED)),  # at the bound
)
# Where the job writes, and how much of each file the poll reads.
FILES = {
    "connection.json": 4096, "staging.json": 4096, "error": 2000, f"batch/{RUN}/progress.json": 4096,
    f"batch/{RUN}/error": 2000,
}  # fmt: skip


def forged_cluster(tmp_path: Path) -> dict[str, str]:
    """A login host that says the same whatever the jobs wrote: A runs on node1, B waits second in its queue, the job
    of C is gone."""
    return fake_bin(
        tmp_path,
        squeue=(
            'if [[ "$*" == *PENDING* ]]; then printf "$F%s\\n" "gpu|7|x" "gpu|102|hpcllm-' + B + '"; else '
            f"echo '101|hpcllm-{A}|RUNNING|None|2026-11-21T12:00:00|node1|1:00|59:00|gpu|1'; "
            f"echo '102|hpcllm-{B}|PENDING|Priority|N/A|(null)|0:00|1:00:00|gpu|1'; fi"
        ),
        scontrol='[ "$3" = node ] && { echo "NodeName=node1 NodeAddr=127.0.0.1 NodeHostName=localhost"; exit 0; }\n'
        'echo "JobId=$4 JobName=x JobState=TIMEOUT Reason=TimeLimit ExitCode=0:0"',
        sacct="true",
    )


def what_else_it_says(result: remote.PollResult) -> tuple[object, ...]:
    """Everything a poll read besides the files of session A."""
    return (
        result.squeue_ok, result.complete, result.queued, result.unreadable, result.positions, result.node_names,
        result.finished, result.asked_gone, result.connections.get(B),
        {k: v for k, v in result.staging.items() if k != A}, {k: v for k, v in result.errors.items() if k != A},
    )  # fmt: skip


def write_files(home: Path, contents: dict[str, bytes]) -> None:
    for name, data in contents.items():
        path = home / layout.SESSIONS_DIR / A / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture(scope="module")
def forged_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], tuple[object, ...]]:
    """The login host, B's connection file, and what the poll says of everything but A's files when A's are plain."""
    env = forged_cluster(tmp_path_factory.mktemp("forged"))
    home = Path(env["HOME"])
    (home / layout.SESSIONS_DIR / B).mkdir(parents=True)
    (home / layout.SESSIONS_DIR / B / "connection.json").write_text('{"host": "localhost", "port": 4242}')
    write_files(home, {name: b'{"state": "running"}' for name in FILES})
    baseline = poll(remote.poll_command([(A, "101"), (B, "102"), (C, "103")]), env)
    assert baseline.complete and baseline.positions == {("gpu", "102"): 2}
    assert baseline.node_names == {"node1": {"node1", "127.0.0.1", "localhost"}} and baseline.connections[B]
    return env, what_else_it_says(baseline)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({name: JOB_WRITTEN for name in FILES}))
def test_no_bytes_a_job_writes_change_what_the_other_sections_say(
    forged_home: tuple[dict[str, str], tuple[object, ...]], contents: dict[str, bytes]
) -> None:
    env, baseline = forged_home
    write_files(Path(env["HOME"]), contents)
    result = poll(remote.poll_command([(A, "101"), (B, "102"), (C, "103")]), env)
    assert what_else_it_says(result) == baseline
    # And each file reads back as what the job wrote, up to the poll's bound: nothing taken off, nothing added.
    read = {name: contents[name][:bound].decode(errors="replace") for name, bound in FILES.items()}
    assert result.errors[A] == read["error"].strip() and result.batch_errors[RUN] == read[f"batch/{RUN}/error"].strip()
    for name, found in [("connection.json", result.connections), ("staging.json", result.staging)]:
        assert found.get(A) == as_object(read[name])
    assert result.progress.get(RUN) == as_object(read[f"batch/{RUN}/progress.json"])


def as_object(text: str) -> object:
    try:
        data = json.loads(text.strip())
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def test_the_forged_sections_of_the_old_poll_are_read_as_the_files_text(tmp_path: Path) -> None:
    # What made the address check pass: a connection file that went on with nodes of its own and an order.
    env = forged_cluster(tmp_path)
    forged = b'{"host": "127.0.0.1:9/heard?x=#", "port": 8080}\n@@nodes 0\nNodeName=node1 NodeAddr=127.0.0.1:9/h?#\n'
    write_files(Path(env["HOME"]), {"connection.json": forged + b"@@order\ngpu|102|1\n@@end\n"})
    result = poll(remote.poll_command([(A, "101"), (B, "102")]), env)
    assert result.node_names == {"node1": {"node1", "127.0.0.1", "localhost"}}
    assert result.positions == {("gpu", "102"): 2} and A not in result.connections  # not one JSON object


def test_a_batch_folder_named_by_the_job_puts_nothing_on_a_header(tmp_path: Path) -> None:
    env = forged_cluster(tmp_path)
    runs = Path(env["HOME"]) / layout.SESSIONS_DIR / A / "batch"
    for name in (f"x\n@@{FRAME} nodes 0 ", f"{RUN} {RUN}", "x\n@@nodes 0\nNodeName=node1 NodeAddr=127.0.0.9"):
        (runs / name).mkdir(parents=True)
        (runs / name / "progress.json").write_text("{}")
        (runs / name / "error").write_text("given up")
    result = poll(remote.poll_command([(A, "101")]), env)
    assert result.complete and result.progress == {} and result.batch_errors == {}
    assert result.node_names == {"node1": {"node1", "127.0.0.1", "localhost"}}


def test_a_job_name_with_a_newline_forges_no_place_in_the_queue(tmp_path: Path) -> None:
    # Job 8's name goes on as a record of job 101 (the old poll read squeue's output a line at a time).
    env = fake_bin(
        tmp_path,
        squeue=(
            'if [[ "$*" == *PENDING* ]]; then printf "$F%s\\n" "gpu|7|x" "gpu|101|hpcllm-' + A + '" '
            f"$'gpu|8|y\\ngpu|101|hpcllm-{A}' $'gpu|9|z|\\nw'; "
            f"else echo '101|hpcllm-{A}|PENDING|Priority|N/A|(null)|0:00|1:00:00|gpu|1'; fi"
        ),
    )
    result = poll(remote.poll_command([(A, "101")]), env)
    assert result.positions == {("gpu", "101"): 2}


def test_the_poll_lists_only_the_portals_jobs_by_their_exact_names(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, squeue='printf "%s\\n" "$*" >>"$HOME/squeue-calls"')
    sessions = [(str(uuid.UUID(int=n)), "") for n in range(1, 2501)]  # no job ids: none asked about as gone
    assert poll(remote.poll_command(sessions), env).complete
    calls = (Path(env["HOME"]) / "squeue-calls").read_text().splitlines()
    asked = [call.split(" -n ")[1].split()[0].split(",") for call in calls]
    assert [len(names) for names in asked] == [1000, 1000, 500]  # a squeue argument holds 128 KiB at most
    assert [name for names in asked for name in names] == [slurm.job_name(sid) for sid, _ in sessions]


def test_a_poll_or_listing_without_its_frame_answers_nothing(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, squeue=f"echo '101|hpcllm-{A}|RUNNING|None|N/A|node1|1:00|1:00|gpu|1'")
    for command in (remote.poll_command([(A, "101")]), remote.listing_command()):
        out = run(command.command, env, b"not a frame\n")
        assert out.returncode == 2 and "no frame" in out.stderr and "@@" not in out.stdout
        assert not remote.parse_poll(out.stdout, command.frame).complete


def listing(env: dict[str, str]) -> remote.Listing:
    command = remote.listing_command()
    out = run(command.command, env, command.stdin)
    assert out.returncode == 0, out.stderr
    return remote.parse_listing(out.stdout, command.frame)


def test_a_job_name_with_a_newline_or_a_bar_forges_no_listing_line(tmp_path: Path) -> None:
    # eve names a job so that, read a line at a time, it says ada's waiting job 101 runs on node3; another name holds
    # a '|'. Both wait in the queue, and count for the places of the jobs behind them.
    forged = f"ada|101|hpcllm-{A}|RUNNING|None|2026-12-07T10:00:00|node3|1:00|4:00|gpu|1"
    env = fake_bin(
        tmp_path,
        squeue=(
            'printf "$F%s\\n" '
            f"'ada|101|hpcllm-{A}|PENDING|Priority|N/A|(null)|0:00|5:00|gpu|1' "
            f"$'eve|102|x\\n{forged}\\nz|PENDING|Priority|N/A|(null)|0:00|5:00|gpu|1' "
            f"'eve|103|hpcllm-|x|PENDING|Priority|N/A|(null)|0:00|5:00|gpu|1' "
            f"'grace|104|hpcllm-{B}|PENDING|Priority|N/A|(null)|0:00|5:00|gpu|1' "
            f"'grace|105|hpcllm-{C}|RUNNING|None|2026-12-07T10:00:00|node1|1:00|4:00|gpu|1'"
        ),
    )
    found = listing(env)
    assert found.ok and set(found.jobs) == {"101", "104", "105"}
    assert found.jobs["101"][0] == "ada" and found.jobs["101"][1].state == "PENDING"
    assert found.places == {"101": 1, "104": 4}


def test_a_listing_whose_squeue_ignores_the_frame_is_not_believed(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, squeue=f"echo 'ada|101|hpcllm-{A}|PENDING|Priority|N/A|(null)|0:00|5:00|gpu|1'")
    found = listing(env)
    assert not found.ok and "frame" in found.error and not found.jobs
