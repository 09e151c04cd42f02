"""The gate (portal/gate.py, portal/gate_program.py) rendered with a few verbs of the test's own and run as sshd runs a
forced command: a real python3 process with the request in SSH_ORIGINAL_COMMAND, a home folder of its own, bash."""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from portal import gate, shellsafe
from portal.slurm.cli import SlurmCli

HELPER = "print('the portal helper')\n"
SAY = gate.Verb("say", 'printf "%s\\n" "$@"', args=(shellsafe.SLUG,), more=shellsafe.JOB_ID)
WHERE = gate.Verb("where", "type squeue; type sacctmgr")
TAKE = gate.Verb(
    "take",
    'cat >"$HOME/received.tar"; echo "took $1"',
    args=(shellsafe.UUID,),
    upload=gate.Upload((("^notes\\.txt$", "data"), ("^helper\\.py$", "helper"), ("^api_key$", "key"))),
)
LOG = ".hpc-llm-portal-test/gate.log"
SESSION = "0f8e6c2a-1b2c-4d3e-8f90-123456789abc"


@pytest.fixture
def program(tmp_path: Path) -> Path:
    table = gate.table(
        [SAY, WHERE, TAKE], helpers=[HELPER], job={"body_starts": "", "bodies": [], "header": []}, log=LOG
    )
    path = tmp_path / "gate.py"
    path.write_text(gate.render(table))
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    # What a researcher's dotfiles may do to a shell; the gate's scripts must not run any of it.
    (path / ".bashrc").write_text("echo FROM-BASHRC\n")
    (path / ".bash_profile").write_text("echo FROM-PROFILE\n")
    (path / "env.sh").write_text("echo FROM-BASH-ENV\n")
    return path


