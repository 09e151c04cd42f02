"""`manage.py accounts add|add-service|key|test|list`: give a portal user an identity on a cluster, set up a service
account, print the authorized_keys line that restricts an account's key to the portal's gate, or test a login (and
learn which kind of key it is)."""

from __future__ import annotations

import ipaddress
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from catalog.models import Cluster, ClusterAccount
from jobs import gatekeeping
from jobs.cluster import login
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
        p.add_argument(
            "--restricted",
            action="store_true",
            help="print the authorized_keys line that lets the key run only the portal's gate (recommended)",
        )
        p.add_argument(
            "--permit-open",
            action="append",
            default=[],
            metavar="ADDRESS:PORT",
            help="a node's IP address a restricted key may forward to (a cluster reached through tunnels; PORT: *)",
        )
        t = sub.add_parser("test", help="log in as an account and ask Slurm; says whether its key is restricted")
        t.add_argument("account", type=int, help="its id (manage.py accounts list)")
        k = sub.add_parser("key", help="print an account's restricted authorized_keys line (and mark it restricted)")
        k.add_argument("account", type=int, help="its id (manage.py accounts list)")
        k.add_argument("--permit-open", action="append", default=[], metavar="ADDRESS:PORT")
        s = sub.add_parser(
            "add-service",
            help="create or update a service account (a cluster user no researcher controls: it may read site-wide "
            "facts, and its members submit through it); prints its public key",
        )
        s.add_argument("--cluster", required=True)
        s.add_argument("--label", required=True, help="its name in the portal, e.g. 'portal' or 'NLP lab'")
        s.add_argument("--username", required=True, help="the user name on the cluster")
        s.add_argument("--slurm-account", default="")
        s.add_argument("--private-key-file", type=Path, help="use this key instead of generating one")
        s.add_argument("--member", action="append", default=[], help="a portal user who may submit through it")
        sub.add_parser("list")

    def handle(self, *args: Any, **o: Any) -> None:
        if o["action"] == "list":
            for account in ClusterAccount.objects.select_related("cluster", "user"):
                slurm_account = account.effective_slurm_account or "-"
                reads = "  site-wide reads" if account.reads_for_site else ""
                key = "restricted key" if account.restricted else "plain key"
                self.stdout.write(
                    f"{account.pk:>5}  {account}  {account.kind}  {key}  slurm account: {slurm_account}{reads}"
                )
            return
        if o["action"] == "test":
            tested = ClusterAccount.objects.select_related("cluster").filter(pk=o["account"]).first()
            if tested is None:
                raise CommandError(f"there is no cluster account {o['account']}")
            checked = login.check(tested)
            if not checked.ok:
                raise CommandError(checked.message)
            self.stdout.write(checked.message)
            return
        if o["action"] == "key":
            found = ClusterAccount.objects.select_related("cluster").filter(pk=o["account"]).first()
            if found is None:
                raise CommandError(f"there is no cluster account {o['account']}")
            self._print_restricted(found, o["permit_open"])
            return
        if o["action"] == "add-service":
            self._add_service(o)
            return
        user = find_user(o["user"])
        cluster = Cluster.objects.filter(slug=o["cluster"]).first()
        if cluster is None:
            raise CommandError(f"there is no cluster {o['cluster']!r}")
        existing = ClusterAccount.objects.filter(cluster=cluster, user=user, kind="personal").first()
        account = existing or ClusterAccount(cluster=cluster, user=user, kind="personal")
        if account.trusted and (account.username != o["username"] or o["private_key_file"]):
            # The trust was given to a login (user name and key): another login starts untrusted, as in the admin.
            account.trusted = False
            self.stderr.write(f"{account} is no longer trusted for site-wide reads: its login changed")
        self._save(account, o)

    def _add_service(self, o: dict[str, Any]) -> None:
        cluster = Cluster.objects.filter(slug=o["cluster"]).first()
        if cluster is None:
            raise CommandError(f"there is no cluster {o['cluster']!r}")
        try:
            members = [find_user(name) for name in o["member"]]
        except ValidationError as exc:
            raise CommandError(text_of(exc)) from None
        existing = ClusterAccount.objects.filter(cluster=cluster, kind="service", username=o["username"]).first()
        account = existing or ClusterAccount(cluster=cluster, kind="service")
        account.label = o["label"]
        self._save(account, o)
        account.members.add(*members)

    def _save(self, account: ClusterAccount, o: dict[str, Any]) -> None:
        """Check and save the account with the options' user name, Slurm account and key; print its public key."""
        account.username = o["username"]
        account.slurm_account = o["slurm_account"]
        try:
            if o["private_key_file"]:
                account.set_private_key(o["private_key_file"].read_text())
            account.full_clean(exclude=["public_key", "private_key_encrypted"])
        except (ValidationError, OSError) as exc:
            raise CommandError(text_of(exc) if isinstance(exc, ValidationError) else str(exc)) from None
        if o.get("restricted"):
            self._print_restricted(account, o["permit_open"])
            return
        account.save()
        self.stdout.write(account.public_key)

    def _print_restricted(self, account: ClusterAccount, permit_open: list[str]) -> None:
        """The account's authorized_keys line with the cluster's gate, and what to do with it."""
        if account.cluster.node_access == account.cluster.NodeAccess.TUNNEL and not permit_open:
            raise CommandError(
                f"{account.cluster.name} reaches its nodes through SSH tunnels, which a restricted key may open only "
                "to the addresses it names: give each node's IP address with --permit-open ADDRESS:* (the portal "
                "forwards to the address it checked against the cluster's node networks, never to a name), or "
                "set the cluster's node access to direct where the portal reaches the nodes itself"
            )
        targets = []
        for target in permit_open:
            host, _, port = target.rpartition(":")
            try:
                address = ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                address = None
            if address is None or not (port == "*" or port.isdigit()):
                raise CommandError(f"--permit-open takes ADDRESS:PORT or ADDRESS:*, not {target!r}")
            # sshd's permitopen writes an IPv6 address in brackets.
            targets.append(f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}")
        permit_open = targets
        account.restricted = True
        account.save()
        self.stdout.write(gatekeeping.key_line(account, permit_open))
        self.stderr.write(
            f"Put this line in ~{account.username}/.ssh/authorized_keys on {account.cluster.name} in place of the "
            "account's plain one. The portal installs the gate it names on first use; a change of the cluster's "
            "runtimes (binaries, modules, flags) makes a new gate, and this command prints its new line."
        )
