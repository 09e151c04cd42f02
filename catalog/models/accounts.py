"""How the portal logs in to a cluster for a user (a personal key pair) or for a lab (a shared service account).

Accounts sit with the clusters they open: the catalog reads model files over them and jobs submit through them.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.views.decorators.debug import sensitive_variables

from catalog import validators as v
from catalog.models.clusters import Cluster
from portal import crypto, gate, ssh
from portal.ssh import CommandResult, SSHTarget, generate_keypair, load_private_key

# Who may tick ClusterAccount.trusted (superusers have every permission): the admin shows the box to them alone.
TRUST_PERMISSION = "catalog.trust_clusteraccount"


class ClusterAccount(models.Model):
    """How the portal logs in to a cluster for one user (personal key pair) or for a lab (service account)."""

    class Kind(models.TextChoices):
        PERSONAL = "personal", "Personal (the portal's key pair in the user's authorized_keys)"
        SERVICE = "service", "Service account shared by its members"

    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="accounts")
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.PERSONAL)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="cluster_accounts",
        help_text="The portal user this personal account belongs to (empty for a service account).",
    )
    label = models.CharField(max_length=100, blank=True, help_text="A service account's name, e.g. 'NLP lab'.")
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL,
        blank=True,
        related_name="shared_cluster_accounts",
        help_text="Portal users who may submit through this service account.",
    )
    username = models.CharField("cluster user name", max_length=32, validators=[v.unix_username])
    slurm_account = models.CharField(
        max_length=64,
        blank=True,
        validators=[v.slurm_account],
        help_text="Slurm --account for this user's jobs; empty uses the cluster's default account.",
    )
    trusted = models.BooleanField(
        "trusted for site-wide reads",
        default=False,
        help_text="Let this personal account read facts for the whole site (mapped groups, queue figures, every "
        "portal job's state) as a service account does. Only for an account whose ~/.bashrc, ~/.bash_profile and "
        "PATH no researcher controls, e.g. an operator's. Superusers and staff with the permission 'Can mark a "
        "cluster account trusted for site-wide reads' change it.",
    )
    restricted = models.BooleanField(
        "restricted key",
        default=False,
        help_text="The key's line in ~/.ssh/authorized_keys runs the portal's gate (restrict,command=...), so the key "
        "can do only the portal's own work, which the gate checks again on the cluster: `manage.py accounts key` "
        "prints the line. Tick it once the line is in place; Test connection ticks it when the gate answers.",
    )
    public_key = models.TextField(editable=False, help_text="Goes into ~/.ssh/authorized_keys on the cluster.")
    private_key_encrypted = crypto.SealedTextField(editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["cluster__name", "username"]
        permissions = [(TRUST_PERMISSION.split(".")[1], "Can mark a cluster account trusted for site-wide reads")]
        constraints = [
            models.UniqueConstraint(
                fields=["cluster", "user"], condition=Q(kind="personal"), name="one_personal_account_per_cluster"
            ),
            models.CheckConstraint(
                condition=Q(kind="personal", user__isnull=False) | Q(kind="service", user__isnull=True),
                name="personal_accounts_have_a_user",
            ),
        ]

    def __str__(self) -> str:
        who = self.label or (self.user.get_username() if self.user else "?")
        return f"{self.username}@{self.cluster.slug} ({who})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self.private_key_encrypted:
            self.generate_key()
        super().save(*args, **kwargs)

    def clean(self) -> None:
        super().clean()
        if self.kind == self.Kind.PERSONAL and not self.user_id:
            raise ValidationError({"user": "A personal account belongs to a portal user."})
        if self.kind == self.Kind.SERVICE:
            if self.user_id:
                raise ValidationError({"user": "A service account is shared through its members, not one user."})
            if not self.label:
                raise ValidationError({"label": "Name the service account, e.g. after the lab that shares it."})

    @staticmethod
    def reads_for_site_q(prefix: str = "") -> Q:
        """The accounts that may read facts for the whole site (group sync, the queue figures, a status account's
        listing): service accounts, which an admin sets up, and accounts an admin marked trusted. Never a
        researcher's own: sshd runs every command through that user's shell and rc files (~/.bashrc, functions,
        PATH, even a forced command in authorized_keys), so its user decides what it prints. `prefix` reaches the
        account through a relation ("status_account__")."""
        return Q(**{f"{prefix}kind": ClusterAccount.Kind.SERVICE}) | Q(**{f"{prefix}trusted": True})

    @property
    def reads_for_site(self) -> bool:
        return self.kind == self.Kind.SERVICE or self.trusted

    def not_for_site(self, what: str) -> str:
        """Why this account may not do `what` (a site-wide read), in the words the admin and the logs show."""
        return (
            f"{self} is a researcher's own account, whose shell its user controls: {what} needs a service account or "
            "one an admin marked trusted for site-wide reads"
        )

    @classmethod
    def site_reader(cls, cluster: Cluster) -> ClusterAccount | None:
        """The account that reads the cluster's facts for everyone: its first service account, else the first one
        an admin marked trusted; None when it has neither (never any other account there)."""
        readers = cls.objects.filter(cls.reads_for_site_q(), cluster=cluster).select_related("cluster")
        return readers.order_by("-kind", "pk").first()  # "service" sorts after "personal"; descending puts it first

    @property
    def effective_slurm_account(self) -> str:
        return self.slurm_account or self.cluster.default_account

    @sensitive_variables("private")
    def generate_key(self) -> None:
        private, public = generate_keypair(f"hpc-llm-portal {self.username}@{self.cluster.slug}")
        self.private_key_encrypted = crypto.encrypt(private)
        self.public_key = public

    @sensitive_variables("text", "key")
    def set_private_key(self, text: str) -> None:
        """Use an existing key (service accounts). The public half is derived, so the two always match."""
        try:
            key = load_private_key(text)
        except ValueError as exc:
            raise ValidationError({"private_key": str(exc)}) from None
        self.private_key_encrypted = crypto.encrypt(text)
        self.public_key = f"{key.get_name()} {key.get_base64()} hpc-llm-portal {self.username}@{self.cluster.slug}"

    def ssh_target(self) -> SSHTarget:
        return self.target_of(
            self.cluster.login_host, self.cluster.ssh_port, self.cluster.host_key, self.username,
            self.private_key_encrypted,
        )  # fmt: skip

    @sensitive_variables("options", "program")  # a submit's stdin holds the session's key
    def run(self, command: str, **options: Any) -> CommandResult:
        """One of the portal's commands (portal/gate.py: built for this account, `gated` when its key is restricted)
        over its SSH connection. A restricted key's gate is installed on first use: the one its line names, which
        the portal renders (gate.renderer) and the key's line checks byte for byte before it keeps it."""
        target = self.ssh_target()
        result = ssh.pool.run(target, command, **options)
        if self.restricted and result.exit_code == gate.NOT_INSTALLED and gate.renderer is not None:
            program = gate.renderer(self.cluster)
            installed = ssh.pool.run(target, gate.INSTALL_REQUEST, stdin=program.encode(), timeout_s=60)
            if installed.ok:
                result = ssh.pool.run(target, command, **options)
        return result

    @staticmethod
    def target_of(login_host: str, ssh_port: int, host_key: str, username: str, key_encrypted: str) -> SSHTarget:
        """The SSH target from the stored columns (the proxy reads them without loading the account)."""
        return SSHTarget(
            host=login_host,
            port=ssh_port,
            username=username,
            host_keys=host_key,
            private_key=crypto.decrypt(key_encrypted),
        )

    @classmethod
    def usable_by(cls, user: User, cluster: Cluster) -> list[ClusterAccount]:
        """Every account the user may submit through on the cluster: their own first, then shared ones."""
        accounts = ClusterAccount.objects.filter(cluster=cluster)
        own = list(accounts.filter(kind=cls.Kind.PERSONAL, user=user))
        shared = list(accounts.filter(kind=cls.Kind.SERVICE, members=user).order_by("pk"))
        return own + shared

    @classmethod
    def for_user(cls, user: User, cluster: Cluster) -> ClusterAccount | None:
        """The account a user submits through on a cluster: their own first, else a service account they are in."""
        own = cls.objects.filter(cluster=cluster, kind=cls.Kind.PERSONAL, user=user).first()
        if own is not None:
            return own
        return cls.objects.filter(cluster=cluster, kind=cls.Kind.SERVICE, members=user).order_by("pk").first()
