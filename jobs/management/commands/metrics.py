"""`manage.py metrics reset`: empty this host's multiprocess directory before the portal's processes start (scrape
tokens are `manage.py scrapetoken`)."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "The per-host directory of Prometheus counter files (PORTAL_METRICS_DIR)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("reset", help="empty PORTAL_METRICS_DIR (only while no web or worker process runs)")

    def handle(self, *args: Any, **o: Any) -> None:
        # A running process keeps writing to its open (now unlinked) file, and its counts vanish from the sums until
        # it restarts: hence "only while none runs". scripts/serve prepare runs it before starting them.
        removed = 0
        for path in settings.PORTAL_METRICS_DIR.glob("*.db"):
            path.unlink(missing_ok=True)
            removed += 1
        self.stdout.write(f"removed {removed} metrics files from {settings.PORTAL_METRICS_DIR}")
