"""`manage.py catalog discover`: run inventory.command() on a cluster as a user's account, compare with the catalog, and
apply what the admin accepts through the YAML importer. The parsing and comparing are catalog/inventory.py."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import yaml
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from catalog import inventory
from catalog.models import Cluster, ClusterAccount, GPUType, NodeGroup, Partition
from catalog.yaml_io import ImportReport, export_catalog, import_catalog
from portal import gate

TIMEOUT_S = 60


@dataclass(frozen=True)
class Plan:
    cluster: Cluster
    found: inventory.Discovered
    changes: list[inventory.Change]
    document: dict[str, Any]  # the YAML the import would take: new GPU types and the cluster's merged entry

    @property
    def text(self) -> str:
        return yaml.safe_dump(self.document, sort_keys=False)


def account_for(user: User, cluster: Cluster) -> ClusterAccount:
    account = ClusterAccount.for_user(user, cluster)
    if account is None:
        raise ValidationError(f"{user} has no cluster account on {cluster.name} to read Slurm with.")
    return account


def read_slurm(account: ClusterAccount) -> str:
    """What scontrol says, read over the pinned SSH connection as the account."""
    command = gate.command(inventory.DISCOVER, [], account.cluster.slurm_cli, gated=account.restricted)
    result = account.run(command, timeout_s=TIMEOUT_S)
    if result.exit_code != 0:
        raise ValidationError(f"scontrol failed on {account.cluster.name}: {result.stderr.strip()[:300]}")
    return result.stdout


def plan(cluster: Cluster, text: str) -> Plan:
    """The discovered catalog for the cluster, the changes against the catalog, and the YAML that applies them."""
    existing = list(GPUType.objects.values_list("name", "gres_type", "constraint"))
    found = inventory.with_catalog_gpus(inventory.discover(text), existing)
    exported = yaml.safe_load(export_catalog())
    entry = next((c for c in exported.get("clusters") or [] if c["slug"] == cluster.slug), None)
    assert entry is not None  # the cluster is in the catalog
    known = {g["name"]: g.get("memory_gib") for g in exported.get("gpu_types") or []}
    changes = inventory.diff(found, {"partitions": entry.get("partitions", []), "gpu_types": known})
    # What is already marked missing was reported when it went; it stays out of the list until it comes back.
    missing = {f"partition {p.name}" for p in Partition.objects.filter(cluster=cluster, missing_since__isnull=False)}
    missing |= {
        f"node group {g.partition.name}/{g.gpu_type.name} x {g.gpus_per_node}"
        for g in NodeGroup.objects.filter(partition__cluster=cluster, missing_since__isnull=False).select_related(
            "partition", "gpu_type"
        )
    }
    changes = [c for c in changes if not (c.kind == "gone" and c.what in missing)]
    document = {
        "version": 1,
        "gpu_types": inventory.gpu_entries(found),
        "clusters": [inventory.merged_cluster(entry, found)],
    }
    return Plan(cluster, found, changes, document)


def apply(chosen: Plan, account: ClusterAccount | None = None, *, may_change_code: bool = True) -> ImportReport:
    """Through the YAML importer, all or nothing (an unknown GPU's missing memory is refused there, with its line),
    then what Slurm no longer lists is marked missing (never deleted: sessions keep their history). Discovery changes
    nothing that runs as every researcher; `may_change_code` (the admin's permission) makes sure of it."""
    with transaction.atomic():
        report = import_catalog(chosen.text, f"discover:{chosen.cluster.slug}", may_change_code=may_change_code)
        record(chosen, account, [c for c in chosen.changes if c.kind == "gone"])
    return report


def check(chosen: Plan, account: ClusterAccount | None = None) -> None:
    """Re-discovery without applying: mark what Slurm no longer lists and keep every difference as the drift."""
    record(chosen, account, chosen.changes)


def record(chosen: Plan, account: ClusterAccount | None, drift: list[inventory.Change]) -> None:
    """Partitions and node groups Slurm lists are present again; the others missing since now (if not already)."""
    now = timezone.now()
    present = {p.name: {(g.gpu_type, g.gpus_per_node) for g in p.groups} for p in chosen.found.partitions}
    for partition in Partition.objects.filter(cluster=chosen.cluster).prefetch_related("node_groups__gpu_type"):
        listed = partition.name in present
        _mark(partition, listed, now)
        for group in partition.node_groups.all():
            _mark(group, listed and (group.gpu_type.name, group.gpus_per_node) in present[partition.name], now)
    Cluster.objects.filter(pk=chosen.cluster.pk).update(
        discovered_at=now,
        discovered_with=account or chosen.cluster.discovered_with,
        drift="\n".join(str(c) for c in drift),
    )


def _mark(row: Partition | NodeGroup, listed: bool, now: datetime) -> None:
    missing_since = None if listed else (row.missing_since or now)
    if row.missing_since != missing_since:
        type(row).objects.filter(pk=row.pk).update(missing_since=missing_since)
