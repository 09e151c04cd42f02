"""`manage.py accounts add|list`: give a portal user an identity on a cluster from the command line."""

from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from catalog.models import Cluster, ClusterAccount
from portal.errors import text_of
from portal.users import find_user


class Command(BaseCommand):
    help = "Add or list cluster accounts (the portal's SSH identity for a user on a cluster)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        p = sub.add_parser("add", help="create or update a user's personal account; prints its public key")
        p.add_argument("--user", required=True)
        p.add_argument("--cluster", required=True)
        p.add_argument("--username", required=True, help="the user name on the cluster")
        p.add_argument("--slurm-account", default="")
        p.add_argument("--private-key-file", type=Path, help="use this key instead of generating one")
        sub.add_parser("list")

    def handle(self, *args: Any, **o: Any) -> None:
        if o["action"] == "list":
            for account in ClusterAccount.objects.select_related("cluster", "user"):
                slurm_account = account.effective_slurm_account or "-"
                self.stdout.write(f"{account.pk:>5}  {account}  slurm account: {slurm_account}")
            return
        user = find_user(o["user"])
        cluster = Cluster.objects.filter(slug=o["cluster"]).first()
        if cluster is None:
            raise CommandError(f"there is no cluster {o['cluster']!r}")
        existing = ClusterAccount.objects.filter(cluster=cluster, user=user, kind="personal").first()
        account = existing or ClusterAccount(cluster=cluster, user=user, kind="personal")
        account.username = o["username"]
        account.slurm_account = o["slurm_account"]
        try:
            if o["private_key_file"]:
                account.set_private_key(o["private_key_file"].read_text())
            account.full_clean(exclude=["public_key", "private_key_encrypted"])
        except (ValidationError, OSError) as exc:
            raise CommandError(text_of(exc) if isinstance(exc, ValidationError) else str(exc)) from None
        account.save()
        self.stdout.write(account.public_key)
