from __future__ import annotations

from typing import Any

from django import template

from portal.units import gib_text

register = template.Library()
GIB = 1024**3


@register.filter
def gib(value: float | None) -> str:
    return gib_text(value)


@register.filter
def staging_line(report: dict[str, Any] | None) -> str:
    """A session's staging report (LLMSession.staging, checked by jobs/sessions/staging.py) as one line: what
    staging did or is doing; empty when nothing was staged."""
    if not report:
        return ""
    state, to = report.get("state"), report.get("to", "")
    total, done, seconds = report.get("total", 0), report.get("bytes", 0), report.get("seconds", 0)
    if state == "copying":
        share = f" ({100 * done // total} %)" if total else ""
        return f"copying the model to node-local storage: {gib(done / GIB)} of {gib(total / GIB)}{share}, {seconds} s"
    if state == "copied":
        return f"copied the model ({gib(total / GIB)}) to node-local storage in {seconds} s: {to}"
    if state == "reused":
        return f"reused the node-local copy of the model in {to}"
    if state == "skipped":
        return "not staged (see the log): the model loads from where it lives"
    return ""
