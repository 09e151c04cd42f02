"""Sharing with named users or a group: a running session (who may use it, how, and until when) and a fine-tune run's
adapter (who may see the run, download the adapter and load it in their own sessions). Both are grants of one shape
(Grant): whom, by whom, since when, until when, revoked when."""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from jobs.models.finetune import FineTuneRun
from jobs.models.sessions import LLMSession
from portal import shellsafe


class Grant(models.Model):
    """What every grant holds: whom it names (a user or a group, never both), who made it and when, until when it
    runs (none: until revoked), and when it was revoked. A revoked or expired grant stays as a record of who had
    access when. Reverse accessors are left off: the grants are reached from what they share."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    group = models.ForeignKey(Group, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True

    @property
    def grantee(self) -> str:
        return f"group {self.group.name}" if self.group_id and self.group else str(self.user)


def names_a_user_or_a_group(name: str) -> models.CheckConstraint:
    """A grant's constraint that it names one user or one group (each table's own name for it)."""
    return models.CheckConstraint(
        condition=(Q(user__isnull=False) & Q(group__isnull=True)) | (Q(user__isnull=True) & Q(group__isnull=False)),
        name=name,
    )


class SessionShare(Grant):
    """A session's owner lets a user, or every member of a group, chat with its model in the browser, call it from
    scripts, or both."""

    session = models.ForeignKey(LLMSession, on_delete=models.CASCADE, related_name="shares")
    chat = models.BooleanField("chat in the browser", default=True)
    api = models.BooleanField("API (scripts)", default=True)

    class Meta:
        ordering = ["created_at", "pk"]
        constraints = [
            names_a_user_or_a_group("share_names_a_user_or_a_group"),
            models.CheckConstraint(condition=Q(chat=True) | Q(api=True), name="share_grants_something"),
        ]
        indexes = [models.Index(fields=["session", "revoked_at"], name="share_session_idx")]

    def __str__(self) -> str:
        return f"{self.session_id} with {self.grantee}"

    @property
    def access(self) -> str:
        return " and ".join(name for name, on in (("chat", self.chat), ("API", self.api)) if on)


class FineTuneShare(Grant):
    """A fine-tune run's owner lets a user, or every member of a group, see the run's page, download its adapter and
    load the adapter in their own sessions of the base model (docs/finetune.md, sharing)."""

    run = models.ForeignKey(FineTuneRun, on_delete=models.CASCADE, related_name="shares")

    class Meta:
        ordering = ["created_at", "pk"]
        verbose_name = "fine-tune run share"
        constraints = [names_a_user_or_a_group("finetune_share_names_a_user_or_a_group")]
        indexes = [models.Index(fields=["run", "revoked_at"], name="finetune_share_run_idx")]

    def __str__(self) -> str:
        return f"{self.run_id} with {self.grantee}"


def active_shares(moment: datetime | None = None) -> Q:
    """The grants in force now, as a filter on SessionShare or FineTuneShare."""
    moment = moment or timezone.now()
    return Q(revoked_at__isnull=True) & (Q(expires_at__isnull=True) | Q(expires_at__gt=moment))


def reaching(user: User, moment: datetime | None = None) -> Q:
    """The grants in force that reach `user`, by name or through one of their groups, as a filter on either kind."""
    return active_shares(moment) & (Q(user=user.pk) | Q(group__in=user.groups.values("pk")))


def granted_to(user: User, moment: datetime | None = None) -> models.QuerySet[SessionShare]:
    """The session grants in force that reach `user`."""
    return SessionShare.objects.filter(reaching(user, moment))


class GroupSource(models.Model):
    """Where a portal group's members come from: a Unix/LDAP group or a Slurm account on a cluster, read over SSH
    with one of the cluster's accounts. Cluster user names become portal users through their personal accounts."""

    class Kind(models.TextChoices):
        UNIX_GROUP = "unix_group", "Unix or LDAP group (getent group)"
        SLURM_ACCOUNT = "slurm_account", "Slurm account (sacctmgr; needs slurmdbd)"

    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="sources")
    account = models.ForeignKey(
        "catalog.ClusterAccount",
        on_delete=models.CASCADE,
        related_name="group_sources",
        help_text="The cluster account that asks: a service account, or one marked trusted for site-wide reads (a "
        "researcher's own account could print any members, themselves included).",
    )
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.UNIX_GROUP)
    name = models.CharField(
        max_length=64,
        validators=[RegexValidator(shellsafe.GROUP_NAME.regex, shellsafe.GROUP_NAME.message)],
    )
    synced_at = models.DateTimeField(null=True, blank=True, editable=False)
    members_found = models.PositiveIntegerField(default=0, editable=False)
    last_error = models.TextField(blank=True, editable=False)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["group", "account", "kind", "name"], name="one_source_each")]

    def __str__(self) -> str:
        return f"{self.group} <- {self.get_kind_display()} {self.name}"

    def clean(self) -> None:
        super().clean()
        if self.account_id is not None and not self.account.reads_for_site:
            raise ValidationError({"account": self.account.not_for_site("group sync") + "."})
