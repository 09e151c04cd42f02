"""Fill a model card and variant from a real file: a GGUF header, or a Hugging Face directory's config.json.

The files are read through a Reader, so the same code reads a path on this machine or on a cluster's login host
over SSH (only the GGUF header or the JSON files travel, never the weights).
"""

from __future__ import annotations

import base64
import errno
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import models, transaction

from catalog import gguf, hfconfig, toolcalls
from catalog.architecture import Architecture
from catalog.models import Cluster, ClusterAccount, ModelCard, ModelVariant, VariantLocation
from catalog.quant import canonical_quant
from catalog.validators import absolute_path
from portal import gate, shellsafe, ssh
from portal.errors import text_of

GIB = 1024**3


@dataclass(frozen=True)
class Entry:
    """A file or directory as a listing shows it, links followed."""

    name: str
    kind: str  # "file", "dir", "link" (a link to nothing, or a loop of links) or "other"
    size: int
    mtime: float
    inode: str  # "device:inode" of what it names, so a directory reached twice (through links) is noticed
    link: bool = False  # the entry is a symbolic link (the other fields describe what it names)
    uid: int = -1  # the owner of what it names
    mode: int = 0  # the permission bits of what it names (0o1777 for /tmp)


@dataclass(frozen=True)
class Listing:
    entry: Entry  # the path itself
    children: list[Entry]  # a directory's entries, sorted by name; empty for a file
    problems: list[str]  # entries that could not be read, in the reader's words
    truncated: bool = False  # the directory has more entries than were asked for


class Reader(Protocol):
    def account_uid(self) -> int: ...  # the uid the files are read as
    def prefix(self, path: str, n: int) -> bytes: ...
    def size(self, path: str) -> int: ...
    def is_dir(self, path: str) -> bool: ...
    def listdir(self, path: str) -> list[str]: ...
    def listing(self, path: str, limit: int) -> Listing: ...


_KINDS = {"f": "file", "d": "dir", "l": "link"}


class LocalReader:
    def account_uid(self) -> int:
        return os.geteuid()

    def prefix(self, path: str, n: int) -> bytes:
        with open(path, "rb") as fh:
            return fh.read(n)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def listing(self, path: str, limit: int) -> Listing:
        entry = _local_entry(os.path.basename(path.rstrip("/")) or "/", os.stat(path))
        if entry.kind != "dir":
            return Listing(entry, [], [])
        children: list[Entry] = []
        problems: list[str] = []
        truncated = False
        with os.scandir(path) as found:
            for item in found:
                if len(children) == limit:
                    truncated = True
                    break
                try:
                    children.append(_local_entry(item.name, os.stat(item.path), item.is_symlink()))
                except OSError as exc:
                    if exc.errno != errno.ENOENT:  # a link to nothing is listed as such, as find lists it
                        problems.append(f"{item.path}: {exc.strerror}")
                    children.append(Entry(item.name, "link", 0, 0.0, "", link=True))
        return Listing(entry, sorted(children, key=lambda e: e.name), problems, truncated)


def _local_entry(name: str, st: os.stat_result, link: bool = False) -> Entry:
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
    mode = stat.S_IMODE(st.st_mode)
    return Entry(name, kind, st.st_size, st.st_mtime, f"{st.st_dev}:{st.st_ino}", link, st.st_uid, mode)


# find -L's -printf, after "l" or "-" (whether the entry is a link: -xtype l under -L): depth, type (links followed:
# "l" only for a link to nothing), size, mtime, device:inode, owner's uid, permission bits (octal), name.
_FIND_LINK = r"\( -xtype l -printf 'l\t' -o -printf '-\t' \)"
_FIND_FORMAT = r"%d\t%y\t%s\t%T@\t%D:%i\t%U\t%m\t%f\0"
_FIND_BYTES_PER_ENTRY = 400


