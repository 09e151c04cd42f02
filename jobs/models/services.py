"""Model services: a name that stays up for a lab or the whole site, served by replicas that are ordinary sessions.

A service keeps the launch its replicas are made from (the launch form's fields, validated by the same LaunchForm),
how many replicas it keeps (min..max), and who may use it: its owner alone, members of its groups, or everyone signed
in (a site service, which needs its own permission to create). Its replicas are LLMSession rows marked with it
(LLMSession.service); jobs/services/ keeps them up and the proxy routes a request naming the service to one of them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Count, Q

from jobs.models.sessions import SERVING_STATES, LLMSession

# Site services are used by everyone signed in: creating one takes this permission (superusers have it).
RUN_SITE_SERVICE = ("run_site_service", "jobs")
SERVICE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z"
RESERVED_NAMES = frozenset({"new"})  # /services/<name>/ would be another page


class ServiceQuerySet(models.QuerySet["ModelService"]):
    def usable_by(self, user: Any) -> ServiceQuerySet:
        """The services `user` may send requests to (may_use's rule as a query; the proxy's lookup has it in SQL),
        stopped ones included: their own, site services, and those of a group they are in."""
        if not getattr(user, "is_authenticated", False) or not user.is_active:
            return self.none()
        in_groups = ModelService.groups.through.objects.filter(group__user=user).values("modelservice_id")
        audience = ModelService.Audience
        return self.filter(Q(owner=user) | Q(audience=audience.SITE) | Q(audience=audience.GROUPS, pk__in=in_groups))

    def with_ready(self) -> ServiceQuerySet:
        """With `ready`, each service's number of ready replicas (READY_REPLICA), and its owner, in one query."""
        ready = Q(**{f"replicas__{k}": v for k, v in READY_REPLICA.items()}) & ~Q(replicas__host="")
        return self.select_related("owner").annotate(ready=Count("replicas", filter=ready))


# A replica that takes requests now, as the proxy routes them (jobs/use/targets.py): serving (running, or unknown while
# its server still answers), with an address (host not empty: the query adds it), and not draining.
READY_REPLICA = {"state__in": tuple(sorted(SERVING_STATES)), "draining_since__isnull": True}


def inflight_cap(own: int | None) -> int:
    """The requests one user may have in flight on a service at once: its own cap, else the site's (0: no cap)."""
    return settings.PORTAL_MAX_INFLIGHT_PER_USER if own is None else own


def takes_requests(replica: LLMSession) -> bool:
    """READY_REPLICA's rule on a loaded row."""
    return replica.state in SERVING_STATES and bool(replica.host) and replica.draining_since is None


