"""`manage.py scrapetoken issue NAME` (prints the token once) / `list` / `revoke ID`: Prometheus's access to
/metrics."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from jobs.models import ScrapeToken


class Command(BaseCommand):
    help = "Scrape tokens for /metrics: one per Prometheus server, shown once, stored as its SHA-256."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        issue = sub.add_parser("issue", help="a new token for a Prometheus server; printed once, alone on stdout")
        issue.add_argument("name", help="which Prometheus server holds it")
        sub.add_parser("list", help="every token, in force or revoked, and when it was last used")
        revoke = sub.add_parser("revoke", help="refuse the token from now on")
        revoke.add_argument("id", type=int)

    def handle(self, *args: Any, **o: Any) -> None:
        if o["action"] == "issue":
            try:  # the model field's own rules: not blank, at most its max_length
                name = ScrapeToken._meta.get_field("name").clean(o["name"].strip(), None)
            except ValidationError as exc:
                raise CommandError("name: " + "; ".join(exc.messages)) from None
            _, token = ScrapeToken.issue(name)
            self.stdout.write(token)  # alone, so that `... issue NAME > file` writes just the token
        elif o["action"] == "revoke":
            if not ScrapeToken.objects.filter(pk=o["id"], revoked_at__isnull=True).update(revoked_at=timezone.now()):
                raise CommandError(f"no scrape token {o['id']} in force")
            self.stdout.write(f"revoked scrape token {o['id']}")
        else:
            for t in ScrapeToken.objects.all():
                state = f"revoked {t.revoked_at:%Y-%m-%d}" if t.revoked_at else "in force"
                used = f"last used {t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never used"
                self.stdout.write(f"{t.pk:>4}  {t.name:<24} {t.hint}…  {state}, {used}")
