"""Clusters and what they offer: login hosts, partitions, node groups and their GPU types."""

from __future__ import annotations

import paramiko
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from catalog import validators as v
from portal import nodenet
from portal.slurm.cli import SlurmCli


class Cluster(models.Model):
    class NodeAccess(models.TextChoices):
        DIRECT = "direct", "Direct (the portal can reach compute nodes)"
        TUNNEL = "tunnel", "SSH tunnel through the login host"

    name = models.CharField(max_length=100, unique=True)
    slug = models.SlugField(max_length=50, unique=True, validators=[v.slug_name])
    login_host = models.CharField(max_length=253, validators=[v.hostname])
    ssh_port = models.PositiveIntegerField(default=22, validators=[MinValueValidator(1), MaxValueValidator(65535)])
    host_key = models.TextField(
        blank=True,
        help_text="Pinned known_hosts line(s) for the login host, e.g. from ssh-keyscan after checking the "
        "fingerprint with the site. The portal refuses to connect while this is empty.",
    )
    node_access = models.CharField(max_length=10, choices=NodeAccess.choices, default=NodeAccess.TUNNEL)
    node_networks = models.CharField(
        "compute-node networks", max_length=1000, blank=True, validators=[v.node_network_list],
        help_text="The networks the compute nodes' addresses are in, as CIDRs (IPv4 or IPv6) separated by commas, "
        "e.g. 10.20.0.0/16, fd00:20::/64: the only addresses the portal sends a session's requests to, whatever the "
        "job and its owner's account report. Only the nodes' own networks, never a range that holds other services "
        "(the site's DNS, databases, this portal). Empty: no session on this cluster is sent any request.",
    )  # fmt: skip
    default_account = models.CharField(max_length=64, blank=True, validators=[v.slurm_account])
    slurm_cluster = models.CharField(
        "Slurm cluster name", max_length=64, blank=True, validators=[v.slurm_name],
        help_text="For a login host that serves several Slurm clusters: every Slurm command gets --clusters=NAME "
        "(Open OnDemand's job.cluster). Empty: the login host's own cluster.",
    )  # fmt: skip
    slurm_bin_dir = models.CharField(
        "Slurm binaries", max_length=300, blank=True, validators=[v.absolute_path],
        help_text="Directory of sbatch, squeue, scontrol... when they are not on the login shell's PATH "
        "(Open OnDemand's job.bin). Empty: the PATH.",
    )  # fmt: skip
    stage_to = models.CharField(
        "stage weights to", max_length=300, blank=True, validators=[v.stage_target],
        help_text="Copy the model's files to node-local storage before the server starts: $TMPDIR, /dev/shm or an "
        "absolute path on every node. Empty: load from where the model lives. A launch can turn it off.",
    )  # fmt: skip
    stage_keep = models.BooleanField(
        "keep staged copies", default=True,
        help_text="Keep a staged copy on the node for the user's next session (reused while its size and modification "
        "time match the source; the oldest unused copies go first when space runs short). Off: removed when the "
        "session ends.",
    )  # fmt: skip
    max_sessions_per_user = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Live sessions one user may have on this cluster; empty: the site's PORTAL_MAX_SESSIONS_PER_USER.",
    )
    max_gpus_per_user = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="GPUs one user's live sessions may hold on this cluster; empty: the site's PORTAL_MAX_GPUS_PER_USER.",
    )
    notes = models.TextField(blank=True)
    # Discovery (catalog/discover.py): when Slurm was last read, through which account (the periodic re-discovery
    # reads it again so), and what differed from the catalog then ("" when nothing did).
    discovered_at = models.DateTimeField(null=True, blank=True)
    discovered_with = models.ForeignKey(
        "catalog.ClusterAccount", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="The account discovery last read Slurm with; periodic re-discovery uses it.",
    )  # fmt: skip
    drift = models.TextField(blank=True, help_text="What the last discovery found different from the catalog.")
    status_account = models.ForeignKey(
        "catalog.ClusterAccount", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="Optional: a service account, or one marked trusted for site-wide reads, whose squeue sees every "
        "user's jobs (no PrivateData=jobs, or a Slurm operator). Each poll cycle then reads every portal job's state "
        "with it in one command; only researchers' accounts with a job that started, ended or changed run their own.",
    )  # fmt: skip

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def slurm_cli(self) -> SlurmCli:
        """How every Slurm command the portal runs on the login host is called: its binaries, its --clusters."""
        return SlurmCli(self.slurm_cluster, self.slurm_bin_dir)

    def clean(self) -> None:
        super().clean()
        if self.node_networks.strip():
            self._normalise_networks()
        if self.host_key.strip():
            self._check_host_key()
        if self.status_account is not None and self.status_account.cluster_id != self.pk:
            raise ValidationError({"status_account": "The status account must be an account on this cluster."})
        if self.status_account is not None and not self.status_account.reads_for_site:
            raise ValidationError({"status_account": self.status_account.not_for_site("the status listing") + "."})

    def _normalise_networks(self) -> None:
        """One spelling for each network, so that an export imports back unchanged."""
        try:
            networks = nodenet.parse(self.node_networks)
        except ValueError:
            return  # the field's validator has said why
        self.node_networks = ", ".join(str(network) for network in networks)

    def _check_host_key(self) -> None:
        expected = {self.login_host} if self.ssh_port == 22 else {f"[{self.login_host}]:{self.ssh_port}"}
        for number, line in enumerate(self.host_key.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
            except (paramiko.SSHException, paramiko.hostkeys.InvalidHostKey, ValueError, TypeError) as exc:
                raise ValidationError({"host_key": f"Line {number} is not a valid known_hosts line: {exc}"}) from None
            if entry is None:
                raise ValidationError(
                    {"host_key": f"Line {number} is not a known_hosts line ('host key-type base64-key')."}
                )
            hashed = any(name.startswith("|1|") for name in entry.hostnames)
            if not hashed and not expected & set(entry.hostnames):
                raise ValidationError(
                    {
                        "host_key": f"Line {number} is for {', '.join(entry.hostnames)}, not "
                        f"{' or '.join(sorted(expected))} (the login host and SSH port above)."
                    }
                )


class GPUType(models.Model):
    class Vendor(models.TextChoices):
        NVIDIA = "nvidia", "NVIDIA"
        AMD = "amd", "AMD"
        INTEL = "intel", "Intel"

    name = models.CharField(
        max_length=50,
        unique=True,
        validators=[v.slug_name],
        help_text="The catalog's key for this GPU, e.g. a100-80g.",
    )
    gres_type = models.CharField(
        max_length=50,
        blank=True,
        validators=[v.slurm_name],
        help_text="The GPU type as Slurm knows it in GRES (gpu:TYPE:N); defaults to the name.",
    )
    constraint = models.CharField(
        max_length=50,
        blank=True,
        validators=[v.slurm_name],
        help_text="Slurm feature to add as --constraint when the GRES type alone is ambiguous (e.g. a100-80g).",
    )
    display_name = models.CharField(max_length=100)
    memory_gib = models.FloatField(validators=[MinValueValidator(0.25), MaxValueValidator(1024)])
    reserved_gib = models.FloatField(
        default=0.5,
        validators=[MinValueValidator(0)],
        help_text="Memory not usable by the model's buffers: the driver and CUDA/ROCm context (about 0.4 GiB), a "
        "display on workstations, other processes. The estimator compares its buffers with the size less this.",
    )
    compute_capability = models.CharField(max_length=10, blank=True, validators=[v.compute_capability])
    bandwidth_gbs = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Memory bandwidth in GB/s (optional).",
    )
    vendor = models.CharField(max_length=10, choices=Vendor.choices, default=Vendor.NVIDIA)

    class Meta:
        ordering = ["-memory_gib", "name"]
        verbose_name = "GPU type"

    def __str__(self) -> str:
        return f"{self.display_name} ({self.memory_gib:g} GiB)"

    @property
    def usable_gib(self) -> float:
        return self.memory_gib - self.reserved_gib

    def clean(self) -> None:
        super().clean()
        if not self.gres_type:
            self.gres_type = self.name
        if self.memory_gib is not None and self.reserved_gib is not None and self.reserved_gib >= self.memory_gib:
            raise ValidationError({"reserved_gib": "The reserve must be smaller than the GPU's memory."})


