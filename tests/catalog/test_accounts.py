"""Cluster accounts: key pairs encrypted at rest, service accounts shared by their members, and which accounts may
read facts for the whole site (`manage.py accounts` too)."""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from typing import Any

from django.core.management import call_command
from django.db import connection

from catalog.models import Cluster, ClusterAccount


def raw_column(table: str, column: str, pk: int) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM {table} WHERE id = %s", [pk])
        return str(cursor.fetchone()[0])


def test_a_new_account_gets_a_key_pair_whose_private_half_is_encrypted_at_rest(account: ClusterAccount) -> None:
    assert account.public_key.startswith("ssh-ed25519 ") and "ada@local" in account.public_key
    stored = raw_column(ClusterAccount._meta.db_table, "private_key_encrypted", account.pk)
    assert "PRIVATE KEY" not in stored
    assert "BEGIN OPENSSH PRIVATE KEY" in account.ssh_target().private_key


def test_a_service_account_serves_its_members_only(example_catalog: Path, owner: Any, other_user: Any) -> None:
    cluster = Cluster.objects.get(slug="local")
    lab = ClusterAccount(cluster=cluster, kind="service", label="NLP lab", username="nlplab")
    lab.save()
    lab.members.add(owner)
    assert ClusterAccount.for_user(owner, cluster) == lab
    assert ClusterAccount.for_user(other_user, cluster) is None


def test_an_admin_sets_up_a_service_account_from_the_command_line_and_it_reads_for_the_site(
    account: ClusterAccount, owner: Any
) -> None:
    out = StringIO()
    call_command("accounts", "add-service", "--cluster", "local", "--label", "portal", "--username", "portalsvc",
                 "--member", owner.get_username(), stdout=out)  # fmt: skip
    service = ClusterAccount.objects.get(kind="service")
    assert out.getvalue().strip() == service.public_key and service.reads_for_site and owner in service.members.all()
    assert ClusterAccount.site_reader(account.cluster) == service
    assert not account.reads_for_site  # the owner's own account never speaks for the site
    listed = StringIO()
    call_command("accounts", "list", stdout=listed)
    assert "portalsvc@local (portal)  service  plain key  slurm account: -  site-wide reads" in listed.getvalue()


def test_pointing_a_trusted_account_at_another_login_from_the_command_line_drops_the_trust(
    account: ClusterAccount, owner: Any
) -> None:
    ClusterAccount.objects.filter(pk=account.pk).update(trusted=True)
    call_command("accounts", "add", "--user", owner.get_username(), "--cluster", "local", "--username", "ada",
                 "--slurm-account", "physics", stdout=StringIO())  # fmt: skip
    account.refresh_from_db()
    assert account.trusted  # the same login
    err = StringIO()
    call_command("accounts", "add", "--user", owner.get_username(), "--cluster", "local", "--username", "hopper",
                 stdout=StringIO(), stderr=err)  # fmt: skip
    account.refresh_from_db()
    assert not account.trusted and "no longer trusted" in err.getvalue()
