"""Portal groups that follow the site's own: a group mapped to Unix/LDAP groups or Slurm accounts (GroupSource) gets
its members from the cluster, read over the pinned SSH connection, so that "share with the lab" means the lab as the
site knows it.

A mapped group is managed by its sources: a sync sets its members to the portal users whose personal cluster
accounts (on the source's cluster) are named there, adding and removing. What the lookup prints is believed, so it
runs only as a service account or one an admin marked trusted (ClusterAccount.reads_for_site), never as a
researcher. A source that cannot be read (SSH down, a name the cluster does not know, an account not trusted)
changes nothing and keeps its error for the admin page: a failure never empties a group. Groups without sources are
left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth.models import Group
from django.db import transaction
from django.utils import timezone

from catalog.models import ClusterAccount
from jobs.models import GroupSource
from portal import gate, shellsafe, ssh
from portal.slurm.cli import PLAIN, SlurmCli

LOOKUP_TIMEOUT_S = 30.0


class SourceError(Exception):
    """The cluster could not say who is in the group or account."""


# Who is in a Unix group (NSS: files, LDAP, SSSD, as logins see it) or a Slurm account (sacctmgr, which names the
# cluster in its query rather than with --clusters).
MEMBERS = gate.Verb(
    "members",
    'case "$1" in\n'
    '  unix_group) exec getent group "$2" ;;\n'
    '  slurm_account) exec sacctmgr --noheader --parsable2 show associations "account=$2" ${3:+"cluster=$3"} '
    "format=User ;;\n"
    "esac\n",
    args=(shellsafe.GROUP_KIND, shellsafe.GROUP_NAME),
    more=shellsafe.SLURM_NAME,
)
VERBS = (MEMBERS,)


def lookup_command(kind: str, name: str, cli: SlurmCli = PLAIN, *, gated: bool = False) -> str:
    """The command that names the cluster users of a group or Slurm account."""
    if kind not in GroupSource.Kind.values:
        raise ValueError(f"unknown source kind {kind!r}")
    shellsafe.GROUP_NAME.check(name, "group or account name")
    return gate.command(MEMBERS, [kind, name, *([cli.cluster] if cli.cluster else [])], cli, gated=gated)


def parse_members(kind: str, stdout: str) -> set[str]:
    """Cluster user names from the lookup's output: getent's fourth field (members, comma-separated; those whose
    primary group it is are not listed there), or sacctmgr's one user per line (the account's own row has none)."""
    if kind == GroupSource.Kind.UNIX_GROUP:
        fields = stdout.strip().split("\n")[0].split(":")
        names = fields[3].split(",") if len(fields) >= 4 else []
    else:
        names = stdout.splitlines()
    # Only names an account could have: the others match no one, and what the cluster prints is not trusted.
    return {name.strip() for name in names if shellsafe.UNIX_USERNAME.accepts(name.strip())}


def read_source(source: GroupSource) -> set[str]:
    """The cluster user names the source names now, read only with a service account or one an admin marked trusted:
    a researcher's own account runs the lookup through a shell its user controls, who could print themselves into
    any group (Session support included). Raises SourceError."""
    if not source.account.reads_for_site:
        raise SourceError(source.account.not_for_site("group sync"))
    try:
        account = source.account
        command = lookup_command(source.kind, source.name, account.cluster.slurm_cli, gated=account.restricted)
        result = account.run(command, timeout_s=LOOKUP_TIMEOUT_S)
    except ssh.SSHError as exc:
        raise SourceError(f"cannot reach {source.account.cluster}: {exc}") from exc
    if not result.ok:  # getent: 2 for an unknown group; sacctmgr: no slurmdbd, or no such account
        error = result.stderr.strip()[:300] or f"exit code {result.exit_code}: no such group or account"
        raise SourceError(f"{source.get_kind_display()} {source.name!r} on {source.account.cluster}: {error}")
    if source.kind == GroupSource.Kind.SLURM_ACCOUNT and not result.stdout.strip():
        # sacctmgr answers an unknown account with nothing: never read that as "nobody is in it"
        raise SourceError(f"Slurm knows no account {source.name!r} on {source.account.cluster}")
    return parse_members(source.kind, result.stdout)


@dataclass
class Synced:
    group: str
    added: list[str]
    removed: list[str]
    errors: list[str]


def sync(group: Group) -> Synced:
    """Set the group's members to those its sources name (see the module's docstring). Every source must be read
    for members to be removed; one that fails leaves the group as it was, less nothing."""
    sources = list(GroupSource.objects.filter(group=group).select_related("account__cluster"))
    wanted: set[int] = set()
    errors: list[str] = []
    now = timezone.now()
    for source in sources:
        try:
            names = read_source(source)
        except SourceError as exc:
            errors.append(str(exc))
            GroupSource.objects.filter(pk=source.pk).update(last_error=str(exc))
            continue
        users = ClusterAccount.objects.filter(
            cluster=source.account.cluster_id, kind=ClusterAccount.Kind.PERSONAL, username__in=names
        ).values_list("user", flat=True)
        found = {pk for pk in users if pk is not None}
        wanted |= found
        GroupSource.objects.filter(pk=source.pk).update(synced_at=now, members_found=len(found), last_error="")
    with transaction.atomic():
        current = set(group.user_set.values_list("pk", flat=True))
        add = wanted - current
        remove = (current - wanted) if not errors and sources else set()
        group.user_set.add(*add)
        group.user_set.remove(*remove)
    usernames = dict(group.user_set.model.objects.filter(pk__in=add | remove).values_list("pk", "username"))
    return Synced(group.name, sorted(usernames[pk] for pk in add), sorted(usernames[pk] for pk in remove), errors)


def sync_all() -> list[Synced]:
    return [sync(group) for group in Group.objects.filter(sources__isnull=False).distinct()]
