import django.db.models.deletion
from django.db import migrations, models

import jobs.models.comparisons


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0038_finetune_parent"),
    ]

    operations: list[migrations.operations.base.Operation] = [
        migrations.AddField(
            model_name="finetunecomparison",
            name="asked",
            field=models.JSONField(blank=True, default=dict),
        ),
        migrations.AddField(
            model_name="finetunecomparison",
            name="launched_session",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to="jobs.llmsession",
            ),
        ),
        migrations.AddField(
            model_name="finetunecomparison",
            name="reason",
            field=models.CharField(blank=True, help_text="why it failed", max_length=500),
        ),
        migrations.AddField(
            model_name="finetunecomparison",
            name="requests",
            field=models.FileField(blank=True, upload_to=jobs.models.comparisons.comparison_requests_path),
        ),
        migrations.AddField(
            model_name="finetunecomparison",
            name="session_released_at",
            field=models.DateTimeField(blank=True, help_text="when it asked its session to end", null=True),
        ),
        migrations.AddField(
            model_name="finetunecomparison",
            name="state",
            field=models.CharField(
                choices=[
                    ("waiting", "waiting for its session"),
                    ("started", "its batch runs started"),
                    ("failed", "failed"),
                ],
                default="started",
                max_length=10,
            ),
        ),
        migrations.AlterField(
            model_name="finetunecomparison",
            name="adapter_batch",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="+",
                to="jobs.batchrun",
            ),
        ),
        migrations.AlterField(
            model_name="finetunecomparison",
            name="base_batch",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="+",
                to="jobs.batchrun",
            ),
        ),
    ]
