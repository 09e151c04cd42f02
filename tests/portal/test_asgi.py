"""The ASGI application as uvicorn runs it: /api/v1/ without the cookie middleware, everything else with it."""

from __future__ import annotations

from typing import Any

import pytest

from jobs.models import ApiToken
from tests.asgi import Portal, bearer

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_api_answers_without_the_cookie_middleware(owner: Any) -> None:
    _, token = ApiToken.issue(owner, "script")
    reply = Portal(bearer(token)).get("/api/v1/models")
    assert reply.status_code == 200 and reply.json() == {"object": "list", "data": []}
    assert "set-cookie" not in reply.headers and "vary" not in reply.headers  # no session or auth middleware ran
    assert reply.headers["x-content-type-options"] == "nosniff"  # the proxy's own data-only headers
    assert "sandbox" in reply.headers["content-security-policy"]
    assert Portal().get("/api/v1/models").status_code == 401


def test_pages_still_get_the_middleware() -> None:
    reply = Portal().get("/healthz")
    assert reply.status_code == 200 and reply.headers["x-frame-options"] == "DENY"
    assert reply.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/api/v1/models", "/healthz"])
def test_allowed_hosts_apply_on_both_sides(path: str) -> None:
    assert Portal(host="evil.example").get(path).status_code == 400
