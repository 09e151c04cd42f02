"""Who may run jobs where (ClusterAccount), and the sessions they run (Session, SessionEvent)."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models, transaction
from django.db.models import Q
from django.utils import timezone

from catalog import validators as v
from catalog.models import Cluster, GPUType, ModelVariant, Partition, Runtime
from jobs import crypto
from jobs.ssh import SSHTarget, generate_keypair, load_private_key

unix_username = RegexValidator(
    r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z", "A cluster user name: letters, digits, '_', '.' and '-' (at most 32)."
)


class ClusterAccount(models.Model):
    """How the portal logs in to a cluster for one user (personal key pair) or for a lab (service account)."""

    class Kind(models.TextChoices):
        PERSONAL = "personal", "Personal (the portal's key pair in the user's authorized_keys)"
        SERVICE = "service", "Service account shared by its members"

    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="accounts")
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.PERSONAL)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="cluster_accounts",
        help_text="The portal user this personal account belongs to (empty for a service account).",
    )
    label = models.CharField(max_length=100, blank=True, help_text="A service account's name, e.g. 'NLP lab'.")
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL,
        blank=True,
        related_name="shared_cluster_accounts",
        help_text="Portal users who may submit through this service account.",
    )
    username = models.CharField("cluster user name", max_length=32, validators=[unix_username])
    slurm_account = models.CharField(
        max_length=64,
        blank=True,
        validators=[v.slurm_account],
        help_text="Slurm --account for this user's jobs; empty uses the cluster's default account.",
    )
    public_key = models.TextField(editable=False, help_text="Goes into ~/.ssh/authorized_keys on the cluster.")
    private_key_encrypted = models.TextField(editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["cluster__name", "username"]
        constraints = [
            models.UniqueConstraint(
                fields=["cluster", "user"], condition=Q(kind="personal"), name="one_personal_account_per_cluster"
            ),
            models.CheckConstraint(
                condition=Q(kind="personal", user__isnull=False) | Q(kind="service", user__isnull=True),
                name="personal_accounts_have_a_user",
            ),
        ]

    def __str__(self) -> str:
        who = self.label or (self.user.get_username() if self.user else "?")
        return f"{self.username}@{self.cluster.slug} ({who})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self.private_key_encrypted:
            self.generate_key()
        super().save(*args, **kwargs)

    def clean(self) -> None:
        super().clean()
        if self.kind == self.Kind.PERSONAL and not self.user_id:
            raise ValidationError({"user": "A personal account belongs to a portal user."})
        if self.kind == self.Kind.SERVICE:
            if self.user_id:
                raise ValidationError({"user": "A service account is shared through its members, not one user."})
            if not self.label:
                raise ValidationError({"label": "Name the service account, e.g. after the lab that shares it."})

    @property
    def effective_slurm_account(self) -> str:
        return self.slurm_account or self.cluster.default_account

    def generate_key(self) -> None:
        private, public = generate_keypair(f"hpc-llm-portal {self.username}@{self.cluster.slug}")
        self.private_key_encrypted = crypto.encrypt(private)
        self.public_key = public

    def set_private_key(self, text: str) -> None:
        """Use an existing key (service accounts). The public half is derived, so the two always match."""
        try:
            key = load_private_key(text)
        except ValueError as exc:
            raise ValidationError({"private_key": str(exc)}) from None
        self.private_key_encrypted = crypto.encrypt(text)
        self.public_key = f"{key.get_name()} {key.get_base64()} hpc-llm-portal {self.username}@{self.cluster.slug}"

    def ssh_target(self) -> SSHTarget:
        return self.target_of(
            self.cluster.login_host, self.cluster.ssh_port, self.cluster.host_key, self.username,
            self.private_key_encrypted,
        )  # fmt: skip

    @staticmethod
    def target_of(login_host: str, ssh_port: int, host_key: str, username: str, key_encrypted: str) -> SSHTarget:
        """The SSH target from the stored columns (the proxy reads them without loading the account)."""
        return SSHTarget(
            host=login_host,
            port=ssh_port,
            username=username,
            host_keys=host_key,
            private_key=crypto.decrypt(key_encrypted),
        )

    @classmethod
    def usable_by(cls, user: Any, cluster: Cluster) -> list[ClusterAccount]:
        """Every account the user may submit through on the cluster: their own first, then shared ones."""
        accounts = ClusterAccount.objects.filter(cluster=cluster)
        own = list(accounts.filter(kind=cls.Kind.PERSONAL, user=user))
        shared = list(accounts.filter(kind=cls.Kind.SERVICE, members=user).order_by("pk"))
        return own + shared

    @classmethod
    def for_user(cls, user: Any, cluster: Cluster) -> ClusterAccount | None:
        """The account a user submits through on a cluster: their own first, else a service account they are in."""
        own = cls.objects.filter(cluster=cluster, kind=cls.Kind.PERSONAL, user=user).first()
        if own is not None:
            return own
        return cls.objects.filter(cluster=cluster, kind=cls.Kind.SERVICE, members=user).order_by("pk").first()


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


def served_model_name(model: str, quantization: str) -> str:
    """The name a session's server answers to (the job spec passes it to the runtime)."""
    return f"{model}-{quantization}"


