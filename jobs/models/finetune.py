"""Fine-tune runs (docs/finetune.md): a checked training file, a base variant, a method and its hyperparameters, the
Slurm job that trains an adapter from them, how far its trainer has got (as the poll last read its progress file),
and every change of the run's state. And what a cluster's training environment can do beyond the plain PyTorch stack
(QLoRA's CUDA bitsandbytes), as its admin declares it."""

from __future__ import annotations

import math
import uuid
from collections.abc import Collection
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models, transaction
from django.utils import timezone

from catalog import validators as v
from catalog.models import Cluster, ClusterAccount, ClusterRuntime, GPUType, ModelVariant, Partition


def training_path(run: FineTuneRun, filename: str) -> str:
    return f"finetune/{run.pk}/{filename}"


class FineTuneRun(models.Model):
    class State(models.TextChoices):
        QUEUED = "queued", "queued (not yet submitted)"
        SUBMITTED = "submitted", "submitted (waiting in Slurm's queue)"
        RUNNING = "running", "training"
        COMPLETED = "completed", "completed"
        FAILED = "failed", "failed"
        CANCELLED = "cancelled", "cancelled"

    class Method(models.TextChoices):
        LORA = "lora", "LoRA (bf16 base model)"
        QLORA = "qlora", "QLoRA (4-bit base model; CUDA bitsandbytes)"
        FULL = "full", "full fine-tuning"

    class Targets(models.TextChoices):
        # catalog/training.py's lora_targets, which the estimate sizes
        ALL = "all", "every linear layer (q, k, v, o, gate, up, down)"
        ATTENTION = "attention", "attention (q, k, v, o)"
        QV = "qv", "query and value projections"

    END_STATES = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})
    LIVE_STATES = frozenset({State.QUEUED, State.SUBMITTED, State.RUNNING})
    POLLED_STATES = frozenset({State.SUBMITTED, State.RUNNING})

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="finetune_runs")
    suffix = models.CharField(
        max_length=40,
        blank=True,
        validators=[v.adapter_suffix],
        help_text="A short name for the adapter (letters, digits, . _ -).",
    )
    # Where it runs: the launch form's fields (jobs/finetune/forms.py takes them from jobs.sessions.forms.LaunchForm).
    account = models.ForeignKey(ClusterAccount, on_delete=models.PROTECT, related_name="finetune_runs")
    cluster = models.ForeignKey(Cluster, on_delete=models.PROTECT, related_name="finetune_runs")
    partition = models.ForeignKey(Partition, on_delete=models.PROTECT, related_name="finetune_runs")
    gpu_type = models.ForeignKey(GPUType, on_delete=models.PROTECT, related_name="finetune_runs")
    gpus_per_node = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(64)])
    cpus_per_node = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(1024)])
    memory_gib = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(16384)])
    walltime_min = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(60 * 24 * 30)])
    variant = models.ForeignKey(ModelVariant, on_delete=models.PROTECT, related_name="finetune_runs")
    runtime = models.ForeignKey(ClusterRuntime, on_delete=models.PROTECT, related_name="finetune_runs")
    notify_email = models.BooleanField("email me", default=False, help_text="when the run ends")
    # The completed LoRA or QLoRA run whose adapter this one trains further (docs/finetune.md, training further): its
    # base, adapter shape and cluster user are this run's. PROTECT: a run that started from an adapter keeps saying
    # which one; a parent that vanished (SET_NULL) would make it look trained from the base weights alone.
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children", editable=False
    )

    # The method and its hyperparameters: the form's fields take their limits, labels and help from these columns.
    method = models.CharField(max_length=10, choices=Method.choices, default=Method.LORA)
    epochs = models.PositiveIntegerField(default=3, validators=[MinValueValidator(1), MaxValueValidator(100)])
    learning_rate = models.FloatField(
        default=2e-4, validators=[MinValueValidator(1e-8), MaxValueValidator(1.0)],
        help_text="2e-4 suits LoRA and QLoRA; full fine-tuning wants about 1e-5.",
    )  # fmt: skip
    lora_rank = models.PositiveIntegerField(
        "LoRA rank", default=16, validators=[MinValueValidator(1), MaxValueValidator(1024)]
    )
    lora_alpha = models.PositiveIntegerField(
        "LoRA alpha", default=32, validators=[MinValueValidator(1), MaxValueValidator(4096)],
        help_text="The adapter's scale is alpha / rank; twice the rank is the usual choice.",
    )  # fmt: skip
    lora_dropout = models.FloatField(
        "LoRA dropout", default=0.05, validators=[MinValueValidator(0.0), MaxValueValidator(0.9)]
    )
    target_modules = models.CharField(max_length=10, choices=Targets.choices, default=Targets.ALL)
    max_seq_length = models.PositiveIntegerField(
        "max sequence length (tokens)", default=1024, validators=[MinValueValidator(16), MaxValueValidator(131072)],
        help_text="Longer examples are cut to this; the estimate sizes its activations.",
    )  # fmt: skip
    batch_size = models.PositiveIntegerField(
        "batch size per GPU", default=4, validators=[MinValueValidator(1), MaxValueValidator(1024)]
    )
    gradient_accumulation = models.PositiveIntegerField(
        "gradient accumulation steps", default=4, validators=[MinValueValidator(1), MaxValueValidator(1024)],
        help_text="Examples per optimizer step: batch size x this x GPUs.",
    )  # fmt: skip
    gradient_checkpointing = models.BooleanField(
        default=True, help_text="Recompute activations in the backward pass: less memory, about 30% slower."
    )
    checkpoint_every = models.PositiveIntegerField(
        "checkpoint every N steps", default=50, validators=[MinValueValidator(1), MaxValueValidator(1_000_000)],
        help_text="Also at Slurm's warning before the time limit or a preemption.",
    )  # fmt: skip
    seed = models.PositiveIntegerField(default=42, validators=[MaxValueValidator(2**31 - 1)])

    # The data: the checked training file (and validation file, or split from it), private storage.
    name = models.CharField(max_length=200, help_text="the training file's name")
    data_format = models.CharField(max_length=20)  # chat | prompt-completion (jobs/finetune/data.py)
    train_file = models.FileField(upload_to=training_path)
    valid_file = models.FileField(upload_to=training_path, blank=True)
    train_examples = models.PositiveIntegerField()
    valid_examples = models.PositiveIntegerField(default=0)
    dataset_sha256 = models.CharField(max_length=64, help_text="of the checked training file as the trainer reads it")
    planned_steps = models.PositiveIntegerField(help_text="optimizer steps: epochs x the steps of one epoch")
    # The planned precision from the GPU type (bf16 on compute capability 8.0 and newer, fp16 before); the trainer
    # uses fp32 where it finds no CUDA device (the local cluster's CPUs), and says so in `result`.
    precision = models.CharField(max_length=10)
    estimate_gib = models.FloatField(default=0.0, help_text="the estimator's GPU memory per GPU")

    # Changed through transition_finetune() alone, which records each change as a FineTuneEvent.
    state = models.CharField(max_length=10, choices=State.choices, default=State.QUEUED, db_index=True)
    job_id = models.CharField(max_length=32, blank=True)
    node_list = models.CharField(max_length=500, blank=True)
    slurm_reason = models.CharField(max_length=200, blank=True)
    end_reason = models.TextField(blank=True)
    # What the trainer reported (jobs/finetune/progress.py checks every value): steps and losses, the loss curve,
    # and at the end the adapter's record (final losses, library versions, the precision and device it ran on).
    step = models.PositiveIntegerField(default=0)
    epoch = models.FloatField(default=0.0)
    train_loss = models.FloatField(null=True, blank=True)
    valid_loss = models.FloatField(null=True, blank=True)
    # The validation loss before training (the trainer's evaluation at step 0): the base model's, beside the adapter's.
    base_valid_loss = models.FloatField(null=True, blank=True)
    tokens_per_s = models.FloatField(default=0.0)
    peak_memory_gib = models.FloatField(null=True, blank=True)
    restarts = models.PositiveIntegerField(default=0, help_text="starts of the job after its first (requeues)")
    resumed_from_step = models.PositiveIntegerField(null=True, blank=True)
    losses = models.JSONField(default=list, blank=True, editable=False)  # [[step, train loss, valid loss | None]]
    result = models.JSONField(default=dict, blank=True, editable=False)
    # What OpenAI's fine-tuning API was given (jobs/use/openai_finetunes.py): the ids of its training and validation
    # files, as the job object names them after the files are deleted, and its metadata. Empty for other runs.
    openai = models.JSONField(default=dict, blank=True, editable=False)
    progress_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    submitted_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Bookkeeping for the tasks, as a session's: who holds the submit, when Slurm last knew the job, cancel asked.
    submit_claim = models.CharField(max_length=64, blank=True)
    submit_claimed_at = models.DateTimeField(null=True, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    notified_at = models.DateTimeField(null=True, blank=True)  # the email that it ended went out
    request_token = models.CharField(max_length=64, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "fine-tune run"
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "request_token"], condition=~models.Q(request_token=""), name="one_finetune_per_form"
            )
        ]

    def __str__(self) -> str:
        return f"{self.model_name} ({self.state})"

    @property
    def model_name(self) -> str:
        """The adapter's name, as OpenAI names fine-tuned models: ft:<base>:<owner>:<suffix>:<short id>."""
        parts = ["ft", self.variant.model.name, self.owner.get_username(), self.suffix, str(self.pk)[:8]]
        return ":".join(parts)

    @property
    def is_ended(self) -> bool:
        return self.state in self.END_STATES

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation * self.gpus_per_node

    @property
    def percent(self) -> float:
        return 100.0 * min(self.step, self.planned_steps) / max(1, self.planned_steps)

    @property
    def run_hours(self) -> float:
        if self.started_at is None:
            return 0.0
        end = self.finished_at or timezone.now()
        return max(0.0, (end - self.started_at).total_seconds() / 3600)

    @property
    def gpu_hours(self) -> float:
        return self.run_hours * self.gpus_per_node

    @property
    def eta_s(self) -> float | None:
        """Seconds to go at the pace of the steps so far (this start's: a requeue starts the clock again)."""
        if self.state != self.State.RUNNING or not self.step or self.started_at is None:
            return None
        done_since = self.step - (self.resumed_from_step or 0)
        if done_since <= 0 or self.progress_at is None:
            return None
        elapsed = (self.progress_at - self.started_at).total_seconds()
        return max(0.0, (self.planned_steps - self.step) * elapsed / done_since)

    @property
    def eta_min(self) -> int | None:
        eta = self.eta_s
        return None if eta is None else max(1, math.ceil(eta / 60))


