import uuid

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0035_finetune_shares"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name="finetunerun",
            name="base_valid_loss",
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.CreateModel(
            name="FineTuneComparison",
            fields=[
                ("id", models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                (
                    "source",
                    models.CharField(
                        choices=[("validation", "the run's validation data"), ("prompts", "a prompts file")],
                        max_length=10,
                    ),
                ),
                (
                    "name",
                    models.CharField(help_text="the prompts file's name, or the validation data's", max_length=200),
                ),
                ("prompts", models.PositiveIntegerField()),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                (
                    "adapter_batch",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="+", to="jobs.batchrun"
                    ),
                ),
                (
                    "base_batch",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="+", to="jobs.batchrun"
                    ),
                ),
                (
                    "owner",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="finetune_comparisons",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                (
                    "run",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="comparisons", to="jobs.finetunerun"
                    ),
                ),
            ],
            options={
                "verbose_name": "fine-tune comparison",
                "ordering": ["-created_at"],
            },
        ),
    ]
