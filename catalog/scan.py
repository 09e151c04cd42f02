"""Find the models under directories on a cluster and read each one's headers (never its weights).

`scan(paths, reader)` walks each path through a Reader (add_model: over SSH as a cluster account, or on this machine):

1. one listing per directory (names, kinds, sizes, links followed) in one round trip;
2. a directory holding manifests/ and blobs/ is an ollama store: each tag's manifest names its model blob, a GGUF;
   tags of the same blob are one model, the first tag in name order (other than `latest`) naming it;
3. a directory with config.json is a Hugging Face checkpoint (it needs safetensors weights, all of them);
4. GGUF files are models, a split set (llama.cpp's NAME-00001-of-00003.gguf) as one, at its first file;
5. subdirectories are walked to MAX_DEPTH below each path, hidden ones, ones reached twice (links) and ones past
   MAX_DIRS left out;
6. a link is followed only to what someone the scan already trusts there controls alone (LINK_RULE, below).

What cannot be a model, or is broken, is listed with the reason and left out; catalog.add_model.add_all adds the rest.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

from django.core.exceptions import ValidationError

from catalog import add_model, gguf, hfconfig
from catalog import validators as v
from catalog.add_model import Entry, Listing, Located, Outcome, Reader
from catalog.quant import canonical_quant
from portal import shellsafe
from portal.errors import text_of

MAX_DEPTH = 4  # directories below each scanned path
MAX_ENTRIES = 2000  # per directory; an ollama store's blobs/ may hold more
MAX_BLOBS = 20000
MAX_DIRS = 1000  # per scan
MAX_MANIFEST_BYTES = 1 << 20
SHARD_FIRST_BYTES = 64 << 10  # a split set's later files hold only their tensors' descriptions

# LINK_RULE. A link met in the walk (in a directory below a path given, or in the path itself) is followed only to a
# file or directory owned by root, by the account the scan reads as, or by the owner of the directory the link is in,
# and writable by neither its group nor others. Whoever planted a link could only have planted it where they may
# write; following it must not hand the catalog (whose locations every researcher's job loads) to anyone who could
# not already have put the files there: a lab member's link in a group-writable models folder to their own home, or
# to a world-writable scratch, is skipped with the reason. The paths given are the admin's choice and are not judged.
LINK_OWNERS_TRUSTED = "root, the scanning account or the directory's owner"
WRITABLE_BY_OTHERS = 0o022

# llama.cpp's split naming (gguf-split, llama_split_path): PREFIX-%05d-of-%05d.gguf.
SPLIT = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf\Z")
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_DIGEST = re.compile(r"^sha256[:-](?P<hex>[0-9a-f]{64})\Z")
# ollama shows its own registry's models without the host, and its library's without the namespace too.
OLLAMA_REGISTRY, OLLAMA_LIBRARY = "registry.ollama.ai", "library"


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Scan:
    models: list[Located] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def check_paths(paths: list[str]) -> list[str]:
    """The paths as the scan takes them: absolute, normalised, of the characters a location may hold."""
    checked = []
    for raw in paths:
        path = raw.strip()
        if not path:
            continue
        path = path.rstrip("/") or "/"
        try:
            v.absolute_path(path)
        except ValidationError as exc:
            raise ValidationError(f"{raw!r}: {text_of(exc)}") from None
        if posixpath.normpath(path) != path:
            raise ValidationError(f"{raw!r}: give the path without '.', '..' or '//' in it.")
        checked.append(path)
    if not checked:
        raise ValidationError("Give at least one directory to scan.")
    return checked


def scan(paths: list[str], reader: Reader) -> Scan:
    """What the paths hold; a model found twice (the same card and quantisation) is kept once, at its first place."""
    walker = _Walker(_Cached(reader))
    for path in check_paths(paths):
        walker.start(path)
    result = Scan(skipped=walker.skipped)
    first: dict[tuple[str, str], Located] = {}
    for item in walker.models:
        key = (item.found.name, _quant_key(item.found.quant))
        if key in first:
            result.skipped.append(Skipped(item.path, f"the same model and quantisation as {first[key].path}"))
            continue
        first[key] = item
        result.models.append(item)
    return result


def report(found: Scan, outcomes: list[Outcome]) -> tuple[list[Outcome], str]:
    """One line per model (what add_all did with it, then what the scan skipped) and a summary."""
    lines = [*outcomes, *(Outcome("skipped", s.path, s.reason) for s in found.skipped)]
    counts = Counter(line.status for line in lines)
    return lines, ", ".join(f"{counts[status]} {status}" for status in ("added", "updated", "unchanged", "skipped"))


def _quant_key(quant: str) -> str:
    try:
        return canonical_quant(quant)
    except KeyError:
        return quant


class _Cached:
    """The reader, answering sizes, kinds and names from the listings already made, and prefixes already read: the
    Hugging Face reader (add_model.inspect_hf) asks for them one at a time."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.listings: dict[str, tuple[Listing, dict[str, Entry]]] = {}
        self.prefixes: dict[str, tuple[int, bytes]] = {}
        self.refused: list[Skipped] = []  # links not followed (LINK_RULE), for the walker to report
        self._uid: int | None = None

    def account_uid(self) -> int:
        if self._uid is None:
            self._uid = self.reader.account_uid()
        return self._uid

    def listing(self, path: str, limit: int) -> Listing:
        """The reader's listing, less the links LINK_RULE does not follow: nothing in the scan sees those."""
        if path not in self.listings:
            listing = self.reader.listing(path, limit)
            trusted = {0, self.account_uid(), listing.entry.uid}
            children = []
            for entry in listing.children:
                why = _unfollowed(entry, trusted)
                if not why:
                    children.append(entry)
                elif not entry.name.startswith("."):  # hidden ones are left out anyway
                    self.refused.append(Skipped(_join(path, entry.name), why))
            listing = replace(listing, children=children)
            self.listings[path] = listing, {e.name: e for e in listing.children}
        return self.listings[path][0]

    def _entry(self, path: str) -> Entry | None:
        parent, name = posixpath.split(path)
        listed = self.listings.get(parent)
        return listed[1].get(name) if listed else None

    def prefix(self, path: str, n: int) -> bytes:
        asked, data = self.prefixes.get(path, (0, b""))
        if n > asked and len(data) == asked:  # more than was read, and the file did not end there
            asked, data = n, self.reader.prefix(path, n)
            self.prefixes[path] = asked, data
        return data[:n]

    def size(self, path: str) -> int:
        entry = self._entry(path)
        return entry.size if entry else self.reader.size(path)

    def is_dir(self, path: str) -> bool:
        entry = self._entry(path)
        return entry.kind == "dir" if entry else self.reader.is_dir(path)

    def listdir(self, path: str) -> list[str]:
        listed = self.listings.get(path)
        return [e.name for e in listed[0].children] if listed else self.reader.listdir(path)


