"""Reading and writing video files with PyAV (shared by the demo and the trainers)."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import torch


def write_video(path: str, frames: torch.Tensor, fps: float = 8.0, crf: int = 18) -> str:
    """Write frames ``[T, H, W, 3]`` float 0..1 as H.264 mp4, atomically (temp file + rename)."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got {tuple(frames.shape)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    tmp = f"{path}.tmp-{os.getpid()}.mp4"
    with av.open(tmp, mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = data.shape[2] // 2 * 2, data.shape[1] // 2 * 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in data:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[: stream.height, : stream.width]), format="rgb24")
            container.mux(stream.encode(vf))
        container.mux(stream.encode())
    os.replace(tmp, path)
    return path


def read_video(path: str) -> tuple[torch.Tensor, float]:
    """Decode a video file to ``([T, H, W, 3]`` float 0..1, fps)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.base_rate or 8)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path!r} has no decodable video frames")
    return torch.from_numpy(np.stack(frames)).float() / 255.0, fps
