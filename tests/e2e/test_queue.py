"""Queue tradeoffs on the real local cluster: with the A100 nodes busy, the H100 option shows idle GPUs and starts
sooner, by the partition state and by Slurm's own --test-only estimate."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from catalog.models import Cluster, ClusterAccount, ModelVariant
from catalog.plans import plans, request_for
from jobs.cluster.capacity import queue_views, refresh_cluster
from jobs.models import PartitionState
from jobs.tasks import refresh_partitions
from portal import ssh
from tests.e2e.sessions import local_account, local_service_account, shell

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]


@pytest.fixture
def busy_a100(local_catalog: dict[str, Any]) -> Iterator[list[str]]:
    """Both A100 nodes fully taken by the cluster user's own jobs for a few minutes."""
    ids = []
    for _ in range(2):
        out = shell(
            local_catalog, "sbatch --parsable -p gpu --gres=gpu:a100:2 -N1 -t 10 -o /dev/null --wrap 'sleep 600'"
        )
        ids.append(out.stdout.strip())
    for _ in range(100):
        states = shell(local_catalog, f"squeue -h -j {','.join(ids)} -o %T").stdout.split()
        if states == ["RUNNING", "RUNNING"]:
            break
        time.sleep(0.2)
    yield ids
    shell(local_catalog, f"scancel {' '.join(ids)}")


@pytest.fixture
def account(local_catalog: dict[str, Any], owner: Any) -> Iterator[ClusterAccount]:
    yield local_account(owner, local_catalog)
    ssh.pool.close_all()


def test_with_the_a100s_busy_the_h100_option_is_idle_and_sooner(
    busy_a100: list[str], account: ClusterAccount, local_catalog: dict[str, Any]
) -> None:
    cluster = Cluster.objects.get(slug="local")
    local_service_account(local_catalog)  # reads the queue figures; the owner's account asks --test-only
    states = {(s.partition.name, s.gres_type): s for s in refresh_cluster(cluster)}
    assert (states["gpu", "a100"].total_gpus, states["gpu", "a100"].idle_gpus) == (4, 0)
    assert states["gpu", "h100"].idle_gpus == 2 and states["gpu_devel", "h100"].idle_gpus == 2

    variant = ModelVariant.objects.get(model__name="tiny-llama")
    options = plans(request_for(variant, "llama.cpp", 1024), variant)
    views = {(v.option.node_group.partition.name, v.option.node_group.gpu_type.name): v
             for v in queue_views(options, 30, account_for=lambda c: account)}  # fmt: skip
    a100, h100 = views["gpu", "a100-80g"], views["gpu", "h100"]
    assert not a100.idle_now and h100.idle_now
    assert a100.slurm is not None and a100.slurm.start is not None
    assert h100.slurm is not None and h100.slurm.start is not None
    assert h100.slurm.start < a100.slurm.start
    assert a100.slurm.start > timezone.now() + timedelta(minutes=5)  # after the busy jobs' time limit
    best = next(v for v in views.values() if v.recommended)
    assert best.option.node_group.gpu_type.name == "h100"
    assert any("idle now" in reason for reason in best.reasons)
    assert "0 of 4 GPUs idle" in a100.describe()[0]
    assert any(line.startswith("Slurm estimates") for line in a100.describe())


def test_the_beat_task_refreshes_every_cluster_with_a_service_account(
    account: ClusterAccount, local_catalog: dict[str, Any]
) -> None:
    assert refresh_partitions() == 0  # the owner's own account never reads figures everyone sees
    local_service_account(local_catalog)
    assert refresh_partitions() == 1
    assert PartitionState.objects.filter(partition__cluster__slug="local").count() == 3
