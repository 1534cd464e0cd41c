"""Small line plots drawn with Pillow (no matplotlib offline), e.g. FID against CLIP score.

A plot box of ``width x height`` pixels with margin ``pad`` maps data ``(x, y)`` linearly:

    px = pad + (x - x_lo) / (x_hi - x_lo) * (width - 2 pad)
    py = height - pad - (y - y_lo) / (y_hi - y_lo) * (height - 2 pad)

(`to_pixels`; y grows upwards). `line_plot` draws each series as a polyline with a dot and an
optional text label per point, plus optional horizontal / vertical dashed reference lines.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
REFERENCE_COLOR = (128, 128, 128)


def to_pixels(x, y, x_range, y_range, size, pad):
    """Data ``(x, y)`` -> pixel ``(px, py)`` in an image of ``size = (width, height)``.

    Args:
        x, y: scalars or arrays of data coordinates.
        x_range, y_range: ``(lo, hi)`` data limits of the plot box, ``lo < hi``.
        size: ``(width, height)`` in pixels.
        pad: margin in pixels on every side.

    Raises:
        ValueError: an empty range or a box without room inside the margins.
    """
    (x_lo, x_hi), (y_lo, y_hi), (width, height) = x_range, y_range, size
    if not (x_hi > x_lo and y_hi > y_lo):
        raise ValueError(f"plot ranges must have lo < hi, got x {x_range} and y {y_range}")
    if width <= 2 * pad or height <= 2 * pad:
        raise ValueError(f"size {size} leaves no room inside the margin pad={pad}")
    px = pad + (np.asarray(x, float) - x_lo) / (x_hi - x_lo) * (width - 2 * pad)
    py = height - pad - (np.asarray(y, float) - y_lo) / (y_hi - y_lo) * (height - 2 * pad)
    return px, py


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[str]]], *,
              title: str, x_label: str, y_label: str, size=(720, 480), pad: int = 60,
              h_lines: dict[str, float] | None = None, v_lines: dict[str, float] | None = None,
              margin: float = 0.08) -> Image.Image:
    """An RGB plot of ``series`` (name -> ``(xs, ys, point_labels)``; labels may be empty).

    The data limits cover every point and reference line, widened by ``margin`` of the span
    on each side. ``h_lines`` / ``v_lines``: name -> y / x of a dashed gray reference line.

    Raises:
        ValueError: no points, or ``xs`` / ``ys`` / labels of different lengths.
    """
    h_lines, v_lines = h_lines or {}, v_lines or {}
    xs_all, ys_all = list(v_lines.values()), list(h_lines.values())
    for name, (xs, ys, labels) in series.items():
        if len(xs) != len(ys) or (labels and len(labels) != len(xs)):
            raise ValueError(f"series {name!r}: {len(xs)} xs, {len(ys)} ys and {len(labels)} "
                             "labels; expected equal lengths (labels may be empty)")
        xs_all += list(xs)
        ys_all += list(ys)
    if not any(len(xs) for xs, _, _ in series.values()):
        raise ValueError("line_plot needs at least one point")
    x_range, y_range = _limits(xs_all, margin), _limits(ys_all, margin)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    width, height = size
    place = lambda x, y: tuple(float(v) for v in to_pixels(x, y, x_range, y_range, size, pad))
    draw.rectangle([pad, pad, width - pad, height - pad], outline="black")
    _axis_text(draw, x_range, y_range, size, pad, title, x_label, y_label)
    for name, value in h_lines.items():
        _dashed(draw, place(x_range[0], value), place(x_range[1], value), name)
    for name, value in v_lines.items():
        _dashed(draw, place(value, y_range[1]), place(value, y_range[0]), name)
    for s, (name, (xs, ys, labels)) in enumerate(series.items()):
        color = COLORS[s % len(COLORS)]
        points = [place(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for i, (px, py) in enumerate(points):
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
            if labels:
                draw.text((px + 6, py - 14), str(labels[i]), fill=color)
        draw.text((pad + 200 * s, height - pad + 38), name, fill=color)  # legend, below
    return img


def _limits(values, margin):
    lo, hi = float(min(values)), float(max(values))
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    return lo - margin * span, hi + margin * span


def _axis_text(draw, x_range, y_range, size, pad, title, x_label, y_label):
    width, height = size
    draw.text((pad, pad - 22), title, fill="black")
    draw.text((width // 2 - 4 * len(x_label), height - pad + 22), x_label, fill="black")
    draw.text((4, pad - 40), y_label, fill="black")
    draw.text((pad, height - pad + 6), f"{x_range[0]:.3g}", fill="black")
    draw.text((width - pad - 30, height - pad + 6), f"{x_range[1]:.3g}", fill="black")
    draw.text((4, height - pad - 10), f"{y_range[0]:.3g}", fill="black")
    draw.text((4, pad), f"{y_range[1]:.3g}", fill="black")


def _dashed(draw, start, end, label):
    (x0, y0), (x1, y1) = start, end
    length = max(abs(x1 - x0), abs(y1 - y0))
    for a in np.arange(0.0, length, 12.0):
        b = min(a + 6.0, length)
        draw.line([x0 + (x1 - x0) * a / length, y0 + (y1 - y0) * a / length,
                   x0 + (x1 - x0) * b / length, y0 + (y1 - y0) * b / length],
                  fill=REFERENCE_COLOR)
    draw.text((x0 + 4, y0 + 2), label, fill=REFERENCE_COLOR)
