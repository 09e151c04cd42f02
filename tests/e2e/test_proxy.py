"""The proxy and the API against a real llama-server session on the local cluster: streaming, the openai client,
tokens, and who may use which route."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.core.management import call_command
from django.utils import timezone

from catalog.models import Cluster, ClusterRuntime
from jobs.cluster import backend
from jobs.cluster.logs import fetch as fetch_log
from jobs.models import ApiToken, LLMSession, State
from jobs.use import targets
from portal import ssh
from tests.asgi import Portal, bearer, browser, client, run
from tests.conftest import LAUNCH
from tests.e2e.sessions import cancel_all_jobs, drive, local_account
from tests.e2e.test_worker import worker_env
from tests.worker import PortalServer

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


@pytest.fixture
def running(local_catalog: dict[str, Any], owner: Any, django_capture_on_commit_callbacks: Any) -> Iterator[LLMSession]:
    from jobs.sessions.actions import launch
    from jobs.tasks import submit_session

    local_account(owner, local_catalog)
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, LAUNCH)
    submit_session.apply(args=(str(session.pk),))
    session = drive(LLMSession.objects.get(pk=session.pk), lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    LLMSession.objects.filter(pk=session.pk).update(alias="tiny")
    yield LLMSession.objects.get(pk=session.pk)
    cancel_all_jobs()
    ssh.pool.close_all()
    backend.close_forwards()


def test_the_api_reaches_a_tunnel_clusters_server_through_the_forward(running: LLMSession, owner: Any) -> None:
    Cluster.objects.filter(pk=running.cluster_id).update(node_access=Cluster.NodeAccess.TUNNEL)
    found = targets.target(targets.Holder(owner.pk, sees_all=False), "tiny")
    assert found is not None and str(found.base).startswith("http://127.0.0.1:")
    assert running.port is not None and found.base != backend.server_url(running.host, running.port, "127.0.0.0/8")
    _, token = ApiToken.issue(owner, "script")
    reply = Portal(bearer(token)).post("/api/v1/chat/completions", json={**CHAT, "model": "tiny"})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"


def sse_chunks(body: bytes) -> list[dict[str, Any]]:
    events = []
    for line in body.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def test_the_browser_route_streams_a_chat_for_the_owner(running: LLMSession, owner: Any) -> None:
    reply = Portal(browser(owner)).post(f"/sessions/{running.pk}/v1/chat/completions", json={**CHAT, "stream": True})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    body = reply.content
    chunks = sse_chunks(body)
    assert len(chunks) >= 2 and "choices" in chunks[0]
    assert running.api_key.encode() not in body
    assert LLMSession.objects.get(pk=running.pk).last_activity_at is not None


def test_a_stream_counts_as_use_until_its_last_byte(running: LLMSession, owner: Any) -> None:
    """Idle auto-cancel counts from a request's end, not its start: a reply streamed for a long time is use."""
    _, token = ApiToken.issue(owner, "script")

    async def stream() -> datetime:
        first_byte = None
        async with (
            client(bearer(token)) as api,
            api.stream("POST", "/api/v1/chat/completions",
                       json={**CHAT, "model": "tiny", "stream": True, "max_tokens": 400}) as reply,
        ):  # fmt: skip
            async for _ in reply.aiter_raw():
                first_byte = first_byte or timezone.now()  # after the request's start was noted
        assert first_byte is not None
        return first_byte

    first_byte = run(stream())
    deadline = time.monotonic() + 10
    while (seen := LLMSession.objects.get(pk=running.pk).last_activity_at) is None or seen <= first_byte:
        assert time.monotonic() < deadline, (seen, first_byte)  # noted by the proxy's threads as the stream ended
        time.sleep(0.1)


def test_who_may_use_which_route(
    running: LLMSession, owner: Any, other_user: Any, admin_user: Any, staff_user: Any, support_user: Any
) -> None:
    _, token = ApiToken.issue(owner, "test")
    _, other_token = ApiToken.issue(other_user, "test")
    _, staff_token = ApiToken.issue(staff_user, "test")
    _, support_token = ApiToken.issue(support_user, "test")
    routes: list[tuple[str, dict[str, Any] | None]] = [
        (f"/sessions/{running.pk}/v1/models", None),
        (f"/sessions/{running.pk}/v1/chat/completions", CHAT),
    ]
    expected = {"owner": 200, "other": 404, "anonymous": 401, "admin": 200, "staff": 404, "support": 200}
    users = {"owner": owner, "other": other_user, "anonymous": None, "admin": admin_user, "staff": staff_user,
             "support": support_user}  # fmt: skip
    for who, user in users.items():
        page = Portal(browser(user) if user is not None else {})
        for url, data in routes:
            reply = page.post(url, json=data) if data else page.get(url)
            assert reply.status_code == expected[who], (who, url, reply.status_code)
    cases = (("owner", token, 200), ("other", other_token, 404), ("none", "", 401), ("bad", "hpcllm_x", 401),
             ("staff", staff_token, 404), ("support", support_token, 200))  # fmt: skip
    for who, key, status in cases:
        api = Portal(bearer(key) if key else {})
        reply = api.post("/api/v1/chat/completions", json={**CHAT, "model": str(running.pk)})
        assert reply.status_code == status, (who, reply.status_code)
    refused = Portal(bearer(token)).post("/api/v1/slots/0", json={})
    assert refused.status_code == 404  # only the OpenAI routes are forwarded


