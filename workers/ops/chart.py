"""Line charts as inline SVG, drawn in Python: no script, no external asset.

One chart: a time axis (UTC, a tick every 10 minutes), a value axis from 0 with
round ticks, grid lines, a legend, and one line per series. Each point carries a
``<title>`` (the browser shows it on hover). A series breaks where no point came
for longer than ``max_gap`` (workers stopped) instead of joining across the gap.
Every text is escaped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html import escape

#: Okabe-Ito colours: told apart by colour-blind readers, and printable.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#F0E442", "#000000")

#: The colour of failures.
ALARM = "#D55E00"

#: Points drawn as dots (with their hover title) up to this many per series.
MAX_MARKERS = 90


@dataclass
class Series:
    """One line: a name for the legend, a colour, and (time, value, hover text) points."""

    name: str
    color: str
    points: list[tuple[datetime, float, str]] = field(default_factory=list)
    dashed: bool = False


def nice_step(span: float, target_ticks: int = 5) -> float:
    """A round step (1, 2 or 5 times a power of ten) giving about ``target_ticks`` ticks."""
    if span <= 0:
        return 1.0
    raw = span / target_ticks
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return max(float(factor * power), 1.0)
    return float(10 * power)


def _number(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:g}"


def line_chart(
    *,
    chart_id: str,
    title: str,
    y_label: str,
    series: list[Series],
    start: datetime,
    end: datetime,
    max_gap: timedelta,
    empty_text: str,
    width: int = 560,
    height: int = 320,
) -> str:
    """An ``<svg>`` element of the series between ``start`` and ``end``."""
    left, right, top, bottom = 56, 16, 66, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    span_s = max((end - start).total_seconds(), 1.0)
    values = [value for s in series for _, value, _ in s.points]
    step = nice_step(max(values, default=0.0))
    y_max = max(step * math.ceil(max(values, default=0.0) / step), step)

    def x_of(moment: datetime) -> float:
        return left + plot_w * min(max((moment - start).total_seconds() / span_s, 0.0), 1.0)

    def y_of(value: float) -> float:
        return top + plot_h * (1 - value / y_max)

    out = [
        f'<svg id="{escape(chart_id)}" class="chart" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="{escape(chart_id)}-title">',
        f'<title id="{escape(chart_id)}-title">{escape(title)}</title>',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{left}" y="20" class="chart-title">{escape(title)}</text>',
    ]
    # Value axis: grid lines and labels.
    tick = 0.0
    while tick <= y_max + 1e-9:
        y = y_of(tick)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" class="grid"/>')
        out.append(
            f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_number(tick)}</text>'
        )
        tick += step
    out.append(
        f'<text x="16" y="{top + plot_h / 2:.1f}" text-anchor="middle" class="axis-label" '
        f'transform="rotate(-90 16 {top + plot_h / 2:.1f})">{escape(y_label)}</text>'
    )
    # Time axis: a tick every 10 minutes, on the round minute.
    first = start.astimezone(UTC).replace(second=0, microsecond=0)
    first += timedelta(minutes=(10 - first.minute % 10) % 10)
    moment = first
    while moment <= end:
        x = x_of(moment)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" class="grid"/>')
        out.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 18}" text-anchor="middle" class="tick">'
            f"{moment.strftime('%H:%M')}</text>"
        )
        moment += timedelta(minutes=10)
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 10}" text-anchor="middle" class="axis-label">'
        f"time (UTC), {escape(start.astimezone(UTC).strftime('%H:%M'))} to "
        f"{escape(end.astimezone(UTC).strftime('%H:%M'))}</text>"
    )
    out.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" class="axis"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" class="axis"/>'
    )
    # Legend under the title, one swatch per series, wrapping to a second row if need be.
    legend_x, legend_y = float(left), 42.0
    for s in series:
        item_w = 30 + 7.0 * len(s.name) + 18
        if legend_x + item_w > width - right and legend_x > left:
            legend_x, legend_y = float(left), legend_y + 16
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        out.append(
            f'<g class="legend-item" data-series="{escape(s.name)}">'
            f'<line x1="{legend_x:.1f}" y1="{legend_y - 4:.1f}" '
            f'x2="{legend_x + 24:.1f}" y2="{legend_y - 4:.1f}" '
            f'stroke="{escape(s.color)}" stroke-width="3"{dash}/>'
            f'<text x="{legend_x + 30:.1f}" y="{legend_y:.1f}" class="legend">{escape(s.name)}</text></g>'
        )
        legend_x += item_w
    if not values:
        out.append(
            f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
            f'class="empty">{escape(empty_text)}</text>'
        )
    for s in series:
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        runs: list[list[tuple[datetime, float, str]]] = []
        for point in sorted(s.points, key=lambda p: p[0]):
            if runs and point[0] - runs[-1][-1][0] <= max_gap:
                runs[-1].append(point)
            else:
                runs.append([point])
        out.append(f'<g class="series" data-series="{escape(s.name)}" data-points="{len(s.points)}">')
        for run in runs:
            coordinates = " ".join(f"{x_of(at):.1f},{y_of(value):.1f}" for at, value, _ in run)
            out.append(
                f'<polyline points="{coordinates}" fill="none" stroke="{escape(s.color)}" '
                f'stroke-width="2" stroke-linejoin="round"{dash}/>'
            )
        # Dots carry the hover text; past MAX_MARKERS only lone points (between gaps) get one.
        dotted = s.points if len(s.points) <= MAX_MARKERS else [run[0] for run in runs if len(run) == 1]
        if dotted:
            for at, value, text in dotted:
                out.append(
                    f'<circle cx="{x_of(at):.1f}" cy="{y_of(value):.1f}" r="3" fill="{escape(s.color)}">'
                    f"<title>{escape(text)}</title></circle>"
                )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)
