"""What the home page's cluster cards say, as an HPC guide's hand-made table would: per cluster, the largest GPU, the
most GPU memory on one node, the GPUs by type with how many are idle now, and the partitions the signed-in
researcher can use there.

Everything comes from the catalog and from the idle counts beat last cached (PartitionState), shown only for clusters
with a service or trusted account to read them (capacity.read_states); rendering the page never asks a cluster
anything. Partitions and node groups discovery no longer finds (missing_since) are left out.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from django.contrib.auth.models import AnonymousUser, User
from django.db.models import Prefetch, Q

from catalog.models import Cluster, ClusterAccount, GPUType, NodeGroup, Partition
from jobs.cluster import capacity


@dataclass(frozen=True)
class GPUCount:
    """GPUs of one type: how many the catalog lists and how many were idle at the last refresh (None: not known)."""

    gpu_type: GPUType
    total: int
    idle: int | None


@dataclass(frozen=True)
class PartitionSummary:
    partition: Partition
    gpus: list[GPUCount]


@dataclass(frozen=True)
class NodeMemory:
    """The node shape with the most GPU memory: what one node offers a model split over its GPUs."""

    gpus_per_node: int
    gpu_type: GPUType

    @property
    def memory_gib(self) -> float:
        return self.gpus_per_node * self.gpu_type.memory_gib


@dataclass
class ClusterSummary:
    cluster: Cluster
    largest_gpu: GPUType | None
    largest_node: NodeMemory | None
    gpus: list[GPUCount]
    # The partitions the user can use (every partition for a visitor who is not signed in).
    partitions: list[PartitionSummary] = field(default_factory=list)
    # None for a visitor; for a signed-in user, whether they have an account here at all.
    has_account: bool | None = None
    # The oldest refresh the idle counts come from; None when beat has not read this cluster's queue yet.
    idle_as_of: datetime | None = None
    # False when the cluster has no service or trusted account: its queue is never read (unknown, not "not yet").
    queue_read: bool = True


def summarize(user: User | AnonymousUser) -> list[ClusterSummary]:
    """Every cluster's card, in a fixed number of queries whatever the catalog's size:
    1. clusters (whether their queue is read), current partitions, node groups (with GPU types) and the partition
       states that may be shown (4 queries);
    2. the Slurm accounts the user may charge on each cluster (1 query, none for a visitor);
    3. per cluster, the figures, in Python."""
    clusters = list(
        capacity.readable_clusters_marked()
        .order_by("name")
        .prefetch_related(
            Prefetch(
                "partitions",
                queryset=Partition.objects.filter(missing_since__isnull=True).order_by("name"),
                to_attr="current_partitions",
            ),
            Prefetch(
                "current_partitions__node_groups",
                queryset=NodeGroup.objects.filter(missing_since__isnull=True).select_related("gpu_type"),
                to_attr="current_groups",
            ),
            Prefetch("current_partitions__states", queryset=capacity.read_states(), to_attr="cached_states"),
        )
    )
    slurm_accounts = _slurm_accounts(user) if user.is_authenticated else None
    return [_summary(cluster, slurm_accounts) for cluster in clusters]


def _slurm_accounts(user: User | AnonymousUser) -> dict[int, set[str]]:
    """Cluster id -> the Slurm accounts the user's own and shared (service) accounts there charge."""
    rows = (
        ClusterAccount.objects.filter(
            Q(kind=ClusterAccount.Kind.PERSONAL, user=user.pk) | Q(kind=ClusterAccount.Kind.SERVICE, members=user.pk)
        )
        .values_list("cluster_id", "slurm_account", "cluster__default_account")
        .distinct()
    )
    accounts: dict[int, set[str]] = defaultdict(set)
    for cluster_id, slurm_account, default_account in rows:
        accounts[cluster_id].add(slurm_account or default_account)
    return accounts


def _summary(cluster: Cluster, slurm_accounts: dict[int, set[str]] | None) -> ClusterSummary:
    partitions: list[Partition] = cluster.current_partitions  # type: ignore[attr-defined]
    per_partition = [(p, _gpus_of(p)) for p in partitions]
    groups = [g for p in partitions for g in p.current_groups]  # type: ignore[attr-defined]
    largest = max((g.gpu_type for g in groups), key=lambda t: (t.memory_gib, t.name), default=None)
    node = max(
        (NodeMemory(g.gpus_per_node, g.gpu_type) for g in groups),
        key=lambda n: (n.memory_gib, n.gpu_type.name),
        default=None,
    )
    summary = ClusterSummary(cluster, largest, node, _cluster_gpus(per_partition))
    refreshed = [s.refreshed_at for p in partitions for s in p.cached_states]  # type: ignore[attr-defined]
    summary.idle_as_of = min(refreshed, default=None)
    summary.queue_read = bool(getattr(cluster, "queue_read", False))  # annotated by readable_clusters_marked
    if slurm_accounts is None:
        summary.partitions = [PartitionSummary(p, gpus) for p, gpus in per_partition]
    else:
        charged = slurm_accounts.get(cluster.pk, set())
        summary.has_account = bool(charged)
        summary.partitions = [
            PartitionSummary(p, gpus) for p, gpus in per_partition if any(p.takes(a) for a in charged)
        ]
    return summary


def _gpus_of(partition: Partition) -> list[GPUCount]:
    """The partition's GPUs by type, largest first, with the idle count its cached state gives for that GRES type."""
    totals: dict[int, int] = defaultdict(int)
    types: dict[int, GPUType] = {}
    for group in partition.current_groups:  # type: ignore[attr-defined]
        totals[group.gpu_type_id] += group.node_count * group.gpus_per_node
        types[group.gpu_type_id] = group.gpu_type
    idle: dict[str, int] = defaultdict(int)
    for state in partition.cached_states:  # type: ignore[attr-defined]
        idle[state.gres_type] += state.idle_gpus
    known = bool(partition.cached_states)  # type: ignore[attr-defined]
    counts = [
        GPUCount(gpu, totals[pk], idle.get(gpu.gres_type or gpu.name, 0) if known else None)
        for pk, gpu in types.items()
    ]
    return sorted(counts, key=lambda c: (-c.gpu_type.memory_gib, c.gpu_type.name))


def _cluster_gpus(per_partition: list[tuple[Partition, list[GPUCount]]]) -> list[GPUCount]:
    """The cluster's GPUs by type. Partitions often share nodes (a scavenge or devel partition over the same GPUs),
    and the catalog does not name nodes, so summing partitions would count a node once per partition: each type is
    counted in the partition that has the most of it, which is exact when one partition spans them all."""
    best: dict[int, GPUCount] = {}
    for _partition, counts in per_partition:
        for count in counts:
            seen = best.get(count.gpu_type.pk)
            if seen is None:
                best[count.gpu_type.pk] = count
                continue
            idle = None if seen.idle is None and count.idle is None else max(seen.idle or 0, count.idle or 0)
            best[count.gpu_type.pk] = GPUCount(count.gpu_type, max(seen.total, count.total), idle)
    return sorted(best.values(), key=lambda c: (-c.gpu_type.memory_gib, c.gpu_type.name))
