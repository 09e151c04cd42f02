"""`manage.py reencrypt [--dry-run]`: seal every stored secret under the first encryption key, so that an older key
(an earlier PORTAL_ENCRYPTION_KEYS entry, or the key derived from an old SECRET_KEY) can be retired."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError

from portal import crypto


class Command(BaseCommand):
    help = "Re-encrypt every stored secret (SSH private keys, session API keys) under the first encryption key."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="count what would change; write nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        resealed, unreadable = 0, []
        for model in apps.get_models():
            for field in model._meta.concrete_fields:
                if not isinstance(field, crypto.SealedTextField):
                    continue
                manager = model._default_manager
                for pk, token in manager.exclude(**{field.attname: ""}).values_list("pk", field.attname):
                    try:
                        fresh = crypto.reseal(token)
                    except crypto.DecryptionError:
                        unreadable.append(f"{model._meta.label} {pk} ({field.name})")
                        continue
                    # Conditional on the value read: a secret changed meanwhile is not overwritten with the old one.
                    if options["dry_run"] or manager.filter(pk=pk, **{field.attname: token}).update(
                        **{field.attname: fresh}
                    ):
                        resealed += 1
        verb = "would be" if options["dry_run"] else "were"
        self.stdout.write(f"{resealed} secret{'s' if resealed != 1 else ''} {verb} sealed under the first key.")
        if unreadable:
            raise CommandError(
                f"{len(unreadable)} secret(s) open with none of the configured keys and were left as they are: "
                + ", ".join(unreadable[:20])
            )
