"""Queue tradeoffs: idle GPUs and pending demand per partition, Slurm's start estimate per option, the portal's own
history of waits, and a recommended option with its reasons."""

from __future__ import annotations

import hashlib
import math
import shlex
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.db.models import Exists, OuterRef, QuerySet
from django.utils import timezone

from catalog.models import Cluster, ClusterAccount, GPUType, Partition
from catalog.plans import Option
from jobs.cluster import jobscript
from jobs.models import LLMSession, PartitionState, counts
from portal import gate, shellsafe, ssh
from portal.slurm import sbatch, sinfo, squeue
from portal.slurm.errors import SlurmParseError

TEST_ONLY_CACHE_S = 60
HISTORY_MIN_SAMPLES = 3
HISTORY_WINDOW = timedelta(days=30)
# "Fits with margin": at least this share of the GPU free after the estimate, for what the estimate cannot see
# (fragmentation, a longer prompt than planned, driver growth).
MARGIN_FRACTION = 0.05


class QueueError(Exception):
    pass


# The partitions' GPUs, idle and in use, and the pending jobs' demand, in one command (a site-wide read).
QUEUE = gate.Verb(
    "queue",
    f"sinfo -h -N -O {shlex.quote(sinfo.SINFO_GRES_OPTIONS)} && echo @@pending && "
    f"squeue -h -t PENDING -o {shlex.quote(squeue.PENDING_DEMAND_FORMAT)}\n",
)
# When Slurm would start a job of an option (the wizard's estimate): sbatch's own #SBATCH flags, nothing run.
TEST_ONLY = gate.Verb("test-only", 'sbatch --test-only "$@" --wrap=true\n', more=shellsafe.SBATCH_FLAG)
VERBS = (QUEUE, TEST_ONLY)


def account_for_cluster(cluster: Cluster) -> ClusterAccount | None:
    """Whose login reads the partition state every user's wizard shows: a service account, else one an admin marked
    trusted; never a researcher's own, whose shell its user controls (they could print any figures for everyone)."""
    return ClusterAccount.site_reader(cluster)


def _has_reader(cluster: str) -> Exists:
    """Whether the cluster (an OuterRef path to it) has a service or trusted account to read its queue with."""
    readers = ClusterAccount.objects.filter(ClusterAccount.reads_for_site_q(), cluster=OuterRef(cluster))
    return Exists(readers)


def readable_clusters_marked() -> QuerySet[Cluster]:
    """Every cluster, each with `queue_read`: whether it has a service account or one marked trusted to read its
    queue figures with."""
    return Cluster.objects.annotate(queue_read=_has_reader("pk"))


def readable_clusters() -> QuerySet[Cluster]:
    """The clusters whose queue figures are read."""
    return Cluster.objects.filter(_has_reader("pk"))


def read_states() -> QuerySet[PartitionState]:
    """The partition states pages may show: those of clusters that have an account to read them with now. A cluster
    without one shows its queue as unknown, whatever rows it has (read before it lost its trusted account, or by a
    researcher's account before the portal refused those)."""
    return PartitionState.objects.filter(_has_reader("partition__cluster"))


def forget_unread() -> int:
    """Drop the partition states of clusters without a reader: figures no trusted account stands behind are not
    kept (read_states already hides them)."""
    return int(PartitionState.objects.exclude(_has_reader("partition__cluster")).delete()[0])


