"""What the portal knows about clusters and models: the catalog admins maintain in admin or as YAML."""

from __future__ import annotations

import paramiko
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from catalog import validators as v
from catalog.quant import QUANTS, canonical_quant


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
    default_account = models.CharField(max_length=64, blank=True, validators=[v.slurm_account])
    notes = models.TextField(blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        super().clean()
        if self.host_key.strip():
            self._check_host_key()

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

    class Meta:
        ordering = ["cluster__name", "name"]
        constraints = [models.UniqueConstraint(fields=["cluster", "name"], name="partition_unique_per_cluster")]

    def __str__(self) -> str:
        return f"{self.cluster.slug}/{self.name}"

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

    class Meta:
        ordering = ["partition", "gpu_type__name", "gpus_per_node"]
        constraints = [
            models.UniqueConstraint(
                fields=["partition", "gpu_type", "gpus_per_node"], name="nodegroup_unique_shape_per_partition"
            )
        ]

    def __str__(self) -> str:
        return f"{self.partition}: {self.node_count} x {self.gpus_per_node} {self.gpu_type.name}"


class Runtime(models.Model):
    class Kind(models.TextChoices):
        LLAMA_CPP = "llama.cpp", "llama.cpp llama-server"
        OLLAMA = "ollama", "ollama"
        VLLM = "vllm", "vLLM"

    kind = models.CharField(max_length=20, choices=Kind.choices, unique=True)
    display_name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    default_flags = models.CharField(
        max_length=500,
        blank=True,
        validators=[v.shell_flags],
        help_text="Flags added to every server this runtime starts; each word is shell-quoted in the job script.",
    )

    class Meta:
        ordering = ["kind"]

    def __str__(self) -> str:
        return self.display_name


class ClusterRuntime(models.Model):
    """How a cluster provides a runtime: modules to load and/or binary paths."""

    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="runtimes")
    runtime = models.ForeignKey(Runtime, on_delete=models.PROTECT, related_name="installs")
    modules = models.CharField(
        max_length=500,
        blank=True,
        validators=[v.module_list],
        help_text="Module names to load, space-separated.",
    )
    binary = models.CharField(
        max_length=300,
        validators=[v.command_or_path],
        help_text="The server program: a command on PATH after the modules load, or an absolute path.",
    )
    rpc_binary = models.CharField(
        max_length=300,
        blank=True,
        validators=[v.command_or_path],
        help_text="llama.cpp only: ggml-rpc-server, for models split across nodes.",
    )
    model_dir = models.CharField(
        max_length=500,
        blank=True,
        validators=[v.absolute_path],
        help_text="ollama only: the shared model directory (OLLAMA_MODELS) where tags are looked up and pulled.",
    )
    extra_flags = models.CharField(max_length=500, blank=True, validators=[v.shell_flags])

    class Meta:
        ordering = ["cluster__name", "runtime__kind"]
        constraints = [models.UniqueConstraint(fields=["cluster", "runtime"], name="one_install_per_cluster")]
        verbose_name = "runtime on a cluster"

    def __str__(self) -> str:
        return f"{self.runtime.kind} on {self.cluster.slug}"

    def clean(self) -> None:
        super().clean()
        if self.rpc_binary and self.runtime_id and self.runtime.kind != Runtime.Kind.LLAMA_CPP:
            raise ValidationError({"rpc_binary": "Only llama.cpp uses an RPC server binary."})
        if self.model_dir and self.runtime_id and self.runtime.kind != Runtime.Kind.OLLAMA:
            raise ValidationError({"model_dir": "Only ollama uses a shared model directory."})


