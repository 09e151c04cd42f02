"""Allocations: GPU-hours and/or tokens a user, a group or a Slurm account may spend per period, on one cluster or
everywhere, with a soft threshold that mails its holder and managers and what happens once it is spent.

What an allocation counts, and when its period resets, is jobs/allocations/'s; here only what an admin set.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from catalog import validators as v
from catalog.models import Cluster


class Allocation(models.Model):
    class Period(models.TextChoices):
        DAY = "day", "a day"
        WEEK = "week", "a week (from Monday)"
        MONTH = "month", "a month"
        TERM = "term", "a term (from one date to another)"

    class Action(models.TextChoices):
        REFUSE = "refuse", "refuse new launches and stop API and chat calls"
        WARN = "warn", "only warn"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, blank=True, related_name="allocations"
    )
    group = models.ForeignKey(Group, on_delete=models.CASCADE, null=True, blank=True, related_name="allocations")
    slurm_account = models.CharField(
        max_length=64,
        blank=True,
        validators=[v.slurm_account],
        help_text="Every session charged to this Slurm account (the cluster account's, else the cluster's default), "
        "and the tokens of everyone who may submit with it.",
    )
    cluster = models.ForeignKey(
        Cluster,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="allocations",
        help_text="Empty: on every cluster, together.",
    )
    gpu_hours = models.DecimalField(
        "GPU-hours",
        max_digits=12,
        decimal_places=2,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal("0"))],
        help_text="Empty: no GPU-hour limit. A launch reserves GPUs times walltime; what it did not use returns when "
        "it ends.",
    )
    tokens = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Prompt and completion tokens together; empty: no token limit."
    )
    period = models.CharField(max_length=5, choices=Period.choices, default=Period.MONTH)
    starts_on = models.DateField(null=True, blank=True, help_text="A term's first day.")
    ends_on = models.DateField(null=True, blank=True, help_text="A term's last day.")
    soft_percent = models.PositiveSmallIntegerField(
        default=80,
        validators=[MinValueValidator(1), MaxValueValidator(100)],
        help_text="At this much spent the holder and the managers get an email.",
    )
    action = models.CharField(max_length=6, choices=Action.choices, default=Action.REFUSE)
    managers = models.ManyToManyField(
        settings.AUTH_USER_MODEL,
        blank=True,
        related_name="managed_allocations",
        help_text="Who hears at the soft threshold and when it is spent, besides a user holder: a group's or an "
        "account's managers.",
    )
    # The start of the period whose soft threshold, and whose end, were mailed (claimed by a conditional UPDATE).
    soft_mailed_for = models.DateTimeField(null=True, blank=True, editable=False)
    spent_mailed_for = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["pk"]
        constraints = [
            models.CheckConstraint(
                name="allocation_one_holder",
                condition=(
                    Q(user__isnull=False, group__isnull=True, slurm_account="")
                    | Q(user__isnull=True, group__isnull=False, slurm_account="")
                    | (Q(user__isnull=True, group__isnull=True) & ~Q(slurm_account=""))
                ),
            ),
            models.CheckConstraint(
                name="allocation_term_dates",
                condition=~Q(period="term") | Q(starts_on__isnull=False, ends_on__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        where = f" on {self.cluster}" if self.cluster_id else ""
        return f"{self.holder_label}{where}, {self.get_period_display()}"

    @property
    def holder_label(self) -> str:
        if self.user_id is not None:
            return f"user {self.user}"
        if self.group_id is not None:
            return f"group {self.group}"
        return f"Slurm account {self.slurm_account}"

    @property
    def holder_key(self) -> str:
        """A short stable name for /metrics and the CLI: user:NAME, group:NAME or account:NAME, @cluster-slug."""
        if self.user_id is not None:
            holder = f"user:{self.user.get_username()}"  # type: ignore[union-attr]
        elif self.group_id is not None:
            holder = f"group:{self.group.name}"  # type: ignore[union-attr]
        else:
            holder = f"account:{self.slurm_account}"
        return f"{holder}@{self.cluster.slug}" if self.cluster_id else holder  # type: ignore[union-attr]

    def in_force(self, today: date) -> bool:
        """A term is in force from its first day to its last; the other periods always."""
        if self.period != self.Period.TERM:
            return True
        assert self.starts_on is not None and self.ends_on is not None
        return self.starts_on <= today <= self.ends_on

    def clean(self) -> None:
        super().clean()
        holders = sum([self.user_id is not None, self.group_id is not None, bool(self.slurm_account)])
        if holders != 1:
            raise ValidationError("An allocation is for exactly one of: a user, a group, a Slurm account.")
        if self.gpu_hours is None and self.tokens is None:
            raise ValidationError("Give GPU-hours, tokens or both.")
        if self.tokens is not None and self.cluster_id is not None:
            # A call is refused at the portal's door, before the model it names is looked up: its cluster is not
            # known there, and tokens are spent through the portal, which is the same on every cluster.
            raise ValidationError({"cluster": "Token allocations count on every cluster together; leave it empty."})
        if self.period == self.Period.TERM:
            if self.starts_on is None or self.ends_on is None:
                raise ValidationError({"ends_on": "A term needs its first and last day."})
            if self.ends_on < self.starts_on:
                raise ValidationError({"ends_on": "A term's last day cannot come before its first."})
        elif self.starts_on is not None or self.ends_on is not None:
            raise ValidationError({"period": "Dates are for a term; a day, week or month resets by itself."})