def test_the_backend_refuses_requests_without_the_session_key(running: LLMSession) -> None:
    url = backend.base_url(running)
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 401


def test_a_stopped_session_answers_409_with_its_state(running: LLMSession, owner: Any) -> None:
    LLMSession.objects.filter(pk=running.pk).update(state=State.QUEUED)
    reply = Portal(browser(owner)).get(f"/sessions/{running.pk}/v1/models")
    assert reply.status_code == 409 and reply.json()["error"]["code"] == "queued"


@pytest.fixture
def portal_server(running: LLMSession, tmp_path: Path) -> Iterator[str]:
    server = PortalServer(worker_env(), tmp_path / "uvicorn.log")
    yield server.start()
    server.stop()


def test_the_openai_client_streams_through_the_api_and_a_revoked_token_is_refused(
    portal_server: str, running: LLMSession, owner: Any
) -> None:
    import openai

    out = StringIO()
    call_command("apitoken", "create", owner.get_username(), "--name", "laptop", stdout=out)
    token = out.getvalue().strip()
    client = openai.OpenAI(base_url=f"{portal_server}/api/v1", api_key=token, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny", "tiny-llama", "tiny-llama:fp16"]
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) >= 2
    whole = client.chat.completions.create(
        model=str(running.pk), messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert whole.choices[0].message.role == "assistant" and whole.usage and whole.usage.completion_tokens > 0
    token_id = ApiToken.objects.get(user=owner, name="laptop").pk
    call_command("apitoken", "revoke", str(token_id), stdout=StringIO())
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_a_client_that_goes_away_cancels_the_generation(portal_server: str, running: LLMSession, owner: Any) -> None:
    """llama-server logs "cancel task" only for a request whose HTTP connection closed before the reply was done."""
    _, token = ApiToken.issue(owner, "script")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=portal_server, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        whole = client.post("/api/v1/chat/completions", json={**body, "max_tokens": 8})
        assert whole.status_code == 200 and "[DONE]" in whole.text
        assert "cancel task" not in fetch_log(running)  # a reply read to the end is not cancelled
        with client.stream("POST", "/api/v1/chat/completions", json={**body, "max_tokens": 900}) as response:
            assert response.status_code == 200
            first = next(line for line in response.iter_lines() if line.startswith("data: {"))
            assert json.loads(first[6:])["choices"]
        # leaving the block mid-reply closes the connection to the portal
    deadline = time.monotonic() + 20
    while "cancel task" not in (log := fetch_log(running)) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert "cancel task" in log, log[-2000:]


@pytest.fixture
def impostor(
    local_catalog: dict[str, Any], owner: Any, django_capture_on_commit_callbacks: Any
) -> Iterator[LLMSession]:
    """A session whose job runs the owner's own server (fake_model_server.py) in place of llama-server."""
    from jobs.sessions.actions import launch
    from jobs.tasks import submit_session

    folder = Path(tempfile.mkdtemp(prefix="impostor-", dir="/tmp"))
    folder.chmod(0o755)  # the cluster's user runs it
    server = folder / "server"
    shutil.copy(Path(__file__).with_name("fake_model_server.py"), server)
    server.chmod(0o755)
    ClusterRuntime.objects.filter(cluster__slug="local", runtime__kind="llama.cpp").update(binary=str(server))
    local_account(owner, local_catalog)
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, LAUNCH)
    submit_session.apply(args=(str(session.pk),))
    session = drive(LLMSession.objects.get(pk=session.pk), lambda s: s.state == State.RUNNING or s.is_ended)
    assert session.state == State.RUNNING, session.end_reason
    yield session
    cancel_all_jobs()
    ssh.pool.close_all()
    shutil.rmtree(folder, ignore_errors=True)


def test_html_from_the_owners_own_server_is_never_served_as_a_page(
    impostor: LLMSession, owner: Any, support_user: Any
) -> None:
    """Whoever opens the session's routes (a support person, say) gets inert JSON, never the owner's script."""
    _, token = ApiToken.issue(owner, "script")
    support = Portal(browser(support_user))
    api = Portal(bearer(token))
    replies = [
        support.get(f"/sessions/{impostor.pk}/v1/models"),
        support.post(f"/sessions/{impostor.pk}/v1/chat/completions", json=CHAT),
        support.post(f"/sessions/{impostor.pk}/v1/completions", json={"prompt": "x"}),
        api.post("/api/v1/chat/completions", json={**CHAT, "model": str(impostor.pk)}),
    ]
    for reply in replies:
        assert reply.headers["Content-Type"] == "application/json", reply.content
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert "sandbox" in reply.headers["Content-Security-Policy"]
        assert "<script>" not in reply.text  # escaped inside the JSON error, or not relayed at all
        assert reply.json()["error"]["type"] == "upstream_error"
    assert [r.status_code for r in replies] == [502, 502, 500, 502]
    assert "text/html" in replies[0].json()["error"]["message"]
