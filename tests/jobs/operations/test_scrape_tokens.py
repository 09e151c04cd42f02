"""Scrape tokens, issued and revoked with `manage.py scrapetoken` or in the admin: shown once, kept as a SHA-256;
and `manage.py metrics reset`."""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from jobs.models import ScrapeToken, token_digest

pytestmark = pytest.mark.django_db


def scrape(client: Client, token: str) -> int:
    return client.get("/metrics", headers={"authorization": f"Bearer {token}"}).status_code


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_the_command_issues_lists_and_revokes_scrape_tokens(client: Client) -> None:
    token = run("scrapetoken", "issue", "prometheus-main").strip()
    assert token.startswith(ScrapeToken.PREFIX) and scrape(client, token) == 200
    row = ScrapeToken.objects.get()
    assert row.digest == token_digest(token) and token not in row.hint
    listing = run("scrapetoken", "list")
    assert "prometheus-main" in listing and "in force" in listing and token not in listing
    assert run("scrapetoken", "revoke", str(row.pk)).strip() == f"revoked scrape token {row.pk}"
    assert scrape(client, token) == 401
    assert "revoked" in run("scrapetoken", "list")
    with pytest.raises(CommandError, match="no scrape token"):
        run("scrapetoken", "revoke", str(row.pk))  # already revoked
    with pytest.raises(CommandError, match="name"):
        run("scrapetoken", "issue", "x" * 101)
    with pytest.raises(CommandError, match="name"):
        run("scrapetoken", "issue", "  ")


def test_the_admin_issues_a_token_once_and_revokes_it(admin_client: Client, client: Client) -> None:
    assert admin_client.get("/admin/jobs/scrapetoken/add/").status_code == 200
    reply = admin_client.post("/admin/jobs/scrapetoken/add/", {"name": "prometheus-main"})
    assert reply.status_code == 200
    row = ScrapeToken.objects.get()
    token = reply.context["token"]
    assert row.name == "prometheus-main" and row.digest == token_digest(token)
    assert f'value="{token}"' in reply.content.decode() and "not shown again" in reply.content.decode()
    assert "no-store" in reply["Cache-Control"]
    assert scrape(client, token) == 200
    for page in ("/admin/jobs/scrapetoken/", f"/admin/jobs/scrapetoken/{row.pk}/change/"):
        shown = admin_client.get(page).content.decode()
        assert row.hint in shown and token not in shown
    admin_client.post("/admin/jobs/scrapetoken/", {"action": "revoke", "_selected_action": [row.pk]})
    assert ScrapeToken.objects.get().revoked_at is not None
    assert scrape(client, token) == 401


def test_the_admin_shows_a_bad_name_again_and_issues_nothing(admin_client: Client) -> None:
    reply = admin_client.post("/admin/jobs/scrapetoken/add/", {"name": ""})
    assert reply.status_code == 200 and "This field is required" in reply.content.decode()
    assert not ScrapeToken.objects.exists()


def test_staff_without_the_permission_cannot_issue_tokens(client: Client, staff_user: Any) -> None:
    client.force_login(staff_user)
    assert client.post("/admin/jobs/scrapetoken/add/", {"name": "mine"}).status_code == 403
    assert not ScrapeToken.objects.exists()


def test_reset_empties_the_metrics_directory(settings: Any, tmp_path: Path) -> None:
    settings.PORTAL_METRICS_DIR = tmp_path
    for name in ("counter_web-1-10.db", "histogram_web-1-10.db"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("kept")
    assert "removed 2 metrics files" in run("metrics", "reset")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
