"""Render per-frame metric curves (identity similarity, flow, CLIP-I) as an image with PIL (no matplotlib)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
MISSING = (214, 39, 40)


@dataclasses.dataclass
class Panel:
    """One chart: ``series`` are lists of values over frames (``None`` = no value: a gap, marked red when
    ``mark_missing``); ``mean`` draws a dashed reference line; ``message`` replaces an empty chart."""

    title: str
    series: list
    mean: float | None = None
    mark_missing: bool = False
    message: str = ""
    x_label: str = "frame"


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _draw_panel(draw: ImageDraw.ImageDraw, panel: Panel, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 56, x1 - 12, y0 + 22, y1 - 24
    draw.text((x0 + 8, y0 + 4), panel.title, fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    values = [v for s in panel.series for v in _finite(s)]
    if not values:
        draw.text((left + 10, (top + bottom) // 2 - 6), panel.message or "no values", fill=MISSING)
        return
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * 0.08, 1e-3 if hi == lo else 0.0)
    lo, hi = lo - pad, hi + pad
    n = max(len(s) for s in panel.series)

    def px(i: float, v: float) -> tuple[float, float]:
        return (left + (i / max(n - 1, 1)) * (right - left), top + (hi - v) / (hi - lo) * (bottom - top))

    if panel.mean is not None:
        for xa in range(left, right, 8):
            ya = px(0, panel.mean)[1]
            draw.line([(xa, ya), (min(xa + 4, right), ya)], fill=(120, 120, 120))
        draw.text((right - 90, px(0, panel.mean)[1] - 12), f"mean {panel.mean:.3f}", fill=(90, 90, 90))
    for k, series in enumerate(panel.series):
        colour = COLOURS[k % len(COLOURS)]
        run = []
        for i, v in enumerate(list(series) + [None]):
            if v is not None and math.isfinite(v):
                run.append(px(i, float(v)))
                continue
            if len(run) > 1:
                draw.line(run, fill=colour, width=2)
            for p in run:
                draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
            run = []
            if panel.mark_missing and i < len(series):
                xm = px(i, lo)[0]
                draw.line([(xm, bottom - 6), (xm, bottom)], fill=MISSING, width=2)
    draw.text((x0 + 4, top), f"{hi - pad:.3g}", fill="black")
    draw.text((x0 + 4, bottom - 10), f"{lo + pad:.3g}", fill="black")
    draw.text((left, bottom + 4), "0", fill="black")
    draw.text(((left + right) // 2 - 12, bottom + 4), panel.x_label, fill="black")
    draw.text((right - 24, bottom + 4), f"{n - 1}", fill="black")


def render_panels(panels: list[Panel], footer: list[str] = (), legend: list[str] = (), width: int = 640,
                  panel_height: int = 170) -> Image.Image:
    """Stack ``panels`` vertically, then ``legend`` (series k's name in series k's colour) and ``footer`` text."""
    lines = [(f"-- {name}", COLOURS[k % len(COLOURS)]) for k, name in enumerate(legend)]
    lines += [(text.replace("\u2191", ""), (0, 0, 0)) for text in footer]  # PIL's default font has no arrows
    height = max(1, len(panels)) * panel_height + 14 * len(lines) + (10 if lines else 0)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for k, panel in enumerate(panels):
        _draw_panel(draw, panel, (0, k * panel_height, width, (k + 1) * panel_height))
    for k, (text, colour) in enumerate(lines):
        draw.text((8, len(panels) * panel_height + 4 + 14 * k), text, fill=colour)
    return img


def to_image_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> ComfyUI IMAGE ``[1, H, W, 3]`` float 0..1."""
    return torch.from_numpy(np.array(img)).float()[None] / 255.0  # np.array: a writable copy


def metric_panels(metrics, keys=("face_sim", "flow", "clip_t", "clip_i")) -> list[Panel]:
    """The per-frame panels of a :class:`~.metrics.VideoMetrics` (only the curves it has, in ``keys`` order)."""
    from .metrics import FLOW_SHORT_SIDE, NO_FACE

    panels = []
    for key in keys:
        if key == "face_sim" and "face_sim" in metrics.curves:
            panels.append(Panel(f"identity: cosine to the reference{'s' if metrics.references_used > 1 else ''} per "
                                f"scored frame (red ticks: no face; {metrics.faces_found}/{metrics.frames_scored} "
                                "with a face)", [metrics.curves["face_sim"]], mean=metrics.face_sim,
                                mark_missing=True, message=NO_FACE, x_label="scored frame"))
        elif key == "flow" and "flow" in metrics.curves:
            panels.append(Panel(f"dynamics: mean optical flow per pair, px/s at short side {FLOW_SHORT_SIDE} "
                                f"({metrics.analysis_fps:g} fps analysed)", [metrics.curves["flow"]],
                                mean=metrics.dynamics, x_label="frame pair"))
        elif key == "clip_t" and "clip_t" in metrics.curves:
            panels.append(Panel("text-video: CLIP-T per frame", [metrics.curves["clip_t"]], mean=metrics.clip_t))
        elif key == "clip_i" and "clip_i" in metrics.curves:
            panels.append(Panel("subject: CLIP-I per frame", [metrics.curves["clip_i"]], mean=metrics.clip_i))
    return panels
