"""A session's node-local copy of its weights, as its job reports it (staging.sh stage_model writes staging.json).

The report comes from the cluster: only known states, whole numbers and bounded paths are kept, and it is shown as
text (escaped), never as markup: jobs/templatetags/portal_format.py staging_line.
"""

from __future__ import annotations

from typing import Any

STATES = ("copying", "copied", "reused", "skipped")


def clean(raw: dict[str, object]) -> dict[str, Any] | None:
    """The report's known fields, checked; None for one that is not a staging report."""
    state = raw.get("state")
    if state not in STATES:
        return None
    numbers = {key: raw.get(key) for key in ("bytes", "total", "seconds")}
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers.values()):
        return None
    paths = {key: raw.get(key) for key in ("from", "to")}
    if not all(isinstance(p, str) for p in paths.values()):
        return None
    return {"state": state, **numbers, **{key: str(p)[:500] for key, p in paths.items()}}
