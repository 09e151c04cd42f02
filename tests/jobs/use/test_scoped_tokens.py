"""Scoped API tokens (issue 29): a token limited to named models, with an expiry and a rate of its own, through the
ASGI application as scripts reach it; how the token page and `apitoken create` make one."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from jobs.models import ApiToken, LLMSession, counts
from tests.asgi import Portal, bearer
from tests.jobs.use.upstream import Server

pytestmark = pytest.mark.django_db(transaction=True)


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def test_a_token_limited_to_named_models_reaches_those_and_no_other(
    owner: Any, running: LLMSession, server: Server
) -> None:
    scoped = Portal(bearer(ApiToken.issue(owner, "lab", allowed_models=["tiny"])[1]))
    assert scoped.post("/api/v1/chat/completions", json=chat("tiny")).status_code == 200
    for other in (str(running.pk), "tiny-llama", "ada/tiny", "lab-llama"):  # the same session by another name too
        refused = scoped.post("/api/v1/chat/completions", json=chat(other))
        assert refused.status_code == 403, other
        assert refused.json()["error"]["code"] == "model_not_allowed" and "tiny" in refused.json()["error"]["message"]
    anthropic = scoped.post("/api/v1/messages", json={**chat("tiny-llama"), "max_tokens": 5})
    assert anthropic.status_code == 403 and anthropic.json()["type"] == "error"  # in the route's own shape
    assert [m["id"] for m in scoped.get("/api/v1/models").json()["data"]] == ["tiny"]
    assert len(server.got) == 1  # nothing outside the scope reached the server
    unscoped = Portal(bearer(ApiToken.issue(owner, "all")[1]))
    assert {"tiny", "tiny-llama"} <= {m["id"] for m in unscoped.get("/api/v1/models").json()["data"]}


def test_an_expired_token_is_refused_like_a_revoked_one(owner: Any, running: LLMSession, server: Server) -> None:
    made, token = ApiToken.issue(owner, "week", expires_at=timezone.now() + timedelta(days=7))
    api = Portal(bearer(token))
    assert api.post("/api/v1/chat/completions", json=chat("tiny")).status_code == 200
    ApiToken.objects.filter(pk=made.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    refused = api.post("/api/v1/chat/completions", json=chat("tiny"))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert ApiToken.objects.get(pk=made.pk).expired and "expired" in ApiToken.objects.get(pk=made.pk).describe()


def test_a_token_with_its_own_rate_is_held_to_it(
    owner: Any, running: LLMSession, server: Server, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.PORTAL_API_REQUESTS_PER_MINUTE = 100
    monkeypatch.setattr(counts, "clock", lambda: 1_800_000_135.0)  # a minute of its own
    api = Portal(bearer(ApiToken.issue(owner, "slow", requests_per_minute=2)[1]))
    statuses = [api.get("/api/v1/models") for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert "this token made more than 2 requests a minute" in statuses[-1].json()["error"]["message"]


def test_a_batch_naming_a_model_outside_the_scope_is_refused(owner: Any, settings: Any, tmp_path: Any) -> None:
    settings.MEDIA_ROOT = tmp_path
    api = Portal(bearer(ApiToken.issue(owner, "lab", allowed_models=["lab-llama"])[1]))
    line = {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": chat("tiny")}
    uploaded = api.post("/api/v1/files", files={"file": ("b.jsonl", json.dumps(line).encode() + b"\n")},
                        data={"purpose": "batch"})  # fmt: skip
    assert uploaded.status_code == 200, uploaded.text
    asked = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    refused = api.post("/api/v1/batches", json=asked)
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "model_not_allowed")


@pytest.mark.parametrize(
    ("scope", "says"),
    [
        ({"allowed_models": ["ok", "not ok"]}, "Not a model's name"),
        ({"allowed_models": [f"m{n}" for n in range(21)]}, "At most 20"),
        ({"expires_at": timezone.now() - timedelta(minutes=1)}, "future"),
        ({"requests_per_minute": 0}, "requests a minute"),
        ({"requests_per_minute": 10_000}, "the site's limit"),
    ],
)
def test_a_scope_a_token_cannot_have_is_refused_and_nothing_is_made(owner: Any, scope: Any, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        ApiToken.issue(owner, "bad", **scope)
    assert not ApiToken.objects.exists()


def test_the_token_page_makes_a_scoped_token_and_says_so(client: Client, owner: Any) -> None:
    client.force_login(owner)
    page = client.post("/tokens/", {"name": "lab", "models": "lab-llama, ada/tiny", "days": "30", "rate": "20"})
    made = ApiToken.objects.get(user=owner)
    assert made.allowed_models == ["lab-llama", "ada/tiny"] and made.requests_per_minute == 20
    assert made.expires_at is not None and timedelta(days=29) < made.expires_at - timezone.now() <= timedelta(days=30)
    assert "only lab-llama, ada/tiny" in page.content.decode() and "20 requests a minute" in page.content.decode()
    bad = client.post("/tokens/", {"name": "oops", "days": "forever"})
    assert "not a whole number" in bad.content.decode() and 'value="oops"' in bad.content.decode()
    assert ApiToken.objects.filter(user=owner).count() == 1


def test_the_command_line_makes_a_scoped_token(owner: Any) -> None:
    out = StringIO()
    call_command("apitoken", "create", owner.username, "--name", "ci", "--model", "lab-llama", "--days", "7",
                 "--rate", "30", stdout=out)  # fmt: skip
    assert out.getvalue().startswith(ApiToken.PREFIX)
    made = ApiToken.objects.get(user=owner)
    assert (made.allowed_models, made.requests_per_minute) == (["lab-llama"], 30)
    listed = StringIO()
    call_command("apitoken", "list", owner.username, stdout=listed)
    assert "only lab-llama" in listed.getvalue() and "30 requests a minute" in listed.getvalue()
    call_command("apitoken", "create", owner.username, "--name", "dated", "--expires", "2099-01-31", stdout=StringIO())
    assert ApiToken.objects.get(name="dated").expires_at.year == 2099  # type: ignore[union-attr]
