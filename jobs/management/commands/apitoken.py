"""`manage.py apitoken create USER --name NAME` (prints the token once) / `revoke ID` / `list [USER]`."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from jobs.models import ApiToken
from portal.users import find_user


class Command(BaseCommand):
    help = "Personal API tokens for scripts (the openai client's api_key with base URL <portal>/api/v1)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create")
        create.add_argument("user")
        create.add_argument("--name", required=True)
        revoke = sub.add_parser("revoke")
        revoke.add_argument("id", type=int)
        listing = sub.add_parser("list")
        listing.add_argument("user", nargs="?")

    def handle(self, *args: Any, **o: Any) -> None:
        try:
            if o["action"] == "create":
                _, token = ApiToken.issue(find_user(o["user"]), o["name"])
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
                    state = f"revoked {t.revoked_at:%Y-%m-%d}" if t.revoked_at else "active"
                    self.stdout.write(f"{t.pk:>5}  {t.user.get_username():<16} {t.name:<24} {t.hint}…  {state}")
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
