from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0033_session_adapters"),
    ]

    operations = [
        migrations.AddField(
            model_name="finetunerun",
            name="openai",
            field=models.JSONField(blank=True, default=dict, editable=False),
        ),
    ]
