"""Sign-in throttling (django-axes, portal/lockout.py): failed sign-ins lock a user name and an address out for a
cool-off, at the portal's sign-in page and the admin's, while API tokens keep working."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from axes.models import AccessAttempt
from django.db.models import F
from django.test import Client
from django.utils import timezone

from jobs.models import ApiToken
from portal.asgi import application
from tests.asgi import Portal, bearer

REPO = Path(__file__).resolve().parents[2]
LIMIT = 3
COOL_OFF = timedelta(minutes=15)
RIGHT = "correct horse battery"  # the conftest users' password
FORM_ERROR = b"Please enter a correct username and password"
HOME, AWAY, ELSEWHERE = "192.0.2.10", "198.51.100.20", "203.0.113.30"  # documentation addresses (RFC 5737)


@pytest.fixture(autouse=True)
def _throttle(settings: Any) -> None:
    """A small limit, and a fast hasher: every failure that is not refused checks a password."""
    settings.AXES_FAILURE_LIMIT = LIMIT
    settings.AXES_COOLOFF_TIME = COOL_OFF
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def sign_in(username: str, password: str, address: str = HOME, path: str = "/accounts/login/", **meta: Any) -> Any:
    """One attempt from a fresh browser at `address`."""
    return Client().post(path, {"username": username, "password": password}, REMOTE_ADDR=address, **meta)


def lock_out(username: str, address: str = HOME) -> Any:
    """Fail until locked out; the failure that reaches the limit is answered with the lockout page."""
    for _ in range(LIMIT - 1):
        assert sign_in(username, "wrong", address).status_code == 200
    return sign_in(username, "wrong", address)


def signed_in(reply: Any) -> bool:
    return bool(reply.wsgi_request.user.is_authenticated)


def test_failures_up_to_the_limit_get_the_form_then_even_the_right_password_is_refused(owner: Any) -> None:
    for _ in range(LIMIT - 1):
        reply = sign_in("ada", "wrong")
        assert reply.status_code == 200 and FORM_ERROR in reply.content
    assert sign_in("ada", "wrong").status_code == 429
    refused = sign_in("ada", RIGHT)
    assert refused.status_code == 429 and not signed_in(refused)
    page = refused.content.decode()
    assert "Too many failed sign-ins" in page and 'class="topbar"' in page  # the portal's page, not a bare message
    ends = AccessAttempt.objects.get(username="ada").attempt_time + COOL_OFF
    shown = timezone.localtime(datetime.fromisoformat(re.findall(r'<time datetime="([^"]+)"', page)[0]))
    assert ends <= shown < ends + timedelta(minutes=1)  # the minute after the lock ends
    assert f">{shown:%H:%M} " in page and "(in 15 minutes)" in page
    assert COOL_OFF.total_seconds() - 60 < int(refused["Retry-After"]) <= COOL_OFF.total_seconds()


def test_another_user_from_another_address_is_not_locked(owner: Any, other_user: Any) -> None:
    assert lock_out("ada", HOME).status_code == 429
    reply = sign_in("grace", RIGHT, AWAY)
    assert reply.status_code == 302 and signed_in(reply)


def test_the_name_is_locked_from_every_address_and_the_address_for_every_name(owner: Any, other_user: Any) -> None:
    assert lock_out("ada", HOME).status_code == 429
    assert sign_in("ada", RIGHT, AWAY).status_code == 429
    assert sign_in("grace", RIGHT, HOME).status_code == 429


def test_spellings_of_a_name_share_its_count(owner: Any) -> None:
    """LDAP matches names regardless of case: "ADA" is a guess at ada's password."""
    for spelling, address in zip(["Ada", "ADA", " ada"], [HOME, AWAY, ELSEWHERE], strict=True):
        sign_in(spelling, "wrong", address)
    assert sign_in("ada", RIGHT, "192.0.2.99").status_code == 429


def test_a_forwarded_for_header_does_not_change_the_address_counted(owner: Any, other_user: Any) -> None:
    """Only the web server decides whether to believe X-Forwarded-For (uvicorn, for proxies it trusts)."""
    for n in range(LIMIT):
        sign_in(f"nobody{n}", "wrong", HOME, HTTP_X_FORWARDED_FOR=f"192.0.2.{100 + n}")
    assert sign_in("grace", RIGHT, HOME, HTTP_X_FORWARDED_FOR="192.0.2.200").status_code == 429
    assert sign_in("grace", RIGHT, AWAY).status_code == 302


def test_after_the_cool_off_the_right_password_works_and_retrying_does_not_prolong_it(owner: Any) -> None:
    assert lock_out("ada").status_code == 429
    AccessAttempt.objects.update(attempt_time=F("attempt_time") - (COOL_OFF - timedelta(minutes=1)))
    assert sign_in("ada", RIGHT).status_code == 429  # a minute left; this refused attempt does not restart it
    AccessAttempt.objects.update(attempt_time=F("attempt_time") - timedelta(minutes=1, seconds=1))
    reply = sign_in("ada", RIGHT)
    assert reply.status_code == 302 and signed_in(reply)


