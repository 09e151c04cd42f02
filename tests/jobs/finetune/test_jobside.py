"""finetune.sh run by bash as a job would run it, with a stand-in for the trainer: the trainer's exit decides the job's
(done, failed with its reason, or stopped at a checkpoint and requeued), and Slurm's warning reaches the trainer."""

from __future__ import annotations

import os
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from jobs.cluster import layout
from tests.jobs.cluster import jobside

PARTS = ("skeleton.sh", "finetune.sh")
# The trainer's stand-in: what it does is $BEHAVE's; it notes its start, and the signals it gets.
TRAINER = r"""#!/bin/bash
echo "$*" >"$HOME/args"
error=""
while [ $# -gt 0 ]; do [ "$1" = --error ] && error=$2; shift; done
echo started >"$HOME/started"
case "$BEHAVE" in
  done) exit 0 ;;
  fails) echo "the data has no examples" >"$error"; exit 1 ;;
  crashes) exit 3 ;;
  waits) trap 'echo warned >"$HOME/warned"; exit 75' USR1; while :; do sleep 0.05; done ;;
esac
"""
# scontrol's stand-in: notes the requeue and, as Slurm would, stops the job's shell.
SCONTROL = '#!/bin/bash\necho "$@" >"$HOME/scontrol"\nkill -TERM "$PPID"\n'


def executable(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "bin").mkdir()
    executable(tmp_path / "bin" / "scontrol", SCONTROL)
    return tmp_path


def job(home: Path, behave: str, **more: str) -> tuple[subprocess.Popen[str], Path]:
    session = str(uuid.uuid4())
    directory = jobside.session_dir(home, session)
    values = {"SESSION_ID": session, "SERVER_BIN": executable(home / "python", TRAINER), "MODEL_PATH": "/models/m",
              **more}  # fmt: skip
    env = {"HOME": str(home), "PATH": f"{home / 'bin'}:{os.environ['PATH']}", "BEHAVE": behave,
           "SLURM_JOB_ID": "42"}  # fmt: skip
    process = subprocess.Popen(["bash", "-c", jobside.script(values, "", PARTS)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    return process, directory


def test_a_trainer_that_trained_every_step_ends_the_job_well(home: Path) -> None:
    process, directory = job(home, "done")
    assert process.wait(30) == 0
    assert not (directory / layout.NAMES.error_file).exists()


def test_a_run_with_a_parent_hands_the_trainer_the_parents_adapter_beside_its_own_directory(home: Path) -> None:
    parent = str(uuid.uuid4())
    process, directory = job(home, "done", PARENT_RUN=parent)
    assert process.wait(30) == 0
    adapter = jobside.session_dir(home, parent) / layout.NAMES.adapter_dir
    assert (home / "args").read_text().split()[-2:] == ["--parent", str(adapter)]
    process, _ = job(home, "done", PARENT_RUN="")
    assert process.wait(30) == 0 and "--parent" not in (home / "args").read_text()
    process, directory = job(home, "done", PARENT_RUN="../../etc")  # never a path: the gate takes none either
    assert process.wait(30) == 1 and "bad parent run" in (directory / layout.NAMES.error_file).read_text()


@pytest.mark.parametrize(("behave", "reason"), [("fails", "the data has no examples"),
                                                ("crashes", "the trainer stopped with code 3")])  # fmt: skip
def test_a_failing_trainer_fails_the_job_with_its_reason(home: Path, behave: str, reason: str) -> None:
    process, directory = job(home, behave)
    assert process.wait(30) == 1
    assert reason in (directory / layout.NAMES.error_file).read_text()


def test_slurms_warning_reaches_the_trainer_which_stops_at_a_checkpoint_and_the_job_is_requeued(home: Path) -> None:
    process, _ = job(home, "waits")
    deadline = time.monotonic() + 30
    while not (home / "started").exists():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(10)  # USR1 to the batch shell, as --signal=B:USR1@N sends it
    assert process.wait(30) == 143  # Slurm stops the allocation once the job is requeued
    assert (home / "warned").read_text() == "warned\n"
    assert (home / "scontrol").read_text().split() == ["requeue", "42"]
    output = process.stdout.read() if process.stdout else ""
    assert "the trainer saved a checkpoint: asking Slurm to requeue the job" in output
