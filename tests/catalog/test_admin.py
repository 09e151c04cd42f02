from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from catalog.models import (
    Cluster,
    ClusterAccount,
    ClusterRuntime,
    GPUType,
    ModelCard,
    ModelVariant,
    NodeGroup,
    Partition,
    Runtime,
    VariantLocation,
)

CATALOG_MODELS = [
    Cluster,
    Partition,
    GPUType,
    NodeGroup,
    Runtime,
    ClusterRuntime,
    ModelCard,
    ModelVariant,
    VariantLocation,
]

pytestmark = pytest.mark.django_db


def admin_url(model, view: str, *args) -> str:
    return reverse(f"admin:catalog_{model._meta.model_name}_{view}", args=args)


@pytest.mark.parametrize("model", CATALOG_MODELS, ids=lambda m: m.__name__)
def test_admin_sees_changelist_add_and_change_pages(admin_client: Client, example_catalog: Path, model) -> None:
    obj = model.objects.first()
    assert obj is not None
    for url in (admin_url(model, "changelist"), admin_url(model, "add"), admin_url(model, "change", obj.pk)):
        response = admin_client.get(url)
        assert response.status_code == 200, url
    response = admin_client.get(admin_url(model, "changelist"), {"q": str(obj)[:3]})
    assert response.status_code == 200


@pytest.mark.parametrize("model", CATALOG_MODELS, ids=lambda m: m.__name__)
def test_a_researcher_is_refused_the_admin(client: Client, owner, example_catalog: Path, model) -> None:
    client.force_login(owner)
    obj = model.objects.first()
    for url in (admin_url(model, "changelist"), admin_url(model, "change", obj.pk)):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("admin:login"))


def test_changelists_filter_by_their_list_filters(admin_client: Client, example_catalog: Path) -> None:
    response = admin_client.get(
        admin_url(NodeGroup, "changelist"), {"gpu_type__id__exact": GPUType.objects.get(name="h200").pk}
    )
    assert response.status_code == 200
    assert "bouchet/gpu_h200" in response.content.decode()
    assert "grace/gpu" not in response.content.decode()


def test_admin_creates_a_cluster_with_partitions_and_runtimes_inline(
    admin_client: Client, example_catalog: Path
) -> None:
    llama = Runtime.objects.get(kind="llama.cpp")
    data = {
        "name": "New cluster",
        "slug": "newc",
        "login_host": "login.newc.example.edu",
        "ssh_port": "22",
        "host_key": "",
        "node_access": "tunnel",
        "default_account": "",
        "notes": "",
        "partitions-TOTAL_FORMS": "1",
        "partitions-INITIAL_FORMS": "0",
        "partitions-0-name": "gpu",
        "partitions-0-max_walltime_min": "2880",
        "partitions-0-default_walltime_min": "60",
        "runtimes-TOTAL_FORMS": "1",
        "runtimes-INITIAL_FORMS": "0",
        "runtimes-0-runtime": str(llama.pk),
        "runtimes-0-modules": "llama.cpp/b4000",
        "runtimes-0-binary": "llama-server",
        "runtimes-0-rpc_binary": "rpc-server",
        "runtimes-0-extra_flags": "",
    }
    response = admin_client.post(admin_url(Cluster, "add"), data)
    assert response.status_code == 302, response.content.decode()[:2000]
    cluster = Cluster.objects.get(slug="newc")
    assert list(cluster.partitions.values_list("name", flat=True)) == ["gpu"]
    assert cluster.runtimes.get().modules == "llama.cpp/b4000"


def test_admin_form_shows_validation_errors_and_keeps_input(admin_client: Client, example_catalog: Path) -> None:
    data = {
        "name": "Bad",
        "slug": "bad",
        "login_host": "login;id",
        "ssh_port": "22",
        "node_access": "tunnel",
        "partitions-TOTAL_FORMS": "1",
        "partitions-INITIAL_FORMS": "0",
        "partitions-0-name": "gpu",
        "partitions-0-max_walltime_min": "10",
        "partitions-0-default_walltime_min": "60",
        "runtimes-TOTAL_FORMS": "0",
        "runtimes-INITIAL_FORMS": "0",
    }
    response = admin_client.post(admin_url(Cluster, "add"), data)
    assert response.status_code == 200
    body = response.content.decode()
    assert "Enter a host name" in body
    assert "login;id" in body  # what the admin typed is still in the form
    assert not Cluster.objects.filter(slug="bad").exists()


def test_a_clusters_status_account_is_chosen_among_its_own_accounts(
    admin_client: Client, example_catalog: Path, owner
) -> None:
    local = Cluster.objects.get(slug="local")
    other = Cluster.objects.exclude(pk=local.pk).first()
    assert other is not None
    here = ClusterAccount.objects.create(cluster=local, user=owner, username="ada")
    there = ClusterAccount.objects.create(cluster=other, user=owner, username="ada-elsewhere")
    page = admin_client.get(admin_url(Cluster, "change", local.pk))
    choices = page.context["adminform"].form.fields["status_account"].queryset
    assert list(choices) == [here] and there not in choices
    assert (
        list(admin_client.get(admin_url(Cluster, "add")).context["adminform"].form.fields["status_account"].queryset)
        == []
    )
