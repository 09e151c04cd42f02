"""Fair share on shared servers (jobs/use/fairshare.py), through the ASGI application: a user's requests in flight on
a shared session or a service are capped, past the cap 429 with Retry-After in the route's API's shape, others are
served, and a request's slot is freed when its answer ends however it ends. The session's server is the proxy tests'
stand-in (tests/jobs/use/upstream.py); counted in the database here (tests/jobs/use/test_shared_counts.py covers
Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile, UploadedFile
from django.test import Client
from django.utils.datastructures import MultiValueDict

from catalog.models import ClusterAccount
from jobs.batch import actions as batch_actions
from jobs.batch.forms import BatchForm
from jobs.models import Conversation, InFlight, LLMSession, ModelService, SessionShare, counts
from jobs.operations import metrics
from jobs.services import actions as service_actions
from jobs.use import fairshare
from tests.asgi import bearer, browser, client, run
from tests.conftest import LAUNCH
from tests.jobs.services.test_services import ready
from tests.jobs.use.upstream import Server, token_of

pytestmark = pytest.mark.django_db(transaction=True)
CHAT = {"messages": [{"role": "user", "content": "hi"}], "stream": True}


class Held(httpx.AsyncByteStream):
    """A stream that sends its first event at once and ends when the test lets it."""

    def __init__(self, done: asyncio.Event) -> None:
        self.done = done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n'
        await self.done.wait()
        yield b"data: [DONE]\n\n"


@pytest.fixture(autouse=True)
def capped(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.PORTAL_MAX_INFLIGHT_PER_USER = 2
    settings.REDIS_URL = ""  # the database as the store, whatever the environment says
    monkeypatch.setattr(counts, "_down_until", 0.0)


@pytest.fixture
def holding(server: Server) -> asyncio.Event:
    """The server streams until the returned event is set (on the test's event loop)."""
    done = asyncio.Event()
    server.answer = lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"},
                                                   stream=Held(done))  # fmt: skip
    return done


def share(running: LLMSession, owner: Any, user: Any) -> None:
    SessionShare.objects.create(session=running, user=user, created_by=owner)


async def opened(stack: AsyncExitStack, headers: dict[str, str], path: str, body: dict[str, Any]) -> httpx.Response:
    """A request whose answer has begun and is kept open (until the stack closes)."""
    api = await stack.enter_async_context(client(headers))
    reply = await stack.enter_async_context(api.stream("POST", path, json=body))
    if reply.status_code == 200:
        await anext(reply.aiter_raw())
    else:
        await reply.aread()
    return reply


def test_a_users_third_stream_on_a_shared_session_gets_429_while_another_user_is_served(
    server: Server, holding: asyncio.Event, running: LLMSession, owner: Any, other_user: Any
) -> None:
    share(running, owner, other_user)
    grantee = bearer(token_of(other_user))
    body = {**CHAT, "model": f"{owner.username}/tiny"}
    owners_token = bearer(token_of(owner))

    async def three_and_another() -> tuple[list[httpx.Response], httpx.Response]:
        async with AsyncExitStack() as stack:
            replies = [await opened(stack, grantee, "/api/v1/chat/completions", body) for _ in range(3)]
            owners = await opened(stack, owners_token, "/api/v1/chat/completions", {**CHAT, "model": "tiny"})
            holding.set()
            return replies, owners

    refused_before = metrics.PROXY_REFUSED.labels("fair_share")._value.get()
    replies, owners = run(three_and_another())
    assert [r.status_code for r in replies] == [200, 200, 429] and owners.status_code == 200
    assert metrics.PROXY_REFUSED.labels("fair_share")._value.get() == refused_before + 1  # /metrics counts it
    refused = replies[2]
    assert refused.headers["retry-after"] == str(fairshare.RETRY_AFTER_S)
    error = refused.json()["error"]
    assert error["code"] == "too_many_requests_in_flight" and "2 requests in flight" in error["message"]
    assert len(server.got) == 3  # the refused request never reached the server


