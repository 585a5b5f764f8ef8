"""Reading and writing video files with PyAV (shared by the demo, the nodes' tests and the trainers).

Reading decodes only what is asked for: :func:`index_video` lists every frame's timestamp by demuxing
(no decoding), :func:`read_frames` seeks to the keyframe before each wanted frame, decodes forward and
converts only the wanted frames to uint8 RGB. Memory follows the number of frames asked for, not the
clip's length, and frame ``i`` is exactly frame ``i`` of a full decode (frames are matched by their
timestamps; streams without usable timestamps are decoded from the start, counting frames).
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch


class VideoDecodeError(ValueError):
    """A video that cannot be decoded as asked; ``decoded`` is how many frames were seen, if known."""

    def __init__(self, message: str, decoded: int | None = None):
        super().__init__(message)
        self.decoded = decoded


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a video's header says: frame count (0 when the header has none), frame rate, size."""

    frames: int
    fps: float
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class VideoIndex:
    """Every frame's presentation timestamp (in presentation order) and the keyframes' timestamps."""

    pts: tuple
    keyframes: tuple
    fps: float
    seekable: bool  # timestamps are present and unique (else frames are counted from the start)
    width: int = 0
    height: int = 0

    @property
    def frames(self) -> int:
        return len(self.pts)


def _fps(stream) -> float:
    return float(stream.average_rate or stream.base_rate or 8)


def probe_video(path: str) -> VideoInfo:
    """The header's frame count, fps and size (cheap: no decoding; demuxes only when the header has no count)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = int(stream.frames or 0)
        if not frames:
            frames = sum(1 for p in container.demux(stream) if p.size and not p.is_discard)
        return VideoInfo(frames=frames, fps=_fps(stream), width=stream.codec_context.width,
                         height=stream.codec_context.height)


def index_video(path: str) -> VideoIndex:
    """Demux (without decoding) the first video stream of ``path`` and list its frames' timestamps."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        pts, keys = [], []
        for packet in container.demux(stream):
            if not packet.size or packet.is_discard:  # the flush packet / pre-roll dropped by the decoder
                continue
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
        fps, width, height = _fps(stream), stream.codec_context.width, stream.codec_context.height
    seekable = bool(pts) and None not in pts and len(set(pts)) == len(pts) and None not in keys and bool(keys)
    if seekable:
        pts, keys = sorted(pts), sorted(keys)
    return VideoIndex(pts=tuple(pts), keyframes=tuple(keys), fps=fps, seekable=seekable, width=width, height=height)


def _decode_from_start(container, stream, wanted: dict[int, list[int]], out: list) -> int:
    """Decode from the first frame, converting the frames whose *position* is in ``wanted``; stops after
    the last one. Returns how many frames were decoded."""
    last, seen = max(wanted), 0
    for i, frame in enumerate(container.decode(stream)):
        seen = i + 1
        if i in wanted:
            arr = frame.to_ndarray(format="rgb24")
            for pos in wanted[i]:
                out[pos] = arr
        if i >= last:
            break
    return seen


class _NoSeek(Exception):
    """Seeking did not land where the index said: decode from the start instead."""


def _decode_by_timestamp(container, stream, index: VideoIndex, wanted: dict[int, list[int]], out: list) -> None:
    """Seek to the keyframe before each wanted frame (unless decoding on reaches it sooner) and convert the
    frames whose timestamp is wanted."""
    by_pts = {index.pts[i]: positions for i, positions in wanted.items()}
    frames, last = None, None
    for target in sorted(by_pts):
        if out[by_pts[target][0]] is not None:
            continue  # met on the way to an earlier target
        key = index.keyframes[max(0, bisect.bisect_right(index.keyframes, target) - 1)]
        if frames is None or last is None or key > last:  # a keyframe lies ahead: skip the frames before it
            container.seek(key, stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            if frame.pts is None:
                raise _NoSeek
            last = frame.pts
            positions = by_pts.get(frame.pts)
            if positions is not None and out[positions[0]] is None:
                arr = frame.to_ndarray(format="rgb24")
                for pos in positions:
                    out[pos] = arr
            if frame.pts >= target:
                break
        if out[by_pts[target][0]] is None:
            raise _NoSeek


def read_frames(path: str, indices: Sequence[int], index: VideoIndex | None = None) -> np.ndarray:
    """Frames ``indices`` (0-based, presentation order, repeats allowed) of ``path`` as uint8 ``[F, H, W, 3]``.

    With an ``index`` (:func:`index_video`) it seeks to the keyframe before each wanted frame; without one
    it decodes from the start and stops after the last wanted frame. Only the wanted frames are
    converted to RGB and kept. Raises :class:`VideoDecodeError` when the clip has fewer frames.
    """
    import av

    indices = [int(i) for i in indices]
    if not indices or min(indices) < 0:
        raise ValueError(f"frame indices must be non-negative and at least one, got {indices}")
    total = index.frames if index is not None else None
    if total is not None and max(indices) >= total:
        raise VideoDecodeError(f"{path} has {total} frames; frame {max(indices)} was asked", total)
    wanted: dict[int, list[int]] = {}
    for pos, i in enumerate(indices):
        wanted.setdefault(i, []).append(pos)
    out: list = [None] * len(indices)
    if index is not None and index.seekable:
        try:
            with av.open(path) as container:
                container.streams.video[0].thread_type = "AUTO"
                _decode_by_timestamp(container, container.streams.video[0], index, wanted, out)
            return np.stack(out)
        except _NoSeek:  # timestamps that do not behave: count frames from the start instead
            out = [None] * len(indices)
    with av.open(path) as container:
        container.streams.video[0].thread_type = "AUTO"
        seen = _decode_from_start(container, container.streams.video[0], wanted, out)
    if any(f is None for f in out):
        raise VideoDecodeError(f"{path} has {seen} decodable frames; frame {max(indices)} was asked", seen)
    return np.stack(out)


def read_video(path: str, indices: Sequence[int] | None = None) -> tuple[torch.Tensor, float]:
    """Decode frames ``indices`` (default: all) of a video to ``([F, H, W, 3]`` float 0..1, fps)."""
    index = index_video(path)
    if not index.frames:
        raise ValueError(f"{path!r} has no decodable video frames")
    frames = read_frames(path, range(index.frames) if indices is None else indices, index)
    return torch.from_numpy(frames).float() / 255.0, index.fps


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
