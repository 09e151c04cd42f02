"""`manage.py apitoken create USER --name NAME [--model NAME ...] [--expires DATE | --days N] [--rate N]` (prints the
token once) / `revoke ID` / `list [USER]`."""

from __future__ import annotations

from argparse import ArgumentParser
from datetime import datetime, time, timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from jobs.models import ApiToken
from portal.users import find_user


class Command(BaseCommand):
    help = "Personal API tokens for scripts (the openai client's api_key with base URL <portal>/api/v1)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create")
        create.add_argument("user")
        create.add_argument("--name", required=True)
        create.add_argument("--model", action="append", default=[], help="only this model name (a service, an alias, "
                            "a catalog name, owner/alias; repeat for several); default: any")  # fmt: skip
        until = create.add_mutually_exclusive_group()
        until.add_argument("--expires", help="refused from this date (YYYY-MM-DD, the portal's time zone) or moment on")
        until.add_argument("--days", type=int, help="refused after this many days")
        create.add_argument("--rate", type=int, help="its own requests a minute, at most the site's")
        revoke = sub.add_parser("revoke")
        revoke.add_argument("id", type=int)
        listing = sub.add_parser("list")
        listing.add_argument("user", nargs="?")

    def handle(self, *args: Any, **o: Any) -> None:
        try:
            if o["action"] == "create":
                expires_at = _expiry(o["expires"], o["days"])
                _, token = ApiToken.issue(find_user(o["user"]), o["name"], allowed_models=o["model"],
                                          expires_at=expires_at, requests_per_minute=o["rate"])  # fmt: skip
                self.stdout.write(token)
            elif o["action"] == "revoke":
                if not ApiToken.objects.filter(pk=o["id"], revoked_at__isnull=True).update(revoked_at=timezone.now()):
                    raise CommandError(f"no active token {o['id']}")
                self.stdout.write(f"revoked token {o['id']}")
            else:
                tokens = ApiToken.objects.select_related("user")
                if o["user"]:
                    tokens = tokens.filter(user=find_user(o["user"]))
                for t in tokens:
                    self.stdout.write(f"{t.pk:>5}  {t.user.get_username():<16} {t.name:<24} {t.hint}…  {t.describe()}")
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None


def _expiry(expires: str | None, days: int | None) -> datetime | None:
    """--expires (a date: its start in the portal's time zone; or an ISO moment) or --days, as a moment."""
    if days is not None:
        return timezone.now() + timedelta(days=days)
    if not expires:
        return None
    moment = parse_datetime(expires)
    if moment is None:
        day = parse_date(expires)
        if day is None:
            raise CommandError(f"--expires {expires!r} is not a date (YYYY-MM-DD) or an ISO moment")
        moment = datetime.combine(day, time.min)
    return timezone.make_aware(moment) if timezone.is_naive(moment) else moment
