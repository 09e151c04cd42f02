# Hand-written: cluster accounts moved to the catalog (catalog 0004 took the model and renamed its table).
import django.db.models.deletion
from django.db import migrations, models


def content_type_to_catalog(apps, schema_editor):
    """Keep admins' permissions on cluster accounts: they hang on the content type, which moves with the model."""
    content_type = apps.get_model("contenttypes", "ContentType")
    if not content_type.objects.filter(app_label="catalog", model="clusteraccount").exists():
        content_type.objects.filter(app_label="jobs", model="clusteraccount").update(app_label="catalog")


def content_type_to_jobs(apps, schema_editor):
    content_type = apps.get_model("contenttypes", "ContentType")
    if not content_type.objects.filter(app_label="jobs", model="clusteraccount").exists():
        content_type.objects.filter(app_label="catalog", model="clusteraccount").update(app_label="jobs")


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0008_idle_cancel"),
        ("catalog", "0004_clusteraccount"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="session",
                    name="account",
                    field=models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="sessions",
                        to="catalog.clusteraccount",
                    ),
                ),
                migrations.DeleteModel(name="ClusterAccount"),
            ],
        ),
        migrations.RunPython(content_type_to_catalog, content_type_to_jobs),
    ]
