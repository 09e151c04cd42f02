"""Open OnDemand's clusters.d files as catalog clusters (catalog/ood.py, `manage.py catalog ood-import`), from the
sample files in tests/catalog/data/ood/: a clusters.d folder with Slurm, Torque and shell-less clusters, and bad
files that must change nothing."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from hypothesis import given
from hypothesis import strategies as st

from catalog import ood
from catalog.models import Cluster

DATA = Path(__file__).parent / "data" / "ood"
CLUSTERS_D = DATA / "clusters.d"


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("catalog", "ood-import", *args, stdout=out)
    return out.getvalue()


def test_a_slurm_cluster_file_gives_its_title_login_host_cluster_name_and_binaries() -> None:
    found = ood.read([str(CLUSTERS_D / "owens.yml")])
    [owens] = found.clusters
    assert (owens.slug, owens.name, owens.login_host) == ("owens", "Owens", "owens.osc.edu")
    assert (owens.slurm_cluster, owens.slurm_bin_dir) == ("owens", "/opt/slurm/bin")
    assert any("job.conf" in note for note in owens.notes)


def test_other_adapters_and_files_without_a_login_host_are_skipped_with_the_reason() -> None:
    found = ood.read([str(CLUSTERS_D)])
    assert sorted(c.slug for c in found.clusters) == ["owens", "pitzer"]
    skipped = "\n".join(found.skipped)
    assert "ruby.yml: its job adapter is torque, not slurm" in skipped
    assert "quick.yml: no login host" in skipped
    assert "README" not in skipped  # OnDemand reads only *.yml; so does the import


@pytest.mark.django_db
def test_the_command_creates_the_clusters_and_says_each_needs_its_host_key_pinned() -> None:
    out = run(str(CLUSTERS_D))
    owens = Cluster.objects.get(slug="owens")
    assert (owens.name, owens.login_host, owens.host_key) == ("Owens", "owens.osc.edu", "")
    assert (owens.slurm_cluster, owens.slurm_bin_dir) == ("owens", "/opt/slurm/bin")
    assert owens.slurm_cli.command("squeue", "-h") == "/opt/slurm/bin/squeue --clusters=owens -h"
    pitzer = Cluster.objects.get(slug="pitzer")
    assert (pitzer.slurm_cluster, pitzer.slurm_bin_dir) == ("", "")
    assert "created  cluster owens" in out and "created  cluster pitzer" in out
    assert "skipped" in out and "torque" in out
    assert "Pin the host key of owens, pitzer" in out
    assert not Cluster.objects.filter(slug__in=["ruby", "quick"]).exists()


@pytest.mark.django_db
def test_a_second_import_updates_only_what_ondemand_says_and_keeps_the_pinned_key() -> None:
    run(str(CLUSTERS_D / "owens.yml"))
    key = "owens.osc.edu ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    Cluster.objects.filter(slug="owens").update(host_key=key, default_account="lab", slurm_cluster="old")
    out = run(str(CLUSTERS_D / "owens.yml"))
    owens = Cluster.objects.get(slug="owens")
    assert (owens.host_key, owens.default_account, owens.slurm_cluster) == (key, "lab", "owens")
    assert "updated  cluster owens" in out and "Pin the host key" not in out


@pytest.mark.django_db
def test_a_dry_run_reports_and_changes_nothing() -> None:
    out = run(str(CLUSTERS_D), "--dry-run")
    assert "created  cluster owens" in out and "Dry run" in out
    assert not Cluster.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("broken.yml", "broken.yml:3: not valid YAML"),
        ("erb.yml", "ERB template"),
    ],
)
def test_a_file_that_cannot_be_read_fails_the_whole_import(name: str, message: str) -> None:
    with pytest.raises(CommandError, match=message) as raised:
        run(str(CLUSTERS_D), str(DATA / "bad" / name))
    assert "Nothing was changed" in str(raised.value)
    assert not Cluster.objects.exists()


@pytest.mark.django_db
def test_values_the_catalog_refuses_name_the_ondemand_file_and_key_and_change_nothing() -> None:
    with pytest.raises(CommandError) as raised:
        run(str(CLUSTERS_D), str(DATA / "bad" / "spaces.yml"))
    text = str(raised.value)
    assert "spaces.yml: v2.job.cluster: Slurm names use letters" in text
    assert "spaces.yml: v2.job.bin: Use an absolute path" in text
    assert not Cluster.objects.exists()


@pytest.mark.django_db
def test_a_folder_with_no_slurm_cluster_is_an_error() -> None:
    with pytest.raises(CommandError, match="no Slurm cluster"):
        run(str(CLUSTERS_D / "ruby.yml"))


def test_a_missing_path_is_an_error() -> None:
    with pytest.raises(ood.OodError, match="no such file"):
        ood.read([str(DATA / "nowhere")])


@given(st.text(max_size=300))
def test_parse_never_fails_other_than_with_an_ood_error(text: str) -> None:
    with contextlib.suppress(ood.OodError):
        ood.parse(text, "x.yml")
