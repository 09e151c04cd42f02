"""Session bookkeeping without a cluster: accounts, encryption at rest, validation, state changes and polls."""

from __future__ import annotations

import shlex
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from catalog.models import ClusterAccount
from jobs.cluster import remote
from jobs.models import LLMSession, State, transition
from jobs.sessions import lifecycle
from jobs.sessions.actions import launch, request_cancel
from jobs.use import targets
from portal import ssh
from portal.slurm.squeue import QueuedJob
from tests.conftest import LAUNCH
from tests.jobs.cluster.framing import framed

SQUEUE_DOWN = "@@squeue 1\nUnable to contact slurm controller\n@@end"  # the poll's answer while slurmctld is away


@pytest.fixture
def session(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> LLMSession:
    with django_capture_on_commit_callbacks(execute=False):
        return launch(owner, LAUNCH)


def raw_column(table: str, column: str, pk: Any) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM {table} WHERE id = %s", [pk if isinstance(pk, int) else pk.hex])
        return str(cursor.fetchone()[0])


def test_the_session_key_is_encrypted_at_rest_and_unique(session: LLMSession, owner: Any) -> None:
    stored = raw_column(LLMSession._meta.db_table, "api_key_encrypted", session.pk)
    assert session.api_key.startswith("sk-hpcllm-") and session.api_key not in stored
    other = LLMSession.objects.get(pk=session.pk)
    other.pk = None
    other.api_key_encrypted = ""
    other.save()
    assert other.api_key != session.api_key


def test_transitions_are_conditional_and_recorded(session: LLMSession) -> None:
    assert transition(session.pk, State.SUBMITTING, cause="claim", allowed_from={State.PENDING})
    assert not transition(session.pk, State.SUBMITTING, cause="again", allowed_from={State.PENDING})
    assert transition(session.pk, State.FAILED, cause="boom", end_reason="boom")
    assert not transition(session.pk, State.RUNNING, cause="too late")
    session.refresh_from_db()
    assert session.state == State.FAILED and session.ended_at is not None
    assert [(e.from_state, e.to_state) for e in session.events.all()][1:] == [
        ("pending", "submitting"),
        ("submitting", "failed"),
    ]


def test_a_fresh_submit_claim_keeps_other_workers_out_but_a_stale_one_is_taken_over(
    session: LLMSession, settings: Any
) -> None:
    assert lifecycle.claim_submit(str(session.pk), "task-1")
    assert not lifecycle.claim_submit(str(session.pk), "task-2")
    assert lifecycle.claim_submit(str(session.pk), "task-1")  # a retry or redelivery of the same task
    LLMSession.objects.filter(pk=session.pk).update(submit_claimed_at=timezone.now() - timedelta(hours=1))
    assert lifecycle.claim_submit(str(session.pk), "task-2")
    assert LLMSession.objects.get(pk=session.pk).submit_attempts == 3


def test_cancelling_before_submission_ends_at_once(session: LLMSession) -> None:
    request_cancel(session, "changed my mind")
    session.refresh_from_db()
    assert session.state == State.CANCELLED
    assert not lifecycle.claim_submit(str(session.pk), "late-task")


def queued_job(job_id: str, state: str, reason: str = "", nodes: str = "node1") -> QueuedJob:
    return QueuedJob(job_id, "hpcllm-x", state, reason, datetime(2026, 11, 21, 12, 0), nodes, 0, 60, "gpu", 1)


def submitted(session: LLMSession, job_id: str = "42") -> LLMSession:
    transition(session.pk, State.QUEUED, cause="test", job_id=job_id)
    return LLMSession.objects.get(pk=session.pk)


# What `scontrol show node` said of the nodes: their names, addresses and host names.
NODES = {"node1": {"node1", "127.0.0.5"}, "node2": {"node2", "127.0.0.6"}}


def poll(**fields: Any) -> remote.PollResult:
    return remote.PollResult(squeue_ok=True, complete=True, **{"node_names": NODES, **fields})


def test_polls_move_a_session_from_queued_to_running(session: LLMSession) -> None:
    s = submitted(session)
    assert lifecycle.apply_poll(s, poll(queued={"42": queued_job("42", "PENDING", "Priority")}))
    s.refresh_from_db()
    assert (s.state, s.slurm_reason) == (State.QUEUED, "Priority")
    assert not lifecycle.apply_poll(
        s, poll(queued={"42": queued_job("42", "PENDING", "Priority")})
    )  # no change, no write
    connection_file = {"host": "127.0.0.5", "port": 30123, "node": "node1"}
    assert lifecycle.apply_poll(
        s, poll(queued={"42": queued_job("42", "RUNNING")}, connections={str(s.pk): connection_file})
    )
    s.refresh_from_db()
    assert (s.state, s.host, s.port, s.node_list) == (State.RUNNING, "127.0.0.5", 30123, "node1")
    assert [e.to_state for e in s.events.all()][-2:] == ["starting", "running"]


@pytest.mark.parametrize(
    "slurm_state, error, expected, reason",
    [
        ("CANCELLED", "", State.CANCELLED, "cancelled (scancel outside the portal)"),
        ("TIMEOUT", "", State.TIMEOUT, "time limit of 30 min"),
        ("COMPLETED", "", State.COMPLETED, "the server exited"),
        ("FAILED", "the server exited with code 1 before it was ready: bad magic", State.FAILED, "bad magic"),
        ("NODE_FAIL", "", State.FAILED, "Slurm: NODE_FAIL (exit code 0:0, NodeDown)"),
    ],
)
def test_finished_jobs_end_their_sessions_with_a_reason(
    session: LLMSession, slurm_state: str, error: str, expected: State, reason: str
) -> None:
    s = submitted(session)
    record = {"JobState": slurm_state, "ExitCode": "0:0", "Reason": "NodeDown" if slurm_state == "NODE_FAIL" else ""}
    lifecycle.apply_poll(
        s, poll(finished={"42": record}, asked_gone={"42"}, errors={str(s.pk): error} if error else {})
    )
    s.refresh_from_db()
    assert s.state == expected and reason in s.end_reason


def test_a_job_nobody_knows_ends_only_after_the_grace_period(session: LLMSession, settings: Any) -> None:
    s = submitted(session)
    settings.PORTAL_JOB_LOST_AFTER_S = 600
    assert not lifecycle.apply_poll(s, poll(asked_gone={"42"}))
    LLMSession.objects.filter(pk=s.pk).update(last_seen_at=timezone.now() - timedelta(hours=1))
    s.refresh_from_db()
    assert lifecycle.apply_poll(s, poll(asked_gone={"42"}))
    s.refresh_from_db()
    assert s.state == State.FAILED and "no longer knows" in s.end_reason


def test_an_unreachable_cluster_makes_sessions_unknown_never_ended(
    session: LLMSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = submitted(session)

    def refuse(*args: Any, **kwargs: Any) -> ssh.CommandResult:
        raise ssh.ConnectionRefused(None, "connection refused")

    monkeypatch.setattr(ssh.pool, "run", refuse)
    for _ in range(3):
        lifecycle.poll(s.account_id)
    s.refresh_from_db()
    assert s.state == State.UNKNOWN and s.ended_at is None

    def squeue_down(*args: Any, **kwargs: Any) -> ssh.CommandResult:
        return ssh.CommandResult(0, framed(kwargs.get("stdin"), SQUEUE_DOWN), "")

    monkeypatch.setattr(ssh.pool, "run", squeue_down)
    transition(s.pk, State.QUEUED, cause="the cluster answered again")
    lifecycle.poll(s.account_id)
    s.refresh_from_db()
    assert s.state == State.UNKNOWN
    assert "Unable to contact slurm controller" in s.events.last().cause  # type: ignore[union-attr]


def test_a_cancel_that_gave_up_is_repeated_by_the_poll(session: LLMSession, monkeypatch: pytest.MonkeyPatch) -> None:
    s = submitted(session)
    LLMSession.objects.filter(pk=s.pk).update(cancel_requested_at=timezone.now() - timedelta(minutes=5))
    commands: list[str] = []

    def cluster(target: Any, command: str, **kwargs: Any) -> ssh.CommandResult:
        commands.append(command)
        answer = "@@squeue 0\n42|hpcllm-x|RUNNING|None|N/A|node1|1:00|1:00|gpu|1\n@@end"
        return ssh.CommandResult(0, framed(kwargs.get("stdin"), answer), "")

    monkeypatch.setattr(ssh.pool, "run", cluster)
    lifecycle.poll(s.account_id)
    assert [shlex.split(c)[3:] for c in commands[1:]] == [["scancel", "42"]]  # the scancel verb, by job id


def test_a_queued_session_knows_its_place_in_the_queue(session: LLMSession) -> None:
    s = submitted(session)
    polled = poll(queued={"42": queued_job("42", "PENDING", "Priority")}, positions={("gpu", "42"): 2})
    assert lifecycle.apply_poll(s, polled)
    s.refresh_from_db()
    assert s.queue_position == 2
    assert not lifecycle.apply_poll(s, polled)


@pytest.fixture
def health_server() -> Iterator[int]:
    """A model server that answers its health check, on a free local port."""

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_a_scheduler_that_does_not_answer_does_not_cut_a_working_chat(
    session: LLMSession, monkeypatch: pytest.MonkeyPatch, health_server: int, owner: Any
) -> None:
    answering = submitted(session)
    transition(answering.pk, State.RUNNING, cause="test", host="127.0.0.1", port=health_server)

    def squeue_down(*args: Any, **kwargs: Any) -> ssh.CommandResult:
        return ssh.CommandResult(0, framed(kwargs.get("stdin"), SQUEUE_DOWN), "")

    monkeypatch.setattr(ssh.pool, "run", squeue_down)
    lifecycle.poll(answering.account_id)
    answering.refresh_from_db()
    assert answering.state == State.UNKNOWN and answering.serving and answering.ended_at is None
    assert "still answers" in answering.events.last().cause  # type: ignore[union-attr]
    found = targets.target(targets.Holder(owner.pk), str(answering.pk))
    assert found is not None and str(found.base) == f"http://127.0.0.1:{health_server}"  # the proxy still forwards

    transition(answering.pk, State.RUNNING, cause="back", host="127.0.0.1", port=1)  # a server that went away
    lifecycle.poll(answering.account_id)
    answering.refresh_from_db()
    assert answering.state == State.UNKNOWN and not answering.serving
    assert targets.target(targets.Holder(owner.pk), str(answering.pk)).base is None


def running_on(s: LLMSession, connection: dict[str, Any], nodes: str = "node1") -> remote.PollResult:
    return poll(queued={"42": queued_job("42", "RUNNING", nodes=nodes)}, connections={str(s.pk): connection})


@pytest.mark.parametrize(
    "connection, why",
    [
        ({"host": "127.0.0.2", "port": 8080}, "not one of its nodes"),  # another service on the portal's own host
        ({"host": "127.0.0.6", "port": 30123}, "not one of its nodes"),  # another job's node
        ({"host": "127.0.0.5", "port": 22}, "not one from 1024 to 65535"),
        ({"host": "127.0.0.5", "port": "30123"}, "not one from 1024 to 65535"),
        ({"host": "127.0.0.5", "port": 30123, "key": "guess; rm -rf ~"}, "not one the portal makes"),
    ],
)
def test_an_address_outside_the_jobs_nodes_is_refused_and_recorded(
    session: LLMSession, connection: dict[str, Any], why: str
) -> None:
    s = submitted(session)
    lifecycle.apply_poll(s, running_on(s, connection))
    lifecycle.apply_poll(s, running_on(s, connection))  # the same refusal is recorded once
    s.refresh_from_db()
    assert s.state != State.RUNNING and not s.serving
    refusals = [e.cause for e in s.events.all() if "refused" in e.cause]
    assert len(refusals) == 1 and why in refusals[0]


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:9/heard?x=#", "localhost/heard", "ada@localhost", "localhost#x", "localhost?x", "[::1]", "::1%lo",
     "127.0.0.1 ", ""],
)  # fmt: skip
def test_a_host_that_is_not_a_name_or_an_ip_address_is_refused_even_if_slurm_named_it(
    session: LLMSession, host: str
) -> None:
    # As if `scontrol show node` (or a section forged into the poll's answer) gave the node this address.
    s = submitted(session)
    nodes = {"node1": {"node1", host}}
    lifecycle.apply_poll(s, poll(queued={"42": queued_job("42", "RUNNING")}, node_names=nodes,
                                 connections={str(s.pk): {"host": host, "port": 8080}}))  # fmt: skip
    s.refresh_from_db()
    assert not s.serving and s.host == ""
    assert "not a host name or an IP address" in s.events.last().cause  # type: ignore[union-attr]


