"""Line plots of metric histories as PNG, drawn with Pillow (no matplotlib, no torch).

One panel per metric, stacked vertically, sharing nothing but the image: each has its own
step and value axes with "nice" ticks (1, 2, 2.5 or 5 times a power of ten), a title with the
last value, and "no data yet" when the metric has no finite point.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

Series = tuple[str, Sequence[tuple[int, float]]]
"""A metric name and its (step, value) points in step order."""

BACKGROUND = (255, 255, 255)
FRAME = (120, 120, 120)
GRID = (232, 232, 232)
TEXT = (40, 40, 40)
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))
MARGIN = {"left": 70, "right": 18, "top": 26, "bottom": 26}
MIN_PANEL = (200, 80)
"""Smallest (width, height) of one panel in pixels."""


def nice_ticks(low: float, high: float, count: int = 5, min_step: float = 0.0) -> list[float]:
    """About ``count`` round values covering [low, high] (first <= low, last >= high), at least
    ``min_step`` apart (1 for steps, which are whole numbers)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"ticks need finite bounds, got {low}, {high}")
    if high <= low:
        pad = max(abs(low) * 0.05, min_step) or 1.0
        low, high = low - pad, high + pad
    raw = max((high - low) / max(count - 1, 1), min_step)
    if not math.isfinite(raw) or raw <= 0.0:  # a span too wide or too narrow for floats
        return [low, high]
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw * (1 - 1e-9))
    if min_step >= 1:
        step = float(max(round(step), 1))
    first = math.floor(low / step + 1e-9)
    ticks = [first * step]
    while ticks[-1] < high - step * 1e-9:
        ticks.append((first + len(ticks)) * step)
    return ticks


def _label(value: float, digits: int = 3) -> str:
    return "0" if value == 0 else f"{value:.{digits}g}"


def _draw_panel(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
                box: tuple[int, int, int, int], name: str, points: Sequence[tuple[int, float]],
                colour: tuple[int, int, int]) -> None:
    left, top, right, bottom = box
    x0, y0 = left + MARGIN["left"], top + MARGIN["top"]
    x1, y1 = right - MARGIN["right"], bottom - MARGIN["bottom"]
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    title = name if not finite else f"{name}   last {_label(finite[-1][1], 4)} at step {finite[-1][0]}"
    draw.text((x0, top + 6), title, fill=TEXT, font=font)
    draw.rectangle((x0, y0, x1, y1), outline=FRAME)
    if not finite:
        draw.text(((x0 + x1) // 2, (y0 + y1) // 2), "no data yet", fill=FRAME, font=font, anchor="mm")
        return
    steps, values = [s for s, _ in finite], [v for _, v in finite]
    xt = nice_ticks(min(steps), max(steps), min_step=1.0)
    yt = nice_ticks(min(values), max(values))
    xlo, xhi = xt[0], xt[-1]
    ylo, yhi = yt[0], yt[-1]

    def px(step: float) -> float:
        return x0 + (step - xlo) / (xhi - xlo) * (x1 - x0)

    def py(value: float) -> float:
        return y1 - (value - ylo) / (yhi - ylo) * (y1 - y0)

    for t in yt:
        y = py(t)
        draw.line((x0 + 1, y, x1 - 1, y), fill=GRID)
        draw.text((x0 - 6, y), _label(t), fill=TEXT, font=font, anchor="rm")
    for t in xt:
        x = px(t)
        draw.line((x, y1, x, y1 + 4), fill=FRAME)
        draw.text((x, y1 + 6), str(round(t)), fill=TEXT, font=font, anchor="ma")
    coords = [(px(s), py(v)) for s, v in finite]
    if len(coords) == 1:
        (x, y), r = coords[0], 3
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    else:
        draw.line(coords, fill=colour, width=2, joint="curve")


def render_plot(series: Sequence[Series], width: int, height: int) -> bytes:
    """A ``width`` x ``height`` PNG with one panel per series, top to bottom."""
    if not series:
        raise ValueError("nothing to plot")
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    panel = height / len(series)
    for i, (name, points) in enumerate(series):
        box = (0, round(i * panel), width, round((i + 1) * panel))
        _draw_panel(draw, font, box, name, points, COLOURS[i % len(COLOURS)])
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()
