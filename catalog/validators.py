"""Allow-list validators for catalog values that later reach a shell or Slurm command line."""

from __future__ import annotations

import shlex

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator

slug_name = RegexValidator(
    r"^[a-z0-9][a-z0-9_.-]*\Z",
    "Use lowercase letters, digits, '.', '_' and '-', starting with a letter or digit.",
)
slurm_name = RegexValidator(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z", "Slurm names use letters, digits, '.', '_' and '-' only.")
slurm_account = RegexValidator(r"^[A-Za-z0-9_.-]*\Z", "Slurm accounts use letters, digits, '.', '_' and '-' only.")
hostname = RegexValidator(
    r"^(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z",
    "Enter a host name such as login.cluster.example.edu or an IPv4 address.",
)
model_name = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_.+-]*\Z", "Model names use letters, digits, '.', '_', '+' and '-' (no spaces)."
)
absolute_path = RegexValidator(
    r"^/[A-Za-z0-9_.+@/-]*\Z",
    "Use an absolute path of letters, digits and '_ . + @ / -' (no spaces or quotes).",
)
command_or_path = RegexValidator(
    r"^[A-Za-z0-9_.+@/-]+\Z",
    "Use a command name or path of letters, digits and '_ . + @ / -' (no spaces or quotes).",
)
ollama_tag = RegexValidator(
    r"^[a-z0-9][a-z0-9._/-]*(?::[A-Za-z0-9][A-Za-z0-9._-]*)?\Z",
    "Use an ollama tag such as llama3.1:8b-instruct-q4_K_M.",
)
module_name = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_.+/-]*\Z", "Module names use letters, digits and '_ . + / -' only."
)
compute_capability = RegexValidator(
    r"^(?:\d{1,2}\.\d{1,2}|gfx[0-9a-f]{3,5})\Z",
    "Use a CUDA compute capability such as 8.0, or an AMD gfx target.",
)
stage_target = RegexValidator(
    r"^(?:\$TMPDIR|/[A-Za-z0-9_.+@/-]*)\Z",
    "Use $TMPDIR, /dev/shm or another absolute path of letters, digits and '_ . + @ / -'.",
)
tag = RegexValidator(r"^[a-z0-9][a-z0-9-]*\Z", "Tags use lowercase letters, digits and '-'.")


def shell_flags(value: str) -> None:
    """Flags are split with shlex and each word quoted again when scripts are rendered; reject what cannot split."""
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise ValidationError(f"Cannot split these flags like a shell would: {exc}.") from None
    for word in words:
        if "\n" in word or "\x00" in word:
            raise ValidationError("Flags must not contain newlines or NUL bytes.")


def module_list(value: str) -> None:
    for name in value.split():
        module_name(name)


def tag_list(value: str) -> None:
    for item in value.split(","):
        if item.strip():
            tag(item.strip())


def slurm_name_list(value: str) -> None:
    """Comma-separated Slurm names (accounts, node features)."""
    for item in value.split(","):
        if item.strip():
            slurm_name(item.strip())
