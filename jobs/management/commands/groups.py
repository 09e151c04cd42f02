"""`manage.py groups map GROUP --account ID (--unix-group NAME | --slurm-account NAME)` / `unmap ID` / `sync [GROUP]`
/ `list`: portal groups (what sessions are shared with) that follow the cluster's Unix/LDAP groups or Slurm
accounts (jobs/sessions/groups.py)."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from catalog.models import ClusterAccount
from jobs.models import GroupSource
from jobs.sessions import groups


class Command(BaseCommand):
    help = "Portal groups mapped to the cluster's Unix/LDAP groups or Slurm accounts, and their sync."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        mapping = sub.add_parser("map", help="make GROUP follow a cluster group or Slurm account (created if new)")
        mapping.add_argument("group")
        mapping.add_argument(
            "--account", type=int, required=True,
            help="id of the cluster account that asks: a service account or one marked trusted",
        )  # fmt: skip
        kind = mapping.add_mutually_exclusive_group(required=True)
        kind.add_argument("--unix-group", help="a Unix or LDAP group, as `getent group` on the cluster knows it")
        kind.add_argument("--slurm-account", help="a Slurm account (needs slurmdbd on the cluster)")
        unmap = sub.add_parser("unmap")
        unmap.add_argument("id", type=int)
        syncing = sub.add_parser("sync", help="read every mapped group's members from its cluster now")
        syncing.add_argument("group", nargs="?")
        sub.add_parser("list")

    def handle(self, *args: Any, **o: Any) -> None:
        if o["action"] == "map":
            self._map(o)
        elif o["action"] == "unmap":
            if not GroupSource.objects.filter(pk=o["id"]).delete()[0]:
                raise CommandError(f"no source {o['id']}")
            self.stdout.write(f"removed source {o['id']} (the group keeps its members until the next sync)")
        elif o["action"] == "sync":
            chosen = Group.objects.filter(name=o["group"]) if o["group"] else None
            if chosen is not None and not chosen.exists():
                raise CommandError(f"no group {o['group']!r}")
            results = [groups.sync(g) for g in chosen] if chosen is not None else groups.sync_all()
            for r in results:
                self.stdout.write(
                    f"{r.group}: +{len(r.added)} {' '.join(r.added)} -{len(r.removed)} {' '.join(r.removed)}"
                )
                for error in r.errors:
                    self.stderr.write(f"{r.group}: {error}")
            if any(r.errors for r in results):
                raise CommandError("some sources could not be read; their groups kept their members")
        else:
            for s in GroupSource.objects.select_related("group", "account__cluster").order_by("group__name", "pk"):
                state = s.last_error or (f"{s.members_found} members, {s.synced_at:%Y-%m-%d %H:%M}" if s.synced_at
                                         else "never synced")  # fmt: skip
                self.stdout.write(f"{s.pk:>4}  {s.group.name:<20} {s.kind:<14} {s.name:<20} {s.account}  {state}")

    def _map(self, o: dict[str, Any]) -> None:
        account = ClusterAccount.objects.filter(pk=o["account"]).first()
        if account is None:
            raise CommandError(f"no cluster account {o['account']}")
        kind = GroupSource.Kind.UNIX_GROUP if o["unix_group"] else GroupSource.Kind.SLURM_ACCOUNT
        group, _ = Group.objects.get_or_create(name=o["group"])
        source = GroupSource(group=group, account=account, kind=kind, name=o["unix_group"] or o["slurm_account"])
        try:
            source.full_clean()
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        source.save()
        self.stdout.write(f"group {group.name} follows {source.get_kind_display()} {source.name} (source {source.pk})")