def test_a_successful_sign_in_resets_that_users_count(owner: Any) -> None:
    for _ in range(2):
        for _ in range(LIMIT - 1):
            assert sign_in("ada", "wrong", AWAY).status_code == 200
        assert sign_in("ada", RIGHT, HOME).status_code == 302  # from anywhere
    assert not AccessAttempt.objects.filter(username="ada").exists()


def test_signing_in_as_oneself_does_not_clear_failures_against_someone_else(owner: Any, other_user: Any) -> None:
    """Otherwise anyone with an account could guess at others' passwords for ever, signing in between rounds."""
    for _ in range(LIMIT - 1):
        sign_in("grace", "wrong", HOME)
    assert sign_in("ada", RIGHT, HOME).status_code == 302
    assert sign_in("grace", "wrong", HOME).status_code == 429


def test_the_admin_sign_in_is_throttled(staff_user: Any) -> None:
    for _ in range(LIMIT - 1):
        reply = sign_in("hopper", "wrong", path="/admin/login/")
        assert reply.status_code == 200 and b"Please enter the correct username and password" in reply.content
    assert sign_in("hopper", "wrong", path="/admin/login/").status_code == 429
    refused = sign_in("hopper", RIGHT, path="/admin/login/")
    assert refused.status_code == 429 and not signed_in(refused)
    assert b"Too many failed sign-ins" in refused.content
    assert sign_in("hopper", RIGHT, AWAY).status_code == 429  # one count for both sign-in pages


@pytest.mark.django_db(transaction=True)  # the API looks tokens up on its own threads, which see committed rows only
def test_an_api_token_still_works_while_its_users_sign_in_is_locked(owner: Any) -> None:
    token = ApiToken.issue(owner, "script")[1]
    assert lock_out("ada").status_code == 429
    reply = Portal(bearer(token), address=(HOME, 50000)).get("/api/v1/models")
    assert reply.status_code == 200 and reply.json()["object"] == "list"
    assert sign_in("ada", RIGHT).status_code == 429  # still locked


def asgi_sign_in(username: str, password: str, address: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """One attempt through the ASGI application as uvicorn runs it, where axes's middleware takes its async path."""
    csrf = "c" * 32  # Django takes the cookie's secret, unmasked, as the form's token
    body = f"username={username}&password={password}&csrfmiddlewaretoken={csrf}".encode()
    headers = [
        (b"host", b"127.0.0.1"),
        (b"cookie", f"csrftoken={csrf}".encode()),
        (b"content-type", b"application/x-www-form-urlencoded"),
        (b"content-length", str(len(body)).encode()),
    ]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/accounts/login/", "raw_path": b"/accounts/login/", "query_string": b"", "root_path": "",
             "client": (address, 50000), "server": ("127.0.0.1", 8000), "headers": headers}  # fmt: skip
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not messages:
            await asyncio.sleep(3600)  # the client keeps the connection open
        return messages.pop()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(application(scope, receive, send), 30))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], {k.lower(): v for k, v in start["headers"]}, b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.django_db(transaction=True)  # Django runs the view on a thread of its own, with its own connection
def test_the_lockout_page_comes_through_the_asgi_application_too(owner: Any) -> None:
    statuses = [asgi_sign_in("ada", "wrong", HOME)[0] for _ in range(LIMIT)]
    status, headers, page = asgi_sign_in("ada", RIGHT, HOME)
    assert [*statuses, status] == [*[200] * (LIMIT - 1), 429, 429]
    assert b"Too many failed sign-ins" in page and int(headers[b"retry-after"]) > 0


PROBE = (
    "import json, django; from django.conf import settings; django.setup(); "
    "print(json.dumps([settings.AXES_FAILURE_LIMIT, settings.AXES_COOLOFF_TIME.total_seconds()]))"
)


def read_settings(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_LOGIN_")}
    environ.update({"DJANGO_SETTINGS_MODULE": "portal.settings", "PORTAL_VAR_DIR": str(tmp_path / "var"), **env})
    return subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=environ, capture_output=True, text=True)


def test_the_limit_and_the_cool_off_come_from_the_environment(tmp_path: Path) -> None:
    default = read_settings(tmp_path)
    assert default.returncode == 0, default.stderr
    assert json.loads(default.stdout) == [5, 15 * 60]
    site = read_settings(tmp_path, PORTAL_LOGIN_FAILURE_LIMIT="10", PORTAL_LOGIN_COOLOFF_MINUTES="60")
    assert site.returncode == 0, site.stderr
    assert json.loads(site.stdout) == [10, 60 * 60]
    bad = read_settings(tmp_path, PORTAL_LOGIN_FAILURE_LIMIT="0")
    assert bad.returncode != 0 and "PORTAL_LOGIN_FAILURE_LIMIT=0 is below the minimum 1" in bad.stderr
