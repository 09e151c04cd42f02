"""Sessions: what a researcher asked for, where its Slurm job is, and every change of its state."""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models, transaction
from django.db.models import Q
from django.utils import timezone

from catalog.models import Cluster, ClusterAccount, GPUType, ModelVariant, Partition, Runtime
from portal import crypto


class State(models.TextChoices):
    PENDING = "pending", "Pending (not yet submitted)"
    SUBMITTING = "submitting", "Submitting"
    QUEUED = "queued", "Queued"
    STARTING = "starting", "Starting (loading the model)"
    RUNNING = "running", "Running"
    COMPLETED = "completed", "Completed"
    CANCELLED = "cancelled", "Cancelled"
    FAILED = "failed", "Failed"
    TIMEOUT = "timeout", "Time limit reached"
    UNKNOWN = "unknown", "Unknown (the scheduler cannot be asked)"


END_STATES = frozenset({State.COMPLETED, State.CANCELLED, State.FAILED, State.TIMEOUT})
# States whose job the poller asks Slurm about.
POLLED_STATES = frozenset({State.QUEUED, State.STARTING, State.RUNNING, State.UNKNOWN})
LIVE_STATES = frozenset(set(State) - END_STATES)
# States in which a session's server may be used: running, or unknown after running while the scheduler cannot be
# asked but the server still answered (the poll clears the address when it does not).
SERVING_STATES = frozenset({State.RUNNING, State.UNKNOWN})


def served_model_name(model: str, quantization: str) -> str:
    """The name a session's server answers to (the job spec passes it to the runtime)."""
    return f"{model}-{quantization}"


def new_api_key() -> str:
    return "sk-hpcllm-" + secrets.token_urlsafe(32)


SEE_ALL_SESSIONS = ("jobs", "see_all_sessions")  # (app label, codename) of the support permission
SEE_SITE_USAGE = ("jobs", "see_site_usage")  # every user's usage and the site dashboard (not their sessions)
BATCH_PARALLEL = 4  # requests a batch session serves at once
# Between the owner's user name and the alias in the name others call a shared session by ("ada/lab-model"): neither
# a user name, an alias nor a catalog model name may hold it, so the spelling is never another name.
OWNER_SEPARATOR = "/"


class Purpose(models.TextChoices):
    """What the session is for; it sets how many requests the server takes at once (and the estimate sizes)."""

    CHAT = "chat", "interactive chat"
    BATCH = "batch", f"batch prompts ({BATCH_PARALLEL} at a time)"
    # The server answers /v1/embeddings (for RAG) instead of generating; not every runtime can (RuntimeRules).
    EMBEDDINGS = "embeddings", "embeddings (RAG)"

    @property
    def parallel(self) -> int:
        return BATCH_PARALLEL if self == Purpose.BATCH else 1


