"""Motion (models/motion.py): dynamics in px/s independent of the frame rate and resolution, VBench's dynamic degree
and OpenS2V's motion_fb against implementations written here from the published scripts' rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from magicmirror_video.models import metrics, motion  # noqa: E402


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).uniform(0, 255, (h, w)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 2.0)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min()) * 255
    return np.repeat(smooth[..., None], 3, -1).astype(np.uint8)


def moving_texture(h: int, w: int, fps: float, seconds: float, speed=(48.0, 0.0), scale: float = 1.0) -> np.ndarray:
    """A textured plane moving at ``speed`` px/s (at the short side ``h / scale``), sampled at ``fps``: frame k is the
    plane shifted by ``speed * k / fps`` (bilinear, sub-pixel), i.e. the same continuous motion at any frame rate."""
    base = _texture(int(h / scale), int(w / scale))
    base = cv2.resize(base, (w, h), interpolation=cv2.INTER_LINEAR) if scale != 1 else base
    big = cv2.copyMakeBorder(base, h, h, w, w, cv2.BORDER_REFLECT)
    frames = []
    for k in range(int(round(seconds * fps)) + 1):
        dx, dy = (s * scale * k / fps for s in speed)
        m = np.float32([[1, 0, w - dx], [0, 1, h - dy]])     # output pixel p shows big[p + (w, h) - shift]
        frames.append(cv2.warpAffine(big, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP))
    return np.stack(frames)


def test_thinning_interval_is_vbench_round():
    for fps, interval in ((8, 1), (12, 2), (16, 2), (20, 2), (24, 3), (25, 3), (30, 4), (4, 1), (60, 8)):
        assert motion.thinning_interval(fps) == max(1, round(fps / 8)) == interval, fps


def test_dynamics_are_the_same_at_8_12_16_24_and_30_fps():
    """The same motion (48 px/s at short side 256) written at five frame rates: dynamics within 5 % of each other
    and of 48 px/s, while the old per-frame flow differs by the frame-rate ratio."""
    values, per_frame = {}, {}
    for fps in (8, 12, 16, 24, 30):
        video = moving_texture(256, 384, fps, seconds=1.5)
        m = motion.video_motion(video, fps)
        values[fps] = m.dynamics
        if fps in (8, 16):  # every frame, no thinning: px/frame
            per_frame[fps] = motion.video_motion(video, motion.ANALYSIS_FPS).pair_mean.mean()
        assert m.indices == list(range(0, len(video), motion.thinning_interval(fps)))
    print({fps: round(v, 3) for fps, v in values.items()}, per_frame)
    assert max(values.values()) <= 1.05 * min(values.values()), values
    for fps, value in values.items():
        assert value == pytest.approx(48.0, rel=0.05), (fps, value)
    assert per_frame[8] == pytest.approx(2 * per_frame[16], rel=0.05)  # what px/frame did


def test_dynamics_are_the_same_at_two_resolutions():
    small = motion.video_motion(moving_texture(256, 384, 16, 1.5), 16).dynamics
    large = motion.video_motion(moving_texture(512, 768, 16, 1.5, scale=2.0), 16).dynamics  # same motion, 2x pixels
    assert large == pytest.approx(small, rel=0.05) and small == pytest.approx(48.0, rel=0.05)


def test_static_video_has_no_dynamics_and_does_not_move():
    still = np.stack([_texture(256, 384)] * 9)
    m = motion.video_motion(still, 8)
    assert m.dynamics < 0.05 and m.moves is False
    assert motion.video_motion(still[:1], 8).dynamics is None and motion.video_motion(still[:1], 8).moves is None


def _vbench_reference(frames: np.ndarray, fps: float) -> tuple[list, bool]:
    """VBench dynamic_degree.py's rule written out: frames[::max(1, round(fps/8))]; per pair the mean of the
    int(h*w*0.05) largest flow magnitudes (Farneback here, at short side 256); moving when the number of pairs
    above 6 * short/256 reaches round(4 * n / 16), counted in order."""
    kept = frames[::max(1, round(fps / 8))]
    h, w = kept.shape[1:3]
    size = (round(w * 256 / min(h, w)), round(h * 256 / min(h, w)))
    gray = [cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA if min(h, w) > 256
                       else cv2.INTER_LINEAR) for f in kept]
    scores = []
    for a, b in zip(gray[:-1], gray[1:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        rad = np.sqrt(flow[..., 0].astype(np.float64) ** 2 + flow[..., 1] ** 2).ravel()
        cut = int(rad.size * 0.05)
        scores.append(float(np.sort(rad)[::-1][:cut].mean()))
    threshold, needed = 6.0 * min(gray[0].shape) / 256.0, round(4 * (len(kept) / 16.0))
    count, moves = 0, False
    for s in scores:
        count += s > threshold
        if count >= needed:
            moves = True
            break
    return scores, moves


@pytest.mark.parametrize("speed,fps", [((48.0, 0.0), 16), ((8.0, 4.0), 8), ((160.0, 0.0), 24), ((0.0, 0.0), 8)])
def test_dynamic_degree_follows_vbench(speed, fps):
    video = moving_texture(240, 320, fps, seconds=1.5, speed=speed)
    m = motion.video_motion(video, fps)
    scores, moves = _vbench_reference(video, fps)
    np.testing.assert_allclose(m.pair_top, scores, rtol=1e-6)
    assert m.moves == moves and m.threshold == pytest.approx(6.0)
    assert m.needed == round(4 * len(m.indices) / 16)
    # 48 px/s at 8 fps = 6 px per pair: the threshold itself; 160 px/s moves, 8 px/s and a still video do not
    if speed[0] >= 160:
        assert moves
    if math.hypot(*speed) < 10:
        assert not moves


def test_vbench_count_rule():
    assert motion.vbench_moves([7, 1, 7], 6.0, 2) and not motion.vbench_moves([7, 1, 1], 6.0, 2)
    assert motion.vbench_moves([1.0], 6.0, 0) and not motion.vbench_moves([], 6.0, 0)
    assert motion.vbench_needed_pairs(49) == 12 and motion.vbench_needed_pairs(6) == 2  # round(1.5) = 2
    assert motion.vbench_needed_pairs(10) == 2  # round(2.5) = 2 (Python rounds half to even, as VBench runs it)


def test_motion_fb_follows_opens2v():
    """OpenS2V get_motionscore.py: every frame, full resolution, the RGB frame read with BGR->gray weights,
    Farneback, each flow map resized to 16 px wide (INTER_AREA), mean over pairs, mean of both signed components,
    absolute value."""
    video = moving_texture(120, 160, 8, seconds=1.0, speed=(-24.0, 8.0))
    gray = [0.114 * f[..., 0].astype(np.float64) + 0.587 * f[..., 1] + 0.299 * f[..., 2] for f in video]
    gray = [np.clip(np.round(g), 0, 255).astype(np.uint8) for g in gray]
    maps = []
    for a, b in zip(gray[:-1], gray[1:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        maps.append(cv2.resize(flow, (16, int(flow.shape[0] * 16 / flow.shape[1])), interpolation=cv2.INTER_AREA))
    expected = abs(float(np.mean(np.mean(np.array(maps), axis=0))))
    assert motion.motion_fb(video) == pytest.approx(expected, rel=1e-4)
    assert expected > 0.5  # signed mean of (-3, +1) px/frame components: ~1 px
    assert motion.motion_fb(video[:1]) is None


def test_evaluate_video_reports_motion_with_its_counts():
    video = moving_texture(240, 320, 16, seconds=1.0)
    out = metrics.evaluate_video(video, fps=16, protocol="opens2v")
    assert out.dynamics == pytest.approx(48.0 * 256 / 240, rel=0.05)  # px/s at short side 256
    assert out.counts["dynamics"] == len(range(0, len(video), 2)) - 1 and out.analysis_fps == 8.0
    assert out.dynamic_degree in (0.0, 1.0) and out.motion_fb is not None and out.counts["motion_fb"] == len(video) - 1
    assert "Farneback" in out.flow and "px/s" in out.report()
    unknown = metrics.evaluate_video(video, fps=None)
    assert unknown.dynamics is None and unknown.unavailable["dynamics"] == "frame rate unknown"


def test_raft_flow_plumbing():
    """torchvision's raft_large (random weights: only the plumbing is real) at full resolution, padded to /8:
    VBench's threshold scales with the short side; original-RAFT key names convert to torchvision's."""
    pytest.importorskip("torchvision")
    import torch
    from torchvision.models.optical_flow import raft_large

    torch.manual_seed(0)
    model = raft_large(weights=None, progress=False).eval()
    flow = motion.RaftFlow(model)
    video = moving_texture(132, 140, 8, seconds=0.25)                          # 3 frames, 132 -> padded 136
    m = motion.video_motion(video, 8, flow)
    assert m.threshold == pytest.approx(6.0 * 132 / 256) and len(m.pair_mean) == 2 and "RAFT" in m.flow
    renamed = {"module.fnet.conv1.weight": 1, "module.cnet.layer2.0.norm3.weight": 2, "cnet.layer2.0.norm1.bias": 3,
               "update_block.gru.convz2.bias": 4, "update_block.encoder.convc1.weight": 5,
               "update_block.mask.2.weight": 6, "cnet.conv2.bias": 7}
    assert motion.raft_state_dict_from_original(renamed) == {
        "feature_encoder.convnormrelu.0.weight": 1, "context_encoder.layer2.0.convnormrelu1.1.bias": 3,
        "update_block.recurrent_block.convgru2.convz.bias": 4, "update_block.motion_encoder.convcorr1.0.weight": 5,
        "mask_predictor.conv.weight": 6, "context_encoder.conv.bias": 7}
    assert set(motion.raft_state_dict_from_original({k: v for k, v in model.state_dict().items()})) == \
        set(model.state_dict())  # torchvision names pass unchanged
