"""A daily chart as inline SVG, drawn on the server (no JavaScript library): stacked bars against the left axis,
lines against the right one, dates along the bottom and a legend. Every text is escaped; the chart has a <title> and a
<desc> with the totals for screen readers, and each day a tooltip; no days, or one, still draw a readable chart. Each
axis counts in round steps (1, 2 or 5 times a power of ten) that reach above its data, each tick's label written
exactly, so that no label appears twice on an axis whatever the data's range."""

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
# Steps never go below 10**-12: under that nothing a chart shows (tokens, hours) is more than nought, and 10.0**p
# itself loses its precision far below it.
SMALLEST_EXPONENT = -12
SUFFIXES = ((12, "T"), (9, "G"), (6, "M"), (3, "k"))
SCIENTIFIC_BELOW = -4  # 0.0005 reads well, 0.00005 does not: labels of smaller steps are written 5e-5


@dataclass(frozen=True)
class Series:
    label: str
    values: Sequence[float]
    colour: str
    dashed: bool = False


@dataclass(frozen=True)
class Scale:
    """An axis from 0 to `count` steps of `multiple` times 10**`exponent` (multiple 1, 2 or 5). Every tick is an integer
    times a power of ten, so its label is written exactly, with as many decimals as the step needs: ticks that differ
    never share a label (rounding every label to a fixed precision made 0.0005 and 0.001 both "0.001")."""

    multiple: int
    exponent: int
    count: int

    @property
    def step(self) -> float:
        return self.multiple * 10.0**self.exponent

    @property
    def top(self) -> float:
        return self.count * self.step

    def ticks(self) -> list[float]:
        return [k * self.step for k in range(self.count + 1)]

    def labels(self) -> list[str]:
        return [exact(k * self.multiple, self.exponent) for k in range(self.count + 1)]


def _nice(maximum: float, steps: int, smallest: int) -> tuple[int, int]:
    """(multiple, exponent): the smallest 1, 2 or 5 times a power of ten, at least 10**smallest, that covers
    `maximum` in `steps` steps."""
    if not maximum > 0:  # nothing to show
        return 1, max(0, smallest)
    raw = maximum / steps
    if raw == 0:  # so little that dividing it underflowed
        return 1, smallest
    exponent = max(math.floor(math.log10(raw)), smallest)
    multiple = next((m for m in (1, 2, 5) if raw <= m * 10.0**exponent), 10)
    return (1, exponent + 1) if multiple == 10 else (multiple, exponent)


def _bigger(multiple: int, exponent: int) -> tuple[int, int]:
    return {1: (2, exponent), 2: (5, exponent)}.get(multiple, (1, exponent + 1))


def scale(maximum: float, most: int = 4, *, count: int | None = None, whole: bool = False) -> Scale:
    """The axis that covers 0 to `maximum` in round steps: in the fewest of 2 to `most` steps, or in exactly `count`
    (an axis that shares another's grid lines). `whole`: the values are counts (tokens), so no step is below 1."""
    if not math.isfinite(maximum):
        raise ValueError(f"an axis needs a finite maximum, not {maximum}")
    smallest = 0 if whole else SMALLEST_EXPONENT
    steps = count or most
    multiple, exponent = _nice(maximum, steps, smallest)
    # A float division can land a hair below the true step: widen until the top really covers the maximum.
    while steps * multiple * 10.0**exponent < maximum:
        multiple, exponent = _bigger(multiple, exponent)
    if count is None:
        count = next(k for k in range(min(2, steps), steps + 1) if k * multiple * 10.0**exponent >= maximum)
    return Scale(multiple, exponent, count)


def exact(integer: int, exponent: int) -> str:
    """integer times 10**exponent written exactly and short: 15, 3 -> "15k"; 15, -4 -> "0.0015"; 5, -7 -> "5e-7"."""
    if integer == 0:
        return "0"
    digits = str(abs(integer))
    sign = "-" if integer < 0 else ""
    magnitude = len(digits) - 1 + exponent  # the value lies in [10**magnitude, 10**(magnitude + 1))
    if magnitude < SCIENTIFIC_BELOW:
        mantissa = digits[0] + ("." + digits[1:] if digits[1:] else "")
        return f"{sign}{_trim(mantissa)}e{magnitude}"
    power, suffix = next(((p, s) for p, s in SUFFIXES if magnitude >= p), (0, ""))
    shift = exponent - power
    if shift >= 0:
        text = digits + "0" * shift
    else:
        digits = digits.rjust(-shift + 1, "0")
        text = _trim(digits[:shift] + "." + digits[shift:])
    return f"{sign}{text}{suffix}"


def _trim(decimal: str) -> str:
    return decimal.rstrip("0").rstrip(".") if "." in decimal else decimal


def _number(value: float) -> str:
    """A tooltip's figure: whole numbers as they are, others to two decimals, and what two decimals would show as
    0.00 to two significant digits (a newcomer's first minutes are a few thousandths of a GPU-hour)."""
    if value == int(value):
        return f"{value:,.0f}"
    return f"{value:,.2f}" if abs(value) >= 0.01 else f"{value:.2g}"


def _whole(values: Sequence[float]) -> bool:
    return all(float(v).is_integer() for v in values)


def _axes(bars: Sequence[float], lines: Sequence[float]) -> tuple[Scale, Scale]:
    """The bars' and the lines' scales: both axes share the grid lines, each with round steps; an axis of counts
    (tokens) has no fractional ticks."""
    bar = scale(max(bars, default=0.0), whole=_whole(bars))
    return bar, scale(max(lines, default=0.0), count=bar.count, whole=_whole(lines))


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
    bar_scale, line_scale = _axes(totals, line_values)
    bar_top, line_top = bar_scale.top, line_scale.top
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
    # Grid and both axes' labels (each axis a group of its own, which the browser tests read).
    heights = [y(tick, bar_top) for tick in bar_scale.ticks()]
    out += [f'<line x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{at:.1f}" y2="{at:.1f}" stroke="#dde1e7"/>' for at in heights]
    out.append('<g class="axis axis-left" text-anchor="end">')
    out += [
        f'<text x="{LEFT - 6}" y="{at + 4:.1f}">{label}</text>'
        for at, label in zip(heights, bar_scale.labels(), strict=True)
    ]
    out.append("</g>")
    if lines:
        out.append('<g class="axis axis-right">')
        labels = line_scale.labels()
        out += [
            f'<text x="{LEFT + PLOT_W + 6}" y="{at + 4:.1f}">{label}</text>'
            for at, label in zip(heights, labels, strict=True)
        ]
        out.append("</g>")
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
