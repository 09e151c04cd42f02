"""Runtimes (llama.cpp, ollama, vLLM) and how each cluster provides them; their rules are catalog/runtime_rules.py."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models

from catalog import runtime_rules
from catalog import validators as v
from catalog.models.clusters import Cluster
from catalog.runtime_rules import RuntimeRules


def _named(flag: str) -> str:
    """The runtimes whose rules set a flag, in words ("llama.cpp")."""
    return " and ".join(runtime_rules.kinds_with(flag))


class Runtime(models.Model):
    kind = models.CharField(max_length=20, choices=runtime_rules.CHOICES, unique=True)
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

    @property
    def rules(self) -> RuntimeRules:
        return runtime_rules.rules_for(self.kind)


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
        help_text=f"{_named('rpc_binary')} only: ggml-rpc-server, for models split across nodes.",
    )
    model_dir = models.CharField(
        max_length=500,
        blank=True,
        validators=[v.absolute_path],
        help_text=f"{_named('model_dir')} only: the shared model directory (OLLAMA_MODELS) where tags are looked up "
        "and pulled.",
    )
    extra_flags = models.CharField(max_length=500, blank=True, validators=[v.shell_flags])

    class Meta:
        ordering = ["cluster__name", "runtime__kind"]
        constraints = [models.UniqueConstraint(fields=["cluster", "runtime"], name="one_install_per_cluster")]
        verbose_name = "runtime on a cluster"
        # catalog.models.runs_code.CODE_PERMISSION: the fields there run as every researcher; change permission on
        # this model alone does not let staff change them.
        permissions = [
            ("change_runtime_code", "Can change what runs as every researcher (runtime programs, modules, flags, "
             "model paths)")
        ]  # fmt: skip

    def __str__(self) -> str:
        return f"{self.runtime.kind} on {self.cluster.slug}"

    def clean(self) -> None:
        super().clean()
        if not self.runtime_id:
            return
        rules = self.runtime.rules
        if self.rpc_binary and not rules.rpc_binary:
            raise ValidationError({"rpc_binary": f"Only {_named('rpc_binary')} uses an RPC server binary."})
        if self.model_dir and not rules.model_dir:
            raise ValidationError({"model_dir": f"Only {_named('model_dir')} uses a shared model directory."})