class Partition(models.Model):
    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="partitions")
    name = models.CharField(max_length=64, validators=[v.slurm_name])
    max_walltime_min = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    default_walltime_min = models.PositiveIntegerField(default=60, validators=[MinValueValidator(1)])
    is_debug = models.BooleanField(
        default=False, help_text="A debug/devel partition: short limits, meant for quick tests."
    )
    allowed_accounts = models.CharField(
        max_length=500, blank=True, validators=[v.slurm_name_list],
        help_text="Comma-separated Slurm accounts the partition takes (its AllowAccounts); empty: any.",
    )  # fmt: skip
    allowed_qos = models.CharField(
        "allowed QOS", max_length=500, blank=True, validators=[v.slurm_name_list],
        help_text="Comma-separated QOS the partition takes (its AllowQos); empty: any. A job runs with the user's "
        "default QOS, which must be one of these.",
    )  # fmt: skip
    missing_since = models.DateTimeField(
        null=True, blank=True, help_text="Discovery has not found it in Slurm since then; no longer offered."
    )

    class Meta:
        ordering = ["cluster__name", "name"]
        constraints = [models.UniqueConstraint(fields=["cluster", "name"], name="partition_unique_per_cluster")]

    def __str__(self) -> str:
        return f"{self.cluster.slug}/{self.name}"

    @property
    def allowed_account_list(self) -> list[str]:
        return [a.strip() for a in self.allowed_accounts.split(",") if a.strip()]

    def takes(self, slurm_account: str) -> bool:
        """Whether Slurm lets a job charged to this account into the partition (AllowAccounts; empty: any)."""
        return not self.allowed_accounts or slurm_account in self.allowed_account_list

    def clean(self) -> None:
        super().clean()
        if (
            self.max_walltime_min is not None
            and self.default_walltime_min is not None
            and self.default_walltime_min > self.max_walltime_min
        ):
            raise ValidationError(
                {"default_walltime_min": f"The default must not exceed the maximum ({self.max_walltime_min} min)."}
            )