class _Walker:
    def __init__(self, reader: _Cached) -> None:
        self.reader = reader
        self.models: list[Located] = []
        self.skipped: list[Skipped] = []
        self.seen: set[str] = set()  # device:inode of the directories listed
        self.dirs = 0

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append(Skipped(path, reason))

    def listing(self, path: str, limit: int = MAX_ENTRIES) -> Listing | None:
        try:
            return self.reader.listing(path, limit)
        except OSError as exc:
            self.skip(path, f"cannot read it: {exc}")
            return None
        finally:
            self.skipped += self.reader.refused
            self.reader.refused.clear()

    def guarded(self, path: str, inspect: Callable[[], Located | None]) -> None:
        """One model: found whole, or skipped with the reason."""
        try:
            found = inspect()
        except ValidationError as exc:
            self.skip(path, text_of(exc))
        except OSError as exc:
            self.skip(path, f"cannot read it: {exc}")
        except ValueError as exc:  # GGUFError, HFConfigError, JSON and UTF-8 errors
            self.skip(path, str(exc))
        else:
            if found is not None:
                self.models.append(found)

    def start(self, path: str) -> None:
        listing = self.listing(path)
        if listing is None:
            return
        if listing.entry.kind == "dir":
            if listing.entry.inode in self.seen:
                self.skip(path, "scanned already (through another path)")
                return
            self.directory(path, listing, 0)
        elif listing.entry.kind == "file" and path.endswith(".gguf"):
            parent, name = posixpath.split(path)
            match = SPLIT.match(name)
            if match is None:
                self.gguf_files(parent, [listing.entry])
                return
            siblings = self.listing(parent)  # the rest of its set
            if siblings is not None:
                same = [e for e in siblings.children if (m := SPLIT.match(e.name)) and m["stem"] == match["stem"]
                        and m["count"] == match["count"]]  # fmt: skip
                self.gguf_files(parent, same)
        else:
            self.skip(path, "not a GGUF file nor a directory")

    def directory(self, path: str, listing: Listing, depth: int) -> None:
        self.seen.add(listing.entry.inode)
        self.dirs += 1
        for problem in listing.problems:
            self.skip(path, problem)
        if listing.truncated:
            self.skip(path, f"more than {MAX_ENTRIES} entries: only the first {MAX_ENTRIES} were looked at")
        children = {e.name: e for e in listing.children if not e.name.startswith(".")}
        kinds = {name: e.kind for name, e in children.items()}
        if kinds.get("manifests") == "dir" and kinds.get("blobs") == "dir":
            self.ollama_store(path)
            return
        if kinds.get("config.json") == "file":
            self.guarded(path, partial(self.hf_directory, path, children))
            self.reader.prefixes.clear()
        self.gguf_files(path, [e for e in children.values() if e.name.endswith(".gguf")])
        for entry in children.values():
            sub = _join(path, entry.name)
            if entry.kind != "dir" or entry.inode in self.seen:
                continue
            if not shellsafe.FILE_NAME.accepts(entry.name):
                self.skip(sub, "not scanned: its name has characters other than letters, digits and '_ . + @ -'")
            elif depth >= MAX_DEPTH:
                self.skip(sub, f"not scanned: deeper than {MAX_DEPTH} directories below the path given")
            elif self.dirs >= MAX_DIRS:
                self.skip(sub, f"not scanned: a scan stops after {MAX_DIRS} directories")
            elif (sub_listing := self.listing(sub)) is not None and sub_listing.entry.inode not in self.seen:
                self.directory(sub, sub_listing, depth + 1)

    # --- GGUF files ---------------------------------------------------------------------------------------------

    def gguf_files(self, directory: str, entries: list[Entry]) -> None:
        """Each file a model, each split set one (in the order of its first file)."""
        units: list[tuple[str, Entry | tuple[str, int]]] = []
        sets: dict[tuple[str, int], dict[int, Entry]] = {}
        for entry in sorted(entries, key=lambda e: e.name):
            path = _join(directory, entry.name)
            if not shellsafe.FILE_NAME.accepts(entry.name):
                self.skip(path, "its name has characters other than letters, digits and '_ . + @ -'")
            elif entry.kind != "file":
                self.skip(path, "not a file (a link to nothing?)")
            elif match := SPLIT.match(entry.name):
                key = (match["stem"], int(match["count"]))
                if key not in sets:
                    sets[key] = {}
                    units.append((path, key))
                sets[key][int(match["no"])] = entry
            else:
                units.append((path, entry))
        for path, unit in units:
            if isinstance(unit, Entry):
                self.guarded(path, partial(self.single_gguf, path, unit))
            else:
                self.guarded(path, partial(self.split_gguf, directory, *unit, sets[unit]))

    def single_gguf(self, path: str, entry: Entry) -> Located:
        shard = self.read_gguf(path, entry)
        count = shard.metadata.get("split.count")
        if isinstance(count, int) and count > 1:
            raise gguf.GGUFError(
                f"one file of a model split in {count} (split.count), not named like one "
                f"(NAME-00001-of-{count:05d}.gguf)"
            )
        stem = posixpath.basename(path).removesuffix(".gguf")
        return Located(add_model.gguf_found(stem, gguf.combine([shard]), entry.size), path)

    def split_gguf(self, directory: str, stem: str, count: int, shards: dict[int, Entry]) -> Located:
        missing = [f"{n:05d}" for n in range(1, count + 1) if n not in shards]
        if missing:
            raise gguf.GGUFError(f"shards {', '.join(missing)} of {count:05d} are missing")
        read = []
        for n in range(1, count + 1):
            path = _join(directory, f"{stem}-{n:05d}-of-{count:05d}.gguf")
            shard = self.read_gguf(path, shards[n], 4 << 20 if n == 1 else SHARD_FIRST_BYTES, f"shard {n:05d}: ")
            said = (shard.metadata.get("split.no"), shard.metadata.get("split.count"))
            if said != (n - 1, count):
                raise gguf.GGUFError(f"shard {n:05d}'s header says split.no {said[0]} of split.count {said[1]}")
            read.append(shard)
        tensors = read[0].metadata.get("split.tensors.count")
        if isinstance(tensors, int) and tensors != sum(s.tensors for s in read):
            raise gguf.GGUFError(f"the shards hold {sum(s.tensors for s in read)} tensors, the first says {tensors}")
        size = sum(e.size for e in shards.values())
        first = _join(directory, f"{stem}-00001-of-{count:05d}.gguf")
        return Located(add_model.gguf_found(stem, gguf.combine(read), size), first)

    def read_gguf(self, path: str, entry: Entry, first_bytes: int = 4 << 20, what: str = "") -> gguf.Shard:
        try:
            # Straight from the reader: a GGUF's header is read once, and a few MB of it are not worth keeping.
            shard = add_model.read_gguf(self.reader.reader, path, entry.size, first_bytes)
        except gguf.GGUFError as exc:
            raise gguf.GGUFError(f"{what}{exc}") from None
        if entry.size < shard.data_end:
            raise gguf.GGUFError(
                f"{what}truncated: {entry.size:,} bytes, where its header's tensors end at byte {shard.data_end:,}"
            )
        return shard

    # --- Hugging Face directories -------------------------------------------------------------------------------

    def hf_directory(self, path: str, children: dict[str, Entry]) -> Located:
        weights = [e for name, e in children.items() if name.endswith(".safetensors")]
        if not weights:
            other = next((n for n in children if n.endswith((".bin", ".pt", ".pth"))), "")
            raise hfconfig.HFConfigError(
                "config.json but no safetensors weights" + (f" ({other} is not safetensors)" if other else "")
            )
        for entry in weights:
            if entry.kind != "file":
                raise hfconfig.HFConfigError(f"{entry.name} is not a file (a link to nothing?)")
        if "model.safetensors.index.json" in children:
            index = self.reader.prefix(_join(path, "model.safetensors.index.json"), 16 << 20)
            try:
                needed = set(json.loads(index)["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError):
                raise hfconfig.HFConfigError("model.safetensors.index.json has no weight_map") from None
            missing = sorted(str(name) for name in needed - set(children))
            if missing:
                raise hfconfig.HFConfigError(f"weight files named in the index are missing: {', '.join(missing[:3])}")
        found = add_model.inspect_hf(path, self.reader)
        for entry in weights:
            self.check_safetensors(_join(path, entry.name), entry)
        parent, grandparent = posixpath.split(posixpath.dirname(path)), posixpath.dirname(posixpath.dirname(path))
        if parent[1] == "snapshots" and posixpath.basename(grandparent).startswith("models--"):
            # The Hugging Face cache: models--ORG--NAME/snapshots/REVISION/ is NAME.
            found = replace(found, name=posixpath.basename(grandparent).split("--")[-1])
        return Located(found, path)

    def check_safetensors(self, path: str, entry: Entry) -> None:
        """A weights file is at least as long as its header says (read already, for the parameter count)."""
        head = self.reader.prefix(path, 8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        header = hfconfig.safetensors_header(self.reader.prefix(path, 8 + min(length, 100 << 20)))
        ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__" and isinstance(t, dict)]
        if entry.size < 8 + length + max(ends, default=0):
            raise hfconfig.HFConfigError(
                f"{entry.name} is truncated: {entry.size:,} bytes, its header says {8 + length + max(ends):,}"
            )

    # --- ollama stores ------------------------------------------------------------------------------------------

    def ollama_store(self, store: str) -> None:
        blobs = self.listing(_join(store, "blobs"), MAX_BLOBS)
        if blobs is None:
            return
        manifests: list[tuple[list[str], str, Entry]] = []
        self.manifests(_join(store, "manifests"), [], manifests)

        def order(item: tuple[list[str], str, Entry]) -> tuple[list[str], bool, str]:
            return item[0][:3], item[0][3] == "latest", item[0][3]

        blob_entries = {e.name: e for e in blobs.children}
        tags: dict[str, str] = {}  # blob digest -> the tag that named it
        for parts, path, entry in sorted(manifests, key=order):
            self.guarded(path, partial(self.ollama_model, store, parts, path, entry, blob_entries, tags))

    def manifests(self, directory: str, parts: list[str], found: list[tuple[list[str], str, Entry]]) -> None:
        """manifests/REGISTRY/NAMESPACE/MODEL/TAG, one listing per directory."""
        listing = self.listing(directory)
        if listing is None:
            return
        for entry in listing.children:
            path = _join(directory, entry.name)
            if entry.name.startswith("."):
                continue
            if not shellsafe.FILE_NAME.accepts(entry.name):
                self.skip(path, "its name has characters other than letters, digits and '_ . + @ -'")
            elif len(parts) == 3 and entry.kind == "file":
                found.append(([*parts, entry.name], path, entry))
            elif len(parts) < 3 and entry.kind == "dir":
                self.manifests(path, [*parts, entry.name], found)

    def ollama_model(
        self, store: str, parts: list[str], path: str, entry: Entry, blobs: dict[str, Entry], tags: dict[str, str]
    ) -> Located | None:
        registry, namespace, model, tag_part = parts
        tag = f"{model}:{tag_part}"
        if namespace != OLLAMA_LIBRARY or registry != OLLAMA_REGISTRY:
            tag = f"{namespace}/{tag}" if registry == OLLAMA_REGISTRY else f"{registry}/{namespace}/{tag}"
        if entry.size > MAX_MANIFEST_BYTES:
            raise ValueError("too large for a manifest")
        try:
            manifest = json.loads(self.reader.prefix(path, MAX_MANIFEST_BYTES))
        except ValueError:
            raise ValueError("the manifest is not JSON") from None
        layers = manifest.get("layers") if isinstance(manifest, dict) else None
        chosen = [
            layer for layer in layers or [] if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_LAYER
        ]
        if len(chosen) != 1:
            raise ValueError(
                f"the manifest names {'no' if not chosen else 'several'} model layers ({OLLAMA_MODEL_LAYER})"
            )
        match = OLLAMA_DIGEST.match(str(chosen[0].get("digest")))
        if match is None:
            raise ValueError(f"the model layer's digest {chosen[0].get('digest')!r} is not a sha256 digest")
        name = f"sha256-{match['hex']}"
        blob = blobs.get(name)
        if blob is None or blob.kind != "file":
            raise ValueError(f"its model blob {name} is missing from {store}/blobs")
        declared = chosen[0].get("size")
        if isinstance(declared, int) and blob.size < declared:
            raise ValueError(f"its model blob {name} is truncated: {blob.size:,} of {declared:,} bytes")
        if match["hex"] in tags:
            raise ValueError(f"the same weights as {tags[match['hex']]}")
        try:
            v.ollama_tag(tag)
        except ValidationError:
            raise ValueError(f"{tag} is not a tag the catalog takes (lowercase names, then ':' and the tag)") from None
        blob_path = _join(store, f"blobs/{name}")
        shard = self.read_gguf(blob_path, blob, what="its model blob: ")
        count = shard.metadata.get("split.count")
        if isinstance(count, int) and count > 1:
            raise gguf.GGUFError(f"its model blob is one file of a model split in {count}")
        stem = model if tag_part == "latest" else f"{model}-{tag_part}"
        tags[match["hex"]] = tag
        return Located(add_model.gguf_found(stem, gguf.combine([shard]), blob.size), blob_path, tag)


def _unfollowed(entry: Entry, trusted: set[int]) -> str:
    """Why the walk does not follow this entry (LINK_RULE), or "" where it may."""
    if not entry.link or entry.kind not in ("dir", "file"):
        return ""
    what = "directory" if entry.kind == "dir" else "file"
    if entry.uid not in trusted:
        return f"not followed: a link to a {what} of uid {entry.uid} (not {LINK_OWNERS_TRUSTED})"
    if entry.mode & WRITABLE_BY_OTHERS:
        return f"not followed: a link to a {what} its group or others can write (mode {entry.mode:o})"
    return ""


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"
