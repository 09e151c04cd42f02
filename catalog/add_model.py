"""Fill a model card and variant from a real file: a GGUF header, or a Hugging Face directory's config.json.

The files are read through a Reader, so the same code reads a path on this machine or on a cluster's login host
over SSH (only the GGUF header or the JSON files travel, never the weights).
"""

from __future__ import annotations

import base64
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import transaction

from catalog import gguf, hfconfig
from catalog.architecture import Architecture
from catalog.models import Cluster, ClusterAccount, ModelCard, ModelVariant, VariantLocation
from catalog.validators import absolute_path
from portal import ssh

GIB = 1024**3


class Reader(Protocol):
    def prefix(self, path: str, n: int) -> bytes: ...
    def size(self, path: str) -> int: ...
    def is_dir(self, path: str) -> bool: ...
    def listdir(self, path: str) -> list[str]: ...


class LocalReader:
    def prefix(self, path: str, n: int) -> bytes:
        with open(path, "rb") as fh:
            return fh.read(n)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))


class SSHReader:
    """Reads over a pooled SSH connection (portal.ssh) as a cluster account; paths are allow-listed and quoted."""

    def __init__(self, target: ssh.SSHTarget) -> None:
        self.target = target

    def _run(self, command: str, max_bytes: int = 1 << 20) -> str:
        result = ssh.pool.run(self.target, command, timeout_s=120, max_output_bytes=max_bytes)
        if result.exit_code != 0 or result.truncated:
            raise OSError(result.stderr.strip() or f"{command} failed")
        return result.stdout

    def prefix(self, path: str, n: int) -> bytes:
        # base64 keeps binary intact through the text channel.
        out = self._run(f"head -c {int(n)} {shlex.quote(path)} | base64 -w0", max_bytes=n * 2 + 1024)
        return base64.b64decode(out)

    def size(self, path: str) -> int:
        return int(self._run(f"stat -L -c %s {shlex.quote(path)}").strip())

    def is_dir(self, path: str) -> bool:
        return self._run(f"if [ -d {shlex.quote(path)} ]; then echo d; else echo f; fi").strip() == "d"

    def listdir(self, path: str) -> list[str]:
        return sorted(self._run(f"ls -1A {shlex.quote(path)}").split("\n")[:-1])


def cluster_reader(user: User, cluster: Cluster) -> SSHReader:
    """A cluster's files, read as the user's own account there."""
    account = ClusterAccount.for_user(user, cluster)
    if account is None:
        raise ValidationError(f"{user} has no cluster account on {cluster.name} to read it with.")
    return SSHReader(account.ssh_target())


@dataclass(frozen=True)
class Found:
    name: str
    family: str
    arch: Architecture
    quant: str
    format: str
    size_gib: float
    source: str  # what was read, for the report
    license: str = ""  # as the file states it (GGUF's general.license), for a card that has none yet


def inspect(path: str, reader: Reader | None = None) -> Found:
    """Read a GGUF file or a Hugging Face directory (config.json, safetensors index/headers)."""
    reader = reader or LocalReader()
    absolute_path(path)
    try:
        if reader.is_dir(path):
            return _inspect_hf(path, reader)
        return _inspect_gguf(path, reader)
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc}") from None
    except (gguf.GGUFError, hfconfig.HFConfigError) as exc:
        raise ValidationError(f"{path}: {exc}") from None


def _inspect_gguf(path: str, reader: Reader) -> Found:
    size, n = reader.size(path), 4 << 20
    while True:
        try:
            info = gguf.read_header(reader.prefix(path, n))
            break
        except gguf.NeedMoreBytes:
            if n >= size or n >= 256 << 20:
                raise
            n *= 4
    if not info.file_type:
        raise gguf.GGUFError("the header does not say its file type (general.file_type)")
    stem = Path(path).name.removesuffix(".gguf")
    name = _clean_name(re.sub(rf"[-._]{re.escape(info.file_type)}$", "", stem, flags=re.IGNORECASE) or info.name)
    return Found(
        name=name,
        family=_family(info.arch_name),
        arch=info.arch,
        quant=info.file_type,
        format=ModelVariant.Format.GGUF,
        size_gib=round(size / GIB, 4) or 0.0001,
        source=f"GGUF v{info.version} header ({info.arch_name}, {info.params:,} parameters)",
        license=str(info.metadata.get("general.license") or "")[:100],
    )


def _inspect_hf(path: str, reader: Reader) -> Found:
    files = reader.listdir(path)
    if "config.json" not in files:
        raise hfconfig.HFConfigError("a model directory needs config.json")
    config = reader.prefix(f"{path}/config.json", 1 << 20).decode()
    index = None
    if "model.safetensors.index.json" in files:
        index = reader.prefix(f"{path}/model.safetensors.index.json", 16 << 20).decode()
    shards = [f for f in files if f.endswith(".safetensors")]
    headers = None
    if shards and len(shards) <= 64:
        headers = []
        for shard in shards:
            head = reader.prefix(f"{path}/{shard}", 8)
            length = int.from_bytes(head[:8], "little") if len(head) == 8 else 0
            headers.append(reader.prefix(f"{path}/{shard}", 8 + min(length, 100 << 20)))
    info = hfconfig.read_config(config, index, headers)
    size = sum(reader.size(f"{path}/{shard}") for shard in shards)
    return Found(
        name=_clean_name(Path(path).name),
        family=_family(info.arch_name),
        arch=info.arch,
        quant=info.quant,
        format=ModelVariant.Format.SAFETENSORS,
        size_gib=round(size / GIB, 4) or round(info.params * 2 / GIB, 4),
        source=f"config.json ({info.arch_name}; parameters from {info.params_source})",
    )


def _clean_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-.")
    return name or "model"


def _family(architecture: str) -> str:
    text = architecture.lower()
    for suffix in ("forcausallm", "lmheadmodel", "forconditionalgeneration", "model"):
        text = text.removesuffix(suffix)
    return re.sub(r"[^a-z0-9_.-]", "", text) or "unknown"


@dataclass(frozen=True)
class Added:
    card: ModelCard
    variant: ModelVariant
    location: VariantLocation | None
    created: list[str]


@transaction.atomic
def add(found: Found, path: str, cluster: Cluster | None = None, name: str | None = None) -> Added:
    """Create or update the card, the variant and (with a cluster) its location; validated like admin input."""
    created: list[str] = []
    card = ModelCard.objects.filter(name=name or found.name).first() or ModelCard(name=name or found.name)
    if card.pk is None:
        created.append(f"model card {card.name}")
    card.family = found.family
    card.set_architecture(found.arch)
    if found.license and not card.license:  # an admin's own entry wins
        card.license = found.license
    card.full_clean()
    card.save()
    variant = ModelVariant.objects.filter(model=card, quantization=found.quant).first()
    if variant is None:
        variant = ModelVariant(model=card, quantization=found.quant)
        created.append(f"variant {found.quant}")
    variant.format, variant.size_gib = found.format, found.size_gib
    variant.full_clean()
    variant.save()
    location = None
    if cluster is not None:
        location = VariantLocation.objects.filter(variant=variant, cluster=cluster).first()
        if location is None:
            location = VariantLocation(variant=variant, cluster=cluster)
            created.append(f"location on {cluster.slug}")
        location.path = path
        location.full_clean()
        location.save()
    return Added(card, variant, location, created)
