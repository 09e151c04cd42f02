"""What an allocation has spent in its current period.

GPU-hours: the sessions and fine-tune runs charged to it (their owner is its user or in its group, or their job runs
under its Slurm account; on its cluster when it names one) created in the period. A live one is charged its worst
case, GPUs times walltime, reserved when it was launched; an ended one what it used, GPUs times the time its job ran
(none if it never started): so what it did not use returns when it ends. Model services' replicas are sessions of the
service's owner, so a service charges its owner's allocations.

Tokens: prompt and completion tokens of the requests its users made through the portal in the period (its user, its
group's members, or everyone who may submit with its Slurm account).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from django.contrib.auth.models import User
from django.db.models import Case, F, Q, QuerySet, Sum, When
from django.utils import timezone

from catalog.models import Cluster, ClusterAccount
from jobs.allocations.periods import Window, current
from jobs.models import LIVE_STATES, Allocation, FineTuneRun, LLMSession, ProxyRequest, UsageRollup
from jobs.models.summaries import Cover, Mark

Charged = TypeVar("Charged", LLMSession, FineTuneRun)


@dataclass(frozen=True)
class Standing:
    """An allocation in its current period: what it allows, what is spent and when it resets."""

    allocation: Allocation
    window: Window
    gpu_hours: float  # charged: used by ended sessions and reserved by live ones
    reserved_gpu_hours: float  # of which, reserved by live sessions
    tokens: int

    @property
    def gpu_hours_left(self) -> float | None:
        limit = self.allocation.gpu_hours
        return None if limit is None else max(0.0, float(limit) - self.gpu_hours)

    @property
    def tokens_left(self) -> int | None:
        limit = self.allocation.tokens
        return None if limit is None else max(0, limit - self.tokens)

    @property
    def percent(self) -> float:
        """The larger share spent of the limits it sets (100: one is spent)."""
        shares = [0.0]
        if self.allocation.gpu_hours is not None:
            shares.append(_share(self.gpu_hours, float(self.allocation.gpu_hours)))
        if self.allocation.tokens is not None:
            shares.append(_share(self.tokens, self.allocation.tokens))
        return max(shares)

    @property
    def tokens_spent(self) -> bool:
        return self.allocation.tokens is not None and self.tokens >= self.allocation.tokens

    @property
    def spent(self) -> bool:
        return self.percent >= 100

    @property
    def soft(self) -> bool:
        return self.percent >= self.allocation.soft_percent


def _share(used: float, limit: float) -> float:
    if limit <= 0:
        return 100.0
    return 100.0 * used / limit


def charged_rows(model: type[Charged], allocation: Allocation) -> QuerySet[Charged]:
    """Every session (or fine-tune run) charged to the allocation, in any period (deleted sessions too: their
    GPU-hours were spent)."""
    rows = model.objects.all()
    if allocation.user_id is not None:
        rows = rows.filter(owner_id=allocation.user_id)
    elif allocation.group_id is not None:
        rows = rows.filter(owner__groups=allocation.group_id)
    else:
        rows = rows.filter(charged_to(allocation.slurm_account, "account__", "cluster__"))
    if allocation.cluster_id is not None:
        rows = rows.filter(cluster_id=allocation.cluster_id)
    return rows


def sessions_of(allocation: Allocation) -> QuerySet[LLMSession]:
    return charged_rows(LLMSession, allocation)


def charged_to(slurm_account: str, account: str = "", cluster: str = "cluster__") -> Q:
    """Cluster accounts (or the sessions through them, with the prefixes) whose jobs are charged to `slurm_account`:
    their own, else their cluster's default."""
    return Q(**{f"{account}slurm_account": slurm_account}) | Q(
        **{f"{account}slurm_account": "", f"{account}{cluster}default_account": slurm_account}
    )


def users_of(allocation: Allocation) -> QuerySet[User]:
    """Whose requests spend the allocation's tokens."""
    if allocation.user_id is not None:
        return User.objects.filter(pk=allocation.user_id)
    if allocation.group_id is not None:
        return User.objects.filter(groups=allocation.group_id)
    accounts = ClusterAccount.objects.filter(charged_to(allocation.slurm_account))
    return User.objects.filter(Q(cluster_accounts__in=accounts) | Q(shared_cluster_accounts__in=accounts)).distinct()