class LLMSession(models.Model):
    """One model server a researcher asked for: a Slurm job plus what the portal learned about it.

    Named LLMSession, not Session, so that it is never confused with Django's own sessions (request.session and
    django.contrib.sessions' Session model), which the same views use. Researchers still see "sessions".
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="llm_sessions")
    account = models.ForeignKey(ClusterAccount, on_delete=models.PROTECT, related_name="sessions")
    cluster = models.ForeignKey(Cluster, on_delete=models.PROTECT, related_name="sessions")
    partition = models.ForeignKey(Partition, on_delete=models.PROTECT, related_name="sessions")
    gpu_type = models.ForeignKey(GPUType, on_delete=models.PROTECT, related_name="sessions")
    # What the launch form sets (jobs/sessions/forms.py derives its fields and limits from these columns).
    gpus_per_node = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(64)])
    nodes = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1), MaxValueValidator(64)])
    cpus_per_node = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(1024)])
    memory_gib = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(16384)])
    walltime_min = models.PositiveIntegerField(
        "walltime (minutes)", default=120, validators=[MinValueValidator(1), MaxValueValidator(60 * 24 * 30)]
    )
    variant = models.ForeignKey(ModelVariant, on_delete=models.PROTECT, related_name="sessions")
    runtime = models.ForeignKey(Runtime, on_delete=models.PROTECT, related_name="sessions")
    context_length = models.PositiveIntegerField(
        "context length (tokens)",
        validators=[MinValueValidator(256), MaxValueValidator(10_000_000)],
        help_text="Prompt and reply of one request together; at most the model's own maximum.",
    )
    purpose = models.CharField(max_length=10, choices=Purpose.choices, default=Purpose.CHAT)
    parallel = models.PositiveIntegerField(
        "parallel slots",
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(256)],
        help_text="Requests the server takes at once; empty: as the purpose says.",
    )

    state = models.CharField(max_length=12, choices=State.choices, default=State.PENDING, db_index=True)
    slurm_reason = models.CharField(max_length=200, blank=True, help_text="Slurm's reason while the job waits.")
    estimated_start = models.DateTimeField(null=True, blank=True)
    queue_position = models.PositiveIntegerField(null=True, blank=True, help_text="Place among pending jobs.")
    job_id = models.CharField(max_length=32, blank=True)
    node_list = models.CharField(max_length=500, blank=True)
    host = models.CharField(max_length=253, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True)
    api_key_encrypted = crypto.SealedTextField(editable=False)
    end_reason = models.TextField(blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    submitted_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    state_changed_at = models.DateTimeField(default=timezone.now)
    # Bookkeeping for the tasks: who holds the submit, when the scheduler last knew the job, cancellation asked.
    submit_claim = models.CharField(max_length=64, blank=True)
    submit_claimed_at = models.DateTimeField(null=True, blank=True)
    submit_attempts = models.PositiveIntegerField(default=0)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    notify_email = models.BooleanField(
        "email me", default=False, help_text="when it runs and 15 minutes before its time is up"
    )
    alias = models.CharField(
        max_length=40,
        blank=True,
        validators=[RegexValidator(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")],
        help_text="A short name scripts may use as the model instead of the uuid.",
    )
    skip_staging = models.BooleanField(
        "load from the shared path", default=False,
        help_text="do not copy the weights to node-local storage first, where the cluster does",
    )  # fmt: skip
    # The job's report of its node-local copy of the weights (staging.sh stage_model, staging.json): state, bytes,
    # total, seconds, where from and to. Empty while nothing was staged.
    staging = models.JSONField(default=dict, blank=True, editable=False)
    # What the server said it allocated and how fast it answered, read from the job's log (jobs/cluster/measured.py:
    # FIELDS, and devices); measured_at: when it was last read. Empty until read.
    measured = models.JSONField(default=dict, blank=True, editable=False)
    measured_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_activity_at = models.DateTimeField(null=True, blank=True)
    idle_cancel_min = models.PositiveIntegerField(
        "cancel after idle minutes",
        null=True,
        blank=True,
        validators=[MinValueValidator(5), MaxValueValidator(60 * 24 * 14)],
        help_text="Cancel the session after this many minutes without a request; empty: never.",
    )
    cancel_reason = models.CharField(max_length=200, blank=True)
    start_notified_at = models.DateTimeField(null=True, blank=True)
    expiry_warned_at = models.DateTimeField(null=True, blank=True)
    # Deleted by its owner: gone from their pages and its conversations with it, kept for the site's usage records.
    deleted_at = models.DateTimeField(null=True, blank=True, editable=False)
    # The launch form's one-time token: a double submit finds the session the first one created.
    request_token = models.CharField(max_length=64, blank=True, editable=False)
    # A replica of a model service (jobs/models/services.py), launched and ended by it; None: a session of its own.
    service = models.ForeignKey(
        "jobs.ModelService", null=True, blank=True, on_delete=models.PROTECT, related_name="replicas", editable=False
    )
    # A replica that takes no new requests (its successor took over before walltime, or the service scaled down): it
    # is cancelled once the requests open on it have ended.
    draining_since = models.DateTimeField(null=True, blank=True, editable=False)
    # The replica this one was launched to take over from, before that one's walltime (rollover).
    replaces = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="successors", editable=False
    )

    # Fine-tune runs' adapters the server loads beside the base weights, called by each run's model name (ft:...).
    adapters = models.ManyToManyField("jobs.FineTuneRun", blank=True, related_name="sessions")

    class Meta:
        verbose_name = "session"
        ordering = ["-created_at"]
        # Support staff are given this (through the "Session support" group); being staff alone, or being able to
        # open the admin, shows nobody else's sessions.
        permissions = [
            ("see_all_sessions", "Can see and use every user's sessions (support)"),
            ("see_site_usage", "Can see every user's usage and the site dashboard"),
        ]
        indexes = [models.Index(fields=["cluster", "account", "state"], name="session_poll_idx")]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "request_token"], condition=~Q(request_token=""), name="one_session_per_launch_form"
            )
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.state})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self.api_key_encrypted:
            self.api_key_encrypted = crypto.encrypt(new_api_key())
        super().save(*args, **kwargs)

    @property
    def api_key(self) -> str:
        return crypto.decrypt(self.api_key_encrypted)

    @property
    def is_ended(self) -> bool:
        return self.state in END_STATES

    @property
    def serving(self) -> bool:
        """Its server may be used now (the chat, the API)."""
        return self.state in SERVING_STATES and bool(self.host and self.port)

    @property
    def ends_at(self) -> datetime | None:
        """When Slurm's time limit stops the job (from the real start)."""
        return self.started_at + timedelta(minutes=self.walltime_min) if self.started_at else None

    @property
    def time_left_min(self) -> int | None:
        ends = self.ends_at
        return max(0, int((ends - timezone.now()).total_seconds() // 60)) if ends else None

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def run_hours(self) -> float:
        """Hours the job held its GPUs, from Slurm's own start to its end (or now, while it runs)."""
        if self.started_at is None:
            return 0.0
        end = self.ended_at or timezone.now()
        return max(0.0, (end - self.started_at).total_seconds() / 3600)

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.run_hours

    @property
    def served_model_name(self) -> str:
        return served_model_name(self.variant.model.name, self.variant.quantization)

    @property
    def adapter_names(self) -> str:
        """The adapters it loads, by their model names, comma-separated (the launch form's `adapter`)."""
        # Sorted here, not by the database, so that a prefetch of the adapters (access.with_adapters) serves it.
        return ",".join(run.model_name for run in sorted(self.adapters.all(), key=lambda run: run.pk))

    @property
    def name_for_others(self) -> str:
        """What those it is shared with call it in the API: owner/alias, else its uuid. A bare alias or catalog name
        names the caller's own sessions only, so an owner's alias can never stand in for a grantee's own names."""
        if self.alias:
            return f"{self.owner.get_username()}{OWNER_SEPARATOR}{self.alias}"
        return str(self.pk)


class SessionEvent(models.Model):
    session = models.ForeignKey(LLMSession, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now)
    from_state = models.CharField(max_length=12, choices=State.choices, blank=True)
    to_state = models.CharField(max_length=12, choices=State.choices)
    cause = models.CharField(max_length=500)

    class Meta:
        ordering = ["at", "pk"]

    def __str__(self) -> str:
        return f"{self.from_state or '-'} -> {self.to_state}: {self.cause}"


_TIMESTAMP_FOR = {
    State.SUBMITTING: None,
    State.QUEUED: "submitted_at",
    State.STARTING: "started_at",
    State.RUNNING: "ready_at",
}


def transition(
    session_id: uuid.UUID | str,
    to: State,
    *,
    cause: str,
    allowed_from: frozenset[State] | set[State] | None = None,
    at: datetime | None = None,
    **fields: Any,
) -> bool:
    """Move a session to `to` if it is in one of `allowed_from` (default: any live state), recording the event.

    The UPDATE is conditional on the state read, so two workers racing on one session cannot both move it; the
    loser gets False. End states also set ended_at; the first entry into queued/starting/running sets its time.
    """
    allowed = set(LIVE_STATES if allowed_from is None else allowed_from)
    now = at or timezone.now()
    with transaction.atomic():
        row = LLMSession.objects.filter(pk=session_id).values("state", *filter(None, _TIMESTAMP_FOR.values())).first()
        if row is None or row["state"] not in allowed:
            return False
        current = row["state"]
        updates: dict[str, Any] = {"state": to, "state_changed_at": now, **fields}
        stamp = _TIMESTAMP_FOR.get(to)
        if stamp and row.get(stamp) is None and stamp not in fields:
            updates[stamp] = now
        if to in END_STATES:
            updates.setdefault("ended_at", now)
        changed = LLMSession.objects.filter(pk=session_id, state=current).update(**updates)
        if not changed:
            return False
        if current != to:
            SessionEvent.objects.create(
                session_id=session_id, at=now, from_state=current, to_state=to, cause=cause[:500]
            )
    return True
