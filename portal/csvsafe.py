"""THE defusing of CSV cells a spreadsheet would run, for every CSV the portal writes (the usage tables, a batch
run's results). Plain Python."""

from __future__ import annotations

from typing import Any

# What a spreadsheet reads as the start of a formula: = + - @, and a tab or carriage return, which some strip
# before looking (OWASP's list against CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """A cell that a spreadsheet will not run: text starting with one of FORMULA_STARTS gets a leading quote, which
    the spreadsheet shows as text; anything else (numbers too) as it is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
