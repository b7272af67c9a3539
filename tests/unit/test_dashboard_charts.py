"""The server-side SVG chart: well-formed, one bar segment per (day, reason) count, readable axes."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from ckpt_stage.dashboard.charts import nice_ceiling, reason_colour, reasons_chart

SVG = "{http://www.w3.org/2000/svg}"


def stats(series, days=4):
    return {"days": days, "buckets": [f"2026-01-0{i + 1}" for i in range(days)], "series": series,
            "totals": {k: sum(v) for k, v in series.items()}}


def test_bars_stack_per_day_with_one_colour_per_reason():
    svg = reasons_chart(stats({"SHAPE_MISMATCH": [0, 2, 0, 1], "UNSAFE_PICKLE": [1, 1, 0, 0]}))
    root = ET.fromstring(svg)
    rects = root.findall(f"{SVG}rect")
    assert [(r.get("data-reason"), r.find(f"{SVG}title").text) for r in rects] == [
        ("UNSAFE_PICKLE", "2026-01-01: 1 × UNSAFE_PICKLE"),
        ("SHAPE_MISMATCH", "2026-01-02: 2 × SHAPE_MISMATCH"),
        ("UNSAFE_PICKLE", "2026-01-02: 1 × UNSAFE_PICKLE"),
        ("SHAPE_MISMATCH", "2026-01-04: 1 × SHAPE_MISMATCH"),
    ]
    assert {r.get("fill") for r in rects if r.get("data-reason") == "SHAPE_MISMATCH"} == {reason_colour("SHAPE_MISMATCH")}
    # The tallest day (3) reaches the axis maximum's share of the plot height.
    heights = [float(r.get("height")) for r in rects]
    assert abs(heights[1] + heights[2] - 3 / nice_ceiling(3) * (230 - 14 - 30)) < 0.5
    ticks = [t.text for t in root.findall(f"{SVG}text") if t.get("class") == "tick"]
    assert ticks[:3] == ["0", "1", "2"] and "01-04" in ticks  # whole-number y ticks, newest day labelled


def test_empty_chart_says_so():
    root = ET.fromstring(reasons_chart(stats({}, days=14)))
    assert root.findall(f"{SVG}rect") == []
    assert "No quarantines in the last 4 days" not in ET.tostring(root, encoding="unicode")
    assert any("No quarantines in the last 14 days" in (t.text or "") for t in root.findall(f"{SVG}text"))


def test_many_days_get_a_readable_number_of_labels():
    root = ET.fromstring(reasons_chart({"days": 90, "buckets": [f"d-{i:05d}" for i in range(90)],
                                        "series": {"TIMEOUT": [1] * 90}}))
    labels = [t for t in root.findall(f"{SVG}text") if t.get("class") == "tick" and t.get("y") == "220"]
    assert 4 <= len(labels) <= 9


def test_names_are_escaped():
    svg = reasons_chart(stats({"<script>": [1, 0, 0, 0]}))
    assert "<script>" not in svg and "&lt;script&gt;" in svg


def test_nice_ceiling_and_colours():
    assert [nice_ceiling(n) for n in (0, 1, 3, 7, 12, 51, 999)] == [1, 1, 5, 10, 20, 100, 1000]
    assert reason_colour("SHAPE_MISMATCH") == reason_colour("SHAPE_MISMATCH") != reason_colour("UNSAFE_PICKLE")
    assert reason_colour("SOMETHING_NEW").startswith("#")
