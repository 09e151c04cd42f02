"""A fine-tune run's loss curve as inline SVG, drawn on the server as the usage chart is (jobs/usage/chart.py, whose
axis scale and size it uses): training loss as a line, validation loss dashed with a dot per evaluation, the steps
along the bottom up to the planned ones. Every number comes from the checked report (jobs/finetune/progress.py)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from django.utils.safestring import SafeString, mark_safe

from jobs.usage.chart import BOTTOM, HEIGHT, LEFT, PLOT_H, PLOT_W, TOP, WIDTH, scale

SERIES = (("training loss", 1, "#2f6fdf", ""), ("validation loss", 2, "#d9822b", ' stroke-dasharray="5 3"'))


def loss_svg(points: Sequence[Sequence[Any]], planned_steps: int, *, chart_id: str = "loss-chart") -> SafeString:
    """The chart of [step, training loss, validation loss] points over steps 0 to `planned_steps`."""
    losses = [p[i] for p in points for i in (1, 2) if isinstance(p[i], (int, float))]
    y_scale = scale(max(losses, default=0.0))
    steps = max(1, planned_steps)

    def x(step: float) -> float:
        return LEFT + PLOT_W * step / steps

    def y(loss: float) -> float:
        return TOP + PLOT_H - PLOT_H * loss / y_scale.top

    last = points[-1] if points else None
    summary = f"step {last[0]} of {planned_steps}" if last else "no steps yet"
    title = "Loss by training step"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" '
        f'aria-labelledby="{chart_id}-title {chart_id}-desc" font-family="system-ui, sans-serif" font-size="11">',
        f'<title id="{chart_id}-title">{title}</title>',
        f'<desc id="{chart_id}-desc">{escape(summary)}</desc>',
    ]
    for tick, label in zip(y_scale.ticks(), y_scale.labels(), strict=True):
        at = y(tick)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{at:.1f}" y2="{at:.1f}" stroke="#dde1e7"/>')
        out.append(f'<text x="{LEFT - 6}" y="{at + 4:.1f}" text-anchor="end">{label}</text>')
    out.append(f'<text transform="translate(14 {TOP + PLOT_H / 2:.0f}) rotate(-90)" text-anchor="middle">loss</text>')
    for step in sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps}):
        out.append(f'<text x="{x(step):.1f}" y="{TOP + PLOT_H + 16}" text-anchor="middle">{step}</text>')
    out.append(f'<text x="{LEFT + PLOT_W / 2}" y="{TOP + PLOT_H + 30}" text-anchor="middle">step</text>')
    out.append(f'<line x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{TOP + PLOT_H}" y2="{TOP + PLOT_H}" stroke="#5b6474"/>')
    legend_x = float(LEFT)
    for label, index, colour, dash in SERIES:
        line = [(x(p[0]), y(p[index])) for p in points if isinstance(p[index], (int, float))]
        if len(line) > 1:
            path = " ".join(f"{px:.2f},{py:.2f}" for px, py in line)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        if index == 2 or len(line) == 1:
            out += [f'<circle cx="{px:.2f}" cy="{py:.2f}" r="3" fill="{colour}"/>' for px, py in line]
        legend_y = HEIGHT - BOTTOM + 44
        out.append(f'<line x1="{legend_x:.0f}" x2="{legend_x + 14:.0f}" y1="{legend_y - 4}" y2="{legend_y - 4}" '
                   f'stroke="{colour}" stroke-width="2"{dash}/>')  # fmt: skip
        out.append(f'<text x="{legend_x + 18:.0f}" y="{legend_y}">{label}</text>')
        legend_x += 130
    if not points:
        out.append(f'<text x="{LEFT + PLOT_W / 2}" y="{TOP + PLOT_H / 2}" text-anchor="middle" fill="#5b6474">'
                   "No steps yet</text>")  # fmt: skip
    out.append("</svg>")
    return mark_safe("".join(out))  # numbers and fixed labels only; the summary went through escape()