# The catalog's reads of model files on a cluster (portal/gate.py's verbs): each path an allow-listed argument.
_PATH = (shellsafe.MODEL_READ_PATH,)
UID = gate.Verb("uid", "id -u\n")
# base64 keeps binary intact through the text channel.
HEAD = gate.Verb("head", 'head -c "$2" -- "$1" | base64 -w0\n', args=(*_PATH, shellsafe.COUNT))
SIZE = gate.Verb("size", 'stat -L -c %s -- "$1"\n', args=_PATH)
KIND = gate.Verb("kind", 'if [ -d "$1" ]; then echo d; else echo f; fi\n', args=_PATH)
NAMES = gate.Verb("names", 'ls -1A -- "$1"\n', args=_PATH)
ENTRIES = gate.Verb("entries", f"find -L \"$1\" -maxdepth 1 {_FIND_LINK} -printf '{_FIND_FORMAT}'\n", args=_PATH)
VERBS = (UID, HEAD, SIZE, KIND, NAMES, ENTRIES)


class SSHReader:
    """Reads over a pooled SSH connection (portal.ssh) as a cluster account; paths are allow-listed and quoted. With
    the account, a restricted key gets the gate's requests (and its gate on first use)."""

    def __init__(self, target: ssh.SSHTarget, account: ClusterAccount | None = None) -> None:
        self.target = target
        self.account = account
        self._uid: int | None = None

    def _exec(self, verb: gate.Verb, args: list[str], max_bytes: int) -> ssh.CommandResult:
        if self.account is not None:
            command = gate.command(verb, args, gated=self.account.restricted)
            return self.account.run(command, timeout_s=120, max_output_bytes=max_bytes)
        return ssh.pool.run(self.target, gate.command(verb, args), timeout_s=120, max_output_bytes=max_bytes)

    def _run(self, verb: gate.Verb, args: list[str], max_bytes: int = 1 << 20) -> str:
        result = self._exec(verb, args, max_bytes)
        if result.exit_code != 0 or result.truncated:
            raise OSError(result.stderr.strip() or f"{verb.name} {' '.join(args)} failed")
        return result.stdout

    def account_uid(self) -> int:
        if self._uid is None:
            self._uid = int(self._run(UID, []).strip())
        return self._uid

    def prefix(self, path: str, n: int) -> bytes:
        return base64.b64decode(self._run(HEAD, [_checked(path), str(int(n))], max_bytes=n * 2 + 1024))

    def size(self, path: str) -> int:
        return int(self._run(SIZE, [_checked(path)]).strip())

    def is_dir(self, path: str) -> bool:
        return self._run(KIND, [_checked(path)]).strip() == "d"

    def listdir(self, path: str) -> list[str]:
        return sorted(self._run(NAMES, [_checked(path)]).split("\n")[:-1])

    def listing(self, path: str, limit: int) -> Listing:
        """One round trip: the path and (for a directory) its entries, with links followed."""
        result = self._exec(ENTRIES, [_checked(path)], (limit + 1) * _FIND_BYTES_PER_ENTRY)
        records = result.stdout.split("\0")
        records.pop()  # what follows the last NUL: nothing, or a record cut short by the output limit
        entries: list[Entry] = []
        top = None
        for record in records:
            fields = record.split("\t", 8)
            if len(fields) != 9 or fields[0] not in ("l", "-"):
                raise OSError(f"find printed what this reader does not understand: {record[:100]!r}")
            link, depth, kind, size, mtime, inode, uid, mode, name = fields
            entry = Entry(name, _KINDS.get(kind, "other"), int(size), float(mtime), inode, link == "l", int(uid),
                          int(mode, 8))  # fmt: skip
            if depth == "0":
                top = entry
            else:
                entries.append(entry)
        if top is None:
            raise OSError(result.stderr.strip() or f"find {path} failed")
        # A link loop or an unreadable entry makes find complain on stderr and exit 1; the rest is still listed.
        problems = [line.removeprefix("find: ") for line in result.stderr.splitlines() if line.strip()]
        truncated = result.truncated or len(entries) > limit
        return Listing(top, sorted(entries[:limit], key=lambda e: e.name), problems, truncated)


