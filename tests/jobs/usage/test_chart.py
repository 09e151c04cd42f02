"""The server-drawn SVG chart: valid XML for any number of days, titled for screen readers, every text escaped."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import date, timedelta

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


def test_round_steps_and_compact_numbers() -> None:
    assert [chart.nice_step(v) for v in (0, 3, 10, 101, 0.3)] == [1, 1, 5, 50, 0.1]
    assert [chart.compact(v) for v in (0, 0.25, 1500, 2_000_000, 3.5e9)] == ["0", "0.25", "1.5k", "2M", "3.5G"]