def refresh_cluster(cluster: Cluster, account: ClusterAccount | None = None) -> list[PartitionState]:
    """One SSH command: sinfo with GRES per node and partition, and the pending jobs' GPU demand, as the cluster's
    service or trusted account (QueueError when it has none, or `account` is a researcher's own)."""
    account = account or account_for_cluster(cluster)
    if account is None:
        raise QueueError(
            f"{cluster.name} has no service account and no account marked trusted for site-wide reads: its queue "
            "figures are off (a researcher's own account is never used for them)"
        )
    if not account.reads_for_site:
        raise QueueError(account.not_for_site("the queue figures"))
    result = account.run(gate.command(QUEUE, [], cluster.slurm_cli, gated=account.restricted), timeout_s=60)
    if result.exit_code != 0 or "@@pending" not in result.stdout:
        raise QueueError(f"sinfo/squeue failed on {cluster.name}: {result.stderr.strip()[:300]}")
    nodes_text, pending_text = result.stdout.split("@@pending", 1)
    nodes, _bad = sinfo.parse_sinfo_gres(nodes_text)
    demand = squeue.parse_pending_demand(pending_text)
    now = timezone.now()
    partitions = {p.name: p for p in Partition.objects.filter(cluster=cluster)}
    rows: dict[tuple[str, str], dict[str, int]] = {}
    for node in nodes:
        if node.partition not in partitions:
            continue
        for kind, total in node.gpus.items():
            row = rows.setdefault((node.partition, kind), dict.fromkeys(
                ("total_gpus", "idle_gpus", "idle_nodes_with_all_gpus", "unavailable_gpus"), 0))  # fmt: skip
            used = node.gpus_used.get(kind, 0)
            row["total_gpus"] += total
            if node.available:
                row["idle_gpus"] += max(total - used, 0)
                row["idle_nodes_with_all_gpus"] += int(used == 0)
            else:
                row["unavailable_gpus"] += total
    states = []
    with transaction.atomic():
        PartitionState.objects.filter(partition__cluster=cluster).delete()
        for (partition_name, kind), counts in sorted(rows.items()):
            pending = demand.get(partition_name)
            states.append(
                PartitionState.objects.create(
                    partition=partitions[partition_name],
                    gres_type=kind,
                    pending_jobs=pending.jobs if pending else 0,
                    pending_gpus=(pending.gpus.get(kind, 0) + pending.gpus.get("", 0)) if pending else 0,
                    refreshed_at=now,
                    **counts,
                )
            )
    return states


def probe_args(option: Option, walltime_min: int, account: str) -> list[str]:
    """The option's exact request as sbatch flags: the same #SBATCH lines a session's job script would carry."""
    group = option.node_group
    gpu = group.gpu_type
    cpus, memory_gib = group.share_for(option.gpus_per_node)
    spec = jobscript.JobSpec(
        session_id="00000000-0000-4000-8000-000000000000",
        runtime=option.runtime,  # its job's own #SBATCH lines (ollama's --exclusive=user changes where it fits)
        partition=group.partition.name,
        account=account,
        nodes=option.nodes,
        gpus_per_node=option.gpus_per_node,
        gres_type=gpu.gres_type or gpu.name,
        constraint=gpu.constraint,
        cpus_per_node=cpus,
        memory_gib=memory_gib,
        walltime_min=walltime_min,
        binary="true",
        served_name="x",
        context_length=128,
        parallel=1,
    )
    skip = ("--job-name", "--output", "--open-mode")
    flags = [line.removeprefix("#SBATCH ") for line in jobscript.sbatch_directives(spec)]
    return [flag for flag in flags if not flag.startswith(skip)]


@dataclass(frozen=True)
class SlurmEstimate:
    start: datetime | None
    message: str  # Slurm's words when it gives no estimate