class ModelCard(models.Model):
    name = models.CharField(max_length=120, unique=True, validators=[v.model_name])
    family = models.CharField(max_length=50, validators=[v.slug_name], help_text="e.g. llama, mistral, falcon, gpt2")
    params_b = models.FloatField(
        "parameters (billions)", validators=[MinValueValidator(0.0001), MaxValueValidator(10000)]
    )
    layers = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    hidden_size = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    attention_heads = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    kv_heads = models.PositiveIntegerField(validators=[MinValueValidator(1)], help_text="Key/value heads (GQA/MQA).")
    head_dim = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    vocab_size = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    max_context = models.PositiveIntegerField(validators=[MinValueValidator(1)], help_text="Tokens.")
    license = models.CharField(max_length=100, blank=True)
    tags = models.CharField(
        "domain tags", max_length=300, blank=True, validators=[v.tag_list], help_text="Comma-separated."
    )
    description = models.TextField(blank=True)

    class Meta:
        ordering = ["family", "params_b", "name"]
        verbose_name = "model card"

    def __str__(self) -> str:
        return self.name

    @property
    def tag_list(self) -> list[str]:
        return [t.strip() for t in self.tags.split(",") if t.strip()]

    def clean(self) -> None:
        super().clean()
        if self.attention_heads and self.kv_heads:
            if self.kv_heads > self.attention_heads:
                raise ValidationError({"kv_heads": "A model cannot have more KV heads than attention heads."})
            if self.attention_heads % self.kv_heads:
                raise ValidationError(
                    {"kv_heads": f"Attention heads ({self.attention_heads}) must be a multiple of KV heads."}
                )
        self.tags = ",".join(self.tag_list)


class ModelVariant(models.Model):
    class Format(models.TextChoices):
        GGUF = "gguf", "GGUF file"
        SAFETENSORS = "safetensors", "safetensors directory"
        OLLAMA = "ollama", "ollama tag"

    model = models.ForeignKey(ModelCard, on_delete=models.CASCADE, related_name="variants")
    quantization = models.CharField(max_length=20, help_text="e.g. Q4_K_M, Q8_0, fp16, bf16, AWQ, GPTQ-INT4.")
    format = models.CharField(max_length=12, choices=Format.choices)
    size_gib = models.FloatField("size on disk (GiB)", validators=[MinValueValidator(0.0001)])

    class Meta:
        ordering = ["model__name", "size_gib"]
        constraints = [models.UniqueConstraint(fields=["model", "quantization"], name="variant_unique_quant")]
        verbose_name = "model variant"

    def __str__(self) -> str:
        return f"{self.model.name} {self.quantization}"

    def clean(self) -> None:
        super().clean()
        try:
            self.quantization = canonical_quant(self.quantization)
        except KeyError:
            raise ValidationError(
                {"quantization": f"Unknown quantisation {self.quantization!r}; known: {', '.join(QUANTS)}."}
            ) from None
        if self.format and self.format not in QUANTS[self.quantization].formats:
            raise ValidationError({"format": f"{self.quantization} does not come as {self.get_format_display()}."})


class VariantLocation(models.Model):
    """Where a variant lives on one cluster: a file or directory path, and/or an ollama tag."""

    variant = models.ForeignKey(ModelVariant, on_delete=models.CASCADE, related_name="locations")
    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="model_locations")
    path = models.CharField(max_length=500, blank=True, validators=[v.absolute_path])
    ollama_tag = models.CharField(max_length=200, blank=True, validators=[v.ollama_tag])

    class Meta:
        ordering = ["variant", "cluster__name"]
        constraints = [models.UniqueConstraint(fields=["variant", "cluster"], name="one_location_per_cluster")]
        verbose_name = "model location"

    def __str__(self) -> str:
        return f"{self.variant} on {self.cluster.slug}"

    def clean(self) -> None:
        super().clean()
        if not self.variant_id:
            return
        fmt = self.variant.format
        if fmt == ModelVariant.Format.OLLAMA:
            if not self.ollama_tag:
                raise ValidationError({"ollama_tag": "An ollama variant needs its tag."})
            if self.path:
                raise ValidationError({"path": "An ollama variant is found by its tag, not a path."})
        else:
            if not self.path:
                raise ValidationError({"path": f"A {self.variant.get_format_display()} needs its path."})
            if self.ollama_tag and fmt != ModelVariant.Format.GGUF:
                raise ValidationError({"ollama_tag": "Only GGUF variants can also be served by ollama."})
