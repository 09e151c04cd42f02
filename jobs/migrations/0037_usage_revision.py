from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0036_finetune_compare"),
    ]

    operations = [
        migrations.AddField(
            model_name="usagewatermark",
            name="revision",
            field=models.CharField(blank=True, max_length=32),
        ),
    ]
