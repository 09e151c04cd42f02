"""A cluster's gate as the portal renders it (jobs/gatekeeping.py): every verb of the portal's in it, the cluster's
binaries pinned, a real submit accepted and a changed one refused, and the authorized_keys line that installs exactly
this gate on first use, run by sh as sshd would run it."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from catalog.models import Cluster, ClusterAccount, ClusterRuntime
from jobs import gatekeeping
from jobs.cluster import jobscript, layout, remote
from portal import gate, gate_program
from tests.test_layout import modules

SID = "0f8e6c2a-1b2c-4d3e-8f90-123456789abc"


def test_every_verb_the_apps_define_is_in_the_gate() -> None:
    defined: set[str] = set()
    for name in modules():
        module = importlib.import_module(name)
        defined |= {v.name for v in vars(module).values() if isinstance(v, gate.Verb)}
    assert defined and defined == {verb.name for verb in gatekeeping.verbs()}


def table_of(program: str) -> dict[str, Any]:
    body = program.split("\nTABLE = ", 1)[1].split("\n\nif __name__", 1)[0]
    return json.loads(eval(body))  # the repr of a JSON string, as render writes it


def submit_upload(cluster: Cluster, binary: str) -> bytes:
    runtime = ClusterRuntime.objects.filter(cluster=cluster, runtime__kind="llama.cpp").select_related("runtime").get()
    spec = jobscript.JobSpec(
        SID, "llama.cpp", "gpu", "", 1, 1, "a100", "", 4, 16, 60, binary, "tiny", 1024, 1,
        model_path="/models/tiny.gguf", rpc_binary=runtime.rpc_binary, modules=tuple(runtime.modules.split()),
        default_flags=tuple(shlex.split(runtime.runtime.default_flags)),
        extra_flags=tuple(shlex.split(runtime.extra_flags)),
    )  # fmt: skip
    payload = remote.submit_payload(jobscript.render(spec), "sk-hpcllm-" + "a" * 43, jobscript.extra_files("llama.cpp"))
    return payload.stdin


def test_a_clusters_gate_takes_its_own_job_and_refuses_another_binary(example_catalog: Path) -> None:
    local = Cluster.objects.get(slug="local")
    binary = ClusterRuntime.objects.get(cluster=local, runtime__kind="llama.cpp").binary
    table = table_of(gatekeeping.program(local))
    upload = table["verbs"]["submit"]["upload"]
    gate_program.check_upload(submit_upload(local, binary), upload, table, "submit")  # passes: no SystemExit
    with pytest.raises(SystemExit) as refused:
        gate_program.check_upload(submit_upload(local, "/usr/bin/python3"), upload, table, "submit")
    assert refused.value.code == gate_program.REFUSED


def test_the_gate_changes_with_the_clusters_runtimes(example_catalog: Path) -> None:
    local = Cluster.objects.get(slug="local")
    before = gatekeeping.program(local)
    ClusterRuntime.objects.filter(cluster=local, runtime__kind="llama.cpp").update(
        binary="/opt/llama.cpp/new/llama-server"
    )
    after = gatekeeping.program(local)
    assert gate.version_of(before) != gate.version_of(after)  # a key's line names one gate: a new one needs a new line


def dequoted(text: str) -> str:
    """An option's value up to its closing quote, as sshd reads it (auth-options.c: only \\" is an escape)."""
    value, index = [], 0
    while text[index] != '"':
        if text[index] == "\\" and text[index + 1] == '"':
            index += 1
        value.append(text[index])
        index += 1
    return "".join(value)


