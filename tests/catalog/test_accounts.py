"""Cluster accounts: key pairs encrypted at rest, and service accounts shared by their members."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