def _checked(path: str) -> str:
    """Every path that reaches the remote shell is an absolute path of the allow-listed characters (an argument of
    the verb's script, which quotes it)."""
    absolute_path(path)
    return shellsafe.MODEL_READ_PATH.check(path, "model path")


def cluster_reader(user: User, cluster: Cluster) -> SSHReader:
    """A cluster's files, read as the user's own account there."""
    account = ClusterAccount.for_user(user, cluster)
    if account is None:
        raise ValidationError(f"{user} has no cluster account on {cluster.name} to read it with.")
    return SSHReader(account.ssh_target(), account)


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
    tool_call_parser: str = ""  # vLLM's parser for the tool calls its chat template writes, for a card without one


def inspect(path: str, reader: Reader | None = None) -> Found:
    """Read a GGUF file or a Hugging Face directory (config.json, safetensors index/headers)."""
    reader = reader or LocalReader()
    absolute_path(path)
    try:
        if reader.is_dir(path):
            return inspect_hf(path, reader)
        return _inspect_gguf(path, reader)
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc}") from None
    except (gguf.GGUFError, hfconfig.HFConfigError) as exc:
        raise ValidationError(f"{path}: {exc}") from None


def _inspect_gguf(path: str, reader: Reader) -> Found:
    size = reader.size(path)
    return gguf_found(Path(path).name.removesuffix(".gguf"), gguf.combine([read_gguf(reader, path, size)]), size)


def read_gguf(reader: Reader, path: str, size: int, first_bytes: int = 4 << 20) -> gguf.Shard:
    """A GGUF file's header, read through a growing prefix (the weights never travel)."""
    n = first_bytes
    while True:
        try:
            return gguf.read_shard(reader.prefix(path, n))
        except gguf.NeedMoreBytes:
            if n >= size:
                raise gguf.NeedMoreBytes(f"truncated: the file ends inside its header, at byte {size:,}") from None
            if n >= 256 << 20:
                raise
            n *= 4


def gguf_found(stem: str, info: gguf.GGUFInfo, size: int) -> Found:
    """The card and variant a GGUF header describes; the name is the file's (or tag's) stem less its quantisation."""
    if not info.file_type:
        raise gguf.GGUFError("the header does not say its file type (general.file_type)")
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
        # A GGUF may carry a separate template for requests with tools (llama.cpp prefers it for them).
        tool_call_parser=toolcalls.infer(
            _text(info.metadata.get("tokenizer.chat_template.tool_use"))
            or _text(info.metadata.get("tokenizer.chat_template"))
        ),
    )


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def inspect_hf(path: str, reader: Reader) -> Found:
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
        size_gib=round(size / GIB, 4) or round(info.params * 2 / GIB, 4) or 0.0001,
        source=f"config.json ({info.arch_name}; parameters from {info.params_source})",
        tool_call_parser=toolcalls.infer(_hf_chat_template(path, files, reader), info.model_type),
    )


def _hf_chat_template(path: str, files: list[str], reader: Reader) -> str:
    """A Hugging Face directory's chat template: chat_template.jinja where there is one (transformers reads it before
    tokenizer_config.json's), else tokenizer_config.json's chat_template."""
    if "chat_template.jinja" in files:
        return reader.prefix(f"{path}/chat_template.jinja", 1 << 20).decode(errors="replace")
    if "tokenizer_config.json" in files:
        return hfconfig.chat_template(reader.prefix(f"{path}/tokenizer_config.json", 16 << 20).decode(errors="replace"))
    return ""


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
    changed: list[str] = field(default_factory=list)  # what differed on rows that were there: "variant size_gib"


