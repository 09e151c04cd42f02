"""What a usage figure read from the summaries, remembered in this process while the summaries stay as they were.

The summaries (UsageRollup, UsageWindow) change when rollups.summarise rebuilds them, and every run that does gives
the watermark a new revision (jobs.models.UsageWatermark.revision). So an answer read from them is right for as long
as the revision is the one it was read under, provided its key also holds everything else the query read (the
period's units, the sessions it joined and their runs, whose scope). Everything read from the raw rows and the sessions
is read anew each time: a page is still live to the second.

In memory, per process: nothing to serialise, and nothing another process could get wrong. A new revision forgets
everything kept under the old one; at most SIZE answers are kept, the least recently used going first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

SIZE = 64  # answers kept: a few per page and period asked for

_kept: OrderedDict[Hashable, Any] = OrderedDict()
_revision = ""
_lock = threading.Lock()


def kept(revision: str, key: Hashable) -> Any:
    """What was kept under `key` while the summaries are at `revision`; None when nothing was."""
    global _revision
    if not revision:
        return None
    with _lock:
        if revision != _revision:
            _kept.clear()
            _revision = revision
            return None
        if key not in _kept:
            return None
        _kept.move_to_end(key)
        return _kept[key]


def keep(revision: str, key: Hashable, answer: Any) -> None:
    """Keep an answer read under `revision` ("" before the summaries' first run: nothing is kept). It is shared by
    every later caller: it must never be changed (tuples, not lists)."""
    global _revision
    if not revision:
        return
    with _lock:
        if revision != _revision:
            _kept.clear()
            _revision = revision
        _kept[key] = answer
        while len(_kept) > SIZE:
            _kept.popitem(last=False)


def remembered(revision: str, key: Hashable, read: Callable[[], T]) -> T:
    """read()'s answer, kept under `key` while the summaries are at `revision` (keep)."""
    found: T | None = kept(revision, key)
    if found is None:
        found = read()
        keep(revision, key, found)
    return found


def forget() -> None:
    """Keep nothing (tests that change the summaries behind the revision's back)."""
    global _revision
    with _lock:
        _kept.clear()
        _revision = ""
