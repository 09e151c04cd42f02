# Hand-written: see the docstring.
import django.core.validators
import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    """Cluster accounts move from jobs to the catalog, beside the clusters they open (the catalog reads model files
    through them). The catalog takes the model over as it is, table jobs_clusteraccount included, then renames the
    table (and its members table) to catalog's names; jobs 0009 drops the model from the jobs app's state. No row
    moves, and foreign keys to the table follow the rename."""

    dependencies = [
        ("catalog", "0003_gputype_reserve_help"),
        ("jobs", "0008_idle_cancel"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="ClusterAccount",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                            ),
                        ),
                        (
                            "kind",
                            models.CharField(
                                choices=[
                                    ("personal", "Personal (the portal's key pair in the user's authorized_keys)"),
                                    ("service", "Service account shared by its members"),
                                ],
                                default="personal",
                                max_length=10,
                            ),
                        ),
                        (
                            "label",
                            models.CharField(
                                blank=True, help_text="A service account's name, e.g. 'NLP lab'.", max_length=100
                            ),
                        ),
                        (
                            "username",
                            models.CharField(
                                max_length=32,
                                validators=[
                                    django.core.validators.RegexValidator(
                                        "^[A-Za-z_][A-Za-z0-9_.-]{0,31}\\Z",
                                        "A cluster user name: letters, digits, '_', '.' and '-' (at most 32).",
                                    )
                                ],
                                verbose_name="cluster user name",
                            ),
                        ),
                        (
                            "slurm_account",
                            models.CharField(
                                blank=True,
                                help_text="Slurm --account for this user's jobs; empty uses the cluster's default account.",
                                max_length=64,
                                validators=[
                                    django.core.validators.RegexValidator(
                                        "^[A-Za-z0-9_.-]*\\Z",
                                        "Slurm accounts use letters, digits, '.', '_' and '-' only.",
                                    )
                                ],
                            ),
                        ),
                        (
                            "public_key",
                            models.TextField(
                                editable=False, help_text="Goes into ~/.ssh/authorized_keys on the cluster."
                            ),
                        ),
                        ("private_key_encrypted", models.TextField(editable=False)),
                        ("created_at", models.DateTimeField(auto_now_add=True)),
                        (
                            "cluster",
                            models.ForeignKey(
                                on_delete=django.db.models.deletion.CASCADE,
                                related_name="accounts",
                                to="catalog.cluster",
                            ),
                        ),
                        (
                            "members",
                            models.ManyToManyField(
                                blank=True,
                                help_text="Portal users who may submit through this service account.",
                                related_name="shared_cluster_accounts",
                                to=settings.AUTH_USER_MODEL,
                            ),
                        ),
                        (
                            "user",
                            models.ForeignKey(
                                blank=True,
                                help_text="The portal user this personal account belongs to (empty for a service account).",
                                null=True,
                                on_delete=django.db.models.deletion.CASCADE,
                                related_name="cluster_accounts",
                                to=settings.AUTH_USER_MODEL,
                            ),
                        ),
                    ],
                    options={
                        "db_table": "jobs_clusteraccount",
                        "ordering": ["cluster__name", "username"],
                        "constraints": [
                            models.UniqueConstraint(
                                condition=models.Q(("kind", "personal")),
                                fields=("cluster", "user"),
                                name="one_personal_account_per_cluster",
                            ),
                            models.CheckConstraint(
                                condition=models.Q(
                                    models.Q(("kind", "personal"), ("user__isnull", False)),
                                    models.Q(("kind", "service"), ("user__isnull", True)),
                                    _connector="OR",
                                ),
                                name="personal_accounts_have_a_user",
                            ),
                        ],
                    },
                ),
            ],
        ),
        migrations.AlterModelTable(name="clusteraccount", table=None),
    ]