def test_a_running_server_that_reports_a_foreign_address_is_sent_nothing_more(session: LLMSession) -> None:
    s = submitted(session)
    lifecycle.apply_poll(s, running_on(s, {"host": "127.0.0.5", "port": 30123}))
    s.refresh_from_db()
    assert s.serving
    lifecycle.apply_poll(s, running_on(s, {"host": "127.0.0.9", "port": 443}))  # the owner rewrote connection.json
    s.refresh_from_db()
    assert (s.state, s.host, s.port) == (State.STARTING, "", None)


def test_a_server_that_moves_within_its_job_is_followed_and_recorded(session: LLMSession) -> None:
    s = submitted(session)
    lifecycle.apply_poll(s, running_on(s, {"host": "127.0.0.5", "port": 30123}, nodes="node[1-2]"))
    s.refresh_from_db()
    lifecycle.apply_poll(s, running_on(s, {"host": "127.0.0.6", "port": 30999}, nodes="node[1-2]"))
    s.refresh_from_db()
    assert (s.state, s.host, s.port) == (State.RUNNING, "127.0.0.6", 30999)
    assert "moved from 127.0.0.5:30123 to 127.0.0.6:30999" in s.events.last().cause  # type: ignore[union-attr]


def test_unknown_node_addresses_mean_no_decision_yet(session: LLMSession) -> None:
    s = submitted(session)
    unsaid = remote.PollResult(squeue_ok=True, complete=True, queued={"42": queued_job("42", "RUNNING")},
                               connections={str(s.pk): {"host": "127.0.0.5", "port": 30123}})  # fmt: skip
    assert not lifecycle.apply_poll(s, unsaid)
    s.refresh_from_db()
    assert s.state == State.QUEUED


