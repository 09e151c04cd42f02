# Hand-written rename: Session is LLMSession, so it is never confused with Django's sessions.
from django.conf import settings
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0009_accounts_in_catalog"),
        ("catalog", "0004_clusteraccount"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.RenameModel(old_name="Session", new_name="LLMSession"),
    ]
