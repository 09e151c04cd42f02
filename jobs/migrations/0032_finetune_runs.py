# Fine-tune runs (docs/finetune.md): the run, its events, and what a cluster's PyTorch environment can train.

import uuid

import django.core.validators
import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models

import jobs.models.finetune


class Migration(migrations.Migration):
    dependencies = [
        ("catalog", "0019_modelcard_tool_call_parser"),
        ("jobs", "0031_session_measured"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="FineTuneRun",
            fields=[
                ("id", models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                (
                    "suffix",
                    models.CharField(
                        blank=True,
                        help_text="A short name for the adapter (letters, digits, . _ -).",
                        max_length=40,
                        validators=[
                            django.core.validators.RegexValidator(
                                "^[A-Za-z0-9][A-Za-z0-9_.-]*\\Z",
                                "A suffix uses letters, digits, '.', '_' and '-' only.",
                            )
                        ],
                    ),
                ),
                (
                    "gpus_per_node",
                    models.PositiveIntegerField(
                        validators=[
                            django.core.validators.MinValueValidator(1),
                            django.core.validators.MaxValueValidator(64),
                        ]
                    ),
                ),
                (
                    "cpus_per_node",
                    models.PositiveIntegerField(
                        validators=[
                            django.core.validators.MinValueValidator(1),
                            django.core.validators.MaxValueValidator(1024),
                        ]
                    ),
                ),
                (
                    "memory_gib",
                    models.PositiveIntegerField(
                        validators=[
                            django.core.validators.MinValueValidator(1),
                            django.core.validators.MaxValueValidator(16384),
                        ]
                    ),
                ),
                (
                    "walltime_min",
                    models.PositiveIntegerField(
                        validators=[
                            django.core.validators.MinValueValidator(1),
                            django.core.validators.MaxValueValidator(43200),
                        ]
                    ),
                ),
                (
                    "notify_email",
                    models.BooleanField(default=False, help_text="when the run ends", verbose_name="email me"),
                ),
                (
                    "method",
                    models.CharField(
                        choices=[
                            ("lora", "LoRA (bf16 base model)"),
                            ("qlora", "QLoRA (4-bit base model; CUDA bitsandbytes)"),
                            ("full", "full fine-tuning"),
                        ],
                        default="lora",
                        max_length=10,
                    ),
                ),
                (
                    "epochs",
                    models.PositiveIntegerField(
                        default=3,
                        validators=[
                            django.core.validators.MinValueValidator(1),
                            django.core.validators.MaxValueValidator(100),
                        ],
                    ),
                ),
                (
                    "learning_rate",
                    models.FloatField(
                        default=0.0002,
                        help_text="2e-4 suits LoRA and QLoRA; full fine-tuning wants about 1e-5.",
                        validators=[
                            django.core.validators.MinValueValidator(1e-08),
                            django.core.validators.MaxValueValidator(1.0),
                        ],
                    ),
                ),
                (
                    "lora_rank",
                    models.PositiveIntegerField(
                        default=16,
                        validators=[
                            django.core.validators.MinValueValidator(1),
                            django.core.validators.MaxValueValidator(1024),
                        ],
                        verbose_name="LoRA rank",
                    ),
                ),
                (
                    "lora_alpha",
                    models.PositiveIntegerField(
                        default=32,
                        help_text="The adapter's scale is alpha / rank; twice the rank is the usual choice.",
                        validators=[
                            django.core.validators.MinValueValidator(1),
                            django.core.validators.MaxValueValidator(4096),
                        ],
                        verbose_name="LoRA alpha",
                    ),
                ),
                (
                    "lora_dropout",
                    models.FloatField(
                        default=0.05,
                        validators=[
                            django.core.validators.MinValueValidator(0.0),
                            django.core.validators.MaxValueValidator(0.9),
                        ],
                        verbose_name="LoRA dropout",
                    ),
                ),
                (
                    "target_modules",
                    models.CharField(
                        choices=[
                            ("all", "every linear layer (q, k, v, o, gate, up, down)"),
                            ("attention", "attention (q, k, v, o)"),
                            ("qv", "query and value projections"),
                        ],
                        default="all",
                        max_length=10,
                    ),
                ),
                (
                    "max_seq_length",
                    models.PositiveIntegerField(
                        default=1024,
                        help_text="Longer examples are cut to this; the estimate sizes its activations.",
                        validators=[
                            django.core.validators.MinValueValidator(16),
                            django.core.validators.MaxValueValidator(131072),
                        ],
                        verbose_name="max sequence length (tokens)",
                    ),
                ),
                (
                    "batch_size",
                    models.PositiveIntegerField(
                        default=4,
                        validators=[
                            django.core.validators.MinValueValidator(1),
                            django.core.validators.MaxValueValidator(1024),
                        ],
                        verbose_name="batch size per GPU",
                    ),
                ),
                (
                    "gradient_accumulation",
                    models.PositiveIntegerField(
                        default=4,
                        help_text="Examples per optimizer step: batch size x this x GPUs.",
                        validators=[
                            django.core.validators.MinValueValidator(1),
                            django.core.validators.MaxValueValidator(1024),
                        ],
                        verbose_name="gradient accumulation steps",
                    ),
                ),
                (
                    "gradient_checkpointing",
                    models.BooleanField(
                        default=True,
                        help_text="Recompute activations in the backward pass: less memory, about 30% slower.",
                    ),
                ),
                (
                    "checkpoint_every",
                    models.PositiveIntegerField(
                        default=50,
                        help_text="Also at Slurm's warning before the time limit or a preemption.",
                        validators=[
                            django.core.validators.MinValueValidator(1),
                            django.core.validators.MaxValueValidator(1000000),
                        ],
                        verbose_name="checkpoint every N steps",
                    ),
                ),
                (
                    "seed",
                    models.PositiveIntegerField(
                        default=42, validators=[django.core.validators.MaxValueValidator(2147483647)]
                    ),
                ),
                ("name", models.CharField(help_text="the training file's name", max_length=200)),
                ("data_format", models.CharField(max_length=20)),
                ("train_file", models.FileField(upload_to=jobs.models.finetune.training_path)),
                ("valid_file", models.FileField(blank=True, upload_to=jobs.models.finetune.training_path)),
                ("train_examples", models.PositiveIntegerField()),
                ("valid_examples", models.PositiveIntegerField(default=0)),
                (
                    "dataset_sha256",
                    models.CharField(help_text="of the checked training file as the trainer reads it", max_length=64),
                ),
                (
                    "planned_steps",
                    models.PositiveIntegerField(help_text="optimizer steps: epochs x the steps of one epoch"),
                ),
                ("precision", models.CharField(max_length=10)),
                ("estimate_gib", models.FloatField(default=0.0, help_text="the estimator's GPU memory per GPU")),
                (
                    "state",
                    models.CharField(
                        choices=[
                            ("queued", "queued (not yet submitted)"),
                            ("submitted", "submitted (waiting in Slurm's queue)"),
                            ("running", "training"),
                            ("completed", "completed"),
                            ("failed", "failed"),
                            ("cancelled", "cancelled"),
                        ],
                        db_index=True,
                        default="queued",
                        max_length=10,
                    ),
                ),
                ("job_id", models.CharField(blank=True, max_length=32)),
                ("node_list", models.CharField(blank=True, max_length=500)),
                ("slurm_reason", models.CharField(blank=True, max_length=200)),
                ("end_reason", models.TextField(blank=True)),
                ("step", models.PositiveIntegerField(default=0)),
                ("epoch", models.FloatField(default=0.0)),
                ("train_loss", models.FloatField(blank=True, null=True)),
                ("valid_loss", models.FloatField(blank=True, null=True)),
                ("tokens_per_s", models.FloatField(default=0.0)),
                ("peak_memory_gib", models.FloatField(blank=True, null=True)),
                (
                    "restarts",
                    models.PositiveIntegerField(default=0, help_text="starts of the job after its first (requeues)"),
                ),
                ("resumed_from_step", models.PositiveIntegerField(blank=True, null=True)),
                ("losses", models.JSONField(blank=True, default=list, editable=False)),
                ("result", models.JSONField(blank=True, default=dict, editable=False)),
                ("progress_at", models.DateTimeField(blank=True, null=True)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("submitted_at", models.DateTimeField(blank=True, null=True)),
                ("started_at", models.DateTimeField(blank=True, null=True)),
                ("finished_at", models.DateTimeField(blank=True, null=True)),
                ("submit_claim", models.CharField(blank=True, max_length=64)),
                ("submit_claimed_at", models.DateTimeField(blank=True, null=True)),
                ("last_seen_at", models.DateTimeField(blank=True, null=True)),
                ("cancel_requested_at", models.DateTimeField(blank=True, null=True)),
                ("notified_at", models.DateTimeField(blank=True, null=True)),
                ("request_token", models.CharField(blank=True, editable=False, max_length=64)),
                (
                    "account",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="finetune_runs",
                        to="catalog.clusteraccount",
                    ),
                ),
                (
                    "cluster",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT, related_name="finetune_runs", to="catalog.cluster"
                    ),
                ),
                (
                    "gpu_type",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT, related_name="finetune_runs", to="catalog.gputype"
                    ),
                ),
                (
                    "owner",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="finetune_runs",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                (
                    "partition",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="finetune_runs",
                        to="catalog.partition",
                    ),
                ),
                (
                    "runtime",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="finetune_runs",
                        to="catalog.clusterruntime",
                    ),
                ),
                (
                    "variant",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="finetune_runs",
                        to="catalog.modelvariant",
                    ),
                ),
            ],
            options={
                "verbose_name": "fine-tune run",
                "ordering": ["-created_at"],
            },
        ),
        migrations.CreateModel(
            name="FineTuneEvent",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("at", models.DateTimeField(default=django.utils.timezone.now)),
                (
                    "from_state",
                    models.CharField(
                        blank=True,
                        choices=[
                            ("queued", "queued (not yet submitted)"),
                            ("submitted", "submitted (waiting in Slurm's queue)"),
                            ("running", "training"),
                            ("completed", "completed"),
                            ("failed", "failed"),
                            ("cancelled", "cancelled"),
                        ],
                        max_length=10,
                    ),
                ),
                (
                    "to_state",
                    models.CharField(
                        choices=[
                            ("queued", "queued (not yet submitted)"),
                            ("submitted", "submitted (waiting in Slurm's queue)"),
                            ("running", "training"),
                            ("completed", "completed"),
                            ("failed", "failed"),
                            ("cancelled", "cancelled"),
                        ],
                        max_length=10,
                    ),
                ),
                ("reason", models.CharField(max_length=500)),
                (
                    "run",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="events", to="jobs.finetunerun"
                    ),
                ),
            ],
            options={
                "ordering": ["at", "pk"],
            },
        ),
        migrations.CreateModel(
            name="TrainingRuntime",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                (
                    "cuda_bitsandbytes",
                    models.BooleanField(
                        default=False,
                        help_text="The environment has bitsandbytes built for the cluster's CUDA, so QLoRA runs can be launched.",
                        verbose_name="bitsandbytes with CUDA",
                    ),
                ),
                (
                    "runtime",
                    models.OneToOneField(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="training",
                        to="catalog.clusterruntime",
                    ),
                ),
            ],
            options={
                "verbose_name": "training environment",
            },
        ),
        migrations.AddConstraint(
            model_name="finetunerun",
            constraint=models.UniqueConstraint(
                condition=models.Q(("request_token", ""), _negated=True),
                fields=("owner", "request_token"),
                name="one_finetune_per_form",
            ),
        ),
    ]