def run_line(home: Path, line: str, request: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The forced command of an authorized_keys line, as sshd runs it: the login shell with -c, the request in
    SSH_ORIGINAL_COMMAND."""
    command = dequoted(line.split('command="', 1)[1])
    env = {
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SSH_ORIGINAL_COMMAND": request,
    }
    return subprocess.run(["bash", "-c", command], input=stdin, env=env, capture_output=True, timeout=30)


def test_the_key_line_installs_exactly_its_gate_and_then_runs_only_through_it(
    example_catalog: Path, account: ClusterAccount, tmp_path: Path
) -> None:
    account.generate_key()
    line = gatekeeping.key_line(account)
    program = gatekeeping.program(account.cluster)
    assert line.startswith('restrict,command="/bin/sh -c ') and line.endswith(account.public_key)
    assert hashlib.sha256(program.encode()).hexdigest() in line and "port-forwarding" not in line

    missing = run_line(tmp_path, line, f"{gate.GATE_WORD} version")
    assert missing.returncode == gate.NOT_INSTALLED and b"not installed" in missing.stderr
    forged = run_line(tmp_path, line, gate.INSTALL_REQUEST, stdin=program.encode().replace(b"bash", b"bosh"))
    assert forged.returncode == gate_program.REFUSED and not list(tmp_path.rglob("gate-*.py"))
    assert run_line(tmp_path, line, gate.INSTALL_REQUEST, stdin=program.encode()).stdout == b"installed\n"
    (installed,) = tmp_path.rglob("gate-*.py")
    assert installed.read_text() == program and oct(installed.stat().st_mode)[-3:] == "600"
    assert installed.relative_to(tmp_path).as_posix() == gate.program_path(program, layout.PORTAL_DIR)

    asked = run_line(tmp_path, line, f"{gate.GATE_WORD} version")
    assert asked.returncode == 0 and asked.stdout.decode().strip() == gate.version_of(program)
    refused = run_line(tmp_path, line, "cat ~/.ssh/id_ed25519")
    assert refused.returncode == gate_program.REFUSED and b"refused" in refused.stderr
    log = (tmp_path / gatekeeping.GATE_LOG).read_text()
    assert "cat ~/.ssh/id_ed25519" in log and "refused" in log


def test_a_tunnel_cluster_s_line_forwards_only_to_the_nodes_named(
    example_catalog: Path, account: ClusterAccount
) -> None:
    account.generate_key()
    line = gatekeeping.key_line(account, ["node1:*", "node2:*"])
    assert ',port-forwarding,permitopen="node1:*",permitopen="node2:*" ' in line


def test_accounts_prints_the_restricted_line_and_marks_the_account(example_catalog: Path, owner: Any) -> None:
    from django.core.management import CommandError, call_command

    out, err = io.StringIO(), io.StringIO()
    call_command("accounts", "add", "--user", owner.username, "--cluster", "local", "--username", "ada",
                 "--restricted", stdout=out, stderr=err)  # fmt: skip
    account = ClusterAccount.objects.get(user=owner, cluster__slug="local")
    assert account.restricted and out.getvalue().strip() == gatekeeping.key_line(account)
    assert "authorized_keys" in err.getvalue()
    tunnel = Cluster.objects.filter(node_access=Cluster.NodeAccess.TUNNEL).first()
    assert tunnel is not None
    with pytest.raises(CommandError, match="--permit-open ADDRESS"):
        call_command("accounts", "add", "--user", owner.username, "--cluster", tunnel.slug, "--username", "ada",
                     "--restricted", stdout=out)  # fmt: skip
    call_command("accounts", "add", "--user", owner.username, "--cluster", tunnel.slug, "--username", "ada",
                 "--restricted", "--permit-open", "10.1.0.11:*", "--permit-open", "fd00::5:*",
                 stdout=(printed := io.StringIO()))  # fmt: skip
    assert 'permitopen="10.1.0.11:*",permitopen="[fd00::5]:*"' in printed.getvalue()
    with pytest.raises(CommandError, match="takes ADDRESS:PORT"):  # a name: the portal forwards to addresses only
        call_command("accounts", "key", str(ClusterAccount.objects.get(user=owner, cluster=tunnel).pk),
                     "--permit-open", "gpu01:*", stdout=io.StringIO())  # fmt: skip


def test_the_connection_test_learns_which_kind_of_line_the_key_has(
    example_catalog: Path, account: ClusterAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain request that the gate refuses means the line is restricted (and the reverse): the account is marked
    so, and asked again as its line wants."""
    from jobs.cluster import login
    from portal import ssh

    asked: list[str] = []

    def restricted_line(target: Any, command: str, **options: Any) -> ssh.CommandResult:
        asked.append(command)
        if not command.startswith(gate.GATE_WORD):
            return ssh.CommandResult(gate_program.REFUSED, "", f"{gate.GATE_WORD}: refused: not a request")
        return ssh.CommandResult(0, "gpu gpu_devel\n", "")

    monkeypatch.setattr(ssh.pool, "run", restricted_line)
    result = login.check(account)
    account.refresh_from_db()
    assert result.ok and account.restricted and "restricted key" in result.message
    assert [c.split(" ", 1)[0] for c in asked] == ["bash", gate.GATE_WORD]


def test_accounts_test_says_which_kind_of_key_it_is(
    example_catalog: Path, account: ClusterAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.core.management import CommandError, call_command

    from portal import ssh

    def plain_line(target: Any, command: str, **options: Any) -> ssh.CommandResult:
        return ssh.CommandResult(0, "gpu\n", "")

    monkeypatch.setattr(ssh.pool, "run", plain_line)
    call_command("accounts", "test", str(account.pk), stdout=(out := io.StringIO()))
    assert "plain key" in out.getvalue() and "accounts key" in out.getvalue()

    def refused(target: Any, command: str, **options: Any) -> ssh.CommandResult:
        return ssh.CommandResult(255, "", "Permission denied (publickey)")

    monkeypatch.setattr(ssh.pool, "run", refused)
    with pytest.raises(CommandError, match="sinfo failed"):
        call_command("accounts", "test", str(account.pk), stdout=io.StringIO())
