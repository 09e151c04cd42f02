# Hand-written rename: Session is LLMSession, so it is never confused with Django's sessions.
from django.conf import settings
from django.db import migrations

ACTIONS = ("add", "change", "delete", "view")


def rename_permissions(old, new):
    """Keep staff's permissions on sessions: their codenames follow the model's name (the content type follows it by
    itself, through contenttypes' own rename, when `migrate` runs)."""

    def run(apps, schema_editor):
        permission = apps.get_model("auth", "Permission")
        for action in ACTIONS:
            rows = permission.objects.filter(content_type__app_label="jobs", codename=f"{action}_{old}")
            if not permission.objects.filter(content_type__app_label="jobs", codename=f"{action}_{new}").exists():
                rows.update(codename=f"{action}_{new}")

    return run


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0009_accounts_in_catalog"),
        ("catalog", "0004_clusteraccount"),
        ("auth", "0012_alter_user_first_name_max_length"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.RenameModel(old_name="Session", new_name="LLMSession"),
        migrations.RunPython(rename_permissions("session", "llmsession"), rename_permissions("llmsession", "session")),
    ]
