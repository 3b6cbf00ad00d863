"""Small line plots as inline SVG, drawn by hand: the same data give the same bytes (matplotlib's
SVG embeds a date and random ids), and a page that holds them stands alone.

Used by ``rlhf report`` and the demo's page; ``PLOT_STYLE`` is the CSS they share.
"""

from __future__ import annotations

import html
import math

MAX_POINTS = 500  # per curve; longer runs are thinned evenly (the last step always kept)


def fmt(v: float) -> str:
    """A number as the plots and tables show it: four significant digits."""
    return f"{v:.4g}"


def _thin(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    if len(steps) <= MAX_POINTS:
        return steps, values
    idx = sorted({round(i * (len(steps) - 1) / (MAX_POINTS - 1)) for i in range(MAX_POINTS)})
    return [steps[i] for i in idx], [values[i] for i in idx]


def ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Round values for the y axis inside ``[lo, hi]``, 1, 2 or 5 x 10^k apart: the most of them up to
    ``most`` (at least 2 for any range wider than 0)."""
    span = hi - lo
    if not span > 0 or not math.isfinite(span):
        return []
    magnitude = 10.0 ** math.floor(math.log10(span / most))
    for step in (m * magnitude for m in (1, 2, 5, 10, 20)):
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        if last - first + 1 <= most:
            return [i * step + 0.0 for i in range(first, last + 1)]  # + 0.0: no -0
    return []


def tick_label(v: float, step: float) -> str:
    """``v`` with as many digits as ticks ``step`` apart need to differ: 0.25, 0.50, ... or 1.5e-07."""
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))  # a step is 1, 2 or 5 x 10^k
    if step >= 1e-4 and abs(v) < 1e6:
        return f"{v:.{decimals}f}"
    digits = max(1, math.floor(math.log10(max(abs(v), step) / step) + 1e-9) + 2)
    return f"{v:.{digits}g}"


def svg_plot(title: str, steps: list[int], values: list[float], hlines: list[float] = (),
             marks: list[tuple[int, str]] = (), width: int = 300, height: int = 170) -> str:
    """A small line plot as inline SVG.

    Args:
        title: shown above the plot (escaped).
        steps, values: the curve.
        hlines: dashed red lines at these values (thresholds); the y range includes them.
        marks: ``(step, label)`` pairs drawn as orange vertical lines (monitor warnings), the label as a tooltip.
    """
    left, right, top, bottom = 54, 10, 20, 22
    pw, ph = width - left - right, height - top - bottom
    steps, values = _thin(list(steps), list(values))
    lo, hi = min([*values, *hlines], default=0.0), max([*values, *hlines], default=1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * max(abs(lo), 1.0), hi + 0.5 * max(abs(hi), 1.0)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    s0 = min([*steps, *(s for s, _ in marks)], default=0)
    s1 = max([*steps, *(s for s, _ in marks)], default=1)
    if s1 == s0:
        s0, s1 = s0 - 1, s1 + 1
    x = lambda s: left + pw * (s - s0) / (s1 - s0)
    y = lambda v: top + ph * (hi - v) / (hi - lo)
    esc = html.escape
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img"><title>{esc(title)}</title>'),
           f'<text x="{left}" y="13" class="t">{esc(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>']
    marks_y = ticks(lo, hi)
    for v in marks_y:  # the y axis: a tick, a faint grid line and the value
        label = tick_label(v, marks_y[1] - marks_y[0]) if len(marks_y) > 1 else fmt(v)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
                   f'<line x1="{left - 3}" x2="{left}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="tick"/>'
                   f'<text x="{left - 5}" y="{y(v) + 3.5:.1f}" class="ya">{label}</text>')
    out.append(f'<text x="{left}" y="{height - 6}" class="xa">{s0 if steps else ""}</text>')
    out.append(f'<text x="{left + pw}" y="{height - 6}" class="xa end">step {steps[-1] if steps else ""}</text>')
    for v in hlines:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="thr">'
                   f'<title>threshold {fmt(v)}</title></line>'
                   f'<text x="{left + pw - 3}" y="{y(v) - 3:.1f}" class="thrl end">{fmt(v)}</text>')
    for s, label in marks:
        out.append(f'<line x1="{x(s):.1f}" x2="{x(s):.1f}" y1="{top}" y2="{top + ph}" class="warn">'
                   f'<title>{esc(label)}</title></line>')
    if len(steps) == 1:
        out.append(f'<circle cx="{x(steps[0]):.1f}" cy="{y(values[0]):.1f}" r="2.5" class="dot"/>')
    elif steps:
        points = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, values))
        out.append(f'<polyline points="{points}" class="line"/>')
    out.append("</svg>")
    return "".join(out)


# The plots' look, for the page that embeds them.
PLOT_STYLE = """.plots{display:flex;flex-wrap:wrap;gap:8px}svg{background:#fff}svg text{font-size:10px;fill:#444}
svg .t{font-size:11px;fill:#111}svg .ya{text-anchor:end}svg .end{text-anchor:end}svg .frame{fill:none;stroke:#bbb}
svg .line{fill:none;stroke:#1f77b4;stroke-width:1.5}svg .dot{fill:#1f77b4}svg .thr{stroke:#d62728;stroke-dasharray:4 3}
svg .thrl{fill:#d62728}svg .warn{stroke:#ff7f0e;stroke-width:1.5}svg .grid{stroke:#eee}svg .tick{stroke:#999}"""
