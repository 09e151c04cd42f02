"""The submit and poll commands' shell side, run here in bash with fake squeue/sacct/scontrol on PATH."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.cluster import layout, remote, slurm
from portal.slurm.cli import SlurmCli
from portal.slurm.errors import SlurmParseError

A = "0f8e6c2a-1b2c-4d3e-8f90-123456789abc"
B = "1f8e6c2a-1b2c-4d3e-8f90-123456789abc"
C = "2f8e6c2a-1b2c-4d3e-8f90-123456789abc"
SLURM_DATA = Path(__file__).resolve().parents[2] / "portal" / "data" / "slurm"


def fake_bin(tmp_path: Path, **scripts: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body + "\n")
        path.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home)}


def run(command: str, env: dict[str, str], stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], input=stdin.decode(), capture_output=True, text=True, env=env)


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
    out = run(remote.poll_command([(A, "101"), (B, "102"), (C, "103")]), env)
    assert out.returncode == 0, out.stderr
    result = remote.parse_poll(out.stdout)
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
    result = remote.parse_poll(run(remote.poll_command([(A, "62"), (B, "71"), (C, "999")]), env).stdout)
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
    result = remote.parse_poll(run(remote.poll_command([(A, "62"), (B, "71")]), env).stdout)
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
    result = remote.parse_poll(run(remote.poll_command([(A, "101")]), env).stdout)
    assert result.progress == {B: {"state": "running", "done": 7, "total": 200}}


def test_a_failing_squeue_is_reported_not_read_as_every_job_gone(tmp_path: Path) -> None:
    env = fake_bin(
        tmp_path,
        squeue="echo 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)'; exit 1",
        sacct="echo should-not-run; exit 99",
        scontrol="echo should-not-run; exit 99",
    )
    result = remote.parse_poll(run(remote.poll_command([(A, "101")]), env).stdout)
    assert not result.squeue_ok
    assert "Unable to contact slurm controller" in result.squeue_error
    assert not result.finished and not result.asked_gone


def test_a_truncated_poll_output_is_not_complete() -> None:
    assert not remote.parse_poll("@@squeue 0\n101|n|RUNNING|None|N/A|node1|1:00|1:00|gpu|1\n").complete


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


@given(st.text(max_size=400))
def test_parse_poll_never_raises_on_garbage(text: str) -> None:
    result = remote.parse_poll(text)
    assert isinstance(result.queued, dict)


def test_poll_reads_each_pending_jobs_place_in_its_partitions_queue(tmp_path: Path) -> None:
    env = fake_bin(
        tmp_path,
        squeue=(
            f'if [[ "$*" == *PENDING* ]]; then printf "gpu|7|x\\ngpu|101|hpcllm-{A}\\ndevel|9|y\\n"; '
            f"else echo '101|hpcllm-{A}|PENDING|Priority|N/A|(null)|0:00|1:00:00|gpu|1'; fi"
        ),
    )
    result = remote.parse_poll(run(remote.poll_command([(A, "101")]), env).stdout)
    assert result.complete and result.queue_position("gpu", "101") == 2
    assert result.queue_position("devel", "101") is None
    # Not asked for the order (another account's poll read it this cycle): the queue is not read at all.
    unordered = remote.parse_poll(run(remote.poll_command([(A, "101")], order=False), env).stdout)
    assert unordered.complete and unordered.positions == {}


def test_a_poll_of_a_busy_cluster_stays_small(tmp_path: Path) -> None:
    """200,000 pending jobs on the cluster and 50,000 of the user's own outside the portal: the answer still holds
    only the portal's jobs and their places, far below the SSH read limit."""
    env = fake_bin(
        tmp_path,
        squeue=(
            'if [[ "$*" == *PENDING* ]]; then seq 1 200000 | sed "s/^/gpu|/; s/$/|other/" | '
            f'sed "s/^gpu|150000|other$/gpu|150000|hpcllm-{A}/"; else '
            "seq 1000000 1050000 | sed 's/$/|array|PENDING|Priority|N/A|(null)|0:00|1:00:00|gpu|1/'; "
            f"echo '150000|hpcllm-{A}|PENDING|Priority|N/A|(null)|0:00|1:00:00|gpu|1'; fi"
        ),
    )
    out = run(remote.poll_command([(A, "150000")]), env)
    result = remote.parse_poll(out.stdout)
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
    result = remote.parse_poll(run(remote.poll_command([(A, "101")]), env).stdout)
    assert result.complete and result.batch_errors == {B: "its runner stopped 5 times; see the job log\nend"}


def slurm_off_path(tmp_path: Path) -> tuple[dict[str, str], SlurmCli]:
    """Fake Slurm binaries in a folder that is not on PATH, each logging its arguments, and a cluster named c2 with
    them, so only the cluster's bin dir can find them; squeue prints the `CLUSTER:` line old Slurm prints."""
    env = fake_bin(tmp_path)
    slurm_dir = tmp_path / "slurm" / "bin"
    slurm_dir.mkdir(parents=True)
    bodies = {
        "squeue": 'echo "CLUSTER: c2"\n'  # and the portal's job, unless a submit asks for its own by name
        f"""case " $* " in *" -n "*) ;; *) echo '101|hpcllm-{A}|PENDING|Priority|N/A||0:00|1:00:00|gpu|1' ;; esac""",
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
    polled = run(remote.poll_command([(A, "101"), (C, "99")], cli), env)
    result = remote.parse_poll(polled.stdout)
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
    result = remote.parse_poll(run(remote.poll_command([(A, "101"), (B, "102")]), env).stdout)
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
