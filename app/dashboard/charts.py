"""The per-layer error chart, drawn here as SVG so the page needs no charting library.

A report gives each quantized layer's SQNR, 10·log10(‖W‖² / ‖W − Ŵ‖²). A bar shows the
relative weight error that SQNR stands for, ‖W − Ŵ‖ / ‖W‖ = 10^(−SQNR/20), on a linear
scale: the layers that lost the most stand tallest, which a bar of decibels would hide
(20 dB and 26 dB look alike; as errors they are 10 % and 5 %).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

WIDTH, HEIGHT = 960, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 14, 40
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
MAX_TICK_LABELS = 12


@dataclass(frozen=True)
class LayerError:
    name: str
    sqnr_db: float
    error: float  # ‖W − Ŵ‖ / ‖W‖


def layer_errors(layers: list[dict[str, Any]]) -> list[LayerError]:
    """The report's layers that carry an SQNR (classic CNN reports describe bits only)."""
    out = []
    for layer in layers:
        sqnr = layer.get("sqnr_db")
        if isinstance(sqnr, (int, float)):
            # an identical weight has SQNR +inf: no error at all
            out.append(LayerError(layer["name"], float(sqnr), 0.0 if math.isinf(sqnr) else 10 ** (-sqnr / 20)))
    return out


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `value`."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value * (1 - 1e-12):
            return step * power
    return 10 * power


def error_scale(reports_layers: list[list[LayerError]]) -> float:
    """One y-axis top for several charts, so jobs compared side by side share a scale."""
    return nice_ceiling(max((e.error for layers in reports_layers for e in layers), default=0.0))


def layer_error_svg(errors: list[LayerError], chart_id: str, y_max: float | None = None) -> Markup:
    """An SVG bar chart, one bar per layer in report order; empty when there is nothing to draw."""
    if not errors:
        return Markup("")
    top = y_max or error_scale([errors])
    band = PLOT_W / len(errors)
    bar_w = max(band * 0.8, 0.5)
    parts = [
        f'<svg class="layer-chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="{chart_id}-title {chart_id}-desc" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{chart_id}-title">Relative weight error per layer</title>',
        f'<desc id="{chart_id}-desc">{len(errors)} layers in report order; the largest error is '
        f"{_pct(max(e.error for e in errors))} ({escape(max(errors, key=lambda e: e.error).name)}).</desc>",
    ]
    for fraction in (0, 0.25, 0.5, 0.75, 1):  # horizontal grid with the y-axis labels
        y = TOP + PLOT_H * (1 - fraction)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.2f}" y2="{y:.2f}"/>')
        parts.append(f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.2f}" text-anchor="end">{_pct(top * fraction)}</text>')
    label_every = math.ceil(len(errors) / MAX_TICK_LABELS)
    for index, e in enumerate(errors):
        height = PLOT_H * min(e.error / top, 1.0)
        x = LEFT + index * band + (band - bar_w) / 2
        parts.append(
            f'<rect class="bar" x="{x:.2f}" y="{TOP + PLOT_H - height:.3f}" width="{bar_w:.2f}" height="{height:.3f}" '
            f'data-layer="{escape(e.name)}" data-error="{e.error:.6g}">'
            f"<title>{escape(e.name)}: SQNR {e.sqnr_db:.2f} dB, relative error {_pct(e.error)}</title></rect>"
        )
        if index % label_every == 0:
            parts.append(f'<text class="tick" x="{x + bar_w / 2:.2f}" y="{TOP + PLOT_H + 16}" text-anchor="middle">{index}</text>')
    parts.append(f'<text class="axis" x="{LEFT + PLOT_W / 2}" y="{HEIGHT - 6}" text-anchor="middle">layer (report order)</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _pct(value: float) -> str:
    if value == 0:
        return "0 %"
    return f"{100 * value:.3g} %"
