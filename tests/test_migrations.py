"""Migrations keep existing databases: cluster accounts move to the catalog and Session becomes LLMSession with every
row, link and permission kept, and the way back works too."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("catalog", "0003_gputype_reserve_help"), ("jobs", "0008_idle_cancel")]


def apps_at(nodes: list[tuple[str, str]]) -> Any:
    return MigrationExecutor(connection).loader.project_state(nodes).apps


def migrate_back() -> Any:
    """`manage.py migrate catalog 0003` as an admin would run it: jobs 0009 and later go with it."""
    call_command("migrate", "catalog", "0003_gputype_reserve_help", verbosity=0)
    return apps_at(BEFORE)


@pytest.fixture
def latest() -> Iterator[list[tuple[str, str]]]:
    nodes = MigrationExecutor(connection).loader.graph.leaf_nodes()
    yield nodes
    call_command("migrate", verbosity=0)  # whatever a test did, the next one finds the current schema


def migrate_forward(nodes: list[tuple[str, str]]) -> Any:
    call_command("migrate", verbosity=0)
    return apps_at(nodes)


def test_accounts_and_sessions_survive_the_move(latest: list[tuple[str, str]]) -> None:
    old = migrate_back()
    user = old.get_model("auth", "User").objects.create(username="ada")
    permissions = old.get_model("auth", "Permission").objects.filter(content_type__app_label="jobs")
    user.user_permissions.add(*permissions.filter(codename__in=["change_clusteraccount", "view_session"]))
    cluster = old.get_model("catalog", "Cluster").objects.create(name="Grace", slug="grace", login_host="grace.example")
    partition = old.get_model("catalog", "Partition").objects.create(cluster=cluster, name="gpu", max_walltime_min=60)
    gpu = old.get_model("catalog", "GPUType").objects.create(name="a100", display_name="A100", memory_gib=80)
    card = old.get_model("catalog", "ModelCard").objects.create(
        name="m", family="llama", params_b=1, layers=2, hidden_size=64, attention_heads=4, kv_heads=2, head_dim=16,
        vocab_size=100, max_context=4096,
    )  # fmt: skip
    variant = old.get_model("catalog", "ModelVariant").objects.create(
        model=card, quantization="Q4_0", format="gguf", size_gib=1
    )
    runtime = old.get_model("catalog", "Runtime").objects.create(kind="llama.cpp", display_name="llama.cpp")
    account = old.get_model("jobs", "ClusterAccount").objects.create(
        cluster=cluster, kind="service", label="NLP lab", username="nlplab", public_key="ssh-ed25519 AAAA",
        private_key_encrypted="sealed",
    )  # fmt: skip
    account.members.add(user)
    session = old.get_model("jobs", "Session").objects.create(
        owner=user, account=account, cluster=cluster, partition=partition, gpu_type=gpu, gpus_per_node=1,
        cpus_per_node=4, memory_gib=16, walltime_min=30, variant=variant, runtime=runtime, context_length=2048,
        api_key_encrypted="sealed", state="running", job_id="42",
    )  # fmt: skip
    session.events.create(to_state="running", cause="test")

    new = migrate_forward(latest)
    moved = new.get_model("catalog", "ClusterAccount").objects.get()
    assert (moved.username, moved.label, moved.private_key_encrypted) == ("nlplab", "NLP lab", "sealed")
    assert list(moved.members.values_list("username", flat=True)) == ["ada"]
    kept = new.get_model("jobs", "LLMSession").objects.get()
    assert (kept.pk, kept.job_id, kept.account_id, kept.purpose) == (session.pk, "42", moved.pk, "chat")
    assert kept.events.count() == 1
    granted = new.get_model("auth", "User").objects.get().user_permissions.select_related("content_type")
    assert sorted((p.content_type.app_label, p.codename) for p in granted) == [
        ("catalog", "change_clusteraccount"),
        ("jobs", "view_llmsession"),
    ]

    back = migrate_back()
    assert back.get_model("jobs", "ClusterAccount").objects.get().members.count() == 1
    assert back.get_model("jobs", "Session").objects.get().account_id == moved.pk
