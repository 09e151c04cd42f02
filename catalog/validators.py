"""Django validators for catalog values that later reach a shell or a Slurm command line, built from the one
definition of each allow-list (portal/shellsafe.py). The migrations name these validators; their regexes and messages
are the allow-lists' own, so a model field's validator deconstructs as it always did."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator

from catalog import toolcalls
from portal import nodenet, shellsafe


def _validator(allowed: shellsafe.AllowList) -> RegexValidator:
    return RegexValidator(allowed.regex, allowed.message)


slug_name = _validator(shellsafe.SLUG)
slurm_name = _validator(shellsafe.SLURM_NAME)
slurm_account = _validator(shellsafe.SLURM_ACCOUNT)
hostname = _validator(shellsafe.HOSTNAME)
model_name = _validator(shellsafe.MODEL_NAME)
absolute_path = _validator(shellsafe.ABSOLUTE_PATH)
command_or_path = _validator(shellsafe.COMMAND_OR_PATH)
ollama_tag = _validator(shellsafe.OLLAMA_TAG)
module_name = _validator(shellsafe.MODULE_NAME)
compute_capability = _validator(shellsafe.COMPUTE_CAPABILITY)
stage_target = _validator(shellsafe.STAGE_TARGET)
tag = _validator(shellsafe.TAG)
adapter_suffix = _validator(shellsafe.ADAPTER_SUFFIX)
unix_username = _validator(shellsafe.UNIX_USERNAME)


def shell_flags(value: str) -> None:
    """Flags are split with shlex and each word quoted again when scripts are rendered; reject what cannot split."""
    try:
        shellsafe.split_flags(value)
    except shellsafe.UnsafeValue as exc:
        raise ValidationError(str(exc)) from None


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


def node_network_list(value: str) -> None:
    """CIDRs, IPv4 or IPv6, separated by commas or spaces (portal/nodenet.py reads them the same way)."""
    try:
        nodenet.parse(value)
    except ValueError as exc:
        raise ValidationError(f"{str(exc)[0].upper()}{str(exc)[1:]}.") from None


def tool_call_parser(value: str) -> None:
    """One of vLLM's tool-call parser names (catalog/toolcalls.py); the name reaches vLLM's command line, and an
    unknown one stops it at startup."""
    try:
        toolcalls.check_parser(value)
    except ValueError as exc:
        raise ValidationError(f"{str(exc)[0].upper()}{str(exc)[1:]}.") from None
