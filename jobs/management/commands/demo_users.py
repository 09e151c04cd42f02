from __future__ import annotations

import secrets
from argparse import ArgumentParser
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create (or reset) the demo admin and researcher with fresh random passwords, and print them."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--admin", default="admin")
        parser.add_argument("--researcher", default="researcher")

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        for username, is_admin in ((options["admin"], True), (options["researcher"], False)):
            password = secrets.token_urlsafe(12)
            user, _ = User.objects.get_or_create(username=username)
            user.email = f"{username}@example.edu"
            user.is_staff = is_admin
            user.is_superuser = is_admin
            user.set_password(password)
            user.save()
            role = "admin" if is_admin else "researcher"
            self.stdout.write(f"{role:>10}: username {username!r}  password {password!r}")
