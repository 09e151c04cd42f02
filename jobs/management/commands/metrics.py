"""`manage.py metrics issue NAME` (prints a scrape token once) / `tokens` / `revoke ID` / `reset`: Prometheus access
to /metrics, and emptying this host's multiprocess directory before the portal's processes start."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from jobs.models import ScrapeToken


class Command(BaseCommand):
    help = "Scrape tokens for /metrics (Prometheus), and the per-host metrics directory."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        issue = sub.add_parser("issue", help="a new scrape token for a Prometheus server, printed once")
        issue.add_argument("name")
        sub.add_parser("tokens", help="the scrape tokens, in force and revoked")
        revoke = sub.add_parser("revoke")
        revoke.add_argument("id", type=int)
        sub.add_parser("reset", help="empty PORTAL_METRICS_DIR (only while no web or worker process runs)")

    def handle(self, *args: Any, **o: Any) -> None:
        if o["action"] == "issue":
            _, token = ScrapeToken.issue(o["name"][:100])
            self.stdout.write(token)
        elif o["action"] == "revoke":
            if not ScrapeToken.objects.filter(pk=o["id"], revoked_at__isnull=True).update(revoked_at=timezone.now()):
                raise CommandError(f"no scrape token {o['id']} in force")
            self.stdout.write(f"revoked scrape token {o['id']}")
        elif o["action"] == "tokens":
            for t in ScrapeToken.objects.all():
                state = f"revoked {t.revoked_at:%Y-%m-%d}" if t.revoked_at else "in force"
                used = f"last used {t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never used"
                self.stdout.write(f"{t.pk:>4}  {t.name:<24} {t.hint}…  {state}, {used}")
        else:
            removed = 0
            for path in settings.PORTAL_METRICS_DIR.glob("*.db"):
                path.unlink(missing_ok=True)
                removed += 1
            self.stdout.write(f"removed {removed} metrics files from {settings.PORTAL_METRICS_DIR}")
