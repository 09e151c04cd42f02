"""The usage tables' columns, defined once: the pages, the CSV export and `manage.py usage` derive their headers,
cells and sort order from COLUMNS."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Protocol

from jobs.usage.figures import DIMENSIONS, MONTH, Row, Tally
from portal.csvsafe import safe_cell

KEY = "key"  # the sort name of a table's first column (the user, the model, the month, ...)


class Writer(Protocol):
    """Where CSV goes: an HttpResponse, a command's stdout."""

    def write(self, text: str, /) -> object: ...


@dataclass(frozen=True)
class Column:
    name: str  # Tally's attribute; the CSV's header and the pages' ?sort= value
    label: str
    digits: int  # decimals shown on the page and the command line (the CSV has three)
    help: str

    def value(self, tally: Tally) -> int | float | None:
        value: int | float | None = getattr(tally, self.name)
        return value

    def text(self, tally: Tally) -> str:
        value = self.value(tally)
        return "-" if value is None else f"{value:,.{self.digits}f}"

    def raw(self, tally: Tally) -> int | float | str:
        """The CSV's cell: whole numbers as they are, others to three decimals, nothing for no value."""
        value = self.value(tally)
        if value is None:
            return ""
        return value if isinstance(value, int) else round(value, 3)


COLUMNS = (
    Column("sessions", "Sessions", 0, "sessions whose Slurm job ran in the period (their GPU-hours are counted)"),
    Column("requests", "Requests", 0, "requests through the portal's chat and API"),
    Column("errors", "Errors", 0, "requests answered with a status of 400 or more"),
    Column("prompt_tokens", "Prompt tokens", 0, "tokens of the requests' prompts"),
    Column("completion_tokens", "Completion tokens", 0, "tokens the model generated in reply"),
    Column("batch_tokens", "Batch tokens", 0, "prompt and completion tokens of batch runs"),
    Column("ttft_p50_ms", "TTFT p50 (ms)", 0, "median time to the first token of a streamed reply"),
    Column("ttft_p95_ms", "TTFT p95 (ms)", 0, "time to the first token that 95% of streamed replies beat"),
    Column("tokens_per_s_p50", "Tokens/s p50", 1, "median generation speed of a reply"),
    Column("tokens_per_s_p95", "Tokens/s p95", 1, "generation speed that 5% of replies reached"),
    Column("gpu_hours", "GPU-h reserved", 2, "GPUs times the Slurm job's run time"),
    Column("traffic_gpu_hours", "GPU-h with traffic", 2, "GPUs times the 15-minute windows with a request"),
    Column("traffic_pct", "With traffic (%)", 0, "the share of the reserved GPU-hours that had traffic"),
)
BY_NAME = {column.name: column for column in COLUMNS}
SORTS = (KEY, *BY_NAME)


def key_label(by: str) -> str:
    return "Month" if by == MONTH else DIMENSIONS[by].label


def default_sort(by: str) -> tuple[str, bool]:
    """(column, descending): months in order, anything else the largest GPU-hours first."""
    return (KEY, False) if by == MONTH else ("gpu_hours", True)


def sort_rows(rows: list[Row], sort: str, descending: bool) -> list[Row]:
    """Rows by a column (or the key), rows without a value last either way, ties in the order of their keys."""
    rows = sorted(rows, key=lambda row: str(row.key))
    if sort == KEY:
        return sorted(rows, key=lambda row: str(row.key), reverse=descending)
    column = BY_NAME[sort]
    valued = [row for row in rows if column.value(row.tally) is not None]
    empty = [row for row in rows if column.value(row.tally) is None]
    return sorted(valued, key=lambda row: column.value(row.tally) or 0, reverse=descending) + empty


def cells(tally: Tally) -> list[str]:
    """A row's cells as the page and the command line show them."""
    return [column.text(tally) for column in COLUMNS]


def write_csv(out: Writer, by: str, rows: list[Row], total: Tally | None = None) -> None:
    """The table as CSV: the key's column named after what the rows are, then COLUMNS by name."""
    writer = csv.writer(out)
    writer.writerow([by, *BY_NAME])
    for row in rows:
        writer.writerow([safe_cell(str(row.key)), *(column.raw(row.tally) for column in COLUMNS)])
    if total is not None:
        writer.writerow(["(total)", *(column.raw(total) for column in COLUMNS)])


def text_table(by: str, rows: list[Row], total: Tally | None = None) -> list[str]:
    """The table as aligned text lines for a terminal."""
    body = [[str(row.key), *cells(row.tally)] for row in rows]
    if total is not None:
        body.append(["(total)", *cells(total)])
    header = [key_label(by), *(column.label for column in COLUMNS)]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = []
    for line in [header, *body]:
        first = line[0].ljust(widths[0])
        lines.append("  ".join([first, *(cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True))]))
    return lines
