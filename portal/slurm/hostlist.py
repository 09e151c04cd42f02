"""Slurm's hostlists: `node[1-3,7],gpu[01-02]` -> node1, node2, node3, node7, gpu01, gpu02.

Read as Slurm 22.05's `scontrol show hostnames` reads them (src/common/hostlist.c; tests/e2e/test_slurm_text.py
compares the two live), in its order and with its duplicates:

- names are separated by commas, spaces or tabs outside brackets; empty names are skipped (`n1,,n2`, `n1,`);
- a bracket holds comma-separated numbers and ranges `LO-HI`, zero-padded to LO's width (`n[08-11]`: n08..n11,
  `n[9-010]`: n9, n10), LO <= HI, at most 65,536 names a range (Slurm's MAX_RANGE);
- text may sit between brackets (`rack[1-2]-n[1-2]`), but nothing may follow the last one: Slurm 22.05 refuses
  `node[1-2]-ib` ("Invalid hostlist"), and prints a list of such names unbracketed (`node1-ib,node2-ib`);
- with several brackets the last varies fastest and the others are taken from the right: `a[1-2]b[3-4]c[5-6]` is
  a1b3c5 a1b3c6 a2b3c5 a2b3c6 a1b4c5 ... (Slurm expands the prefix's brackets right to left).

Stricter than Slurm where Slurm reads garbage without complaint: an unclosed or stray bracket (`n[1-2`, Slurm:
"n]"), a range with no upper end or with spaces or signs (`n[1-]`, `n[ 1-2]`, `n[+1]`) and control characters are
refused with SlurmParseError, never turned into host names.
"""

from __future__ import annotations

from portal.slurm.errors import SlurmParseError

SEPARATORS = frozenset(", \t")
MAX_RANGE = 64 * 1024  # Slurm's own limit on one range: "Too many hosts in range"
MAX_HOSTS = 1 << 20  # ours: a[1-65536]b[1-65536] would be four billion names
# How Slurm prints "no nodes": squeue's %N of a pending job, scontrol's (null), sacct's "None assigned".
NO_NODES = frozenset({"", "(null)", "None", "None assigned"})
_DIGITS_MAX = 64  # Slurm reads a range's ends as unsigned longs; longer digit strings are no node's number


def expand_hostlist(text: str) -> list[str]:
    """The host names of a Slurm hostlist, in Slurm's order; [] for Slurm's ways of printing no nodes. Raises
    SlurmParseError for what Slurm refuses and for the garbage it reads without complaint (see the module)."""
    text = text.strip()
    if text in NO_NODES:
        return []
    hosts: list[str] = []
    for token in _tokens(text):
        hosts += _expand(token, text)
        if len(hosts) > MAX_HOSTS:
            raise SlurmParseError(f"a hostlist of more than {MAX_HOSTS:,} names: {text[:200]!r}")
    return hosts


def _tokens(text: str) -> list[str]:
    """The names and bracketed expressions of a hostlist: separators inside brackets do not split."""
    tokens: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char in SEPARATORS and depth == 0:
            tokens.append("".join(current))
            current = []
            continue
        depth = depth + 1 if char == "[" else max(depth - 1, 0) if char == "]" else depth
        current.append(char)
    tokens.append("".join(current))
    return [token for token in tokens if token]


def _expand(token: str, text: str) -> list[str]:
    if any(not char.isprintable() for char in token):
        raise SlurmParseError(f"a control character in the hostlist {text[:200]!r}")
    open_at = token.rfind("[")
    if open_at < 0:
        if "]" in token:
            raise SlurmParseError(f"a stray ']' in the hostlist {text[:200]!r}")
        return [token]
    close_at = token.find("]", open_at)
    if close_at != len(token) - 1:
        # No "]" at all, or text after it: Slurm 22.05 refuses the latter and reads the former as garbage.
        raise SlurmParseError(f"not a Slurm hostlist (nothing may follow its last bracket): {text[:200]!r}")
    ranges = _ranges(token[open_at + 1 : close_at], text)
    prefixes = _prefixes(token[:open_at], text)
    per_prefix = sum(high - low + 1 for low, high, _ in ranges)
    if len(prefixes) * per_prefix > MAX_HOSTS:
        raise SlurmParseError(f"a hostlist of more than {MAX_HOSTS:,} names: {text[:200]!r}")
    return [
        f"{prefix}{number:0{width}d}"
        for prefix in prefixes
        for low, high, width in ranges
        for number in range(low, high + 1)
    ]


def _prefixes(prefix: str, text: str) -> list[str]:
    """The prefixes a bracketed prefix stands for (`r[1-2]-n` -> r1-n, r2-n), its last bracket varying slowest."""
    open_at = prefix.rfind("[")
    if open_at < 0:
        if "]" in prefix:
            raise SlurmParseError(f"a stray ']' in the hostlist {text[:200]!r}")
        return [prefix]
    close_at = prefix.find("]", open_at)
    head, tail = prefix[:open_at], prefix[close_at + 1 :]
    if close_at < 0 or "]" in tail:
        raise SlurmParseError(f"unbalanced brackets in the hostlist {text[:200]!r}")
    found: list[str] = []
    for low, high, width in _ranges(prefix[open_at + 1 : close_at], text):
        for number in range(low, high + 1):
            found += _prefixes(f"{head}{number:0{width}d}{tail}", text)
            if len(found) > MAX_HOSTS:
                raise SlurmParseError(f"a hostlist of more than {MAX_HOSTS:,} names: {text[:200]!r}")
    return found


def _ranges(body: str, text: str) -> list[tuple[int, int, int]]:
    """A bracket's numbers and ranges as (low, high, width): "1-3,07" -> (1, 3, 1), (7, 7, 2)."""
    found = []
    for part in body.split(","):
        low, dash, high = part.partition("-")
        if not _is_number(low) or (dash and not _is_number(high)):
            raise SlurmParseError(f"not a range of node numbers: {part!r} in {text[:200]!r}")
        first = int(low)
        last = int(high) if dash else first
        if first > last:
            raise SlurmParseError(f"a range that runs backwards: {part!r} in {text[:200]!r}")
        if last - first + 1 > MAX_RANGE:
            raise SlurmParseError(f"more than {MAX_RANGE:,} names in the range {part!r} of {text[:200]!r}")
        found.append((first, last, len(low)))
    return found


def _is_number(text: str) -> bool:
    # str.isdigit alone takes "²" and other digits int() reads differently or not at all.
    return 0 < len(text) <= _DIGITS_MAX and text.isascii() and text.isdigit()
