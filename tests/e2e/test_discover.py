"""`catalog discover` against the live local cluster over SSH: the catalog it builds matches `sinfo` exactly, and a
second run finds nothing to change."""

from __future__ import annotations

import subprocess
from collections import Counter
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client

from catalog import discover
from catalog.models import Cluster, NodeGroup, Partition
from jobs import tasks
from portal import ssh
from tests.e2e.sessions import local_account

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]


def sinfo_gpus() -> Counter[tuple[str, str, int]]:
    """(partition, GRES type, GPUs per node) -> nodes, as sinfo reports them on this host."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%P %G"], capture_output=True, text=True, check=True).stdout
    counted: Counter[tuple[str, str, int]] = Counter()
    for line in out.splitlines():
        partition, gres = line.split()
        kind, count = gres.split(":")[1], int(gres.split(":")[2].split("(")[0])
        counted[(partition.rstrip("*"), kind, count)] += 1
    return counted


def test_discovery_builds_what_sinfo_says_and_a_second_run_changes_nothing(
    local_catalog: dict[str, Any], owner: Any
) -> None:
    local_account(owner, local_catalog)
    local = Cluster.objects.get(slug="local")
    Partition.objects.filter(cluster=local).delete()  # start from a cluster with no partitions at all
    try:
        first = StringIO()
        call_command("catalog", "discover", "local", "--user", "ada", "--yes", stdout=first)
        groups = Counter(
            {(g.partition.name, g.gpu_type.gres_type, g.gpus_per_node): g.node_count
             for g in NodeGroup.objects.filter(partition__cluster=local).select_related("partition", "gpu_type")}
        )  # fmt: skip
        assert groups == sinfo_gpus(), first.getvalue()
        second = StringIO()
        call_command("catalog", "discover", "local", "--user", "ada", stdout=second)
    finally:
        ssh.pool.close_all()
    assert "the catalog matches what Slurm says" in second.getvalue()


def test_the_clusters_admin_page_shows_the_changes_and_applies_them(
    local_catalog: dict[str, Any], owner: Any, client: Client
) -> None:
    local_account(owner, local_catalog)
    owner.is_staff = owner.is_superuser = True
    owner.save()
    client.force_login(owner)
    local = Cluster.objects.get(slug="local")
    Partition.objects.filter(cluster=local, name="gpu_devel").delete()
    url = f"/admin/catalog/cluster/{local.pk}/discover/"
    try:
        assert url in client.get(f"/admin/catalog/cluster/{local.pk}/change/").content.decode()
        page = client.get(url).content.decode()
        assert "partition gpu_devel" in page and "Apply these changes" in page
        assert not Partition.objects.filter(cluster=local, name="gpu_devel").exists()  # reading changes nothing
        assert client.post(url).status_code == 302
        again = client.get(url).content.decode()
    finally:
        ssh.pool.close_all()
    assert Partition.objects.get(cluster=local, name="gpu_devel").max_walltime_min == 120
    assert "The catalog matches what Slurm says." in again


def test_rediscovery_keeps_the_drift_and_changes_nothing_else(local_catalog: dict[str, Any], owner: Any) -> None:
    local_account(owner, local_catalog)
    local = Cluster.objects.get(slug="local")
    try:
        call_command("catalog", "discover", "local", "--user", "ada", "--yes", stdout=StringIO())
        local.refresh_from_db()
        assert local.discovered_with is not None and local.drift == ""
        Partition.objects.filter(cluster=local, name="gpu").update(max_walltime_min=60, default_walltime_min=30)
        Partition.objects.create(cluster=local, name="retired", max_walltime_min=60)
        assert tasks.rediscover() == 1
    finally:
        ssh.pool.close_all()
    local.refresh_from_db()
    assert "changed  partition gpu: max_walltime_min 60 -> 1440" in local.drift
    assert "gone  partition retired" in local.drift
    assert Partition.objects.get(cluster=local, name="gpu").max_walltime_min == 60  # reported, not applied
    assert Partition.objects.get(cluster=local, name="retired").missing_since is not None


def scontrol(*args: str) -> None:
    subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True)


def test_after_the_clusters_config_changes_the_diff_names_exactly_what_changed(
    local_catalog: dict[str, Any], owner: Any
) -> None:
    """The live cluster changes as an admin would change it (scontrol, as root here): a partition's limit, a new
    partition, a node's features. Discovery names those and nothing else; the config is put back afterwards."""
    local_account(owner, local_catalog)
    call_command("catalog", "discover", "local", "--user", "ada", "--yes", stdout=StringIO())
    local = Cluster.objects.get(slug="local")
    try:
        scontrol("update", "PartitionName=gpu_devel", "MaxTime=03:00:00")
        scontrol("create", "PartitionName=portaltest", "Nodes=node1", "MaxTime=00:20:00", "State=UP")
        scontrol("update", "NodeName=node3", "AvailableFeatures=h100,nvlink", "ActiveFeatures=h100,nvlink")
        found = discover.plan(local, discover.read_slurm(discover.account_for(owner, local)))
    finally:
        subprocess.run(["scontrol", "delete", "PartitionName=portaltest"], capture_output=True)
        subprocess.run(["scontrol", "update", "PartitionName=gpu_devel", "MaxTime=02:00:00"], capture_output=True)
        subprocess.run(
            ["scontrol", "update", "NodeName=node3", "AvailableFeatures=h100", "ActiveFeatures=h100"],
            capture_output=True,
        )
        ssh.pool.close_all()
    assert sorted(map(str, found.changes)) == sorted(
        [
            "  added  partition portaltest: max 20 min; 1 x 2 a100-80g",
            "changed  partition gpu_devel: max_walltime_min 120 -> 180",
            "changed  node group gpu/h100 x 2: features ['h100'] -> ['h100', 'nvlink']",
            "changed  node group gpu_devel/h100 x 2: features ['h100'] -> ['h100', 'nvlink']",
        ]
    )