def new_api_key() -> str:
    return "sk-hpcllm-" + secrets.token_urlsafe(32)


class Session(models.Model):
    """One model server a researcher asked for: a Slurm job plus what the portal learned about it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="llm_sessions")
    account = models.ForeignKey(ClusterAccount, on_delete=models.PROTECT, related_name="sessions")
    cluster = models.ForeignKey(Cluster, on_delete=models.PROTECT, related_name="sessions")
    partition = models.ForeignKey(Partition, on_delete=models.PROTECT, related_name="sessions")
    gpu_type = models.ForeignKey(GPUType, on_delete=models.PROTECT, related_name="sessions")
    gpus_per_node = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(64)])
    nodes = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1), MaxValueValidator(64)])
    cpus_per_node = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(1024)])
    memory_gib = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(16384)])
    walltime_min = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    variant = models.ForeignKey(ModelVariant, on_delete=models.PROTECT, related_name="sessions")
    runtime = models.ForeignKey(Runtime, on_delete=models.PROTECT, related_name="sessions")
    context_length = models.PositiveIntegerField(validators=[MinValueValidator(128)])
    parallel = models.PositiveIntegerField("parallel slots", default=1, validators=[MinValueValidator(1)])

    state = models.CharField(max_length=12, choices=State.choices, default=State.PENDING, db_index=True)
    slurm_reason = models.CharField(max_length=200, blank=True, help_text="Slurm's reason while the job waits.")
    estimated_start = models.DateTimeField(null=True, blank=True)
    queue_position = models.PositiveIntegerField(null=True, blank=True, help_text="Place among pending jobs.")
    job_id = models.CharField(max_length=32, blank=True)
    node_list = models.CharField(max_length=500, blank=True)
    host = models.CharField(max_length=253, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True)
    api_key_encrypted = models.TextField(editable=False)
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
    notify_email = models.BooleanField(default=False, help_text="Email the owner when it runs and before it ends.")
    alias = models.CharField(
        max_length=40,
        blank=True,
        validators=[RegexValidator(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")],
        help_text="A short name scripts may use as the model instead of the uuid.",
    )
    last_activity_at = models.DateTimeField(null=True, blank=True)
    idle_cancel_min = models.PositiveIntegerField(
        null=True, blank=True, help_text="Cancel the session after this many minutes without a request."
    )
    cancel_reason = models.CharField(max_length=200, blank=True)
    start_notified_at = models.DateTimeField(null=True, blank=True)
    expiry_warned_at = models.DateTimeField(null=True, blank=True)
    # The launch form's one-time token: a double submit finds the session the first one created.
    request_token = models.CharField(max_length=64, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]
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
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}" if self.host and self.port else ""

    @property
    def ends_at(self) -> datetime | None:
        """When Slurm's time limit stops the job (from the real start)."""
        return self.started_at + timedelta(minutes=self.walltime_min) if self.started_at else None

    @property
    def time_left_min(self) -> int | None:
        ends = self.ends_at
        return max(0, int((ends - timezone.now()).total_seconds() // 60)) if ends else None

    @property
    def served_model_name(self) -> str:
        return served_model_name(self.variant.model.name, self.variant.quantization)


class SessionEvent(models.Model):
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="events")
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
        row = Session.objects.filter(pk=session_id).values("state", *filter(None, _TIMESTAMP_FOR.values())).first()
        if row is None or row["state"] not in allowed:
            return False
        current = row["state"]
        updates: dict[str, Any] = {"state": to, "state_changed_at": now, **fields}
        stamp = _TIMESTAMP_FOR.get(to)
        if stamp and row.get(stamp) is None and stamp not in fields:
            updates[stamp] = now
        if to in END_STATES:
            updates.setdefault("ended_at", now)
        changed = Session.objects.filter(pk=session_id, state=current).update(**updates)
        if not changed:
            return False
        if current != to:
            SessionEvent.objects.create(
                session_id=session_id, at=now, from_state=current, to_state=to, cause=cause[:500]
            )
    return True


class PartitionState(models.Model):
    """What a cluster's scheduler said about one partition and GPU type at the last refresh (a cache)."""

    partition = models.ForeignKey(Partition, on_delete=models.CASCADE, related_name="states")
    gres_type = models.CharField(max_length=50, help_text="The GPU type as Slurm names it in GRES.")
    total_gpus = models.PositiveIntegerField(default=0)
    idle_gpus = models.PositiveIntegerField(default=0, help_text="On nodes that take jobs, not allocated.")
    idle_nodes_with_all_gpus = models.PositiveIntegerField(default=0)
    unavailable_gpus = models.PositiveIntegerField(default=0, help_text="On nodes down, drained or in maintenance.")
    pending_jobs = models.PositiveIntegerField(default=0, help_text="In the partition, of any GPU type.")
    pending_gpus = models.PositiveIntegerField(default=0, help_text="Asked for by pending jobs, of this type.")
    refreshed_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["partition", "gres_type"], name="one_state_per_partition_gpu")]

    def __str__(self) -> str:
        return f"{self.partition} {self.gres_type}: {self.idle_gpus}/{self.total_gpus} idle"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ApiToken(models.Model):
    """A personal token for scripts (the openai client's api_key). Only its SHA-256 is stored; it is shown once."""

    PREFIX = "hpcllm_"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    digest = models.CharField(max_length=64, unique=True, editable=False)
    hint = models.CharField(
        max_length=16, editable=False, help_text="The token's first characters, to tell tokens apart."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.hint}…)"

    @classmethod
    def issue(cls, user: Any, name: str) -> tuple[ApiToken, str]:
        """A new token; the plain text is returned once and never stored."""
        token = cls.PREFIX + secrets.token_urlsafe(32)
        row = cls.objects.create(user=user, name=name, digest=token_digest(token), hint=token[: len(cls.PREFIX) + 6])
        return row, token


class Conversation(models.Model):
    """A chat with a session's model, kept after the session ends."""

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="conversations")
    title = models.CharField(max_length=200, default="New chat")
    system_prompt = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]

    def __str__(self) -> str:
        return self.title


class ChatMessage(models.Model):
    class Role(models.TextChoices):
        USER = "user", "You"
        ASSISTANT = "assistant", "Model"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=10, choices=Role.choices)
    content = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)
    # Per reply: what researchers otherwise measure by hand.
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_s = models.FloatField(null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["created_at", "pk"]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:40]}"
