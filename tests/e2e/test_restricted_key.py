"""A restricted key on the local cluster (issue 26): its authorized_keys line is the one `manage.py accounts key`
prints, so real sshd runs the portal's gate whatever is asked. The portal installs the gate on first use, and the
whole flow goes through it: launch, poll, the chat and the API, the log, a batch run on the running session, a batch
launch, cancel. Anything else over the same key is refused."""

from __future__ import annotations

import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from catalog.models import Cluster, ClusterAccount
from jobs import gatekeeping
from jobs.batch.actions import start_run
from jobs.cluster import layout, login, logs
from jobs.models import ApiToken, BatchRun, State
from jobs.sessions.actions import request_cancel
from jobs.tasks import cancel_session, stage_batch
from portal import crypto, gate, gate_program, ssh
from tests.asgi import Portal, bearer
from tests.e2e.sessions import drive, start
from tests.e2e.test_batch import batch_launch, checked_prompts

# The door answers on threads of its own, which see only what is committed (tests/asgi.py).
pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def restricted(owner: Any, local_catalog: dict[str, Any]) -> Iterator[ClusterAccount]:
    """The owner's account with a key of its own, whose line in the cluster user's authorized_keys is the gate's; the
    line and the gates installed are removed afterwards."""
    account = ClusterAccount(cluster=Cluster.objects.get(slug="local"), user=owner, kind="personal",
                             username=local_catalog["user"], restricted=True)  # fmt: skip
    account.generate_key()
    account.save()
    home = Path(local_catalog["home"])
    keys = home / ".ssh" / "authorized_keys"
    before = keys.read_text()
    for old in (home / layout.PORTAL_DIR).glob("gate-*.py"):
        old.unlink()  # the portal installs it itself, on first use
    line = gatekeeping.key_line(account)
    keys.write_text(before + line + "\n")
    try:
        yield account
    finally:
        keys.write_text(before)
        for installed in (home / layout.PORTAL_DIR).glob("gate-*.py"):
            installed.unlink()


def test_the_whole_flow_runs_through_the_gate_and_nothing_else_does(
    restricted: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any]
) -> None:
    home = Path(local_catalog["home"])
    session = start(owner, django_capture_on_commit_callbacks)
    assert session.account_id == restricted.pk and session.state == State.QUEUED, session.end_reason
    (installed,) = (home / layout.PORTAL_DIR).glob("gate-*.py")  # the first request installed it
    assert installed.read_text() == gatekeeping.program(restricted.cluster)
    assert installed.stat().st_uid == pwd.getpwnam(local_catalog["user"]).pw_uid

    session = drive(session, lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    _, token = ApiToken.issue(owner, "script")
    body = {"model": str(session.pk), "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    assert Portal(bearer(token)).post("/api/v1/chat/completions", json=body).status_code == 200
    assert "llama-server" in logs.refresh(session).text

    with django_capture_on_commit_callbacks(execute=False):
        run = start_run(session, checked_prompts([f"Item {i}" for i in range(6)], max_tokens=8))
    assert stage_batch.apply(args=(str(run.pk),)).get() == "staged"
    drive(session, lambda s: BatchRun.objects.get(pk=run.pk).is_ended, timeout_s=120)
    run.refresh_from_db()
    assert (run.state, run.done) == (BatchRun.State.FINISHED, 6), run.end_reason

    request_cancel(session, "test")
    cancel_session.apply(args=(str(session.pk),))
    session = drive(session, lambda s: s.is_ended)
    assert session.state == State.CANCELLED, session.end_reason

    launched, launched_run = batch_launch(owner, django_capture_on_commit_callbacks, ["a", "b", "c"])
    launched = drive(launched, lambda s: s.is_ended, timeout_s=180)
    assert launched.state == State.COMPLETED, launched.end_reason
    assert BatchRun.objects.get(pk=launched_run.pk).state == BatchRun.State.FINISHED

    ran = (home / gatekeeping.GATE_LOG).read_text()
    for verb in ("submit", "poll", "log", "stage", "cancel"):
        assert f" ran {verb} " in ran, verb


@pytest.mark.parametrize(
    "request_line",
    ["id", "bash -c id", "cat .ssh/authorized_keys", "scp -t .ssh/authorized_keys", f"{gate.GATE_WORD} install"],
)
def test_anything_else_over_the_key_is_refused(
    restricted: ClusterAccount, local_catalog: dict[str, Any], request_line: str
) -> None:
    home = Path(local_catalog["home"])
    target = restricted.ssh_target()
    assert restricted.run(gate.command(login.HELLO, [], gated=True), timeout_s=30).ok  # installs it
    marker = home / "PWNED"
    answer = ssh.pool.run(target, f"{request_line}; touch {marker}", stdin=b"#!/bin/sh\nid\n", timeout_s=30)
    assert answer.exit_code == gate_program.REFUSED and "refused" in answer.stderr
    assert not marker.exists()
    assert "refused" in (home / gatekeeping.GATE_LOG).read_text().splitlines()[-1]


def test_an_interactive_login_and_port_forwarding_are_refused(
    restricted: ClusterAccount, local_catalog: dict[str, Any], tmp_path: Path
) -> None:
    assert restricted.run(gate.command(login.HELLO, [], gated=True), timeout_s=30).ok  # installs it
    key = tmp_path / "key"
    key.write_text(crypto.decrypt(restricted.private_key_encrypted))
    key.chmod(0o600)
    known = tmp_path / "known_hosts"
    known.write_text(local_catalog["host_key_line"] + "\n")
    client = ["ssh", "-i", str(key), "-p", str(local_catalog["port"]), "-o", f"UserKnownHostsFile={known}",
             "-o", "BatchMode=yes", f"{local_catalog['user']}@{local_catalog['host']}"]  # fmt: skip
    shell = subprocess.run(client, input=b"id\nexit\n", capture_output=True, timeout=30)
    assert b"uid=" not in shell.stdout and b"an interactive login" in shell.stderr
    terminal = subprocess.run([client[0], "-tt", *client[1:]], input=b"id\n", capture_output=True, timeout=30)
    assert b"uid=" not in terminal.stdout and b"PTY allocation request failed" in terminal.stderr
    with pytest.raises(ssh.SSHError):  # restrict: no forwarding (a cluster of direct node access needs none)
        ssh.pool.open_tunnel(restricted.ssh_target(), "127.0.0.1", local_catalog["port"])