class FineTuneEvent(models.Model):
    """A change of a run's state: from what, to what, when and why (its page, `finetune show` and the admin)."""

    run = models.ForeignKey(FineTuneRun, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now)
    from_state = models.CharField(max_length=10, choices=FineTuneRun.State.choices, blank=True)  # blank: created
    to_state = models.CharField(max_length=10, choices=FineTuneRun.State.choices)
    reason = models.CharField(max_length=500)

    class Meta:
        ordering = ["at", "pk"]

    def __str__(self) -> str:
        return f"{self.from_state or '-'} -> {self.to_state}: {self.reason}"


def transition_finetune(
    run_id: uuid.UUID | str,
    to: FineTuneRun.State,
    *,
    reason: str,
    allowed_from: Collection[FineTuneRun.State] | None = None,
    at: datetime | None = None,
    **fields: Any,
) -> bool:
    """Move a run to `to` if it is in one of `allowed_from` (default: any live state), with `fields`, recording the
    change as a FineTuneEvent; False when it is not there or not in such a state. The UPDATE is conditional on the
    state read, so of two writers racing on one run only one moves it. A move to the state it is in updates `fields`
    without an event. An ended run stays ended; an end state sets finished_at unless `fields` does."""
    allowed = FineTuneRun.LIVE_STATES if allowed_from is None else frozenset(allowed_from)
    if not allowed <= FineTuneRun.LIVE_STATES:
        raise ValueError(f"an ended run stays ended: cannot move from {sorted(allowed - FineTuneRun.LIVE_STATES)}")
    if "state" in fields:
        raise TypeError("the state is `to`, not one of the fields")
    now = at or timezone.now()
    # As batch runs' transition_run (which a test keeps the one writer of their state): read, conditional UPDATE,
    # an event for a change.
    with transaction.atomic():
        current = FineTuneRun.objects.filter(pk=run_id).values_list("state", flat=True).first()
        if current is None or current not in allowed:
            return False
        updates: dict[str, Any] = {"state": to, **fields}
        if to in FineTuneRun.END_STATES:
            updates.setdefault("finished_at", now)
        if not FineTuneRun.objects.filter(pk=run_id, state=current).update(**updates):
            return False  # another writer moved it between the read and this UPDATE
        if current != to:
            FineTuneEvent.objects.create(run_id=run_id, at=now, from_state=current, to_state=to, reason=reason[:500])
    return True


class TrainingRuntime(models.Model):
    """What a cluster's PyTorch environment (its transformers runtime, where fine-tune runs train) has beyond
    transformers, PEFT and TRL, as the site installed it. QLoRA loads the base model in 4-bit through bitsandbytes,
    which needs CUDA: a run asks for it only where this says the environment has it (the trainer checks again)."""

    runtime = models.OneToOneField(ClusterRuntime, on_delete=models.CASCADE, related_name="training")
    cuda_bitsandbytes = models.BooleanField(
        "bitsandbytes with CUDA", default=False,
        help_text="The environment has bitsandbytes built for the cluster's CUDA, so QLoRA runs can be launched.",
    )  # fmt: skip

    class Meta:
        verbose_name = "training environment"

    def __str__(self) -> str:
        return f"training on {self.runtime}"