def test_anthropics_route_is_refused_in_its_shape(
    server: Server, holding: asyncio.Event, running: LLMSession, owner: Any, other_user: Any, settings: Any
) -> None:
    settings.PORTAL_MAX_INFLIGHT_PER_USER = 1
    share(running, owner, other_user)
    grantee = bearer(token_of(other_user))
    body = {**CHAT, "model": f"{owner.username}/tiny", "max_tokens": 5}

    async def two() -> httpx.Response:
        async with AsyncExitStack() as stack:
            await opened(stack, grantee, "/api/v1/messages", body)
            refused = await opened(stack, grantee, "/api/v1/messages", body)
            holding.set()
            return refused

    refused = run(two())
    assert refused.status_code == 429 and "retry-after" in refused.headers
    assert refused.json()["type"] == "error" and refused.json()["error"]["type"] == "rate_limit_error"


def owners_three_chats(running: LLMSession, owner: Any, holding: asyncio.Event) -> list[int]:
    """The statuses of three chats at once from the owner's browser, all held open until the third is answered."""
    page = browser(owner)

    async def three() -> list[int]:
        async with AsyncExitStack() as stack:
            replies = [await opened(stack, page, f"/sessions/{running.pk}/v1/chat/completions", CHAT)
                       for _ in range(3)]  # fmt: skip
            holding.set()
            return [r.status_code for r in replies]

    return run(three())


def test_the_owners_own_session_shared_with_nobody_is_not_capped(
    server: Server, holding: asyncio.Event, running: LLMSession, owner: Any
) -> None:
    assert owners_three_chats(running, owner, holding) == [200, 200, 200]
    assert not InFlight.objects.exists()


def test_the_owners_own_requests_count_once_the_session_is_shared(
    server: Server, holding: asyncio.Event, running: LLMSession, owner: Any, other_user: Any
) -> None:
    share(running, owner, other_user)
    assert owners_three_chats(running, owner, holding) == [200, 200, 429]


def test_a_slot_is_freed_when_the_stream_ends_and_when_the_client_goes_away(
    server: Server, holding: asyncio.Event, running: LLMSession, owner: Any, other_user: Any, settings: Any
) -> None:
    settings.PORTAL_MAX_INFLIGHT_PER_USER = 1
    share(running, owner, other_user)
    grantee = bearer(token_of(other_user))
    body = {**CHAT, "model": f"{owner.username}/tiny"}

    async def in_turn() -> list[int]:
        statuses = []
        async with AsyncExitStack() as stack:  # the client leaves after the first event
            statuses.append((await opened(stack, grantee, "/api/v1/chat/completions", body)).status_code)
        await freed()
        holding.set()  # from now on every stream ends by itself
        async with client(grantee) as api:
            statuses.append((await api.post("/api/v1/chat/completions", json=body)).status_code)
        await freed()
        async with client(grantee) as api:
            statuses.append((await api.post("/api/v1/chat/completions", json=body)).status_code)
        return statuses

    async def freed() -> None:
        for _ in range(200):  # the slot is left on the proxy's threads, after the answer's end
            if not await asyncio.to_thread(InFlight.objects.exists):
                return
            await asyncio.sleep(0.025)
        raise AssertionError("the slot was never freed")

    assert run(in_turn()) == [200, 200, 200]