def ask(program: Path, home: Path, request: str | None, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {
        "HOME": str(home),
        "PATH": os.environ["PATH"],
        "BASH_ENV": str(home / "env.sh"),
        "SSH_CONNECTION": "127.0.0.1 5 6 7",
    }
    if request is not None:
        env["SSH_ORIGINAL_COMMAND"] = request
    return subprocess.run([sys.executable, str(program)], input=stdin, env=env, capture_output=True, timeout=30)


def upload(files: dict[str, bytes], link: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buffer.getvalue()


def test_a_verb_runs_its_script_with_its_checked_arguments_and_no_dotfile(program: Path, home: Path) -> None:
    done = ask(program, home, "hpc-llm-portal-gate say hello 12 13_4")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["hello", "12", "13_4"]
    assert b"FROM-" not in done.stdout + done.stderr
    assert "ran say hello 12 13_4" in (home / LOG).read_text()


@pytest.mark.parametrize(
    "request_line, why",
    [
        (None, "an interactive login"),
        ("bash -c id", "not a request of the portal's"),
        ("hpc-llm-portal-gate shell", "unknown verb"),
        ("hpc-llm-portal-gate say Hello", "argument 1"),
        ("hpc-llm-portal-gate say hello x", "argument 2"),
        ("hpc-llm-portal-gate say", "takes 1 arguments"),
        ("hpc-llm-portal-gate where extra", "takes 0 arguments"),
        ("hpc-llm-portal-gate say hello $(id)", "not a request of the portal's"),
        ("hpc-llm-portal-gate say hello;id", "not a request of the portal's"),
        ("hpc-llm-portal-gate say  hello", "not a request of the portal's"),
        ("hpc-llm-portal-gate --slurm-cluster a;b say hello", "not a request of the portal's"),
        ("hpc-llm-portal-gate --slurm-bin relative say hello", "bad value for --slurm-bin"),
        ("hpc-llm-portal-gate --shell x say hello", "unknown option --shell"),
        ("scp -t /home/ada/.ssh/authorized_keys", "not a request of the portal's"),
    ],
)
def test_anything_else_is_refused_said_and_logged(
    program: Path, home: Path, request_line: str | None, why: str
) -> None:
    done = ask(program, home, request_line)
    assert done.returncode == gate_exit_refused()
    assert why in done.stderr.decode() and done.stdout == b""
    logged = (home / LOG).read_text()
    assert "127.0.0.1 refused (" in logged and why in logged


def gate_exit_refused() -> int:
    from portal import gate_program

    return gate_program.REFUSED


def test_slurm_options_make_bare_slurm_commands_name_the_cluster_and_folder(program: Path, home: Path) -> None:
    done = ask(program, home, "hpc-llm-portal-gate --slurm-cluster c2 --slurm-bin /opt/slurm/bin/ where")
    text = done.stdout.decode()
    assert "/opt/slurm/bin/squeue --clusters=c2" in text and "/opt/slurm/bin/sacctmgr" in text
    assert "--clusters" not in text.split("sacctmgr is a function", 1)[1]  # sacctmgr takes no --clusters
    plain = ask(program, home, "hpc-llm-portal-gate where")
    assert "squeue is a function" not in plain.stdout.decode()


def test_the_gates_slurm_preamble_is_the_portals_own(program: Path, home: Path) -> None:
    """The same functions as SlurmCli writes for a plain key: one definition of what a Slurm command becomes."""
    cli = SlurmCli("c2", "/opt/slurm/bin")
    probe = gate.Verb("where", "declare -f squeue sacctmgr")
    plain = subprocess.run(["bash", "-c", cli.script(probe.script)], capture_output=True, text=True).stdout
    table = gate.table([probe], helpers=[], job={"body_starts": "", "bodies": [], "header": []}, log=LOG)
    program.write_text(gate.render(table))
    gated = ask(program, home, gate.command(probe, (), cli, gated=True)).stdout.decode()
    assert gated == plain and "--clusters=c2" in gated


def test_an_upload_of_the_allowed_files_reaches_the_script(program: Path, home: Path) -> None:
    data = upload(
        {"notes.txt": b"anything at all", "helper.py": HELPER.encode(), "api_key": b"sk-hpcllm-" + b"a" * 43 + b"\n"}
    )
    done = ask(program, home, f"hpc-llm-portal-gate take {SESSION}", stdin=data)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"took {SESSION}\n".encode() and (home / "received.tar").read_bytes() == data


@pytest.mark.parametrize(
    "files, link, why",
    [
        ({"notes.txt": b"x"}, "notes.txt", "is not a plain file"),
        ({"../.ssh/authorized_keys": b"ssh-ed25519 AAAA"}, "", "has no place in this upload"),
        ({"helper.py": b"import os; os.system('id')\n"}, "", "is not one of the portal's helpers"),
        ({"api_key": b"not a key"}, "", "is not a session key"),
    ],
)
def test_an_upload_with_anything_else_is_refused_before_the_script_runs(
    program: Path, home: Path, files: dict[str, bytes], link: str, why: str
) -> None:
    done = ask(program, home, f"hpc-llm-portal-gate take {SESSION}", stdin=upload(files, link))
    assert done.returncode == gate_exit_refused() and why in done.stderr.decode()
    assert not (home / "received.tar").exists()
    assert (
        ask(program, home, f"hpc-llm-portal-gate take {SESSION}", stdin=b"not a tar").returncode == gate_exit_refused()
    )


def test_the_gate_names_its_version(program: Path, home: Path) -> None:
    done = ask(program, home, "hpc-llm-portal-gate version")
    assert done.stdout.decode().strip() == gate.version_of(program.read_text())
    assert len(gate.version_of(program.read_text())) == 16


def test_a_plain_key_gets_the_script_itself_and_a_restricted_one_the_gates_request() -> None:
    cli = SlurmCli("c2")
    plain = gate.command(SAY, ["hello", "12"], cli)
    assert shlex.split(plain) == ["bash", "-c", cli.script(SAY.script), "say", "hello", "12"]
    assert gate.command(SAY, ["hello", "12"], cli, gated=True) == "hpc-llm-portal-gate --slurm-cluster c2 say hello 12"
    for bad in (["Hello"], ["hello", "x"], [], ["hello", ""]):
        with pytest.raises(gate.GateError):
            gate.command(SAY, bad)


def test_the_rendered_gate_is_what_its_version_says() -> None:
    table = gate.table([SAY], helpers=[HELPER], job={"body_starts": "", "bodies": [], "header": []}, log=LOG)
    program = gate.render(table)
    assert program == gate.render(table)  # deterministic: the same verbs, the same gate and hash
    other = gate.render(gate.table([SAY, WHERE], helpers=[HELPER], job=table["job"], log=LOG))
    assert gate.version_of(other) != gate.version_of(program)
    assert hashlib.sha256(program.encode()).hexdigest() != hashlib.sha256(other.encode()).hexdigest()