@transaction.atomic
def add(
    found: Found,
    path: str,
    cluster: Cluster | None = None,
    name: str | None = None,
    ollama_tag: str = "",
    card_too: bool = True,
) -> Added:
    """Create or update the card, the variant and (with a cluster) its location; validated like admin input.

    An existing card is updated from the file unless card_too is False (a scan's second variant of a card it already
    filled); an ollama tag, where given, goes with the path on the location (a GGUF blob both runtimes serve)."""
    created: list[str] = []
    changed: list[str] = []
    card = ModelCard.objects.filter(name=name or found.name).first() or ModelCard(name=name or found.name)
    if card.pk is None:
        created.append(f"model card {card.name}")
    if card.pk is None or card_too:
        before = _values(card)
        card.family = found.family
        card.set_architecture(found.arch)
        if found.license and not card.license:  # an admin's own entry wins
            card.license = found.license
        if found.tool_call_parser and not card.tool_call_parser:
            card.tool_call_parser = found.tool_call_parser
        card.full_clean()
        _save(card, before, "model card", changed)
    try:
        quant = canonical_quant(found.quant)
    except KeyError:
        quant = found.quant  # the variant's validation names it
    variant = ModelVariant.objects.filter(model=card, quantization=quant).first()
    if variant is None:
        variant = ModelVariant(model=card, quantization=quant)
        created.append(f"variant {quant}")
    before = _values(variant)
    variant.format, variant.size_gib = found.format, found.size_gib
    variant.full_clean()
    _save(variant, before, "variant", changed)
    location = None
    if cluster is not None:
        location = VariantLocation.objects.filter(variant=variant, cluster=cluster).first()
        if location is None:
            location = VariantLocation(variant=variant, cluster=cluster)
            created.append(f"location on {cluster.slug}")
        before = _values(location)
        location.path = path
        location.ollama_tag = ollama_tag or location.ollama_tag
        location.full_clean()
        _save(location, before, "location", changed)
    return Added(card, variant, location, created, changed)


def _values(obj: models.Model) -> dict[str, object]:
    return {f.attname: getattr(obj, f.attname) for f in obj._meta.concrete_fields}


def _save(obj: models.Model, before: dict[str, object], what: str, changed: list[str]) -> None:
    """Write a new row, or an existing one where a field differs (naming those fields)."""
    existed = obj.pk is not None
    differs = [name for name, value in _values(obj).items() if before[name] != value]
    if not existed or differs:
        obj.save()
    if existed and differs:
        changed.append(f"{what} {', '.join(differs)}")


@dataclass(frozen=True)
class Located:
    """A model found on a cluster: what its header says, where it lives, and its ollama tag if an ollama store holds
    it."""

    found: Found
    path: str
    ollama_tag: str = ""

    def __str__(self) -> str:
        where = f"{self.path} (ollama {self.ollama_tag})" if self.ollama_tag else self.path
        return f"{self.found.name} {self.found.quant} ({self.found.format}, {self.found.size_gib:g} GiB) at {where}"


@dataclass(frozen=True)
class Outcome:
    status: str  # "added", "updated", "unchanged" or "skipped"
    what: str  # the model and where, or the path that was skipped
    detail: str = ""  # what was created or changed, or why it was skipped

    def __str__(self) -> str:
        return f"{self.status:<9} {self.what}" + (f": {self.detail}" if self.detail else "")


def add_all(located: list[Located], cluster: Cluster, dry_run: bool = False) -> list[Outcome]:
    """Add what a scan found, in one transaction (rolled back for a dry run).

    Each model is added whole or not at all: one that fails the catalog's validation is skipped with the reason and
    the rest go on. A card takes its architecture from the first of its models in the list, so that a card with a
    GGUF and a safetensors variant (whose headers count parameters a little differently) is unchanged by a rescan."""
    outcomes: list[Outcome] = []
    filled: set[str] = set()
    with transaction.atomic():
        for item in located:
            try:
                with transaction.atomic():
                    added = add(item.found, item.path, cluster, ollama_tag=item.ollama_tag,
                                card_too=item.found.name not in filled)  # fmt: skip
            except ValidationError as exc:
                outcomes.append(Outcome("skipped", str(item), text_of(exc)))
                continue
            filled.add(added.card.name)
            if added.created:
                outcomes.append(Outcome("added", str(item), ", ".join(added.created)))
            elif added.changed:
                outcomes.append(Outcome("updated", str(item), ", ".join(added.changed)))
            else:
                outcomes.append(Outcome("unchanged", str(item)))
        if dry_run:
            transaction.set_rollback(True)
    return outcomes
