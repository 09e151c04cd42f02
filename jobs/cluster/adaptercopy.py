"""A fine-tune run's adapter copied into another cluster user's home (docs/finetune.md, sharing): the cluster side.
Python's standard library only (3.8 and up: a login host's python3, as the gate's); jobs/cluster/remote.py puts this
program's text into the two verbs that run it (ADAPTER_MANIFEST on the run's account, ADAPTER_RECEIVE on the
grantee's), so it is one definition of what a copy holds and how it is summed.

    python3 -c PROGRAM recorded DEST
        prints the checksum of the copy in DEST, if there is one.
    python3 -c PROGRAM manifest DIR ADAPTER_DIR ADAPTER_GGUF
        prints "BYTES SHA256": the adapter's files in DIR (ADAPTER_DIR's tree and the GGUF beside it, if any), their
        total size and the checksum of their names and contents (`manifest`); prints nothing when there is no adapter.
    python3 -c PROGRAM receive DEST SHA256 MAX_KIB ADAPTER_DIR ADAPTER_GGUF <TAR.GZ
        unpacks the tar on standard input into DEST (made whole in a temporary directory beside it, then renamed), if
        its files sum to SHA256; prints "present" when DEST already holds that copy, "copied" when it does now.

The tar comes from another cluster user's home, whose owner can put anything there: only plain files and directories
under ADAPTER_DIR (and the GGUF), names of plain characters without `.` or `..` parts, at most MAX_KIB KiB in all, are
unpacked; anything else refuses the whole copy (exit 3, the reason on standard error), and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from typing import IO, cast

REFUSED = 3  # the copy cannot be made as it is: trying again changes nothing
SUM_FILE = "copy.sha256"  # beside the copy's files in DEST: what the copy holds (no member can have this name)
PART = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,254}\Z")  # a name's part: no dot first, so no "." or ".."
HEADER_SLACK = 16 << 20  # tar headers and padding beyond the files' own bytes
CHUNK = 1 << 20
STALE_S = 86400.0  # a temporary directory this old belongs to no copy in progress


class Refused(Exception):
    """The copy cannot be made; the message says why."""


def _files(root: str, adapter_dir: str, gguf: str) -> list[str]:
    """The adapter's files under root, relative, sorted by their bytes; Refused for anything but plain files and
    directories (a link could point anywhere in the owner's home)."""
    found = []
    gguf_path = os.path.join(root, gguf)
    if os.path.lexists(gguf_path):
        if os.path.islink(gguf_path) or not os.path.isfile(gguf_path):
            raise Refused(f"{gguf} is not a plain file")
        found.append(gguf)
    for folder, dirs, names in os.walk(os.path.join(root, adapter_dir)):
        for name in dirs + names:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            if os.path.islink(path) or not (os.path.isdir(path) or os.path.isfile(path)):
                raise Refused(f"{relative} is not a plain file or directory")
            if os.path.isfile(path):
                found.append(relative)
    return sorted(found, key=lambda name: name.encode("utf-8", "surrogateescape"))


def manifest(root: str, adapter_dir: str, gguf: str) -> tuple[int, str]:
    """The adapter's total size in bytes and its checksum: SHA-256 over a line "SHA256 SIZE NAME" for each file, in
    the order of their names' bytes. Names are checked as a copy's are (check_name), so both sides read them alike."""
    total, digest = 0, hashlib.sha256()
    for name in _files(root, adapter_dir, gguf):
        check_name(name, adapter_dir, gguf)
        file_sum, size = hashlib.sha256(), 0
        with open(os.path.join(root, name), "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                file_sum.update(chunk)
                size += len(chunk)
        total += size
        digest.update(f"{file_sum.hexdigest()} {size} {name}\n".encode())
    return total, digest.hexdigest()


def check_name(name: str, adapter_dir: str, gguf: str) -> list[str]:
    """A member's name as its parts; Refused unless it is the GGUF, the adapter directory or a path under it, each
    part of plain characters (no "", ".", "..", no slash first, no backslash, no control character)."""
    parts = name.split("/")
    if name != gguf and parts[0] != adapter_dir:
        raise Refused(f"{name[:200]!r} is not part of an adapter")
    if not all(PART.match(part) for part in parts):
        raise Refused(f"{name[:200]!r} is not a plain relative name")
    return parts


class _Bounded:
    """A stream that stops the copy once more than `limit` bytes came through it (a gzip that unpacks to far more
    than the adapter's files: a bomb)."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.stream, self.limit, self.count = stream, limit, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        if self.count > self.limit:
            raise Refused(f"the adapter's archive unpacks to more than {self.limit} bytes")
        return data


def _unpack(stream: IO[bytes], into: str, max_bytes: int, adapter_dir: str, gguf: str) -> None:
    """Each member of the tar.gz on `stream` into the directory `into`, checked first (check_name, its kind, the
    running total); files 0600, directories 0700, opened so that nothing already there is followed or replaced."""
    total = 0
    unpacked = _Bounded(cast(IO[bytes], gzip.GzipFile(fileobj=stream, mode="rb")), max_bytes + HEADER_SLACK)
    with tarfile.open(fileobj=cast(IO[bytes], unpacked), mode="r|") as archive:
        for member in archive:
            parts = check_name(member.name.rstrip("/") if member.isdir() else member.name, adapter_dir, gguf)
            target = os.path.join(into, *parts)
            if member.isdir():
                os.makedirs(target, mode=0o700, exist_ok=True)
                continue
            if not member.isreg():
                raise Refused(f"{member.name[:200]!r} is not a plain file (a link or a device)")
            total += member.size
            if total > max_bytes:
                raise Refused(f"the adapter is larger than {max_bytes} bytes")
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            source = archive.extractfile(member)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            with os.fdopen(os.open(target, flags, 0o600), "wb") as out:
                if source is not None:
                    shutil.copyfileobj(source, out, CHUNK)


def _recorded(dest: str) -> str:
    try:
        with open(os.path.join(dest, SUM_FILE)) as f:
            return f.read(100).strip()
    except OSError:
        return ""


def _sweep(parent: str, older_than_s: float = STALE_S) -> None:
    """Remove what copies cut short left (their process killed with its SSH connection): temporary directories
    older than any copy takes, so never one a copy in progress still fills."""
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith((".incoming-", ".old-")) and not os.path.islink(path):
            with contextlib.suppress(OSError):
                if time.time() - os.lstat(path).st_mtime > older_than_s:
                    shutil.rmtree(path, ignore_errors=True)


def receive(stream: IO[bytes], dest: str, expected: str, max_bytes: int, adapter_dir: str, gguf: str) -> str:
    """The adapter on `stream` (tar.gz) as DEST: "present" when DEST holds this copy already, else "copied".

    1. A copy whose recorded checksum is `expected` is kept. 2. The tar is unpacked into a new 0700 directory beside
    DEST (_unpack). 3. Its files must sum to `expected` (what the run's side summed: nothing was lost or added on the
    way). 4. The checksum is recorded and the directory renamed to DEST in one step, an older copy moved aside first
    and removed after. Any failure removes what was unpacked."""
    if _recorded(dest) == expected:
        return "present"
    parent = os.path.dirname(dest)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    os.chmod(parent, 0o700)
    _sweep(parent)
    incoming = tempfile.mkdtemp(prefix=".incoming-", dir=parent)  # 0700
    try:
        _unpack(stream, incoming, max_bytes, adapter_dir, gguf)
        if not os.path.isdir(os.path.join(incoming, adapter_dir)):
            raise Refused(f"the archive has no {adapter_dir}/")
        _size, found = manifest(incoming, adapter_dir, gguf)
        if found != expected:
            raise Refused("the adapter's files differ from what its run's directory holds (changed while copied?)")
        with open(os.path.join(incoming, SUM_FILE), "w") as f:
            f.write(expected + "\n")
        old = ""
        if os.path.lexists(dest):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.rename(dest, os.path.join(old, "copy"))
        try:
            os.rename(incoming, dest)
        except OSError:
            if _recorded(dest) == expected:  # another copy of the same adapter got there first
                return "present"
            raise
        finally:
            if old:
                shutil.rmtree(old, ignore_errors=True)
        incoming = ""
        return "copied"
    finally:
        if incoming:
            shutil.rmtree(incoming, ignore_errors=True)


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 4 and argv[0] == "manifest":
            root, adapter_dir, gguf = argv[1:]
            if os.path.isdir(os.path.join(root, adapter_dir)):
                size, digest = manifest(root, adapter_dir, gguf)
                print(size, digest)
            return 0
        if len(argv) == 2 and argv[0] == "recorded":
            print(_recorded(argv[1]))
            return 0
        if len(argv) == 6 and argv[0] == "receive":
            dest, expected, max_kib, adapter_dir, gguf = argv[1:]
            if not re.match(r"[0-9a-f]{64}\Z", expected) or not (max_kib.isascii() and max_kib.isdigit()):
                raise Refused("bad arguments")
            print(receive(sys.stdin.buffer, dest, expected, int(max_kib) * 1024, adapter_dir, gguf))
            return 0
    except (Refused, tarfile.TarError, gzip.BadGzipFile, EOFError, OSError, UnicodeError) as exc:
        sys.stderr.write(f"the adapter cannot be copied: {exc}\n")
        return REFUSED
    sys.stderr.write(
        "usage: manifest DIR ADAPTER_DIR GGUF | recorded DEST | receive DEST SHA256 MAX_KIB ADAPTER_DIR GGUF\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
