"""What runs as every researcher (catalog/models/runs_code.py): staff without the permission see it read-only in the
admin, cannot add a runtime on a cluster or a model's location (by hand, by a scan or from a file), and an import on
their behalf refuses to change it; superusers, staff granted the permission and `manage.py catalog import` may."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from catalog import discover
from catalog import scan as scanning
from catalog.models import CODE_PERMISSION, RUNS_CODE, Cluster, ClusterRuntime, Partition, Runtime, VariantLocation
from catalog.yaml_io import CatalogImportError, export_catalog, import_catalog

pytestmark = pytest.mark.django_db

CATALOG_MODELS = ["cluster", "clusterruntime", "runtime", "variantlocation", "modelvariant", "modelcard"]


def staff_with(user: Any, *codenames: str) -> Any:
    """The staff user with view, add and change permission on the catalog's models, and these (a fresh object:
    Django caches permissions on the one it read)."""
    wanted = [f"{verb}_{model}" for model in CATALOG_MODELS for verb in ("view", "add", "change")]
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="catalog",
                                                        codename__in=[*wanted, *codenames]))  # fmt: skip
    return type(user).objects.get(pk=user.pk)


def form_fields(client: Client, url: str) -> set[str]:
    return set(client.get(url).context["adminform"].form.fields)


def test_staff_without_the_permission_see_what_runs_as_every_researcher_read_only(
    client: Client, example_catalog: Path, staff_user: Any
) -> None:
    client.force_login(staff_with(staff_user))
    local = Cluster.objects.get(slug="local")
    llama = ClusterRuntime.objects.get(cluster=local, runtime__kind="llama.cpp")
    location = VariantLocation.objects.filter(cluster=local).first()
    assert location is not None
    pages = {
        Cluster: reverse("admin:catalog_cluster_change", args=[local.pk]),
        ClusterRuntime: reverse("admin:catalog_clusterruntime_change", args=[llama.pk]),
        Runtime: reverse("admin:catalog_runtime_change", args=[llama.runtime_id]),
        VariantLocation: reverse("admin:catalog_variantlocation_change", args=[location.pk]),
    }
    for model, url in pages.items():
        assert not form_fields(client, url) & set(RUNS_CODE[model]), model.__name__
    assert {"name", "login_host", "stage_keep"} <= form_fields(client, pages[Cluster])  # the rest stays theirs
    assert form_fields(client, pages[VariantLocation]) == set()  # the variant too: a location is what it loads
    inlines = client.get(pages[Cluster]).context["inline_admin_formsets"]
    runtimes = next(inline for inline in inlines if inline.formset.prefix == "runtimes")
    assert runtimes.formset.forms and not set(runtimes.formset.forms[0].fields) & set(RUNS_CODE[ClusterRuntime])
    assert not runtimes.has_add_permission  # a new runtime on the cluster is a new program for everyone
    locations = client.get(reverse("admin:catalog_modelvariant_change", args=[location.variant_id]))
    assert not locations.context["inline_admin_formsets"][0].has_add_permission
    assert client.get(reverse("admin:catalog_variantlocation_add")).status_code == 403
    assert client.get(reverse("admin:catalog_clusterruntime_add")).status_code == 403


def test_a_change_posted_anyway_leaves_what_runs_as_it_was(
    client: Client, example_catalog: Path, staff_user: Any
) -> None:
    client.force_login(staff_with(staff_user))
    llama = ClusterRuntime.objects.get(cluster__slug="local", runtime__kind="llama.cpp")
    url = reverse("admin:catalog_clusterruntime_change", args=[llama.pk])
    binary = llama.binary
    posted = client.post(url, {"cluster": llama.cluster_id, "runtime": llama.runtime_id, "binary": "/tmp/mine",
                               "modules": "mine", "extra_flags": "--mine"})  # fmt: skip
    assert posted.status_code == 302
    llama.refresh_from_db()
    assert (llama.binary, llama.modules, llama.extra_flags) == (binary, "", "")
    runtime = llama.runtime
    flags = runtime.default_flags
    url = reverse("admin:catalog_runtime_change", args=[runtime.pk])
    client.post(url, {"kind": runtime.kind, "display_name": "llama", "default_flags": "--mine"})
    runtime.refresh_from_db()
    assert (runtime.display_name, runtime.default_flags) == ("llama", flags)  # the rest is theirs to change


def test_superusers_and_staff_granted_the_permission_change_it(
    client: Client, admin_client: Client, example_catalog: Path, staff_user: Any
) -> None:
    llama = ClusterRuntime.objects.get(cluster__slug="local", runtime__kind="llama.cpp")
    url = reverse("admin:catalog_clusterruntime_change", args=[llama.pk])
    form = {"cluster": llama.cluster_id, "runtime": llama.runtime_id, "binary": "/opt/llama/bin/llama-server"}
    assert admin_client.post(url, form).status_code == 302
    assert ClusterRuntime.objects.get(pk=llama.pk).binary == "/opt/llama/bin/llama-server"
    client.force_login(staff_with(staff_user, CODE_PERMISSION.split(".")[1]))
    assert {"binary", "modules"} <= form_fields(client, url)
    client.post(url, {**form, "binary": "/opt/llama/b2/llama-server"})
    assert ClusterRuntime.objects.get(pk=llama.pk).binary == "/opt/llama/b2/llama-server"
    assert client.get(reverse("admin:catalog_variantlocation_add")).status_code == 200


def test_a_scan_or_a_file_records_no_location_for_staff_without_the_permission(
    client: Client, example_catalog: Path, staff_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_scan(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing is read for a scan that may not be applied")

    monkeypatch.setattr(scanning, "scan", no_scan)
    client.force_login(staff_with(staff_user))
    local = Cluster.objects.get(slug="local")
    before = VariantLocation.objects.count()
    page = client.post(reverse("admin:catalog_cluster_scan", args=[local.pk]), {"paths": "/srv/models", "apply": "1"})
    assert "Nothing was applied" in page.content.decode() and "Can change what runs as every researcher" in (
        page.content.decode()
    )
    added = client.post(reverse("admin:catalog_modelcard_add_from_file"), {"path": "/srv/m.gguf", "cluster": local.pk})
    assert added.status_code == 200 and "is what its jobs load" in added.content.decode()
    assert VariantLocation.objects.count() == before


def entry(document: dict[str, Any], slug: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in document["clusters"] if c["slug"] == slug)
    return found


def test_an_import_without_the_permission_changes_nothing_that_runs_and_says_where(example_catalog: Path) -> None:
    document = yaml.safe_load(export_catalog())
    import_catalog(yaml.safe_dump(document), "same.yaml", may_change_code=False)  # unchanged: allowed (discovery)
    entry(document, "lab")["slurm_bin_dir"] = "/tmp/bin"
    entry(document, "local")["runtimes"][0]["binary"] = "/tmp/llama-server"
    document["runtimes"][0]["default_flags"] = "--mine"
    location = document["models"][0]["variants"][0]["locations"][0]
    location["path"] = "/tmp/model.gguf"
    with pytest.raises(CatalogImportError) as refused:
        import_catalog(yaml.safe_dump(document), "mine.yaml", may_change_code=False)
    text = str(refused.value)
    for key in ("slurm_bin_dir", "binary", "default_flags", "path"):
        assert f"'{key}' runs as every researcher who launches with it" in text, key
    assert "catalog.change_runtime_code" in text
    assert Cluster.objects.get(slug="lab").slurm_bin_dir == ""
    import_catalog(yaml.safe_dump(document), "operator.yaml")  # manage.py catalog import: the operator's own act
    assert Cluster.objects.get(slug="lab").slurm_bin_dir == "/tmp/bin"


def test_discovery_on_behalf_of_staff_without_the_permission_applies_and_changes_nothing_that_runs(
    example_catalog: Path,
) -> None:
    Cluster.objects.filter(slug="local").update(slurm_bin_dir="/opt/slurm/bin", stage_to="/dev/shm")
    scontrol = (Path(__file__).parent / "data" / "scontrol-local.txt").read_text()
    local = Cluster.objects.get(slug="local")
    plan = discover.plan(local, scontrol.replace("MaxTime=02:00:00", "MaxTime=04:00:00"))
    discover.apply(plan, may_change_code=False)
    assert Partition.objects.get(cluster=local, name="gpu_devel").max_walltime_min == 240
    local.refresh_from_db()
    assert (local.slurm_bin_dir, local.stage_to) == ("/opt/slurm/bin", "/dev/shm")
