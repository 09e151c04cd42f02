"""Sessions end to end: real Slurm over real SSH, a real llama-server and ggml-rpc-server, the tiny GGUF model.

Tasks run in this process (submit_session.apply, poll_account as beat would call it); tests/e2e/test_worker.py
runs them in a real Celery worker.
"""

from __future__ import annotations

import base64
import http.server
import json
import socket
import subprocess
import threading
import time
from typing import Any

import httpx
import pytest
from django.core.exceptions import ValidationError
from django.test import Client

from catalog.models import (
    Cluster,
    ClusterAccount,
    VariantLocation,
)
from jobs.cluster import backend, layout, remote
from jobs.models import ApiToken, Conversation, LLMSession, State
from jobs.sessions import lifecycle
from jobs.sessions.actions import launch, request_cancel
from jobs.tasks import cancel_session
from portal import ssh
from tests.asgi import Portal, bearer, browser
from tests.conftest import LAUNCH, LOCAL_CLUSTER_SCRIPT
from tests.e2e.sessions import drive, jobs_named, shell, start

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]


def squeue_states(name: str) -> list[str]:
    """The states squeue shows for jobs of this name (empty once none is pending or running)."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%T"], capture_output=True, text=True).stdout
    return out.split()


def states(session: LLMSession) -> list[str]:
    return [session.events.first().to_state, *(e.to_state for e in session.events.all()[1:])]  # type: ignore[union-attr]


def test_a_one_gpu_session_runs_and_its_server_demands_the_key(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any]
) -> None:
    session = start(owner, django_capture_on_commit_callbacks)
    assert session.state == State.QUEUED and session.job_id
    session = drive(session, lambda s: s.state in {State.RUNNING} or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    assert states(session) == ["pending", "submitting", "queued", "starting", "running"]
    assert session.node_list.startswith("node") and session.port

    url = backend.base_url(session)
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {session.api_key}"}, timeout=10)
    assert models.status_code == 200
    assert models.json()["data"][0]["id"] == session.served_model_name
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-not-this-one"}, timeout=10)
    assert wrong.status_code == 401

    # The session directory is private, the key file too, and the key is not on any command line.
    listing = shell(
        local_catalog,
        f"stat -c '%a %n' ~/{layout.session_dir(str(session.pk))} "
        f"~/{layout.session_dir(str(session.pk))}/api_key "
        f"~/{layout.session_dir(str(session.pk))}/connection.json",
    ).stdout
    assert [line.split()[0] for line in listing.splitlines()] == ["700", "600", "600"]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert session.api_key not in ps and "llama-server" in ps

    request_cancel(session, "test")
    cancel_session.apply(args=(str(session.pk),))
    session.refresh_from_db()
    assert session.state == State.CANCELLED
    assert session.end_reason == "cancelled from the portal"
    gone = shell(local_catalog, f"test -e ~/{layout.session_dir(str(session.pk))}/connection.json; echo $?")
    assert gone.stdout.strip() == "1"


def test_the_accounts_page_tests_a_login_for_real(account: ClusterAccount, owner: Any, client: Client) -> None:
    client.force_login(owner)
    reply = client.post(f"/clusters/accounts/{account.pk}/test", headers={"HX-Request": "true"}).content.decode()
    assert f"Connected as {account.username}" in reply and "gpu_devel" in reply
    stranger = ClusterAccount.objects.create(cluster=account.cluster, kind="service", label="lab", username="llmuser")
    stranger.members.add(owner)  # a new key pair, not in the cluster's authorized_keys
    refused = client.post(f"/clusters/accounts/{stranger.pk}/test", headers={"HX-Request": "true"}).content.decode()
    assert "Connected" not in refused and "the server rejected the key" in refused and "authorized_keys" in refused


def test_a_batch_session_serves_four_requests_at_once(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    session = start(owner, django_capture_on_commit_callbacks, purpose="batch")
    session = drive(session, lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    key = {"Authorization": f"Bearer {session.api_key}"}
    props = httpx.get(f"{backend.base_url(session)}/props", headers=key, timeout=10).json()
    assert props["total_slots"] == 4
    assert props["default_generation_settings"]["n_ctx"] == session.context_length  # each request, whole context


def test_the_portal_reaches_the_server_through_an_ssh_tunnel_too(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    Cluster.objects.filter(slug="local").update(node_access=Cluster.NodeAccess.TUNNEL)
    session = drive(start(owner, django_capture_on_commit_callbacks), lambda s: s.state == State.RUNNING or s.is_ended)
    url = backend.base_url(session)
    assert url is not None and session.port is not None and url.host == "127.0.0.1"
    assert url != backend.server_url(session.host, session.port, session.cluster.node_networks)
    key = {"Authorization": f"Bearer {session.api_key}"}
    assert httpx.get(url.copy_with(path="/v1/models"), headers=key, timeout=10).status_code == 200
    assert httpx.get(url.copy_with(path="/v1/models"), timeout=10).status_code == 401


def test_a_two_node_rpc_session_answers_a_chat_completion(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any]
) -> None:
    session = start(owner, django_capture_on_commit_callbacks, nodes=2)
    session = drive(session, lambda s: s.state == State.RUNNING or s.is_ended, timeout_s=180)
    assert session.state == State.RUNNING, session.end_reason
    assert session.node_list in {"node[1-2]", "node[2-3]", "node[1,3]"}
    log = shell(local_catalog, f"cat ~/{layout.session_dir(str(session.pk))}/job.log").stdout
    assert "ggml-rpc-server on node" in log
    # llama-server connected to the RPC server to place the model's layers on it.
    assert log.split("starting llama-server", 1)[1].count("Accepted client connection") >= 2
    rpc_files = shell(local_catalog, f"cat ~/{layout.session_dir(str(session.pk))}/rpc-*.addr").stdout.split()
    assert len(rpc_files) == 1
    # ggml-rpc-server itself listens on loopback; what the job advertises is its relay, which wants the key first.
    assert "ggml-rpc-server on node" in log and "its relay at" in log
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert any("ggml-rpc-server -H 127.0.0.1 -p" in line for line in ps.splitlines())
    host, port = rpc_files[0].rsplit(":", 1)
    assert f"-p {port}" not in ps
    with socket.create_connection((host, int(port)), timeout=10) as intruder:
        assert intruder.recv(200).startswith(b"HPCLLM-RPC1 ")
        intruder.sendall(b"\x00" * 130)  # a handshake's worth of bytes without the key (a ggml HELLO is zeros)
        intruder.settimeout(10)
        try:
            answer = intruder.recv(65536)
        except ConnectionResetError:  # closed with our bytes unread
            answer = b""
        assert answer == b""  # closed, nothing from ggml-rpc-server
    log = shell(local_catalog, f"cat ~/{layout.session_dir(str(session.pk))}/job.log").stdout
    assert "rpcrelay: refused a connection" in log
    # ...and the session is not disturbed by it.
    reply = httpx.post(
        f"{backend.base_url(session)}/v1/chat/completions",
        headers={"Authorization": f"Bearer {session.api_key}"},
        json={"model": session.served_model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] > 0


def test_a_bad_model_path_fails_with_the_servers_error(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    VariantLocation.objects.filter(cluster__slug="local").update(path="/nonexistent/models/missing.gguf")
    session = drive(start(owner, django_capture_on_commit_callbacks), lambda s: s.is_ended, timeout_s=120)
    assert session.state == State.FAILED
    assert "/nonexistent/models/missing.gguf" in session.end_reason
    assert "before it was ready" in session.end_reason


def test_more_gpus_than_a_node_has_fails_at_submit_with_slurms_message(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    session = start(owner, django_capture_on_commit_callbacks, gpus=3)
    assert session.state == State.FAILED
    assert "Requested node configuration is not available" in session.end_reason
    assert not session.job_id


def test_a_user_without_an_account_cannot_submit(local_catalog: dict[str, Any], other_user: Any) -> None:
    with pytest.raises(ValidationError, match="no account on Local test cluster"):
        launch(other_user, LAUNCH)


def test_a_one_minute_walltime_ends_in_timeout(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    session = start(owner, django_capture_on_commit_callbacks, walltime=1)
    session = drive(session, lambda s: s.is_ended, timeout_s=240, every_s=3)
    assert session.state == State.TIMEOUT, session.end_reason
    assert "time limit of 1 min" in session.end_reason


def test_an_ssh_outage_ends_nothing_and_sessions_come_back(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, client: Client
) -> None:
    running = drive(start(owner, django_capture_on_commit_callbacks), lambda s: s.state == State.RUNNING or s.is_ended)
    assert running.state == State.RUNNING
    subprocess.run([LOCAL_CLUSTER_SCRIPT, "stop-sshd"], check=True, capture_output=True)
    try:
        for _ in range(3):
            drive(running, lambda s: True)
            running.refresh_from_db()
            assert running.state == State.UNKNOWN
        causes = [e.cause for e in running.events.filter(to_state=State.UNKNOWN)]
        assert causes and "cannot reach Local test cluster" in causes[0]
        # The scheduler cannot be asked, but the server answers: its chat goes on through the portal.
        assert running.serving and "still answers" in causes[0]
        client.force_login(owner)
        conversation = Conversation.objects.create(session=running, owner=running.owner)
        client.post(f"/sessions/{running.pk}/chat/{conversation.pk}/send", {"message": "hello", "max_tokens": "8"})
        reply = conversation.messages.get(role="assistant").content
        assert reply and "did not answer" not in reply
    finally:
        subprocess.run([LOCAL_CLUSTER_SCRIPT, "start-sshd"], check=True, capture_output=True)
    running = drive(running, lambda s: s.state != State.UNKNOWN)
    assert running.state == State.RUNNING
    assert running.ended_at is None


def test_a_cancel_during_a_submit_leaves_no_job(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, client: Client
) -> None:
    """The cancel wins: the submit retry that comes after it creates no job, and the session can be deleted."""
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, LAUNCH)
    assert lifecycle.claim_submit(str(session.pk), "first-attempt")  # a submit is under way, retrying
    request_cancel(session, "test")
    assert cancel_session.apply(args=(str(session.pk),)).get() == State.CANCELLED
    payload = remote.submit_payload("#!/bin/bash\nsleep 600\n", session.api_key, {})
    late = ssh.pool.run(
        account.ssh_target(), remote.submit_command(str(session.pk), payload.sha256), stdin=payload.stdin
    )  # fmt: skip  (the submit that was in flight arrives now)
    assert remote.parse_submit(late.stdout).cancelled
    assert jobs_named(f"hpcllm-{session.pk}") == []
    client.force_login(owner)
    client.post(f"/sessions/{session.pk}/delete")
    assert LLMSession.objects.get(pk=session.pk).deleted_at is not None  # hidden; kept for the usage records
    assert client.get(f"/sessions/{session.pk}/").status_code == 404


def test_a_job_whose_sbatch_reply_was_lost_is_found_and_cancelled(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    session = start(owner, django_capture_on_commit_callbacks)
    name = f"hpcllm-{session.pk}"
    assert session.job_id and jobs_named(name)
    # As if sbatch had created the job but its reply never reached the portal.
    LLMSession.objects.filter(pk=session.pk).update(state=State.SUBMITTING, job_id="")
    request_cancel(LLMSession.objects.get(pk=session.pk), "test")
    assert cancel_session.apply(args=(str(session.pk),)).get() == State.CANCELLED
    deadline = time.monotonic() + 30
    while squeue_states(name):
        assert time.monotonic() < deadline, squeue_states(name)
        time.sleep(0.5)


class Listener:
    """Something else answering at an address the portal once used; it records every request it gets."""

    def __init__(self, host: str, port: int) -> None:
        heard = self.heard = []  # type: list[str]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                heard.append(self.path)
                self.send_error(418)

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def proxy_replies(session: LLMSession, owner: Any) -> list[int]:
    """The browser route and the API, both asked for a completion of this session."""
    _, token = ApiToken.issue(owner, "script")
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    return [
        Portal(browser(owner)).post(f"/sessions/{session.pk}/v1/chat/completions", json=body).status_code,
        Portal(bearer(token)).post("/api/v1/chat/completions", json={**body, "model": str(session.pk)}).status_code,
    ]


@pytest.mark.django_db(transaction=True)  # the proxy looks sessions up on its own threads
def test_a_requeued_job_gets_no_requests_at_its_old_address_and_starts_again_with_a_new_key(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    session = drive(start(owner, django_capture_on_commit_callbacks), lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    old_key, old_host, old_port = session.api_key, session.host, session.port
    assert old_port is not None
    subprocess.run(["scontrol", "requeue", session.job_id], check=True, capture_output=True)  # as a preemption would
    session = drive(session, lambda s: s.state != State.RUNNING)
    session = drive(session, lambda s: s.state == State.QUEUED or s.is_ended)
    assert session.state == State.QUEUED and (session.host, session.port) == ("", None)
    assert "requeued" in session.events.filter(to_state=State.QUEUED).last().cause  # type: ignore[union-attr]

    # Whatever answers at the old address now never hears from the portal: not the key, not a chat.
    listener = Listener(old_host, old_port)
    try:
        assert proxy_replies(session, owner) == [409, 409]
        assert listener.heard == []
    finally:
        listener.close()

    # Start it again now rather than at the begin time Slurm gave it. Not within the second of the requeue: slurmd
    # refuses a launch whose credential is no newer than the one it revoked ("Job credential revoked").
    while squeue_states(f"hpcllm-{session.pk}") != ["PENDING"]:
        time.sleep(0.2)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={session.job_id}", "StartTime=now"], check=True, capture_output=True)
    session = drive(session, lambda s: s.state == State.RUNNING or s.is_ended, timeout_s=180)
    assert session.state == State.RUNNING, session.end_reason
    assert session.api_key != old_key and "new key" in session.events.last().cause  # type: ignore[union-attr]
    url = backend.base_url(session)
    with_old = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {old_key}"}, timeout=10)
    with_new = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {session.api_key}"}, timeout=10)
    assert (with_old.status_code, with_new.status_code) == (401, 200)
    assert proxy_replies(session, owner) == [200, 200]


@pytest.mark.django_db(transaction=True)  # the proxy looks sessions up on its own threads
def test_an_address_outside_the_jobs_nodes_is_refused_and_recorded(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any]
) -> None:
    session = drive(start(owner, django_capture_on_commit_callbacks), lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    connection = f"~/{layout.session_dir(str(session.pk))}/connection.json"
    # The owner rewrites the file in their home to point the portal at another service of the portal's own host (on
    # a site: its metadata service, a database; a test sends nothing off this machine, even when the check fails).
    assert session.port is not None
    elsewhere = Listener("127.0.0.2", session.port)
    rewrite = 's/"host": "[^"]*"/"host": "127.0.0.2"/'
    try:
        shell(local_catalog, f"cp {connection} {connection}.real && sed -i '{rewrite}' {connection}")
        session = drive(session, lambda s: s.state != State.RUNNING)
        assert session.state == State.STARTING and not session.serving
        refusals = [e.cause for e in session.events.all() if "127.0.0.2" in e.cause]
        assert len(refusals) == 1 and "not one of its nodes" in refusals[0]
        drive(session, lambda s: True)  # asked again, it is not recorded twice
        assert sum("127.0.0.2" in e.cause for e in session.events.all()) == 1
        assert proxy_replies(session, owner) == [409, 409]
        assert elsewhere.heard == []
    finally:
        elsewhere.close()

    shell(local_catalog, f"mv -f {connection}.real {connection}")
    session = drive(session, lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING and proxy_replies(session, owner) == [200, 200]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.django_db(transaction=True)  # the proxy looks sessions up on its own threads
def test_a_forged_connection_file_sends_nothing_anywhere_but_to_the_jobs_own_server(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any, local_catalog: dict[str, Any]
) -> None:
    """The real poll script reads a real connection.json that goes on with sections of its own, as the old poll read
    them: the job's node at an address that carries another port and a path, and a place in the queue. A listener
    there (on this machine) must hear nothing; the session is sent nothing until its file says where it serves."""
    session = drive(start(owner, django_capture_on_commit_callbacks), lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    served_at = (session.host, session.port)
    listener = Listener("127.0.0.1", free_port())
    forged = f"127.0.0.1:{listener.server.server_port}/heard?x=#"
    text = (
        json.dumps({"host": forged, "port": session.port, "key": ""}) + "\n"
        f"@@nodes 0\nNodeName={session.node_list} NodeAddr={forged} NodeHostName={forged}\n"
        f"@@order\ngpu|{session.job_id}|1\n@@end\n"
    )
    connection = f"~/{layout.session_dir(str(session.pk))}/connection.json"
    encoded = base64.b64encode(text.encode()).decode()
    try:
        shell(local_catalog, f"cp {connection} {connection}.real && echo {encoded} | base64 -d >{connection}.new && "
                             f"mv -f {connection}.new {connection}")  # fmt: skip
        session = drive(session, lambda s: (s.host, s.port) != served_at or s.state != State.RUNNING, timeout_s=60)
        replies = proxy_replies(session, owner)
        assert listener.heard == []
        assert replies == [409, 409] and session.host != forged and not session.serving
        assert not any("heard" in e.cause for e in session.events.all())
    finally:
        listener.close()
    shell(local_catalog, f"mv -f {connection}.real {connection}")
    session = drive(session, lambda s: s.state == State.RUNNING or s.is_ended)
    assert (session.state, (session.host, session.port)) == (State.RUNNING, served_at)
    assert proxy_replies(session, owner) == [200, 200] and listener.heard == []
