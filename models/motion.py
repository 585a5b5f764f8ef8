"""Motion of a video that means the same at any frame rate and resolution, and VBench's dynamic degree.

**Frames analysed.** VBench's ``vbench/dynamic_degree.py`` (``DynamicDegree.get_frames``) keeps every
``interval``-th decoded frame, ``interval = max(1, round(fps / 8))`` (Python's ``round``), i.e. about
8 frames per second: a 16 fps video and an 8 fps video of the same motion give the same frame pairs.
Both numbers below come from the optical flow of those consecutive kept frames.

**Flow.** OpenCV Farneback (the default; :class:`FarnebackFlow`) on grayscale frames resized, aspect
kept, to a short side of 256 px; or RAFT (:class:`RaftFlow`, torchvision's ``raft_large`` with a
weights file the user has — VBench's ``raft-things.pth`` or a torchvision ``raft_large_*.pth``) at full
resolution, replicate-padded to a multiple of 8 as RAFT's ``InputPadder`` does, 20 refinement steps
(VBench's setting). Every report names the flow used.

**Dynamics** (px/s): per frame pair, the mean flow magnitude over the frame expressed in pixels at a
short side of 256 (RAFT's full-resolution flow is scaled by 256 / short side), divided by the time
between the two frames, ``interval / fps``; the video's value is the mean over its pairs. Independent
of the frame rate (per second, fixed analysis rate) and of the resolution (short side 256).

**Dynamic degree** (VBench): per pair the mean of the largest 5 % flow magnitudes (``int(h·w·0.05)``
values of the flow field as computed: 256-short-side for Farneback, the padded full frame for RAFT);
the video "moves" when at least ``round(4 · n / 16)`` of its pairs score above ``6 · s / 256`` (``n`` =
frames kept, ``s`` = the analysed frame's short side: 6 px at short side 256). The column is the share
of moving videos. With Farneback instead of RAFT the decision is VBench's rule on another flow, so
compare it with VBench's numbers only when the report says ``raft``.

**OpenS2V motion** (``motion_fb`` of OpenS2V-Nexus ``eval/get_motionscore.py``): Farneback on every
frame at full resolution (the RGB frame converted with OpenCV's BGR->gray weights, as that script
does), each flow map resized to 16 px wide (``INTER_AREA``), averaged over the pairs, then the mean
of both signed components, absolute value. It is the raw number that script writes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

import numpy as np
import torch

ANALYSIS_FPS = 8.0
FLOW_SHORT_SIDE = 256
# cv2.calcOpticalFlowFarneback(prev, next, flow, pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags)
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)
VBENCH_THRESHOLD = 6.0     # px at a short side of 256
VBENCH_TOP_SHARE = 0.05
RAFT_UPDATES = 20
RAFT_FILE_NAMES = ("raft-things.pth", "raft_large_C_T_V1-22a6c225.pth", "raft_large_C_T_V2-1bb1363a.pth",
                   "raft_large_C_T_SKHT_V1-0b8c9e55.pth", "raft_large_C_T_SKHT_V2-ff5fadd5.pth")
MOTION_FB_WIDTH = 16

Progress = Callable[[int, int], None]


def thinning_interval(fps: float) -> int:
    """VBench's frame step for its dynamic degree: ``max(1, round(fps / 8))`` (banker's rounding, as Python)."""
    return max(1, round(float(fps) / ANALYSIS_FPS))


def analysis_size(height: int, width: int, short_side: int = FLOW_SHORT_SIDE) -> tuple[int, int]:
    """(height, width) with the short side scaled to ``short_side``, aspect kept."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def top_share_mean(magnitude: np.ndarray, share: float = VBENCH_TOP_SHARE) -> float:
    """Mean of the ``int(size * share)`` largest values (VBench ``DynamicDegree.get_score``; 0 values -> NaN)."""
    flat = np.asarray(magnitude, np.float64).ravel()
    k = int(flat.size * share)
    if k == 0:
        return float("nan")
    return float(np.partition(flat, flat.size - k)[flat.size - k:].mean())


def vbench_needed_pairs(frames_kept: int) -> int:
    """How many pairs must move: ``round(4 * n / 16)`` with VBench's ``round``."""
    return round(4 * (frames_kept / 16.0))


def vbench_moves(scores, threshold: float, needed: int) -> bool:
    """VBench ``check_move``: count pairs above ``threshold`` in order, True once the count reaches ``needed``
    (so with ``needed == 0`` any video with a pair moves; a video without pairs never does)."""
    count = 0
    for score in scores:
        if score > threshold:
            count += 1
        if count >= needed:
            return True
    return False