class ModelService(models.Model):
    class Audience(models.TextChoices):
        OWNER = "owner", "its owner"
        GROUPS = "groups", "members of its groups"
        SITE = "site", "everyone signed in"

    name = models.CharField(
        max_length=63,
        unique=True,
        validators=[
            RegexValidator(SERVICE_NAME, "Letters, digits, '.', '_' and '-', starting with a letter or digit.")
        ],
        help_text="What callers name as the model (API and chat).",
    )
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="model_services")
    # The launch form's fields (LaunchForm's names and values, as sessions launch takes them): every replica is
    # launched from them, through the same form.
    launch = models.JSONField(default=dict)
    min_replicas = models.PositiveSmallIntegerField(default=1, validators=[MaxValueValidator(64)])
    max_replicas = models.PositiveSmallIntegerField(default=1, validators=[MinValueValidator(1), MaxValueValidator(64)])
    audience = models.CharField(max_length=6, choices=Audience.choices, default=Audience.OWNER)
    groups = models.ManyToManyField(Group, blank=True, related_name="model_services")
    # Scaling (jobs/services/scaling.py): replicas are added while the requests in flight per ready replica stay above
    # the target, and removed one at a time after the idle time in which one fewer would have been enough.
    target_inflight = models.PositiveSmallIntegerField(
        default=4, validators=[MinValueValidator(1), MaxValueValidator(1024)],
        help_text="Requests in flight per ready replica above which another replica is added (up to max).",
    )  # fmt: skip
    idle_minutes = models.FloatField(
        default=15.0, validators=[MinValueValidator(0.0), MaxValueValidator(60 * 24 * 7)],
        help_text="How long one fewer replica must have been enough before one is removed (down to min).",
    )  # fmt: skip
    # Fair share (jobs/use/fairshare.py): requests one user may have in flight on the service at once, past which they
    # are answered 429 with Retry-After. Empty: the site's PORTAL_MAX_INFLIGHT_PER_USER.
    max_inflight_per_user = models.PositiveSmallIntegerField(
        null=True, blank=True, validators=[MaxValueValidator(1024)],
        help_text="Requests one user may have in flight on it at once (0: no cap); empty: the site's default.",
    )  # fmt: skip
    # How many replicas the keeper keeps now, between min and max: raised under load, lowered when idle, raised from
    # 0 by a request when min is 0. Not edited by hand: scale() sets min and max, and this follows within them.
    desired_replicas = models.PositiveSmallIntegerField(default=0, editable=False)
    busy_since = models.DateTimeField(null=True, blank=True, editable=False)  # load above target since
    quiet_since = models.DateTimeField(null=True, blank=True, editable=False)  # one fewer enough since
    created_at = models.DateTimeField(auto_now_add=True)
    stopped_at = models.DateTimeField(null=True, blank=True, help_text="Stopped: no replica is kept up any more.")
    # Why the keeper's last launch of a replica was refused (the owner's allocation or limits, a catalog change);
    # empty once one launches. Shown on the service's page: otherwise only the workers' log would say.
    launch_refused = models.TextField(blank=True, editable=False)

    objects = ServiceQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        verbose_name = "model service"
        permissions = [(RUN_SITE_SERVICE[0], "Can run a model service for everyone signed in (a site service)")]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.name in RESERVED_NAMES:
            raise ValidationError({"name": f"{self.name!r} names a page of the portal's (/services/{self.name}/)."})
        if self.min_replicas > self.max_replicas:
            raise ValidationError({"min_replicas": "At most max replicas."})

    @property
    def running(self) -> bool:
        return self.stopped_at is None

    @property
    def inflight_cap(self) -> int:
        return inflight_cap(self.max_inflight_per_user)

    @property
    def keeps(self) -> int:
        """How many replicas are kept now: the desired count held within min..max."""
        return min(self.max_replicas, max(self.min_replicas, self.desired_replicas))

    def may_use(self, user: Any) -> bool:
        """Whether a signed-in user may send it requests (the proxy's lookup applies the same rule in SQL)."""
        if not getattr(user, "is_authenticated", False) or not user.is_active:
            return False
        if user.pk == self.owner_id or self.audience == self.Audience.SITE:
            return True
        return self.audience == self.Audience.GROUPS and self.groups.filter(user=user).exists()


class ReplicaLoad(models.Model):
    """The requests open on a replica through one portal worker process, as that process last published them
    (jobs/services/load.py, about once a second while it has any). Every worker routes by the sum over the others'
    fresh rows and its own count, and the keeper scales and drains by the same sum: so the load of a replica is the
    site's, not one process's. A row not refreshed for a few seconds is of a process that stopped, and counts no more.
    """

    # Rows refreshed within this long count; an older one is of a process that stopped or hung.
    FRESH = timedelta(seconds=5)

    worker = models.CharField(max_length=64)
    session = models.ForeignKey("jobs.LLMSession", on_delete=models.CASCADE, related_name="loads")
    inflight = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["worker", "session"], name="one_load_per_worker_and_replica")]

    def __str__(self) -> str:
        return f"{self.session_id} via {self.worker}: {self.inflight}"
