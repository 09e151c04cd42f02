"""The home page's cluster cards: largest GPU, most GPU memory on one node, GPUs by type with idle ones, and the
partitions the signed-in researcher can use."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import AnonymousUser
from django.test import Client
from django.utils import timezone

from catalog.models import Cluster, ClusterAccount, GPUType, NodeGroup, Partition
from jobs.models import PartitionState
from jobs.sessions.clusters_summary import ClusterSummary, summarize
from tests.catalog import factories

pytestmark = pytest.mark.django_db


def _gpu(name: str, memory_gib: float) -> GPUType:
    return GPUType.objects.create(name=name, display_name=name.upper(), memory_gib=memory_gib, reserved_gib=0.5)


def _group(partition: Partition, gpu: GPUType, gpus_per_node: int, nodes: int, **over: Any) -> NodeGroup:
    return NodeGroup.objects.create(
        partition=partition, gpu_type=gpu, gpus_per_node=gpus_per_node, node_count=nodes, cpus_per_node=32,
        ram_gib=256, **over,
    )  # fmt: skip


def _state(partition: Partition, gres_type: str, total: int, idle: int) -> PartitionState:
    return PartitionState.objects.create(
        partition=partition, gres_type=gres_type, total_gpus=total, idle_gpus=idle, refreshed_at=timezone.now()
    )


@pytest.fixture
def grace() -> Cluster:
    """A cluster with a big partition, a devel partition over some of the same nodes, and a lab-only partition."""
    cluster = Cluster.objects.create(name="Grace", slug="grace", login_host="grace.example.edu", default_account="all")
    a100, h100 = _gpu("a100", 80), _gpu("h100", 94)
    gpu = Partition.objects.create(cluster=cluster, name="gpu", max_walltime_min=2880)
    _group(gpu, a100, 4, 10)
    _group(gpu, h100, 8, 2)
    devel = Partition.objects.create(cluster=cluster, name="gpu_devel", max_walltime_min=120, is_debug=True)
    _group(devel, a100, 4, 1)
    lab = Partition.objects.create(cluster=cluster, name="nlp", max_walltime_min=1440, allowed_accounts="nlp")
    _group(lab, h100, 8, 1)
    return cluster


def _only(summaries: list[ClusterSummary], slug: str) -> ClusterSummary:
    return next(s for s in summaries if s.cluster.slug == slug)


def test_a_card_names_the_largest_gpu_and_the_most_memory_on_one_node(grace: Cluster) -> None:
    card = _only(summarize(AnonymousUser()), "grace")

    assert card.largest_gpu is not None and card.largest_gpu.name == "h100"
    assert card.largest_node is not None
    assert (card.largest_node.gpus_per_node, card.largest_node.gpu_type.name) == (8, "h100")
    assert card.largest_node.memory_gib == 8 * 94


def test_gpus_are_counted_in_the_partition_that_has_the_most_of_each_type(grace: Cluster) -> None:
    card = _only(summarize(AnonymousUser()), "grace")

    # gpu_devel's A100 nodes are gpu's too: not 44 A100s, and not 24 H100s either.
    assert [(g.gpu_type.name, g.total) for g in card.gpus] == [("h100", 16), ("a100", 40)]


def _reader(cluster: Cluster) -> ClusterAccount:
    """The cluster's service account, which reads its queue for everyone."""
    return ClusterAccount.objects.create(cluster=cluster, kind="service", label="portal", username="portalsvc")


def test_idle_gpus_come_from_the_cached_partition_states(grace: Cluster) -> None:
    _reader(grace)
    gpu = Partition.objects.get(cluster=grace, name="gpu")
    _state(gpu, "a100", 40, 7)
    _state(gpu, "h100", 16, 0)
    _state(Partition.objects.get(cluster=grace, name="gpu_devel"), "a100", 4, 3)

    card = _only(summarize(AnonymousUser()), "grace")

    assert {g.gpu_type.name: g.idle for g in card.gpus} == {"a100": 7, "h100": 0}
    devel = next(p for p in card.partitions if p.partition.name == "gpu_devel")
    assert [(g.gpu_type.name, g.total, g.idle) for g in devel.gpus] == [("a100", 4, 3)]
    assert card.idle_as_of is not None


def test_idle_gpus_are_unknown_until_beat_has_read_the_queue(grace: Cluster) -> None:
    card = _only(summarize(AnonymousUser()), "grace")

    assert all(g.idle is None for g in card.gpus)
    assert card.idle_as_of is None


def test_idle_gpus_are_unknown_where_no_service_or_trusted_account_reads_the_queue(
    client: Client, grace: Cluster, owner: Any
) -> None:
    # Figures a researcher's account read (before the portal refused that) are not shown: its user could fake them.
    ada = ClusterAccount.objects.create(cluster=grace, user=owner, username="ada")
    _state(Partition.objects.get(cluster=grace, name="gpu"), "a100", 40, 40)
    client.force_login(owner)

    card = _only(summarize(owner), "grace")
    assert not card.queue_read and card.idle_as_of is None and all(g.idle is None for g in card.gpus)
    page = client.get("/").content.decode()
    assert "Idle GPUs unknown: the portal has no account it trusts" in page and "(40 idle)" not in page

    ClusterAccount.objects.filter(pk=ada.pk).update(trusted=True)
    card = _only(summarize(owner), "grace")
    assert card.queue_read and {g.gpu_type.name: g.idle for g in card.gpus}["a100"] == 40