# --------------------------------------------------------------------------------------------- flows


class FarnebackFlow:
    """OpenCV Farneback on grayscale frames at a short side of 256 px."""

    name = "farneback"

    def describe(self) -> str:
        return f"Farneback (OpenCV) on grayscale frames at short side {FLOW_SHORT_SIDE}"

    def prepare(self, frames: np.ndarray) -> list:
        import cv2

        h, w = analysis_size(frames.shape[1], frames.shape[2])
        interpolation = cv2.INTER_AREA if h < frames.shape[1] else cv2.INTER_LINEAR
        return [cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (w, h), interpolation=interpolation) for f in frames]

    def __call__(self, a, b) -> tuple:
        """(flow [h, w, 2] of the analysed frames, its px -> px-at-short-side-256 factor, VBench's threshold in
        flow px, the padding (left, right, top, bottom) inside the flow field or None)."""
        import cv2

        flow = cv2.calcOpticalFlowFarneback(a, b, None, *FARNEBACK)                 # [h,w,2]
        return flow, FLOW_SHORT_SIDE / min(a.shape), VBENCH_THRESHOLD * min(a.shape) / FLOW_SHORT_SIDE, None


class RaftFlow:
    """torchvision ``raft_large`` at full resolution (VBench's RAFT setting), from a weights file."""

    name = "raft"

    def __init__(self, model, path: str = "", device: torch.device | str = "cpu"):
        self.model, self.path, self.device = model, path, torch.device(device)

    def describe(self) -> str:
        name = os.path.basename(self.path) or "given model"
        return f"RAFT (torchvision raft_large, {name}, {RAFT_UPDATES} updates) at full resolution"

    def prepare(self, frames: np.ndarray) -> list:
        return [torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1)[None].float() for f in frames]  # [1,3,H,W]

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> tuple:
        """As :meth:`FarnebackFlow.__call__`; the flow covers the padded frame (VBench scores it so)."""
        import torch.nn.functional as F

        h, w = a.shape[-2:]
        pad_h, pad_w = (8 - h % 8) % 8, (8 - w % 8) % 8
        pad = [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]      # RAFT InputPadder 'sintel'
        x = torch.cat([a, b]).to(self.device)
        x = F.pad(x, pad, mode="replicate") / 127.5 - 1.0                            # RAFT: 2 * (x / 255) - 1
        flow = self.model(x[:1], x[1:], num_flow_updates=RAFT_UPDATES)[-1][0]        # [2, H', W'] padded
        flow = flow.permute(1, 2, 0).float().cpu().numpy()
        return flow, FLOW_SHORT_SIDE / min(h, w), VBENCH_THRESHOLD * min(h, w) / FLOW_SHORT_SIDE, pad


def raft_state_dict_from_original(sd: dict) -> dict:
    """Keys of the original RAFT code (``princeton-vl/RAFT``, e.g. VBench's ``raft-things.pth``, with or without
    ``module.``) -> torchvision ``raft_large``'s. The same tensors under torchvision's names; the original's
    duplicate ``norm3`` entries (the BatchNorm of a downsample branch, listed twice) are dropped."""
    out = {}
    for key, value in sd.items():
        k = re.sub(r"^module\.", "", key)
        if re.search(r"net\.layer\d\.\d\.norm3\.", k):
            continue
        k = re.sub(r"^fnet\.", "feature_encoder.", k)
        k = re.sub(r"^cnet\.", "context_encoder.", k)
        k = re.sub(r"_encoder\.conv1\.", "_encoder.convnormrelu.0.", k)
        k = re.sub(r"_encoder\.norm1\.", "_encoder.convnormrelu.1.", k)
        k = re.sub(r"_encoder\.conv2\.", "_encoder.conv.", k)
        k = re.sub(r"(layer\d\.\d)\.conv(\d)\.", r"\1.convnormrelu\2.0.", k)
        k = re.sub(r"(layer\d\.\d)\.norm(\d)\.", r"\1.convnormrelu\2.1.", k)
        k = re.sub(r"^update_block\.encoder\.convc(\d)\.", r"update_block.motion_encoder.convcorr\1.0.", k)
        k = re.sub(r"^update_block\.encoder\.convf(\d)\.", r"update_block.motion_encoder.convflow\1.0.", k)
        k = re.sub(r"^update_block\.encoder\.conv\.", "update_block.motion_encoder.conv.0.", k)
        k = re.sub(r"^update_block\.gru\.conv([zrq])(\d)\.", r"update_block.recurrent_block.convgru\2.conv\1.", k)
        k = re.sub(r"^update_block\.mask\.0\.", "mask_predictor.convrelu.0.", k)
        k = re.sub(r"^update_block\.mask\.2\.", "mask_predictor.conv.", k)
        out[k] = value
    return out


