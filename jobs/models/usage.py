"""What each request through the proxy used: one row per request, by session and by the user who made it."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import AnonymousUser, User
from django.db import models
from django.utils import timezone

from jobs.models.sessions import SEE_SITE_USAGE, LLMSession

# Bucket bounds for times to first token (ms) and generation speeds (tokens/s): the usage pages' percentiles and the
# /metrics histograms use the same ones.
TTFT_BOUNDS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
SPEED_BOUNDS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)

# The "Site usage" permission opens two pages in two subpackages (jobs.usage's site usage, jobs.operations'
# dashboard); its rule lives here, below both, so neither imports the other for it.
SITE_USAGE_DENIED = "Site usage is for those an admin put in the “Site usage” group."


def sees_site_usage(user: User | AnonymousUser) -> bool:
    """Those given the explicit permission (the "Site usage" group; superusers have every permission). Being staff
    alone shows nobody else's usage."""
    return user.has_perm(".".join(SEE_SITE_USAGE))


class ProxyRequest(models.Model):
    """One request a user sent to a session's server through the portal (browser chat or API)."""

    class Route(models.TextChoices):
        CHAT = "chat", "browser chat"
        API = "api", "API"

    session = models.ForeignKey(LLMSession, on_delete=models.CASCADE, related_name="requests")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="proxy_requests")
    at = models.DateTimeField(default=timezone.now, db_index=True)
    route = models.CharField(max_length=4, choices=Route.choices)
    endpoint = models.CharField(max_length=32)  # an API route's name (catalog.runtime_rules.API_ROUTES)
    status = models.PositiveSmallIntegerField()
    prompt_tokens = models.PositiveIntegerField(default=0)  # all of the prompt's, those read from a cache included
    completion_tokens = models.PositiveIntegerField(default=0)
    # Of the prompt's tokens, those the server read from its cache (OpenAI's cached_tokens, Anthropic's
    # cache_read_input_tokens), where it says.
    cached_tokens = models.PositiveIntegerField(default=0)
    # False: the server reported no usage and the completion tokens were counted from the stream's events.
    tokens_reported = models.BooleanField(default=True)
    ttft_ms = models.FloatField(null=True, blank=True)  # streams only: first byte of the reply
    duration_ms = models.FloatField()
    tokens_per_s = models.FloatField(null=True, blank=True)  # completion tokens over the time after the first
    bytes_in = models.PositiveIntegerField(default=0)
    bytes_out = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-at"]
        indexes = [
            models.Index(fields=["session", "user"], name="request_session_user_idx"),
            models.Index(fields=["user", "at"], name="request_user_at_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.user_id} {self.endpoint} {self.status}"

    @property
    def failed(self) -> bool:
        return self.status >= 400


class UsageRollup(models.Model):
    """Proxy requests summarised (jobs/usage/rollups.py) so that the usage figures never read every row: per local day
    or month, broken down per session and user, per user alone or per session alone. A row holds either the tallies of
    one API route (metric empty) or one bucket of a histogram (metric "ttft" or "speed", no route): how many successful
    requests fell in it and the smallest and largest value seen there."""

    class Grain(models.TextChoices):
        DAY = "day", "day"
        MONTH = "month", "month"

    class Breakdown(models.TextChoices):
        SESSION_USER = "session_user", "per session and user"
        USER = "user", "per user"  # the site's tables by user or group read these
        SESSION = "session", "per session"  # and by model, cluster, ..., month these

    class Metric(models.TextChoices):
        TALLIES = "", "tallies"
        TTFT = "ttft", "time to first token (ms)"  # buckets of TTFT_BOUNDS_MS
        SPEED = "speed", "tokens/s"  # buckets of SPEED_BOUNDS

    breakdown = models.CharField(max_length=12, choices=Breakdown.choices)
    grain = models.CharField(max_length=5, choices=Grain.choices)
    start = models.DateField()  # the day, or the month's first day, in the portal's time zone when summarised
    session = models.ForeignKey(LLMSession, on_delete=models.CASCADE, null=True, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, related_name="+")
    endpoint = models.CharField(max_length=32, blank=True)  # ProxyRequest.endpoint; empty on histogram rows
    metric = models.CharField(max_length=5, choices=Metric.choices, blank=True)
    bucket = models.PositiveSmallIntegerField(null=True)
    requests = models.PositiveBigIntegerField(default=0)  # a histogram row: the requests in its bucket
    errors = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)
    bytes_in = models.PositiveBigIntegerField(default=0)
    bytes_out = models.PositiveBigIntegerField(default=0)
    low = models.FloatField(null=True)
    high = models.FloatField(null=True)

    class Meta:
        indexes = [
            models.Index(fields=["breakdown", "grain", "start"], name="rollup_breakdown_idx"),
            models.Index(fields=["user", "breakdown", "grain", "start"], name="rollup_user_idx"),
            models.Index(fields=["session", "breakdown", "grain", "start"], name="rollup_session_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.breakdown} {self.grain} {self.start} {self.metric or self.endpoint}"


class UsageWindow(models.Model):
    """A clock-aligned 15-minute window in which at least one request to a session started (the GPU-hours with
    traffic), with the first and last of them: whether a window at the edge of a run had a request inside it."""

    session = models.ForeignKey(LLMSession, on_delete=models.CASCADE, related_name="+")
    start = models.DateTimeField()
    day = models.DateField()  # the local day of `start`, in the portal's time zone when summarised
    first_at = models.DateTimeField()
    last_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["session", "start"], name="usage_window_unique")]
        indexes = [models.Index(fields=["day"], name="usage_window_day_idx")]

    def __str__(self) -> str:
        return f"{self.session_id} {self.start:%Y-%m-%d %H:%M}"


class UsageWatermark(models.Model):
    """One row: the rollups hold every request that started before `until` and whose id is at most
    `last_request_id`; the figures read the raw rows for the rest."""

    until = models.DateTimeField()
    last_request_id = models.BigIntegerField(default=0)
    # New at every run that changes the summaries: what a figure read from them stays right while it is the same
    # (jobs/usage/memo.py). Random, never a count, so that it never comes back after a rollback.
    revision = models.CharField(max_length=32, blank=True)

    def __str__(self) -> str:
        return f"summarised until {self.until:%Y-%m-%d %H:%M} (request {self.last_request_id})"
