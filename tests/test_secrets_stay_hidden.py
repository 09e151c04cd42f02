"""Keys never show in a repr, a log line or a traceback's locals (what DEBUG pages and the admins' error emails
print): the session's backend key, personal API tokens, SSH private keys, the staged job payload."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import pytest
from django.views.debug import ExceptionReporter

from catalog.models import ClusterAccount
from jobs.models import ApiToken, LLMSession, State, transition
from jobs.sessions import lifecycle
from jobs.sessions.actions import launch
from jobs.use import targets
from portal import ssh
from tests.conftest import LAUNCH, REPO

pytestmark = pytest.mark.django_db


def code_frames(call: Callable[..., Any], *args: Any) -> str:
    """The local variables of the portal's own frames when `call` fails, as an error page or report shows them
    (the test's own frames, which hold the secret on purpose, are left out)."""
    try:
        call(*args)
    except RuntimeError:
        reporter = ExceptionReporter(None, *sys.exc_info())
    else:
        raise AssertionError("expected the call to fail")
    shown = [
        f"{frame['function']}: {frame['vars']}"
        for frame in reporter.get_traceback_frames()
        if frame["filename"].startswith(tuple(str(REPO / app) for app in ("portal", "catalog", "jobs")))
    ]
    assert shown, "no frame of the portal's code in the traceback"
    return "\n".join(shown)


def boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("the database went away")


@pytest.fixture
def running(account: ClusterAccount, owner: Any, django_capture_on_commit_callbacks: Any) -> LLMSession:
    with django_capture_on_commit_callbacks(execute=False):
        session = launch(owner, LAUNCH)
    transition(session.pk, State.RUNNING, cause="test", host="127.0.0.7", port=8080)
    return LLMSession.objects.get(pk=session.pk)


def test_the_lookup_shows_no_backend_key(running: LLMSession, owner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    found = targets.target(targets.Holder(owner.pk), str(running.pk))
    assert found is not None and found.key == running.api_key and running.api_key not in repr(found)
    monkeypatch.setattr(targets, "_execute", boom)  # fails after the key is decrypted
    LLMSession.objects.filter(pk=running.pk).update(last_activity_at=None)
    text = code_frames(targets.target, targets.Holder(owner.pk), str(running.pk))
    assert "secret" in text and running.api_key not in text


def test_a_token_lookup_shows_no_token(owner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, token = ApiToken.issue(owner, "laptop")
    monkeypatch.setattr(targets, "_execute", boom)  # the "last used" write, after the token matched
    text = code_frames(targets.holder, token)
    assert "'token'" in text and token not in text


def test_a_failed_submit_shows_neither_the_payload_nor_the_ssh_key(
    running: LLMSession, account: ClusterAccount, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    LLMSession.objects.filter(pk=running.pk).update(state=State.PENDING, job_id="")
    monkeypatch.setattr(ssh.pool, "run", boom)
    with caplog.at_level(logging.DEBUG):
        text = code_frames(lifecycle.submit, str(running.pk), "claim")
    private_key = account.ssh_target().private_key
    assert "payload" in text
    for secret in (running.api_key, private_key.splitlines()[1]):
        assert secret not in text and secret not in caplog.text
    assert private_key.splitlines()[1] not in repr(account.ssh_target())
