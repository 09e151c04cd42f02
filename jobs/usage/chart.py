"""A daily chart as inline SVG, drawn on the server (no JavaScript library): stacked bars against the left axis,
lines against the right one, dates along the bottom and a legend. Every text is escaped; the chart has a <title> and a
<desc> with the totals for screen readers, and each day a tooltip; no days, or one, still draw a readable chart."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from html import escape

from django.utils.safestring import SafeString, mark_safe

WIDTH, HEIGHT = 720, 250
LEFT, RIGHT, TOP, BOTTOM = 60, 60, 14, 50  # room for the axes' labels, the dates and the legend
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
MAX_DATE_LABELS = 7
MAX_MARKERS = 31  # points up to which each point of a line gets a dot
MAX_BAR_W = 36


@dataclass(frozen=True)
class Series:
    label: str
    values: Sequence[float]
    colour: str
    dashed: bool = False


def nice_step(value: float, ticks: int = 4) -> float:
    """A round step (1, 2 or 5 times a power of ten) that covers `value` in about `ticks` steps."""
    raw = value / ticks
    if raw <= 0:  # nothing to show, or so little that dividing it underflows to 0
        return 1.0
    power: float = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if raw <= m * power)


def compact(value: float) -> str:
    """1200 -> 1.2k, 3000000 -> 3M, 0.5 -> 0.5."""
    for suffix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{round(value / size, 2):g}{suffix}"
    return f"{round(value, 3):g}"


def _number(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.2f}"


def _axes(bar_max: float, line_max: float) -> tuple[int, float, float]:
    """(ticks, bar step, line step): both axes share the grid lines, each with round steps."""
    bar_step = nice_step(bar_max)
    ticks = min(4, max(2, math.ceil(bar_max / bar_step - 1e-9)))
    return ticks, bar_step, nice_step(line_max, ticks)


def _day(day: date, long: bool) -> str:
    return f"{day:%b} {day.year}" if long else f"{day:%b} {day.day}"


def svg(
    days: Sequence[date],
    bars: Sequence[Series],
    lines: Sequence[Series],
    *,
    title: str,
    bar_unit: str,
    line_unit: str,
    step: str = "day",
    chart_id: str = "usage-chart",
) -> SafeString:
    """The chart's markup: `bars` stacked per day (or per `step`: "week", each of `days` its Monday) in the order
    given, `lines` over them on their own axis."""
    n = len(days)
    totals = [sum(s.values[i] for s in bars) for i in range(n)]
    line_values = [v for s in lines for v in s.values[:n]]
    ticks, bar_step, line_step = _axes(max(totals, default=0.0), max(line_values, default=0.0))
    bar_top, line_top = bar_step * ticks, line_step * ticks
    band = PLOT_W / max(n, 1)
    bar_w = min(max(band * 0.8, 0.6), MAX_BAR_W)

    def y(value: float, top: float) -> float:
        return TOP + PLOT_H - PLOT_H * value / top

    totals_text = "; ".join(f"{s.label}: {_number(sum(s.values[:n]))}" for s in [*bars, *lines])
    span = f"{days[0]:%Y-%m-%d} to {days[-1]:%Y-%m-%d}" if n else "no days"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" '
        f'aria-label="{escape(title)}" aria-labelledby="{chart_id}-title {chart_id}-desc" '
        f'font-family="system-ui, sans-serif" font-size="11">',
        f'<title id="{chart_id}-title">{escape(title)}</title>',
        f'<desc id="{chart_id}-desc">{escape(f"{span}. Totals: {totals_text}.")}</desc>',
    ]
    # Grid and both axes' labels.
    for i in range(ticks + 1):
        at = y(bar_step * i, bar_top)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{at:.1f}" y2="{at:.1f}" stroke="#dde1e7"/>')
        out.append(f'<text x="{LEFT - 6}" y="{at + 4:.1f}" text-anchor="end">{compact(bar_step * i)}</text>')
        if lines:
            out.append(f'<text x="{LEFT + PLOT_W + 6}" y="{at + 4:.1f}">{compact(line_step * i)}</text>')
    out.append(
        f'<text transform="translate(14 {TOP + PLOT_H / 2:.0f}) rotate(-90)" text-anchor="middle">'
        f"{escape(bar_unit)}</text>"
    )
    if lines:
        out.append(
            f'<text transform="translate({WIDTH - 8} {TOP + PLOT_H / 2:.0f}) rotate(90)" text-anchor="middle">'
            f"{escape(line_unit)}</text>"
        )
    # The bars, one group per day with its tooltip.
    for i, day in enumerate(days):
        if not totals[i] and not any(s.values[i] for s in lines):
            continue
        parts = [f"{s.label} {_number(s.values[i])}" for s in [*bars, *lines]]
        when = f"{day:%Y-%m-%d}" if step == "day" else f"{step} of {day:%Y-%m-%d}"
        out.append(f"<g><title>{escape(when + ': ' + ', '.join(parts))}</title>")
        base = 0.0
        x = LEFT + i * band + (band - bar_w) / 2
        for s in bars:
            if s.values[i] > 0:
                top, bottom = y(base + s.values[i], bar_top), y(base, bar_top)
                out.append(
                    f'<rect x="{x:.2f}" y="{top:.2f}" width="{bar_w:.2f}" height="{bottom - top:.2f}" '
                    f'fill="{escape(s.colour)}"/>'
                )
                base += s.values[i]
        out.append("</g>")
    # The lines over the bars (a dot per day when there are few; one day is a dot alone).
    for s in lines:
        points = [(LEFT + (i + 0.5) * band, y(s.values[i], line_top)) for i in range(n)]
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        if len(points) > 1:
            path = " ".join(f"{px:.2f},{py:.2f}" for px, py in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{escape(s.colour)}" stroke-width="2"{dash}/>')
        if len(points) <= MAX_MARKERS:
            out += [f'<circle cx="{px:.2f}" cy="{py:.2f}" r="2.5" fill="{escape(s.colour)}"/>' for px, py in points]
    # Dates along the bottom: the first, the last and a few evenly between.
    long = n > 0 and (days[-1] - days[0]).days > 370
    shown = sorted({round(k * (n - 1) / (MAX_DATE_LABELS - 1)) for k in range(MAX_DATE_LABELS)}) if n > 1 else [0]
    for i in shown if n else []:
        x = LEFT + (i + 0.5) * band
        anchor = "start" if i == 0 and n > 1 else "end" if i == n - 1 and n > 1 else "middle"
        out.append(
            f'<text x="{x:.1f}" y="{TOP + PLOT_H + 16}" text-anchor="{anchor}">{escape(_day(days[i], long))}</text>'
        )
    out.append(f'<line x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{TOP + PLOT_H}" y2="{TOP + PLOT_H}" stroke="#5b6474"/>')
    if not any(totals) and not any(line_values):
        out.append(
            f'<text x="{LEFT + PLOT_W / 2}" y="{TOP + PLOT_H / 2}" text-anchor="middle" fill="#5b6474">'
            "No usage in this period</text>"
        )
    # The legend.
    x = float(LEFT)
    legend_y = HEIGHT - 8
    for s, is_bar in [(s, True) for s in bars] + [(s, False) for s in lines]:
        if is_bar:
            out.append(f'<rect x="{x:.0f}" y="{legend_y - 9}" width="12" height="10" fill="{escape(s.colour)}"/>')
        else:
            dash = ' stroke-dasharray="5 3"' if s.dashed else ""
            out.append(
                f'<line x1="{x:.0f}" x2="{x + 14:.0f}" y1="{legend_y - 4}" y2="{legend_y - 4}" '
                f'stroke="{escape(s.colour)}" stroke-width="2"{dash}/>'
            )
        out.append(f'<text x="{x + 18:.0f}" y="{legend_y}">{escape(s.label)}</text>')
        x += 30 + 6.2 * len(s.label)
    out.append("</svg>")
    return mark_safe("".join(out))  # every text above went through escape()
