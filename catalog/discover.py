"""`manage.py catalog discover`: run inventory.COMMAND on a cluster as a user's account, compare with the catalog, and
apply what the admin accepts through the YAML importer. The parsing and comparing are catalog/inventory.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError

from catalog import inventory
from catalog.models import Cluster, ClusterAccount, GPUType
from catalog.yaml_io import ImportReport, export_catalog, import_catalog
from portal import ssh

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


def read_slurm(user: User, cluster: Cluster) -> str:
    """What scontrol says, read over the pinned SSH connection as the user's account on the cluster."""
    account = ClusterAccount.for_user(user, cluster)
    if account is None:
        raise ValidationError(f"{user} has no cluster account on {cluster.name} to read Slurm with.")
    result = ssh.pool.run(account.ssh_target(), inventory.COMMAND, timeout_s=TIMEOUT_S)
    if result.exit_code != 0:
        raise ValidationError(f"scontrol failed on {cluster.name}: {result.stderr.strip()[:300]}")
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
    document = {
        "version": 1,
        "gpu_types": inventory.gpu_entries(found),
        "clusters": [inventory.merged_cluster(entry, found)],
    }
    return Plan(cluster, found, changes, document)


def apply(chosen: Plan, *, dry_run: bool = False) -> ImportReport:
    """Through the YAML importer, all or nothing: an unknown GPU's missing memory is refused there, with its line."""
    return import_catalog(chosen.text, f"discover:{chosen.cluster.slug}", dry_run=dry_run)