def test_a_service_counts_a_users_requests_across_its_replicas_under_its_own_cap(
    account: ClusterAccount, owner: Any, shared_user: Any, lab: Any, server: Server, holding: asyncio.Event,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    with django_capture_on_commit_callbacks(execute=False):
        service = service_actions.create(owner, "llama-lab", LAUNCH, min_replicas=2, max_replicas=2,
                                         audience=ModelService.Audience.GROUPS, groups=[lab],
                                         max_inflight_per_user=3)  # fmt: skip
    ready(service)
    body = {**CHAT, "model": "llama-lab"}
    owners, others = bearer(token_of(owner)), bearer(token_of(shared_user))

    async def four_and_another() -> tuple[list[int], int]:
        async with AsyncExitStack() as stack:
            mine = [(await opened(stack, owners, "/api/v1/chat/completions",
                                  {**body, "messages": [{"role": "user", "content": f"q{n}"}]})).status_code
                    for n in range(4)]  # fmt: skip
            theirs = await opened(stack, others, "/api/v1/chat/completions", body)
            holding.set()
            return mine, theirs.status_code

    assert run(four_and_another()) == ([200, 200, 200, 429], 200)


def test_a_batch_run_on_a_shared_session_leaves_a_slot_for_chat_whatever_it_asks(
    account: ClusterAccount, owner: Any, other_user: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from jobs.models import State, transition
    from jobs.sessions import actions as session_actions

    with django_capture_on_commit_callbacks(execute=False):
        session = session_actions.launch(owner, {**LAUNCH, "purpose": "batch"})
    transition(session.pk, State.RUNNING, cause="test", host="127.0.0.7", port=8080)
    session.refresh_from_db()

    def run_asking(concurrency: int) -> int:
        files: MultiValueDict[str, UploadedFile] = MultiValueDict(
            {"prompts": [SimpleUploadedFile("p.txt", b"one\ntwo\n")]}
        )
        form = BatchForm({"max_tokens": 5, "concurrency": concurrency}, files)
        assert form.is_valid(), form.errors
        assert form.checked is not None
        with django_capture_on_commit_callbacks(execute=False):
            return batch_actions.start_run(session, form.checked).concurrency

    assert session.parallel > 1
    assert run_asking(session.parallel) == session.parallel  # its owner's alone: every slot if asked
    share(session, owner, other_user)
    assert run_asking(session.parallel) == session.parallel - 1
    assert run_asking(1) == 1


def test_an_answer_that_fails_before_its_stream_frees_its_slot(
    server: Server, running: LLMSession, owner: Any, other_user: Any, settings: Any
) -> None:
    settings.PORTAL_MAX_INFLIGHT_PER_USER = 1
    share(running, owner, other_user)

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    server.answer = unreachable
    grantee = bearer(token_of(other_user))
    body = {"model": f"{owner.username}/tiny", "messages": []}

    async def twice() -> list[int]:
        statuses = []
        async with client(grantee) as api:
            for _ in range(2):
                statuses.append((await api.post("/api/v1/chat/completions", json=body)).status_code)
                for _ in range(200):
                    if not await asyncio.to_thread(InFlight.objects.exists):
                        break
                    await asyncio.sleep(0.025)
        return statuses

    assert run(twice()) == [502, 502]  # the second was let in: the first's slot was freed


def test_the_plain_form_send_counts_under_the_same_share_as_the_proxy(
    client: Client, running: LLMSession, owner: Any, other_user: Any, settings: Any
) -> None:
    settings.PORTAL_MAX_INFLIGHT_PER_USER = 1
    share(running, owner, other_user)
    theirs = fairshare.session_share(other_user.pk, str(running.pk), shared=True)
    assert theirs is not None
    streaming = counts.enter(theirs.name, theirs.cap, fairshare.LEASE_S)  # a stream of theirs through the proxy
    assert streaming is not None
    client.force_login(other_user)
    conversation = Conversation.objects.create(session=running, owner=other_user)
    send = f"/sessions/{running.pk}/chat/{conversation.pk}/send"
    page = client.post(send, {"message": "hello"}, follow=True).content.decode()
    assert "1 request in flight on this shared session" in page and not conversation.messages.exists()
    counts.leave(streaming)
    client.post(send, {"message": "hello"})
    assert conversation.messages.count() == 2  # asked (the server at port 9 does not answer: its error is the reply)
    assert not InFlight.objects.exists()
