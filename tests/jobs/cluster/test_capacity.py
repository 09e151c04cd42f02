"""Queue facts: history percentiles and the recommendation (Slurm's text itself: tests/portal/slurm/)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from catalog.models import Cluster, ClusterAccount, ModelVariant
from catalog.plans import plans, request_for
from jobs.cluster.capacity import (
    QueueError,
    SlurmEstimate,
    account_for_cluster,
    history,
    probe_args,
    probe_walltime,
    queue_views,
    recommend,
    refresh_cluster,
)
from jobs.models import LLMSession, PartitionState, counts
from jobs.tasks import refresh_partitions
from portal import ssh
from tests.conftest import HOST_KEY


def past_session(account: ClusterAccount, variant: ModelVariant, wait_s: int) -> None:
    partition = account.cluster.partitions.get(name="gpu")
    gpu = partition.node_groups.first().gpu_type  # type: ignore[union-attr]
    submitted = timezone.now() - timedelta(hours=1)
    assert account.user is not None
    LLMSession.objects.create(
        owner=account.user, account=account, cluster=account.cluster, partition=partition, gpu_type=gpu,
        gpus_per_node=1, cpus_per_node=1, memory_gib=1, walltime_min=30, variant=variant,
        runtime_id=1, context_length=1024, submitted_at=submitted, started_at=submitted + timedelta(seconds=wait_s),
    )  # fmt: skip


@pytest.fixture
def local_setup(example_catalog: Path, owner: Any) -> tuple[ClusterAccount, ModelVariant]:
    account = ClusterAccount(cluster=Cluster.objects.get(slug="local"), user=owner, username="ada")
    account.save()
    return account, ModelVariant.objects.get(model__name="tiny-llama")


def test_history_gives_median_and_90th_percentile_once_there_are_enough_sessions(
    local_setup: tuple[ClusterAccount, ModelVariant],
) -> None:
    account, variant = local_setup
    partition = account.cluster.partitions.get(name="gpu")
    gpu = partition.node_groups.first().gpu_type  # type: ignore[union-attr]
    past_session(account, variant, 60)
    past_session(account, variant, 120)
    assert history(partition, gpu).median_s is None  # two are not enough to say anything
    for wait in (180, 240, 3000):
        past_session(account, variant, wait)
    seen = history(partition, gpu)
    assert (seen.samples, seen.median_s) == (5, 180)
    assert seen.p90_s == pytest.approx(1896)  # interpolated between 240 and 3000


def service_account(account: ClusterAccount) -> ClusterAccount:
    """The cluster's service account, which reads its queue for everyone."""
    return ClusterAccount.objects.create(cluster=account.cluster, kind="service", label="portal", username="portalsvc")


def test_idle_gpus_beat_a_bigger_margin_and_the_reasons_say_so(
    local_setup: tuple[ClusterAccount, ModelVariant],
) -> None:
    account, variant = local_setup
    service_account(account)
    options = plans(request_for(variant, "llama.cpp", 1024), variant)
    assert {o.node_group.gpu_type.name for o in options} == {"a100-80g", "h100"}
    now = timezone.now()
    for option in options:
        group = option.node_group
        busy = group.gpu_type.name == "a100-80g"
        PartitionState.objects.get_or_create(
            partition=group.partition, gres_type=group.gpu_type.gres_type,
            defaults={"total_gpus": 4 if busy else 2, "idle_gpus": 0 if busy else 2, "refreshed_at": now},
        )  # fmt: skip
    views = queue_views(options, 30, account_for=None)
    best = next(v for v in views if v.recommended)
    assert best.option.node_group.gpu_type.name == "h100" and best.idle_now
    assert any("idle now" in reason for reason in best.reasons)
    a100 = next(v for v in views if v.option.node_group.gpu_type.name == "a100-80g")
    assert not a100.idle_now and a100.likely_start is None
    assert "0 of 4 GPUs idle" in a100.describe()[0]


def test_slurms_estimate_decides_when_nothing_is_idle(local_setup: tuple[ClusterAccount, ModelVariant]) -> None:
    _account, variant = local_setup
    options = plans(request_for(variant, "llama.cpp", 1024), variant)
    views = queue_views(options, 30)
    soon = timezone.now() + timedelta(minutes=5)
    for view in views:
        late = view.option.node_group.partition.name == "gpu"
        view.slurm = SlurmEstimate(soon + timedelta(hours=2) if late else soon, "")
        view.recommended, view.reasons = False, []
    best = recommend(views)
    assert best is not None and best.option.node_group.partition.name == "gpu_devel"
    assert any(line.startswith("Slurm estimates") for line in best.describe())


def test_the_test_only_request_is_the_options_exact_request(local_setup: tuple[ClusterAccount, ModelVariant]) -> None:
    _, variant = local_setup
    option = next(
        o for o in plans(request_for(variant, "llama.cpp", 1024), variant) if o.node_group.gpu_type.name == "a100-80g"
    )
    args = probe_args(option, 45, "lab")
    assert args == [
        "--partition=gpu", "--account=lab", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--mem=2G",
        "--gres=gpu:a100:1", "--constraint=a100-80g", "--time=45",
    ]  # fmt: skip
    assert "--exclusive=user" in probe_args(dataclasses.replace(option, runtime="ollama"), 45, "lab")  # as its job


