import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0037_usage_revision"),
    ]

    operations: list[migrations.operations.base.Operation] = [
        migrations.AddField(
            model_name="finetunerun",
            name="parent",
            field=models.ForeignKey(
                blank=True,
                editable=False,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="children",
                to="jobs.finetunerun",
            ),
        ),
    ]