def probe_walltime(walltime_min: int, partition_max_min: int) -> int:
    """The walltime the probe asks with: rounded up to 15 minutes (to 30 past an hour, 60 past four hours, 240 past a
    day). Slurm's backfill places a job by its time limit only that coarsely, and the rounding keeps every walltime
    typed in the wizard from being its own cache entry and SSH command."""
    step = 15 if walltime_min <= 60 else 30 if walltime_min <= 240 else 60 if walltime_min <= 1440 else 240
    return min(-(-walltime_min // step) * step, max(partition_max_min, 1))


def _may_ask(asker: int | None) -> bool:
    """A user's wizard asks Slurm at most PORTAL_WIZARD_SLURM_PER_MINUTE new questions a minute (cache hits are
    free); past it, options show the portal's own facts without Slurm's estimate."""
    return asker is None or counts.take([(f"slurm-questions:{asker}", settings.PORTAL_WIZARD_SLURM_PER_MINUTE)]) is None


def slurm_estimate(
    option: Option, walltime_min: int, account: ClusterAccount, asker: int | None = None
) -> SlurmEstimate:
    """`sbatch --test-only` with the option's request, as the user's account; cached for a minute, at most so many
    new questions a minute per asking user."""
    walltime = probe_walltime(walltime_min, option.node_group.partition.max_walltime_min)
    args = probe_args(option, walltime, account.effective_slurm_account)
    key = "test-only:" + hashlib.sha256(f"{account.pk}:{' '.join(args)}".encode()).hexdigest()
    cached = cache.get(key)
    if cached is not None:
        return SlurmEstimate(cached[0], cached[1])
    if not _may_ask(asker):
        return SlurmEstimate(None, "not asked: you asked Slurm for many estimates this minute; try again shortly")
    result = account.run(
        gate.command(TEST_ONLY, args, account.cluster.slurm_cli, gated=account.restricted), timeout_s=30
    )
    try:
        start = sbatch.parse_test_only(result.stderr).start
        estimate = SlurmEstimate(timezone.make_aware(start) if timezone.is_naive(start) else start, "")
    except SlurmParseError as exc:
        estimate = SlurmEstimate(None, str(exc))
    cache.set(key, (estimate.start, estimate.message), TEST_ONLY_CACHE_S)
    return estimate


@dataclass(frozen=True)
class History:
    samples: int
    median_s: float | None
    p90_s: float | None


def histories(places: set[tuple[int, int]]) -> dict[tuple[int, int], History]:
    """Submit-to-start waits of past sessions (last 30 days) for each (partition id, GPU type id), in one query."""
    since = timezone.now() - HISTORY_WINDOW
    rows = LLMSession.objects.filter(
        partition_id__in={p for p, _ in places},
        gpu_type_id__in={g for _, g in places},
        submitted_at__gte=since,
        started_at__isnull=False,
    ).values_list("partition_id", "gpu_type_id", "submitted_at", "started_at")
    waits: dict[tuple[int, int], list[float]] = {place: [] for place in places}
    for partition_id, gpu_type_id, submitted, started in rows:
        if (partition_id, gpu_type_id) in waits and submitted and started:
            waits[partition_id, gpu_type_id].append(max((started - submitted).total_seconds(), 0.0))
    return {place: _summary(sorted(values)) for place, values in waits.items()}


def history(partition: Partition, gpu_type: GPUType) -> History:
    return histories({(partition.pk, gpu_type.pk)})[partition.pk, gpu_type.pk]


def _summary(waits: list[float]) -> History:
    if len(waits) < HISTORY_MIN_SAMPLES:
        return History(len(waits), None, None)
    p90 = statistics.quantiles(waits, n=10, method="inclusive")[-1]
    return History(len(waits), statistics.median(waits), p90)


@dataclass
class QueueView:
    option: Option
    state: PartitionState | None
    slurm: SlurmEstimate | None
    history: History
    walltime_min: int
    # False where the cluster has no service or trusted account: its queue is not read at all, so it is unknown
    # (not "not read yet"), and the page says why.
    queue_read: bool = True
    recommended: bool = False
    reasons: list[str] = field(default_factory=list)

    @property
    def idle_now(self) -> bool:
        """Enough idle GPUs of the type for the request, as of the last refresh."""
        return self.state is not None and self.state.idle_gpus >= self.option.gpus

    @property
    def likely_start(self) -> datetime | None:
        now = timezone.now()
        if self.idle_now:
            return now
        if self.slurm is not None and self.slurm.start is not None:
            return max(self.slurm.start, now)
        if self.history.median_s is not None:
            return now + timedelta(seconds=self.history.median_s)
        return None

    @property
    def gpu_hours(self) -> float:
        return self.option.gpus * self.walltime_min / 60

    def describe(self) -> list[str]:
        """Honest lines for the page: what Slurm says and what the portal has seen."""
        lines = []
        if self.state is not None:
            lines.append(
                f"{self.state.idle_gpus} of {self.state.total_gpus} GPUs idle, {self.state.pending_jobs} jobs "
                f"waiting ({self.state.pending_gpus} GPUs asked for)"
            )
        if self.slurm is not None:
            if self.slurm.start is not None:
                lines.append(f"Slurm estimates {timezone.localtime(self.slurm.start):%H:%M} (often optimistic)")
            else:
                lines.append(f"Slurm gives no estimate: {self.slurm.message}")
        if self.history.median_s is not None and self.history.p90_s is not None:
            lines.append(
                f"past sessions here started within {_minutes(self.history.median_s)} (median), "
                f"{_minutes(self.history.p90_s)} for 9 in 10 ({self.history.samples} sessions)"
            )
        return lines


def _minutes(seconds: float) -> str:
    return f"{math.ceil(seconds / 60)} min" if seconds >= 60 else f"{int(seconds)} s"


def queue_views(
    options: list[Option],
    walltime_min: int,
    account_for: Callable[[Cluster], ClusterAccount | None] | None = None,
    ask_slurm: bool = True,
    asker: int | None = None,
) -> list[QueueView]:
    """Attach queue facts to fitting options and mark the recommended one. account_for(cluster) gives the user's
    account there (for --test-only with their own priority); without one, Slurm is not asked for that option."""
    states = {
        (s.partition_id, s.gres_type): s for s in read_states().filter(
            partition__in={o.node_group.partition_id for o in options})
    }  # fmt: skip
    clusters = {o.node_group.partition.cluster_id for o in options}
    readable = set(
        ClusterAccount.objects.filter(ClusterAccount.reads_for_site_q(), cluster__in=clusters).values_list(
            "cluster_id", flat=True
        )
    )
    waits = histories({(o.node_group.partition_id, o.node_group.gpu_type_id) for o in options})
    views = []
    for option in options:
        group = option.node_group
        state = states.get((group.partition_id, group.gpu_type.gres_type or group.gpu_type.name))
        estimate = None
        account = account_for(group.partition.cluster) if account_for and ask_slurm and option.fit.fits else None
        if account is not None:
            try:
                estimate = slurm_estimate(option, walltime_min, account, asker)
            except ssh.SSHError as exc:
                estimate = SlurmEstimate(None, f"cannot ask {group.partition.cluster.name}: {exc}")
        views.append(QueueView(option, state, estimate, waits[group.partition_id, group.gpu_type_id], walltime_min,
                               queue_read=group.partition.cluster_id in readable))  # fmt: skip
    recommend(views)
    return views


def recommend(views: list[QueueView]) -> QueueView | None:
    """Fits with margin, then the soonest likely start, then the fewest GPU-hours, then the most headroom."""
    far = timezone.now() + timedelta(days=365)

    def margin_ok(view: QueueView) -> bool:
        usable = view.option.node_group.gpu_type.usable_gib
        return view.option.fit.fits and view.option.fit.headroom_gib >= MARGIN_FRACTION * usable

    candidates = [v for v in views if margin_ok(v)] or [v for v in views if v.option.fit.fits]
    if not candidates:
        return None
    best = min(candidates, key=lambda v: (v.likely_start or far, v.gpu_hours, -v.option.fit.headroom_gib))
    best.recommended = True
    usable = best.option.node_group.gpu_type.usable_gib
    headroom = best.option.fit.headroom_gib
    best.reasons.append(f"fits with {headroom:.1f} GiB to spare per GPU ({headroom / usable:.0%})")
    if best.idle_now:
        best.reasons.append(f"{best.state.idle_gpus if best.state else 0} GPUs idle now: it should start at once")
    elif best.likely_start is not None:
        best.reasons.append(f"likely start {timezone.localtime(best.likely_start):%H:%M}, the soonest of the options")
    others = [v for v in candidates if v is not best]
    if others and all(best.gpu_hours <= v.gpu_hours for v in others):
        best.reasons.append(f"the fewest GPU-hours ({best.gpu_hours:g})")
    return best
