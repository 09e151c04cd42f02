"""A cluster's Slurm binaries folder and Slurm cluster name against the live local cluster over SSH.

The local cluster has no slurmdbd, and Slurm looks every --clusters name up there: so with the cluster's own name
(its ClusterName) Slurm itself refuses, naming --cluster, which shows the flag reaches it; with no name and a
binaries folder that is not on the PATH, discovery, the account test and the queue refresh all work."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from catalog import discover
from catalog.models import Cluster
from jobs.cluster import capacity, login
from portal import ssh
from tests.e2e.sessions import local_account, local_service_account

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]


def cluster_name() -> str:
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    return next(line.split("=", 1)[1].strip() for line in config.splitlines() if line.startswith("ClusterName"))


@pytest.fixture
def slurm_elsewhere() -> Iterator[Path]:
    """Slurm's commands linked into a folder the login shell's PATH does not have (the login host is this host, and
    the cluster account's user must be able to read the folder)."""
    folder = Path(tempfile.mkdtemp(prefix="portal-slurm-bin-", dir="/tmp"))
    folder.chmod(0o755)
    real = Path(shutil.which("sbatch") or "/usr/bin/sbatch").parent
    for program in ("sbatch", "squeue", "scontrol", "sacct", "scancel", "sinfo"):
        (folder / program).symlink_to(real / program)
    yield folder
    shutil.rmtree(folder)


def test_the_binaries_folder_reaches_every_command(
    local_catalog: dict[str, Any], owner: Any, slurm_elsewhere: Path
) -> None:
    account = local_account(owner, local_catalog)
    Cluster.objects.filter(slug="local").update(slurm_bin_dir=str(slurm_elsewhere))
    account.cluster.refresh_from_db()
    try:
        found = discover.plan(account.cluster, discover.read_slurm(account))
        assert {p.name for p in found.found.partitions} == {"gpu", "gpu_devel"}
        assert login.check(account).ok
        assert capacity.refresh_cluster(account.cluster, local_service_account(local_catalog))
        Cluster.objects.filter(slug="local").update(slurm_bin_dir=str(slurm_elsewhere / "missing"))
        account.cluster.refresh_from_db()
        with pytest.raises(ValidationError, match="No such file"):
            discover.read_slurm(account)  # the folder is used, not the PATH
    finally:
        ssh.pool.close_all()


def test_the_slurm_cluster_name_reaches_slurm(local_catalog: dict[str, Any], owner: Any) -> None:
    account = local_account(owner, local_catalog)
    Cluster.objects.filter(slug="local").update(slurm_cluster=cluster_name())
    account.cluster.refresh_from_db()
    try:
        with pytest.raises(ValidationError, match="invalid entry for --cluster"):
            discover.read_slurm(account)
        check = login.check(account)
        assert not check.ok and "--cluster" in check.message
    finally:
        ssh.pool.close_all()
