"""The server-drawn SVG chart: valid XML for any number of days, titled for screen readers, every text escaped."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from datetime import date, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.usage import chart
from jobs.usage.chart import Series

SVG = "{http://www.w3.org/2000/svg}"


def draw(days: list[date], tokens: list[float], hours: list[float], label: str = "tokens") -> ET.Element:
    markup = chart.svg(
        days,
        [Series(label, tokens, "#0b5cad")],
        [Series("GPU-hours", hours, "#d9822b", dashed=True)],
        title="Tokens & GPU-hours <per day>",
        bar_unit="tokens",
        line_unit="GPU-hours",
    )
    return ET.fromstring(str(markup))


def test_a_chart_is_valid_svg_with_a_title_a_description_and_a_bar_per_day_with_use() -> None:
    days = [date(2025, 3, 1) + timedelta(days=i) for i in range(10)]
    root = draw(days, [0, 100, 2500, 0, 0, 0, 0, 0, 0, 40], [0, 1, 2, 0, 0, 0, 0, 0, 0, 0.5])
    assert root.tag == SVG + "svg" and root.get("role") == "img"
    assert root.get("aria-label") == "Tokens & GPU-hours <per day>"
    assert root.findtext(SVG + "title") == "Tokens & GPU-hours <per day>"
    desc = root.findtext(SVG + "desc") or ""
    assert "2025-03-01 to 2025-03-10" in desc and "tokens: 2,640" in desc and "GPU-hours: 3.50" in desc
    days_drawn = [g for g in root.iter(SVG + "g") if g.find(SVG + "title") is not None]
    assert len(days_drawn) == 3  # days without use draw nothing
    assert days_drawn[1].findtext(SVG + "title") == "2025-03-03: tokens 2,500, GPU-hours 2"
    texts = [t.text for t in root.iter(SVG + "text")]
    assert "Mar 1" in texts and "Mar 10" in texts  # the first and last dates
    assert "3k" in texts  # the left axis' top: a round number above the highest bar
    assert root.find(f".//{SVG}polyline[@stroke-dasharray]") is not None


@pytest.mark.parametrize("n", [0, 1])
def test_no_days_or_one_day_still_draw_a_chart(n: int) -> None:
    days = [date(2025, 3, 1)][:n]
    root = draw(days, [0.0] * n, [0.0] * n)
    texts = [t.text for t in root.iter(SVG + "text")]
    assert "No usage in this period" in texts
    one = draw([date(2025, 3, 1)], [10.0], [2.0])
    assert len(list(one.iter(SVG + "rect"))) == 2  # the bar and the legend's swatch
    assert one.find(f".//{SVG}circle") is not None and one.find(f".//{SVG}polyline") is None


def test_a_year_of_days_labels_months_with_their_year() -> None:
    days = [date(2024, 1, 1) + timedelta(days=i) for i in range(400)]
    root = draw(days, [float(i) for i in range(400)], [1.0] * 400)
    texts = [t.text for t in root.iter(SVG + "text")]
    assert "Jan 2024" in texts and root.find(f".//{SVG}circle") is None  # too many days for a dot each


@given(
    label=st.text(max_size=40),
    values=st.lists(st.floats(min_value=0, max_value=1e12, allow_nan=False), max_size=40),
)
def test_any_label_and_values_give_valid_xml_that_shows_the_label_as_written(label: str, values: list[float]) -> None:
    label = "".join(c for c in label if c.isprintable())  # XML 1.0 has no place for control characters at all
    days = [date(2025, 1, 1) + timedelta(days=i) for i in range(len(values))]
    root = draw(days, values, values[::-1], label=label)
    assert label in [t.text or "" for t in root.iter(SVG + "text")]


def axis_labels(root: ET.Element, side: str) -> list[str]:
    group = root.find(f".//{SVG}g[@class='axis axis-{side}']")
    assert group is not None
    return [t.text or "" for t in group.iter(SVG + "text")]


def test_round_steps_and_exact_labels() -> None:
    assert [chart.scale(v, count=4).step for v in (0, 3, 10, 101, 0.3)] == [1, 1, 5, 50, 0.1]
    written = {(0, 3): "0", (25, -2): "0.25", (15, 2): "1.5k", (2, 6): "2M", (35, 8): "3.5G", (15, -4): "0.0015",
               (5, -7): "5e-7", (12, -9): "1.2e-8"}  # fmt: skip
    assert {(n, e): chart.exact(n, e) for n, e in written} == written


def test_a_newcomers_few_thousandths_of_a_gpu_hour_get_distinct_labels_on_the_right_axis() -> None:
    """The bug a newcomer saw: 0.0005 and 0.001 were both rounded to "0.001"."""
    days = [date(2025, 3, 1) + timedelta(days=i) for i in range(3)]
    root = draw(days, [2000, 400, 0], [0.0017, 0.0004, 0])
    assert axis_labels(root, "right") == ["0", "0.0005", "0.001", "0.0015", "0.002"]
    assert axis_labels(root, "left") == ["0", "500", "1k", "1.5k", "2k"]
    assert "GPU-hours: 0.0021" in (root.findtext(SVG + "desc") or "")  # not "0.00"


def test_an_axis_of_tokens_has_no_fractional_ticks() -> None:
    days = [date(2025, 3, 1)]
    assert axis_labels(draw(days, [1], [0.25]), "left") == ["0", "1", "2"]
    assert axis_labels(draw(days, [1], [0.25]), "right") == ["0", "0.2", "0.4"]


maxima = st.floats(min_value=0, max_value=1e15, allow_nan=False)


@given(maximum=maxima, whole=st.booleans(), count=st.none() | st.integers(min_value=1, max_value=8))
def test_ticks_rise_strictly_cover_the_maximum_and_their_labels_differ(
    maximum: float, whole: bool, count: int | None
) -> None:
    axis = chart.scale(maximum, count=count, whole=whole)
    ticks, labels = axis.ticks(), axis.labels()
    assert ticks[0] == 0 and all(a < b for a, b in itertools.pairwise(ticks))
    assert ticks[-1] >= maximum and axis.top == ticks[-1]
    assert len(set(labels)) == len(labels) == len(ticks)
    assert axis.count == count if count else 2 <= axis.count <= 4
    assert axis.multiple in (1, 2, 5)
    if whole:
        assert all(t == int(t) for t in ticks)


@given(maximum=maxima, count=st.integers(min_value=1, max_value=8))
def test_the_step_is_the_smallest_round_one_that_covers_the_maximum(maximum: float, count: int) -> None:
    """Sensibly rounded: one round step smaller would not reach the maximum (10**-12 is as small as steps go)."""
    axis = chart.scale(maximum, count=count)
    smaller = {1: (5, axis.exponent - 1), 2: (1, axis.exponent), 5: (2, axis.exponent)}[axis.multiple]
    if smaller[1] >= chart.SMALLEST_EXPONENT and maximum > 0:
        assert count * smaller[0] * 10.0 ** smaller[1] < maximum * (1 + 1e-9)


@given(integer=st.integers(min_value=-(10**18), max_value=10**18), exponent=st.integers(min_value=-15, max_value=6))
def test_a_label_reads_back_as_exactly_its_value(integer: int, exponent: int) -> None:
    """What makes labels of different ticks differ: each is its value written exactly."""
    text = chart.exact(integer, exponent)
    scale = {"k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12}
    value = Decimal(text[:-1]) * scale[text[-1]] if text[-1] in scale else Decimal(text)
    assert value == Decimal(integer).scaleb(exponent)


@given(
    bars=st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=40),
    lines=st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=40),
)
def test_both_axes_of_any_chart_have_distinct_labels_and_reach_above_the_data(
    bars: list[int], lines: list[float]
) -> None:
    n = min(len(bars), len(lines))
    days = [date(2025, 1, 1) + timedelta(days=i) for i in range(n)]
    root = draw(days, [float(b) for b in bars[:n]], lines[:n])
    for side in ("left", "right"):
        labels = axis_labels(root, side)
        assert len(set(labels)) == len(labels) >= 3
    bar_axis, line_axis = chart._axes([float(b) for b in bars[:n]], lines[:n])
    assert bar_axis.top >= max(bars[:n]) and line_axis.top >= max(lines[:n])