class NodeGroup(models.Model):
    """A set of identical GPU nodes a partition offers."""

    partition = models.ForeignKey(Partition, on_delete=models.CASCADE, related_name="node_groups")
    gpu_type = models.ForeignKey(GPUType, on_delete=models.PROTECT, related_name="node_groups")
    gpus_per_node = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(64)])
    node_count = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    cpus_per_node = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    ram_gib = models.FloatField(validators=[MinValueValidator(1)])
    features = models.CharField(
        max_length=500, blank=True, validators=[v.slurm_name_list],
        help_text="Comma-separated node features every node of the group has (usable with --constraint).",
    )  # fmt: skip
    missing_since = models.DateTimeField(
        null=True, blank=True, help_text="Discovery has not found these nodes in Slurm since then; no longer offered."
    )

    class Meta:
        ordering = ["partition", "gpu_type__name", "gpus_per_node"]
        constraints = [
            models.UniqueConstraint(
                fields=["partition", "gpu_type", "gpus_per_node"], name="nodegroup_unique_shape_per_partition"
            )
        ]

    def __str__(self) -> str:
        return f"{self.partition}: {self.node_count} x {self.gpus_per_node} {self.gpu_type.name}"

    def share_for(self, gpus_per_node: int) -> tuple[int, int]:
        """CPUs and GiB of memory per node that go with this many of a node's GPUs: the same share of the node."""
        used = min(gpus_per_node, self.gpus_per_node)
        return max(1, self.cpus_per_node * used // self.gpus_per_node), max(
            1, int(self.ram_gib * used / self.gpus_per_node)
        )