def gpu_hours(allocation: Allocation, window: Window) -> tuple[float, float]:
    """GPU-hours charged by the sessions and fine-tune runs created in the window, and of them reserved by live ones.
    A fine-tune run that Slurm requeued (its own checkpoint at the time limit, or a preemption) may run for its
    walltime once per start."""
    created = {"created_at__gte": window.start, "created_at__lt": window.resets_at}
    sessions = sessions_of(allocation).filter(**created)
    runs = charged_rows(FineTuneRun, allocation).filter(**created)
    rows = [
        (state in LIVE_STATES, gpus_per_node * nodes, walltime_min, started_at, ended_at)
        for state, gpus_per_node, nodes, walltime_min, started_at, ended_at in sessions.values_list(
            "state", "gpus_per_node", "nodes", "walltime_min", "started_at", "ended_at"
        )
    ] + [
        (state in FineTuneRun.LIVE_STATES, gpus_per_node, walltime_min * (1 + restarts), started_at, finished_at)
        for state, gpus_per_node, walltime_min, restarts, started_at, finished_at in runs.values_list(
            "state", "gpus_per_node", "walltime_min", "restarts", "started_at", "finished_at"
        )
    ]
    charged = reserved = 0.0
    for live, gpus, walltime_min, started_at, ended_at in rows:
        walltime_h = walltime_min / 60
        if live:
            reserved += gpus * walltime_h
        elif started_at is not None and ended_at is not None:
            charged += gpus * min(walltime_h, max(0.0, (ended_at - started_at).total_seconds() / 3600))
    return charged + reserved, reserved


def tokens(allocation: Allocation, window: Window, now: datetime) -> int:
    """Its users' tokens from the period's start to now: the usage summaries of the whole days and months in it (the
    raw rows are kept only PORTAL_USAGE_RAW_DAYS, a term may be longer) and the raw rows none of them holds."""
    cover = Cover.of(window.start, now, True, Mark.read())
    spent = F("prompt_tokens") + F("completion_tokens")
    summaries = UsageRollup.objects.filter(breakdown=UsageRollup.Breakdown.USER, metric=UsageRollup.Metric.TALLIES)
    raw = ProxyRequest.objects.all()
    if allocation.user_id is not None:  # one user: their (user, moment) index
        summaries, user_id = summaries.filter(user_id=allocation.user_id), allocation.user_id
    else:
        who = users_of(allocation).values("pk")
        summaries, raw, user_id = summaries.filter(user__in=who), raw.filter(user__in=who), None
    total = cover.rollups(summaries).aggregate(n=Sum(spent))["n"] or 0
    total += cover.raw(raw, user_id=user_id).aggregate(n=Sum(spent))["n"] or 0
    return int(total)


def standing(allocation: Allocation, now: datetime | None = None) -> Standing | None:
    """The allocation in its current period; None for a term not in force."""
    now = now or timezone.now()
    window = current(allocation, now)
    if window is None:
        return None
    charged = reserved = 0.0
    if allocation.gpu_hours is not None:
        charged, reserved = gpu_hours(allocation, window)
    spent_tokens = tokens(allocation, window, now) if allocation.tokens is not None else 0
    return Standing(allocation, window, charged, reserved, spent_tokens)


def applying(user: User | int, *, gpu_hours: bool = False, token_limits: bool = False) -> QuerySet[Allocation]:
    """The allocations that count what `user` launches or sends: theirs, their groups', and their Slurm accounts'
    (through every cluster account they may submit with). Narrowed to those that limit GPU-hours or tokens. One
    query."""
    user_pk = user if isinstance(user, int) else user.pk
    effective = Case(When(slurm_account="", then=F("cluster__default_account")), default=F("slurm_account"))
    accounts = ClusterAccount.objects.filter(Q(user_id=user_pk) | Q(members=user_pk)).annotate(charged=effective)
    charged = accounts.exclude(charged="").values("charged")
    rows = Allocation.objects.filter(Q(user_id=user_pk) | Q(group__user=user_pk) | Q(slurm_account__in=charged))
    rows = rows.distinct()
    if gpu_hours:
        rows = rows.filter(gpu_hours__isnull=False)
    if token_limits:
        rows = rows.filter(tokens__isnull=False)
    return rows.select_related("user", "group", "cluster")


def for_launch(user: User, account: ClusterAccount, cluster: Cluster) -> QuerySet[Allocation]:
    """The GPU-hour allocations a launch through `account` on `cluster` is charged to."""
    holders = Q(user=user) | Q(group__user=user)
    if account.effective_slurm_account:
        holders |= Q(slurm_account=account.effective_slurm_account)
    rows = Allocation.objects.filter(holders, Q(cluster__isnull=True) | Q(cluster=cluster), gpu_hours__isnull=False)
    return rows.distinct().select_related("user", "group", "cluster")
