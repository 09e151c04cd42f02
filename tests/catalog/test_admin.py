from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission
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


def test_a_clusters_status_account_is_chosen_among_its_own_service_and_trusted_accounts(
    admin_client: Client, example_catalog: Path, owner
) -> None:
    local = Cluster.objects.get(slug="local")
    other = Cluster.objects.exclude(pk=local.pk).first()
    assert other is not None
    ClusterAccount.objects.create(cluster=local, user=owner, username="ada")  # a researcher's own: never offered
    here = ClusterAccount.objects.create(cluster=local, kind="service", label="portal", username="portalsvc")
    there = ClusterAccount.objects.create(cluster=other, kind="service", label="portal", username="portalsvc")
    page = admin_client.get(admin_url(Cluster, "change", local.pk))
    choices = page.context["adminform"].form.fields["status_account"].queryset
    assert list(choices) == [here] and there not in choices
    assert (
        list(admin_client.get(admin_url(Cluster, "add")).context["adminform"].form.fields["status_account"].queryset)
        == []
    )


def test_the_cluster_page_says_plainly_when_its_queue_figures_are_off(
    admin_client: Client, example_catalog: Path, owner
) -> None:
    local = Cluster.objects.get(slug="local")
    ada = ClusterAccount.objects.create(cluster=local, user=owner, username="ada")
    Cluster.objects.filter(pk=local.pk).update(status_account=ada)  # chosen before the portal refused it
    page = admin_client.get(admin_url(Cluster, "change", local.pk)).content.decode()
    assert "Queue figures: OFF." in page and "Status account: NOT USED." in page
    listed = admin_client.get(admin_url(Cluster, "changelist")).context["cl"].result_list
    assert listed.get(pk=local.pk).has_reader is False  # the list's "queue figures" column

    ClusterAccount.objects.create(cluster=local, kind="service", label="portal", username="portalsvc")
    page = admin_client.get(admin_url(Cluster, "change", local.pk)).content.decode()
    assert "Queue figures (idle GPUs, pending jobs in the wizard and on the home page): read with portalsvc@" in page


@pytest.fixture
def account_staff(staff_user) -> Any:
    """Staff who may change cluster accounts, without the permission to trust one."""
    staff_user.user_permissions.add(*Permission.objects.filter(codename__in=["view_clusteraccount",
                                                                         "change_clusteraccount"]))  # fmt: skip
    return staff_user


def test_only_superusers_and_staff_with_the_permission_mark_an_account_trusted(
    client: Client, example_catalog: Path, owner, account_staff
) -> None:
    ada = ClusterAccount.objects.create(cluster=Cluster.objects.get(slug="local"), user=owner, username="ada")
    url = admin_url(ClusterAccount, "change", ada.pk)
    form = {"cluster": ada.cluster_id, "kind": "personal", "user": owner.pk, "username": "ada", "trusted": "on"}
    client.force_login(account_staff)
    assert "trusted" not in client.get(url).context["adminform"].form.fields
    assert client.post(url, form).status_code == 302
    ada.refresh_from_db()
    assert not ada.trusted  # the box was not theirs to tick

    account_staff.user_permissions.add(Permission.objects.get(codename="trust_clusteraccount"))
    client.force_login(type(account_staff).objects.get(pk=account_staff.pk))  # permissions are cached per object
    assert "trusted" in client.get(url).context["adminform"].form.fields
    client.post(url, form)
    ada.refresh_from_db()
    assert ada.trusted


def test_pointing_a_trusted_account_at_another_login_without_the_permission_drops_the_trust(
    client: Client, example_catalog: Path, owner, account_staff
) -> None:
    ada = ClusterAccount.objects.create(
        cluster=Cluster.objects.get(slug="local"), user=owner, username="ada", trusted=True
    )
    url = admin_url(ClusterAccount, "change", ada.pk)
    client.force_login(account_staff)
    client.post(url, {"cluster": ada.cluster_id, "kind": "personal", "user": owner.pk, "username": "ada",
                      "slurm_account": "physics"})  # fmt: skip
    ada.refresh_from_db()
    assert ada.trusted and ada.slurm_account == "physics"  # not the login: the trust stays
    client.post(url, {"cluster": ada.cluster_id, "kind": "personal", "user": owner.pk, "username": "hopper"})
    ada.refresh_from_db()
    assert ada.username == "hopper" and not ada.trusted
