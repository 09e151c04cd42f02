"""A cluster's compute-node networks: the admin sets them (admin or YAML), discovery leaves them alone, and a cluster
without them says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import reverse

from catalog import discover
from catalog.models import Cluster
from catalog.yaml_io import CatalogImportError, export_catalog, import_catalog

pytestmark = pytest.mark.django_db

SCONTROL_LOCAL = (Path(__file__).parent / "data" / "scontrol-local.txt").read_text()


def local_entry() -> dict[str, object]:
    clusters = yaml.safe_load(export_catalog())["clusters"]
    entry: dict[str, object] = next(c for c in clusters if c["slug"] == "local")
    return entry


def test_the_example_catalog_gives_every_cluster_its_networks(example_catalog: Path) -> None:
    assert dict(Cluster.objects.values_list("slug", "node_networks")) == {
        "bouchet": "10.40.0.0/16", "grace": "10.181.0.0/16", "mccleary": "10.48.0.0/16", "milgram": "10.51.0.0/16",
        "lab": "192.168.40.0/24", "v100": "10.60.0.0/16", "local": "127.0.0.0/8",
    }  # fmt: skip


def test_networks_go_out_to_yaml_and_come_back_unchanged(example_catalog: Path) -> None:
    local = Cluster.objects.get(slug="local")
    local.node_networks = "10.20.0.0/16,fd00:20:0::/64"
    local.full_clean()  # the admin's form cleans it so: one spelling for each network
    local.save()
    assert local.node_networks == "10.20.0.0/16, fd00:20::/64"
    assert local_entry()["node_networks"] == ["10.20.0.0/16", "fd00:20::/64"]
    report = import_catalog(export_catalog(), "export.yaml")
    assert report.changed is False
    assert Cluster.objects.get(slug="local").node_networks == "10.20.0.0/16, fd00:20::/64"


def test_yaml_with_something_that_is_not_a_network_is_refused_with_its_line(example_catalog: Path) -> None:
    text = export_catalog().replace("node_networks:\n  - 127.0.0.0/8", "node_networks:\n  - 127.0.0.1/8")
    assert "127.0.0.1/8" in text
    with pytest.raises(CatalogImportError, match=r"clusters\[\d+\]\.node_networks: '127\.0\.0\.1/8' is not a network"):
        import_catalog(text, "catalog.yaml")


def test_the_model_refuses_a_network_with_host_bits_and_names(example_catalog: Path) -> None:
    local = Cluster.objects.get(slug="local")
    for text in ("10.20.0.1/16", "node[1-4]", "10.20.0.0/16 ; rm -rf"):
        local.node_networks = text
        with pytest.raises(ValidationError) as refused:
            local.full_clean()
        assert "node_networks" in refused.value.message_dict


def test_discovery_leaves_the_networks_alone(example_catalog: Path) -> None:
    Cluster.objects.filter(slug="local").update(node_networks="127.0.0.1/32")
    plan = discover.plan(Cluster.objects.get(slug="local"), SCONTROL_LOCAL)
    discover.apply(plan)
    assert Cluster.objects.get(slug="local").node_networks == "127.0.0.1/32"


def test_a_cluster_without_networks_is_flagged_on_its_admin_page_and_in_the_list(
    admin_client: Client, example_catalog: Path
) -> None:
    local = Cluster.objects.get(slug="local")
    page = admin_client.get(reverse("admin:catalog_cluster_change", args=[local.pk])).content.decode()
    assert "No compute-node networks are set" not in page and "compute-node networks" in page.lower()
    Cluster.objects.filter(pk=local.pk).update(node_networks="")
    page = admin_client.get(reverse("admin:catalog_cluster_change", args=[local.pk])).content.decode()
    assert "No compute-node networks are set for this cluster" in page
    listing = admin_client.get(reverse("admin:catalog_cluster_changelist")).content.decode()
    assert "nodes reachable" in listing.lower()
