# A session's LoRA adapters (docs/finetune.md, serving): fine-tune runs whose adapters its server loads.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0032_finetune_runs"),
    ]

    operations = [
        migrations.AddField(
            model_name="llmsession",
            name="adapters",
            field=models.ManyToManyField(blank=True, related_name="sessions", to="jobs.finetunerun"),
        ),
    ]
