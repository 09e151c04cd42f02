"""Discovery from Slurm's own output (catalog/inventory.py, catalog/discover.py): the local cluster's real
`scontrol show partition -o` / `scontrol show node -o` text, recorded in tests/catalog/data/scontrol-local.txt, and
edits of it. The same against the live cluster over SSH is tests/e2e/test_discover.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from django.core.management import CommandError, call_command

from catalog import discover, inventory
from catalog.models import Cluster, GPUType, ModelVariant, NodeGroup, Partition
from catalog.plans import plans, request_for
from catalog.yaml_io import CatalogImportError, import_catalog
from portal.slurm.cli import SlurmCli

LOCAL = (Path(__file__).parent / "data" / "scontrol-local.txt").read_text()


def edited(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


def test_discovery_runs_scontrol_as_the_cluster_calls_slurm(tmp_path: Path) -> None:
    """The command run by bash, with a stand-in scontrol in the cluster's binaries' folder that says how it was
    called."""
    (tmp_path / "scontrol").write_text('#!/bin/sh\necho "scontrol $*"\n')
    (tmp_path / "scontrol").chmod(0o755)
    for cli, flags in ((SlurmCli("", str(tmp_path)), ""), (SlurmCli("c2", str(tmp_path)), "--clusters=c2 ")):
        said = subprocess.run(["bash", "-c", inventory.command(cli)], capture_output=True, text=True).stdout
        assert said == f"scontrol {flags}show partition -o\n@@nodes\nscontrol {flags}show node -o\n"


def test_the_local_clusters_partitions_nodes_and_gpus_are_read() -> None:
    partitions, nodes = inventory.read(LOCAL)
    gpu = next(p for p in partitions if p.name == "gpu")
    assert (gpu.max_walltime_min, gpu.default_walltime_min, gpu.is_default) == (1440, 60, True)
    assert gpu.nodes == ("node1", "node2", "node3")
    node1 = next(n for n in nodes if n.name == "node1")
    assert (node1.cpus, node1.memory_mib, node1.gpus) == (4, 4096, (("a100", 2),))
    assert node1.features == {"a100", "a100-80g"} and node1.partitions == {"gpu"}


def test_node_groups_are_nodes_of_one_gpu_type_and_count_sized_by_the_smallest() -> None:
    found = inventory.discover(LOCAL)
    shapes = {p.name: [(g.gpu_type, g.gpus_per_node, g.nodes, g.cpus_per_node, g.ram_gib) for g in p.groups]
              for p in found.partitions}  # fmt: skip
    assert shapes == {
        "gpu": [("a100-80g", 2, 2, 4, 4.0), ("h100", 2, 1, 4, 4.0)],
        "gpu_devel": [("h100", 2, 1, 4, 4.0)],
    }
    # An A100 is 40 or 80 GB: the node feature decides; without one the type is left for the admin.
    assert {g.name: g.memory_gib for g in found.gpu_types} == {"a100-80g": 80.0, "h100": 79.6}
    unsized = inventory.discover(edited(LOCAL, "AvailableFeatures=a100,a100-80g", "AvailableFeatures=(null)"))
    assert [g.name for g in unsized.unknown_gpus] == ["a100"]


def test_output_that_is_not_scontrols_is_refused_with_a_reason() -> None:
    with pytest.raises(inventory.DiscoverError, match="no node section"):
        inventory.read("PartitionName=gpu MaxTime=1:00:00")
    with pytest.raises(inventory.DiscoverError, match="no partitions"):
        inventory.read("@@nodes\n")
    with pytest.raises(inventory.DiscoverError, match="partition gpu: not a Slurm duration"):
        inventory.read(edited(LOCAL, "MaxTime=1-00:00:00", "MaxTime=soon"))
    with pytest.raises(inventory.DiscoverError, match=r"partition gpu: .*last bracket"):
        inventory.read(edited(LOCAL, "Nodes=node[1-3]", "Nodes=node[1-3]-ib"))


@pytest.mark.django_db
def test_the_example_catalog_matches_the_local_cluster(example_catalog: Path) -> None:
    """Discovering the cluster the catalog describes finds nothing to change."""
    plan = discover.plan(Cluster.objects.get(slug="local"), LOCAL)
    assert plan.changes == []
    assert discover.apply(plan).changed is False


@pytest.mark.django_db
def test_a_changed_cluster_shows_exactly_what_changed_and_applies_it(example_catalog: Path) -> None:
    changed = edited(LOCAL, "MaxTime=02:00:00", "MaxTime=04:00:00")
    changed = edited(changed, "Gres=gpu:h100:2", "Gres=gpu:h100:4")
    changed = changed.replace("@@nodes", "PartitionName=big MaxTime=3-00:00:00 DefaultTime=NONE Nodes=node1 State=UP\n"
                              "@@nodes")  # fmt: skip
    local = Cluster.objects.get(slug="local")
    plan = discover.plan(local, changed)
    assert {str(c) for c in plan.changes} == {
        "  added  partition big: max 4320 min; 1 x 2 a100-80g",
        "changed  partition gpu_devel: max_walltime_min 120 -> 240",
        "  added  node group gpu/h100 x 4: 1 nodes",
        "   gone  node group gpu/h100 x 2: no such nodes in the partition now",
        "  added  node group gpu_devel/h100 x 4: 1 nodes",
        "   gone  node group gpu_devel/h100 x 2: no such nodes in the partition now",
    }
    discover.apply(plan)
    local.refresh_from_db()
    assert local.discovered_at is not None and "gone  node group gpu/h100 x 2" in local.drift
    devel = Partition.objects.get(cluster=local, name="gpu_devel")
    assert devel.max_walltime_min == 240 and devel.is_debug  # Slurm does not say "debug": the catalog's stays
    assert NodeGroup.objects.filter(partition=devel, gpus_per_node=4).exists()
    assert Partition.objects.filter(cluster=local, name="big").exists()
    # The old groups stay (sessions keep their history), marked missing and no longer offered.
    old = NodeGroup.objects.get(partition=devel, gpus_per_node=2)
    assert old.missing_since is not None
    assert discover.plan(local, changed).changes == []  # reported once, when they went
    tiny = ModelVariant.objects.get(model__name="tiny-llama")
    offered = {o.node_group.pk for o in plans(request_for(tiny, "llama.cpp", 1024), tiny, available_only=False)}
    assert old.pk not in offered and NodeGroup.objects.get(partition=devel, gpus_per_node=4).pk in offered
    back = discover.plan(local, LOCAL)  # the nodes come back: the groups are offered again once applied
    discover.apply(back)
    old.refresh_from_db()
    assert old.missing_since is None


@pytest.mark.django_db
def test_an_unknown_gpu_is_reported_and_nothing_is_applied_until_its_memory_is_known(example_catalog: Path) -> None:
    text = edited(LOCAL, "Gres=gpu:h100:2", "Gres=gpu:b300:8")
    plan = discover.plan(Cluster.objects.get(slug="local"), text)
    assert "  added  GPU type b300: B300, memory unknown: fill it in" in {str(c) for c in plan.changes}
    before = NodeGroup.objects.count()
    with pytest.raises(CatalogImportError) as refused:
        discover.apply(plan)
    assert any("memory_gib" in e.message or "memory_gib" in e.path for e in refused.value.errors)
    assert NodeGroup.objects.count() == before and not GPUType.objects.filter(name="b300").exists()
    # The admin fills it in in the YAML and imports that: the same validation, now satisfied.
    document = yaml.safe_load(plan.text)
    document["gpu_types"][0]["memory_gib"] = 179.0
    import_catalog(yaml.safe_dump(document), "edited.yaml")
    assert GPUType.objects.get(name="b300").memory_gib == 179.0


@pytest.mark.django_db
def test_the_command_needs_a_known_cluster_and_an_account(example_catalog: Path, owner: object) -> None:
    with pytest.raises(CommandError, match="no cluster 'nope'"):
        call_command("catalog", "discover", "nope", "--user", "ada")
    with pytest.raises(CommandError, match="no cluster account on Local test cluster"):
        call_command("catalog", "discover", "local", "--user", "ada")


@pytest.mark.django_db
def test_allowed_accounts_and_node_features_are_discovered(example_catalog: Path) -> None:
    text = edited(LOCAL, "PartitionName=gpu_devel AllowGroups=ALL AllowAccounts=ALL",
                  "PartitionName=gpu_devel AllowGroups=ALL AllowAccounts=physics,chem")  # fmt: skip
    text = edited(text, "AvailableFeatures=h100", "AvailableFeatures=h100,nvlink")
    text = edited(text, "PartitionName=gpu AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL",
                  "PartitionName=gpu AllowGroups=ALL AllowAccounts=ALL AllowQos=normal,long")  # fmt: skip
    local = Cluster.objects.get(slug="local")
    plan = discover.plan(local, text)
    assert {str(c) for c in plan.changes} == {
        "changed  partition gpu_devel: allowed_accounts [] -> ['chem', 'physics']",
        "changed  partition gpu: allowed_qos [] -> ['long', 'normal']",
        "changed  node group gpu/h100 x 2: features ['h100'] -> ['h100', 'nvlink']",
        "changed  node group gpu_devel/h100 x 2: features ['h100'] -> ['h100', 'nvlink']",
    }
    discover.apply(plan)
    assert Partition.objects.get(cluster=local, name="gpu_devel").allowed_accounts == "chem,physics"
    assert Partition.objects.get(cluster=local, name="gpu").allowed_qos == "long,normal"
    assert (
        NodeGroup.objects.get(partition=Partition.objects.get(cluster=local, name="gpu_devel")).features
        == "h100,nvlink"
    )


@pytest.mark.parametrize(
    ("gres", "memory_gib", "display"),
    [
        ("1g.10gb", 9.75, "NVIDIA MIG 1g.10gb slice"),  # nvidia-smi: 9.75 GiB on an H100
        ("3g.40gb", 39.25, "NVIDIA MIG 3g.40gb slice"),  # 39.5
        ("nvidia_a100_3g.40gb", 39.25, "NVIDIA A100 MIG 3g.40gb slice"),  # AutoDetect=nvml's name
        ("a100_1g.5gb", 4.75, "NVIDIA A100 MIG 1g.5gb slice"),  # 4.75 on an A100 40GB
        ("2g.20gb", 19.5, "NVIDIA MIG 2g.20gb slice"),  # 19.62
        ("7g.80gb", 78.5, "NVIDIA MIG 7g.80gb slice"),  # 79.25
    ],
)
def test_mig_slices_take_their_memory_from_the_profile_and_say_they_are_slices(
    gres: str, memory_gib: float, display: str
) -> None:
    spec = inventory.gpu_spec(gres, frozenset())
    assert (spec.name, spec.gres_type, spec.memory_gib, spec.display_name) == (gres, gres, memory_gib, display)
    assert spec.memory_gib is not None and spec.memory_gib < int(gres.rsplit(".", 1)[1].removesuffix("gb"))


def test_a_mig_compute_instance_shares_its_memory_so_the_admin_says_how_much() -> None:
    spec = inventory.gpu_spec("1c.3g.20gb", frozenset())
    assert spec.memory_gib is None and "shared" in spec.display_name
    assert inventory.mig_slice("a100") is None and inventory.mig_slice("a100_80gb") is None


def test_a_node_with_mig_slices_gives_a_node_group_per_profile() -> None:
    text = edited(LOCAL, "Gres=gpu:a100:2", "Gres=gpu:a100_3g.40gb:2,gpu:a100_1g.10gb:3")
    found = inventory.discover(text)
    slices = {g.name: g.memory_gib for g in found.gpu_types if "_" in g.name}
    assert slices == {"a100_3g.40gb": 39.25, "a100_1g.10gb": 9.75}


def test_discover_is_either_a_dry_run_or_applied(example_catalog: Path) -> None:
    with pytest.raises(CommandError, match="not allowed with argument"):
        call_command("catalog", "discover", "local", "--user", "ada", "--yes", "--dry-run")