def load_raft(path: str, device: torch.device | str = "cpu") -> RaftFlow:
    """:class:`RaftFlow` from a RAFT weights file: torchvision's ``raft_large_*.pth`` or the original code's
    ``raft-things.pth`` (VBench's), read with ``weights_only=True`` (or .safetensors). Needs torchvision (every
    ComfyUI install has it); ImportError otherwise."""
    from torchvision.models.optical_flow import raft_large

    from .cogvideox import WeightsFileError, read_safetensors, read_torch_pickle

    sd = read_safetensors(path)[0] if path.endswith((".safetensors", ".sft")) else read_torch_pickle(path)
    if any(re.sub(r"^module\.", "", k).startswith(("fnet.", "cnet.")) for k in sd):
        sd = raft_state_dict_from_original(sd)
    model = raft_large(weights=None, progress=False)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise WeightsFileError(f"{os.path.basename(path)}: not RAFT-large weights ({str(e)[:300]})") from e
    return RaftFlow(model.eval().requires_grad_(False).to(device), path, device)


# --------------------------------------------------------------------------------------------- motion


@dataclasses.dataclass
class Motion:
    """The flow statistics of one video (see the module docstring). ``pair_mean`` in px at short side 256,
    ``pair_top`` in px of the flow field (VBench's score), ``threshold`` in the same px."""

    flow: str
    fps: float
    interval: int
    indices: list
    pair_mean: np.ndarray
    pair_top: np.ndarray
    threshold: float
    needed: int

    @property
    def analysis_fps(self) -> float:
        return self.fps / self.interval

    @property
    def dynamics(self) -> float | None:
        """Mean flow per second, px at short side 256 (None without a pair)."""
        if not len(self.pair_mean):
            return None
        return float(np.mean(self.pair_mean) * self.analysis_fps)

    @property
    def moves(self) -> bool | None:
        """VBench's per-video decision (None without a pair)."""
        if not len(self.pair_top):
            return None
        return vbench_moves(self.pair_top, self.threshold, self.needed)


def video_motion(frames: np.ndarray, fps: float, flow=None, progress: Progress | None = None) -> Motion:
    """:class:`Motion` of uint8 frames ``[T, H, W, 3]`` written at ``fps`` (``flow``: default Farneback)."""
    if not fps or fps <= 0:
        raise ValueError(f"dynamics need the video's frame rate, got fps={fps}")
    flow = flow or FarnebackFlow()
    interval = thinning_interval(fps)
    indices = list(range(0, len(frames), interval))
    prepared = flow.prepare(frames[indices])
    means, tops, threshold = [], [], VBENCH_THRESHOLD
    for k in range(1, len(prepared)):
        field, to_256, threshold, pad = flow(prepared[k - 1], prepared[k])
        magnitude = np.sqrt((field.astype(np.float64) ** 2).sum(-1))                # [h, w] (padded for RAFT)
        tops.append(top_share_mean(magnitude))
        if pad is not None:  # RAFT: the mean over the frame itself, not the replicated border
            left, right, top, bottom = pad
            magnitude = magnitude[top:magnitude.shape[0] - bottom, left:magnitude.shape[1] - right]
        means.append(float(magnitude.mean()) * to_256)
        if progress is not None:
            progress(k, len(prepared) - 1)
    return Motion(flow=flow.describe(), fps=float(fps), interval=interval, indices=indices,
                  pair_mean=np.array(means), pair_top=np.array(tops), threshold=float(threshold),
                  needed=vbench_needed_pairs(len(indices)))


def motion_fb(frames: np.ndarray, progress: Progress | None = None) -> float | None:
    """OpenS2V-Nexus ``eval/get_motionscore.py`` ``motion_fb`` of uint8 RGB frames ``[T, H, W, 3]`` (every frame,
    full resolution; None for one frame)."""
    import cv2

    if len(frames) < 2:
        return None
    gray = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_BGR2GRAY) for f in frames]   # as the script: BGR weights
    small = []
    for t in range(1, len(gray)):
        flow = cv2.calcOpticalFlowFarneback(gray[t - 1], gray[t], None, *FARNEBACK)          # [H,W,2]
        height = int(flow.shape[0] * (MOTION_FB_WIDTH / flow.shape[1]))
        small.append(cv2.resize(flow, (MOTION_FB_WIDTH, height), interpolation=cv2.INTER_AREA))
        if progress is not None:
            progress(t, len(gray) - 1)
    return abs(float(np.mean(np.mean(np.array(small), axis=0))))
