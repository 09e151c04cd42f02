# Counts every web process shares (jobs/models/counts.py) and a service's own fair-share cap.

import django.core.validators
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0029_usage_rollups"),
    ]

    operations = [
        migrations.CreateModel(
            name="InFlight",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(db_index=True, max_length=150)),
                ("ticket", models.CharField(max_length=32, unique=True)),
                ("deadline", models.FloatField()),
            ],
            options={
                "verbose_name": "request in flight",
                "verbose_name_plural": "requests in flight",
            },
        ),
        migrations.CreateModel(
            name="SharedCount",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=150, unique=True)),
                ("minute", models.BigIntegerField(db_index=True)),
                ("count", models.PositiveIntegerField(default=0)),
            ],
        ),
        migrations.AddField(
            model_name="modelservice",
            name="max_inflight_per_user",
            field=models.PositiveSmallIntegerField(
                blank=True,
                help_text="Requests one user may have in flight on it at once (0: no cap); empty: the site's default.",
                null=True,
                validators=[django.core.validators.MaxValueValidator(1024)],
            ),
        ),
    ]
