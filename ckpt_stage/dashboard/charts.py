"""Charts rendered on the server as inline SVG: no front-end build chain, no CDN (the stage runs on
machines without internet access), and the page is readable before any script runs."""

from __future__ import annotations

import math
from html import escape
from typing import Any

from ckpt_stage.domain import ReasonCode

# One stable colour per reason code (colour-blind friendly first: Okabe-Ito, then Tableau).
_COLOURS = ("#D55E00", "#0072B2", "#CC79A7", "#E69F00", "#009E73", "#56B4E9", "#8C564B", "#7F7F7F",
            "#BCBD22", "#17BECF", "#9467BD", "#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#E377C2")
_ORDER = [c.value for c in ReasonCode]


def reason_colour(code: str) -> str:
    try:
        i = _ORDER.index(code)
    except ValueError:
        i = sum(map(ord, code))
    return _COLOURS[i % len(_COLOURS)]


def nice_ceiling(n: float) -> int:
    """Smallest 1/2/5×10^k at or above ``n`` (axis maximum)."""
    if n <= 1:
        return 1
    exp = 10 ** math.floor(math.log10(n))
    for m in (1, 2, 5, 10):
        if m * exp >= n:
            return int(m * exp)
    return int(10 * exp)


def reasons_chart(stats: dict[str, Any], *, width: int = 1200, height: int = 230) -> str:
    """Stacked bars: versions quarantined per reason per day (``DashboardData.reason_stats``)."""
    buckets: list[str] = list(stats.get("buckets") or [])
    series: dict[str, list[int]] = dict(stats.get("series") or {})
    left, right, top, bottom = 40, 12, 14, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(s[i] for s in series.values()) for i in range(len(buckets))]
    peak = nice_ceiling(max(totals, default=0))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="Versions quarantined per reason per day">']
    # Horizontal grid and y labels.
    ticks = next(t for t in (5, 4, 2, 1) if peak % t == 0)  # whole-number steps: counts are integers
    for t in range(ticks + 1):
        value = peak * t / ticks
        y = top + plot_h - plot_h * t / ticks
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{value:.0f}</text>')
    if not buckets or not any(totals):
        out.append(f'<text x="{left + plot_w / 2:.0f}" y="{top + plot_h / 2:.0f}" text-anchor="middle" '
                   f'class="empty">No quarantines in the last {len(buckets) or stats.get("days", 0)} days</text>')
    n = max(1, len(buckets))
    slot = plot_w / n
    bar = max(2.0, slot * 0.68)
    every = max(1, math.ceil(n / 8))  # at most ~8 date labels, the newest always shown
    for i, day in enumerate(buckets):
        x = left + slot * i + (slot - bar) / 2
        y = top + plot_h
        for code, counts in series.items():
            count = counts[i] if i < len(counts) else 0
            if not count:
                continue
            h = plot_h * count / peak
            y -= h
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                       f'fill="{reason_colour(code)}" data-reason="{escape(code)}"><title>{escape(day)}: '
                       f'{count} × {escape(code)}</title></rect>')
        if (n - 1 - i) % every == 0:
            out.append(f'<text x="{x + bar / 2:.1f}" y="{height - 10}" text-anchor="middle" class="tick">'
                       f'{escape(day[5:])}</text>')
    out.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" class="axis"/>')
    out.append("</svg>")
    return "".join(out)
