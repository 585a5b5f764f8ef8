"""Render DualReal's blend (α per denoising step and block group) as an image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from .dualreal import BLEND_SCALE


def _colour(value: float) -> tuple[int, int, int]:
    """0 (all motion) -> orange, 0.1 (even) -> white, 0.2 (all identity) -> blue."""
    t = max(0.0, min(1.0, value / BLEND_SCALE))
    motion, even, identity = np.array([230, 120, 30]), np.array([255, 255, 255]), np.array([40, 90, 200])
    c = motion + (even - motion) * (t * 2) if t < 0.5 else even + (identity - even) * ((t - 0.5) * 2)
    return tuple(int(v) for v in c)


def render_alpha_heatmap(alpha: torch.Tensor, cell: int = 24) -> torch.Tensor:
    """α [steps, groups] -> IMAGE [1, H, W, 3] float 0..1: rows = block groups, columns = steps, colour =
    identity share (blue: identity weight α high, orange: motion weight 0.2 − α high), values printed."""
    steps, groups = alpha.shape
    left, top, bottom = 70, 34, 40
    w, h = left + steps * cell + 10, top + groups * cell + bottom
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), "DualReal blend: identity alpha (blue) vs motion 0.2-alpha (orange)", fill="black")
    for g in range(groups):
        draw.text((6, top + g * cell + cell // 3), f"group {g}", fill="black")
        for s in range(steps):
            x0, y0 = left + s * cell, top + g * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=_colour(float(alpha[s, g])))
    draw.text((left, top + groups * cell + 6), "step 1", fill="black")
    draw.text((left + max(0, steps - 2) * cell, top + groups * cell + 6), f"step {steps}", fill="black")
    draw.text((left, top + groups * cell + 22), f"alpha min {float(alpha.min()):.3f}  max {float(alpha.max()):.3f}",
              fill="black")
    return torch.from_numpy(np.array(img)).float()[None] / 255.0  # np.array: a writable copy
