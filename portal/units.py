"""How sizes are written for people, the same on every page and command line."""

from __future__ import annotations


def gib_text(value: float | None) -> str:
    """GiB with sensible precision; small sizes in MiB or KiB so a tiny model does not read '0.00 GiB'."""
    if value is None:
        return "-"
    if value >= 10:
        return f"{value:.1f} GiB"
    if value >= 1:
        return f"{value:.2f} GiB"
    if value * 1024 >= 1:
        return f"{value * 1024:.1f} MiB"
    return f"{value * 1024 * 1024:.0f} KiB"