def test_partitions_and_node_groups_discovery_lost_are_left_out(grace: Cluster) -> None:
    Partition.objects.filter(cluster=grace, name="nlp").update(missing_since=timezone.now())
    NodeGroup.objects.filter(partition__name="gpu", gpu_type__name="h100").update(missing_since=timezone.now())

    card = _only(summarize(AnonymousUser()), "grace")

    assert [p.partition.name for p in card.partitions] == ["gpu", "gpu_devel"]
    assert [g.gpu_type.name for g in card.gpus] == ["a100"]
    assert card.largest_gpu is not None and card.largest_gpu.name == "a100"


def test_a_visitor_sees_every_partition_and_no_account_question(grace: Cluster) -> None:
    card = _only(summarize(AnonymousUser()), "grace")

    assert card.has_account is None
    assert [p.partition.name for p in card.partitions] == ["gpu", "gpu_devel", "nlp"]


def test_a_researcher_without_an_account_there_can_use_no_partition(grace: Cluster, owner: Any) -> None:
    card = _only(summarize(owner), "grace")

    assert card.has_account is False
    assert card.partitions == []


def test_a_researcher_sees_the_partitions_that_take_their_slurm_account(grace: Cluster, owner: Any) -> None:
    ClusterAccount.objects.create(cluster=grace, user=owner, username="ada")  # charged to the default, "all"

    card = _only(summarize(owner), "grace")

    assert card.has_account is True
    assert [p.partition.name for p in card.partitions] == ["gpu", "gpu_devel"]


def test_a_lab_service_account_opens_the_labs_partition_too(grace: Cluster, owner: Any) -> None:
    lab = ClusterAccount.objects.create(
        cluster=grace, kind=ClusterAccount.Kind.SERVICE, label="NLP lab", username="nlp", slurm_account="nlp"
    )
    lab.members.add(owner)

    card = _only(summarize(owner), "grace")

    # gpu and gpu_devel take any Slurm account; nlp takes only the lab's.
    assert [p.partition.name for p in card.partitions] == ["gpu", "gpu_devel", "nlp"]


def test_a_cluster_without_gpu_nodes_has_an_empty_card(db: None) -> None:
    Cluster.objects.create(name="Empty", slug="empty", login_host="empty.example.edu")

    card = _only(summarize(AnonymousUser()), "empty")

    assert (card.largest_gpu, card.largest_node, card.gpus, card.partitions) == (None, None, [], [])


def test_the_home_page_shows_the_cards_figures(client: Client, grace: Cluster, owner: Any) -> None:
    ClusterAccount.objects.create(cluster=grace, user=owner, username="ada")
    _reader(grace)
    _state(Partition.objects.get(cluster=grace, name="gpu"), "a100", 40, 7)
    client.force_login(owner)

    page = client.get("/").content.decode()

    assert "Largest GPU</dt><dd>H100 (94 GiB)" in page
    assert "752 GiB (8 &times; H100)" in page
    assert '<tr><th scope="row">A100</th><td>40</td><td>7</td></tr>' in page
    assert "Partitions you can use" in page
    assert "<strong>gpu</strong>: up to 48 h;" in page
    assert "<strong>nlp</strong>" not in page


def test_the_home_page_works_for_a_visitor(client: Client, grace: Cluster) -> None:
    page = client.get("/").content.decode()

    assert "Partitions:</strong> gpu, gpu_devel, nlp." in page
    assert "Sign in</a> to see the ones you can use" in page
    assert grace.login_host not in page  # anonymous visitors learn no host names


def test_a_signed_in_researcher_sees_the_clusters_login_host(client: Client, grace: Cluster, owner: Any) -> None:
    client.force_login(owner)

    assert grace.login_host in client.get("/").content.decode()


def test_the_home_page_asks_a_fixed_number_of_queries_however_many_clusters(
    client: Client, owner: Any, django_assert_num_queries: Any
) -> None:
    gpu = _gpu("a100", 80)
    for number in range(6):
        cluster = Cluster.objects.create(name=f"C{number}", slug=f"c{number}", login_host=f"c{number}.example.edu")
        for name in ("gpu", "gpu_devel", "scavenge"):
            partition = Partition.objects.create(cluster=cluster, name=name, max_walltime_min=600)
            _group(partition, gpu, 4, 3)
            _state(partition, "a100", 12, 5)
        ClusterAccount.objects.create(cluster=cluster, user=owner, username="ada")
    factories.model_card().save()
    client.force_login(owner)

    # session and user (2), clusters, partitions, node groups, states (4), the user's accounts (1), the counts (2)
    with django_assert_num_queries(9):
        response = client.get("/")

    assert response.status_code == 200
    assert response.content.decode().count('class="card cluster"') == 6