def test_a_requeued_job_goes_back_to_queued_and_comes_back_with_a_new_key(session: LLMSession) -> None:
    s = submitted(session)
    lifecycle.apply_poll(s, running_on(s, {"host": "127.0.0.5", "port": 30123}))
    s.refresh_from_db()
    old_key = s.api_key
    lifecycle.apply_poll(s, poll(queued={"42": queued_job("42", "PENDING", "BeginTime", nodes="")}))
    s.refresh_from_db()
    assert (s.state, s.host, s.port, s.serving) == (State.QUEUED, "", None, False)
    assert "requeued" in s.events.last().cause  # type: ignore[union-attr]
    new_key = "sk-hpcllm-" + "n" * 43
    lifecycle.apply_poll(s, running_on(s, {"host": "127.0.0.6", "port": 31000, "restarts": 1, "key": new_key}, "node2"))
    s.refresh_from_db()
    assert (s.state, s.host, s.api_key) == (State.RUNNING, "127.0.0.6", new_key) and new_key != old_key
    assert new_key not in " ".join(e.cause for e in s.events.all())


def test_a_server_whose_connection_file_is_gone_gets_no_more_requests(session: LLMSession) -> None:
    s = submitted(session)
    lifecycle.apply_poll(s, running_on(s, {"host": "127.0.0.5", "port": 30123}))
    lifecycle.apply_poll(s, poll(queued={"42": queued_job("42", "RUNNING")}))  # restarted between two polls
    s.refresh_from_db()
    assert (s.state, s.serving) == (State.STARTING, False)
