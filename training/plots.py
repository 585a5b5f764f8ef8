"""Tiny PNG line plots with PIL (no matplotlib dependency): training curves for reports."""

from __future__ import annotations

import os

from PIL import Image, ImageDraw


def line_plot_png(path: str, xs, ys, *, title: str = "", ylabel: str = "", hline: float | None = 0.0,
                  size=(640, 360)) -> str:
    """Write a line plot of ``ys`` over ``xs`` with axes, min/max labels and an optional reference line."""
    w, h = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    xs, ys = list(map(float, xs)), list(map(float, ys))
    if not xs:
        raise ValueError("nothing to plot")
    y_lo, y_hi = min(ys + ([hline] if hline is not None else [])), max(ys + ([hline] if hline is not None else []))
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 1, y_hi + 1
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (w - left - right),
                top + (y_hi - y) / (y_hi - y_lo) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    if hline is not None:
        draw.line([px(x_lo, hline), px(x_hi, hline)], fill=(160, 160, 160), width=1)
    points = [px(x, y) for x, y in zip(xs, ys)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for p in points:
        draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=(31, 119, 180))
    draw.text((left, 8), title, fill="black")
    draw.text((4, top), f"{y_hi:.3g}", fill="black")
    draw.text((4, h - bottom - 10), f"{y_lo:.3g}", fill="black")
    draw.text((4, (top + h - bottom) // 2), ylabel[:10], fill="black")
    draw.text((left, h - bottom + 6), f"{x_lo:g}", fill="black")
    draw.text((w - right - 40, h - bottom + 6), f"{x_hi:g}", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path
