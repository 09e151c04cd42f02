"""The proxy's routes served at the door (jobs/use/guard.py): one lookup before the body, which is never a cache of
who may do what, CSRF on the browser's route, and errors in OpenAI's shape."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from catalog.models import ClusterAccount
from jobs.models import ApiToken, LLMSession, SessionShare, State, transition
from jobs.sessions.actions import launch
from jobs.use import guard, proxy, targets
from tests.asgi import Portal, bearer, browser
from tests.conftest import LAUNCH
from tests.jobs.use.test_guard import token_of

pytestmark = pytest.mark.django_db(transaction=True)
CHAT = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture
def queued(account: ClusterAccount, django_capture_on_commit_callbacks: Any) -> Any:
    """A session of the owner's waiting in Slurm's queue: found by the proxy, with no server to forward to (409)."""

    def started(alias: str, owner: Any = None) -> LLMSession:
        owner = owner or account.user
        with django_capture_on_commit_callbacks(execute=False):
            session = launch(owner, LAUNCH)
        transition(session.pk, State.QUEUED, cause="test")
        LLMSession.objects.filter(pk=session.pk).update(alias=alias)
        return LLMSession.objects.get(pk=session.pk)

    return started


def chat(token: str, model: str) -> tuple[int, dict[str, Any]]:
    reply = Portal(bearer(token)).post("/api/v1/chat/completions", content=CHAT % model.encode())
    return reply.status_code, reply.json()


def test_a_tokens_next_request_looks_its_model_up_ahead_and_still_checks_everything(
    queued: Any, owner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, token = queued("tiny"), token_of(owner)
    assert chat(token, "tiny")[0] == 409  # found; not running, so nothing is forwarded
    looked_up: list[str | None] = []
    door = guard._api_door

    def spied(authorization: str, guess: str | None) -> Any:
        looked_up.append(guess)
        return door(authorization, guess)

    monkeypatch.setattr(guard, "_api_door", spied)
    status, body = chat(token, "tiny")
    assert (status, looked_up) == (409, ["tiny"]) and str(session.pk) in body["error"]["message"]
    ApiToken.objects.filter(user=owner).update(revoked_at=timezone.now())
    status, body = chat(token, "tiny")  # revoked since its last request: refused, before the body is read
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")


def test_a_session_that_ended_is_refused_on_the_next_request(queued: Any, owner: Any) -> None:
    session, token = queued("tiny"), token_of(owner)
    assert chat(token, "tiny")[0] == 409
    transition(session.pk, State.CANCELLED, cause="test")
    status, body = chat(token, "tiny")  # an alias names live sessions only
    assert (status, body["error"]["code"]) == (404, "model_not_found")
    status, body = chat(token, str(session.pk))  # by uuid the proxy says what became of it
    assert (status, body["error"]["code"]) == (409, State.CANCELLED)


def test_a_session_unshared_is_refused_on_the_next_request(queued: Any, owner: Any, other_user: Any) -> None:
    session, token = queued("lab-model"), token_of(other_user)
    grant = SessionShare.objects.create(session=session, created_by=owner, user=other_user, chat=False, api=True)
    assert chat(token, "ada/lab-model")[0] == 409
    assert chat(token, "ada/lab-model")[0] == 409  # the second time looked up at the door
    SessionShare.objects.filter(pk=grant.pk).update(revoked_at=timezone.now())
    assert chat(token, "ada/lab-model")[0] == 404


def test_the_session_looked_up_ahead_serves_only_the_model_it_was_looked_up_for(queued: Any, owner: Any) -> None:
    first, second, token = queued("first"), queued("second"), token_of(owner)
    assert str(first.pk) in chat(token, "first")[1]["error"]["message"]
    assert str(second.pk) in chat(token, "second")[1]["error"]["message"]  # not the one looked up ahead
    assert str(first.pk) in chat(token, "first")[1]["error"]["message"]


def browser_chat(session: LLMSession, headers: dict[str, str]) -> httpx.Response:
    return Portal(headers).post(f"/sessions/{session.pk}/v1/chat/completions", content=CHAT % b"x")


def test_the_browsers_route_checks_csrf_at_the_door(queued: Any, owner: Any) -> None:
    session, signed_in = queued("tiny"), browser(owner)
    reply = browser_chat(session, {"cookie": signed_in["cookie"]})  # no CSRF header
    assert (reply.status_code, reply.json()["error"]["code"]) == (403, "csrf_failed")
    assert reply.headers["content-type"] == "application/json"
    assert "sandbox" in reply.headers["content-security-policy"]
    assert browser_chat(session, {"cookie": signed_in["cookie"], "x-csrftoken": "x" * 32}).status_code == 403
    reply = browser_chat(session, signed_in)
    assert (reply.status_code, reply.json()["error"]["code"]) == (409, State.QUEUED)


def test_the_browsers_route_reaches_only_what_the_user_may_use(queued: Any, owner: Any, other_user: Any) -> None:
    session = queued("tiny")
    assert browser_chat(session, browser(other_user)).status_code == 404
    SessionShare.objects.create(session=session, created_by=owner, user=other_user, chat=True, api=False)
    assert browser_chat(session, browser(other_user)).status_code == 409
    get_user_model().objects.filter(pk=owner.pk).update(is_active=False)
    assert browser_chat(session, browser(owner)).status_code == 401  # Django's own check of the session's user


def test_an_error_in_a_view_is_a_500_in_openais_shape(
    queued: Any, owner: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    queued("tiny")

    async def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(proxy, "_forward", broken)
    status, body = chat(token_of(owner), "tiny")
    assert (status, body["error"]["type"]) == (500, "server_error") and "a bug" not in str(body)
    assert "a bug" in caplog.text


def test_a_lookup_ahead_notes_no_activity_until_the_request_uses_it(
    account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, LAUNCH)
    transition(session.pk, State.RUNNING, cause="test", host="127.0.0.7", port=8080)
    found = targets.target(targets.Holder(owner.pk), str(session.pk), note=False)
    assert found is not None and found.activity_due and found.base
    assert LLMSession.objects.get(pk=session.pk).last_activity_at is None
    noted = targets.target(targets.Holder(owner.pk), str(session.pk))
    assert noted is not None and not noted.activity_due
    assert LLMSession.objects.get(pk=session.pk).last_activity_at is not None