@pytest.fixture
def counted_sbatch(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A login host that answers every --test-only with an estimate and counts the commands it was sent."""
    commands: list[str] = []

    def run(target: ssh.SSHTarget, command: str, **kwargs: Any) -> ssh.CommandResult:
        commands.append(command)
        return ssh.CommandResult(0, "", "sbatch: Job 7 to start at 2030-01-01T10:00:00 using 1 processors on nodes n1")

    monkeypatch.setattr(ssh.pool, "run", run)
    return commands


@pytest.mark.parametrize(("walltime", "asked"), [(1, 15), (16, 30), (59, 60), (61, 90), (300, 300), (1500, 1440)])
def test_the_probe_rounds_the_walltime_up_to_a_few_steps(walltime: int, asked: int) -> None:
    assert probe_walltime(walltime, partition_max_min=1440) == asked


def test_varying_the_walltime_does_not_get_past_the_cache(
    local_setup: tuple[ClusterAccount, ModelVariant], counted_sbatch: list[str]
) -> None:
    account, variant = local_setup
    options = [o for o in plans(request_for(variant, "llama.cpp", 1024), variant) if o.fit.fits]
    for walltime in (31, 37, 44, 45):  # one 45-minute probe per option, asked once
        queue_views(options, walltime, account_for=lambda cluster: account, asker=account.pk)
    assert len(counted_sbatch) == len(options) and all("--time=45" in c for c in counted_sbatch)


def test_a_users_wizard_asks_slurm_only_so_often(
    local_setup: tuple[ClusterAccount, ModelVariant], counted_sbatch: list[str], settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    account, variant = local_setup
    settings.PORTAL_WIZARD_SLURM_PER_MINUTE = 3
    monkeypatch.setattr(counts, "clock", lambda: 1_800_000_015.0)  # all in one minute's window
    options = [o for o in plans(request_for(variant, "llama.cpp", 1024), variant) if o.fit.fits][:1]
    views = [
        queue_views(options, walltime, account_for=lambda c: account, asker=7)[0] for walltime in (30, 60, 90, 120)
    ]
    assert len(counted_sbatch) == 3
    assert views[-1].slurm is not None and "not asked" in views[-1].slurm.message
    assert queue_views(options, 60, account_for=lambda c: account, asker=7)[0].slurm.start  # type: ignore[union-attr]


@pytest.fixture
def login_host(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A login host whose sinfo shows one idle node: the users commands ran as are recorded."""
    asked: list[str] = []

    def run(target: ssh.SSHTarget, command: str, **kwargs: Any) -> ssh.CommandResult:
        asked.append(target.username)
        return ssh.CommandResult(0, "node3|gpu_devel|idle|h100|gpu:h100:2|gpu:h100:0(IDX:N/A)|\n@@pending\n", "")

    monkeypatch.setattr(ssh.pool, "run", run)
    Cluster.objects.filter(slug="local").update(host_key=HOST_KEY)
    return asked


def test_the_queue_figures_are_never_read_with_a_researchers_account(
    local_setup: tuple[ClusterAccount, ModelVariant], login_host: list[str]
) -> None:
    # ada's ~/.bashrc could print any sinfo: what it says would be every user's "idle now".
    account, _ = local_setup
    partition = account.cluster.partitions.get(name="gpu")
    PartitionState.objects.create(partition=partition, gres_type="a100", total_gpus=4, idle_gpus=4,
                                  refreshed_at=timezone.now())  # fmt: skip  # read before the portal refused it
    assert account_for_cluster(account.cluster) is None
    with pytest.raises(QueueError, match="no service account and no account marked trusted"):
        refresh_cluster(account.cluster)
    with pytest.raises(QueueError, match="researcher's own account"):
        refresh_cluster(account.cluster, account)
    assert refresh_partitions() == 0
    assert login_host == [] and not PartitionState.objects.exists()


def test_the_queue_figures_are_read_with_a_service_account_else_one_marked_trusted(
    local_setup: tuple[ClusterAccount, ModelVariant], login_host: list[str]
) -> None:
    account, _ = local_setup
    ClusterAccount.objects.filter(pk=account.pk).update(trusted=True)
    assert account_for_cluster(account.cluster) == account
    service = service_account(account)
    assert account_for_cluster(account.cluster) == service
    assert refresh_partitions() == 1 and login_host == ["portalsvc"]
    assert PartitionState.objects.get().idle_gpus == 2


def test_a_cluster_without_a_trusted_account_shows_its_queue_as_unknown(
    local_setup: tuple[ClusterAccount, ModelVariant], client: Client, owner: Any, settings: Any
) -> None:
    settings.PORTAL_WIZARD_ASKS_SLURM = False  # unit tests never reach a cluster
    client.force_login(owner)
    account, variant = local_setup
    options = plans(request_for(variant, "llama.cpp", 1024), variant)
    for option in options:  # rows the beat would drop: even before it does, nobody is shown them
        PartitionState.objects.get_or_create(
            partition=option.node_group.partition, gres_type=option.node_group.gpu_type.gres_type,
            defaults={"total_gpus": 2, "idle_gpus": 2, "refreshed_at": timezone.now()},
        )  # fmt: skip
    views = queue_views(options, 30)
    assert all(v.state is None and not v.queue_read and not v.idle_now for v in views)
    wanted = {"model": "tiny-llama", "quant": "fp16", "runtime": "llama.cpp", "context": "1024"}
    page = client.get("/launch/", wanted).content.decode()
    assert "no account it trusts to read this cluster's queue" in page and " idle, " not in page

    service_account(account)
    assert all(v.state is not None and v.queue_read for v in queue_views(options, 30))
    assert "2 of 2 idle, 0 waiting" in client.get("/launch/", wanted).content.decode()
