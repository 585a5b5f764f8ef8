"""Video metrics (models/metrics.py) against independent references: insightface's own FaceAnalysis + numpy
cosine, known optical-flow displacements, hand-built landmark tracks; the metric nodes headless."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("insightface")
pytest.importorskip("onnx")
cv2 = pytest.importorskip("cv2")

from magicmirror_video.models import metrics  # noqa: E402
from magicmirror_video.testing import tiny, tiny_faces  # noqa: E402

CPU = ["CPUExecutionProvider"]


def face_video(specs, h=240, w=320) -> np.ndarray:
    """uint8 [T,H,W,3]: one frame per (centre, radius, seed); radius None = no face."""
    return np.stack([tiny_faces.synthetic_face_image(h, w, center=c, radius=r, seed=s) for c, r, s in specs])


def as_image(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).float() / 255.0


def insightface_largest(app, rgb):
    """insightface's own pipeline: FaceAnalysis.get on the BGR image, the largest face (or None)."""
    faces = app.get(np.ascontiguousarray(rgb[..., ::-1]))
    if not faces:
        return None
    return max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))


# --------------------------------------------------------------------------------------------- identity


def test_identity_similarity_equals_insightface_face_analysis(analyzer, insightface_root):
    from insightface.app import FaceAnalysis

    specs = [((160, 120), 50, 1), ((150, 110), 55, 1), (None, None, 0), ((170, 125), 45, 7), ((140, 118), 60, 1),
             ((165, 130), 50, 3), (None, None, 0), ((155, 115), 52, 1), ((160, 120), 48, 7)]
    frames = face_video(specs)
    refs = np.stack([tiny_faces.synthetic_face_image(200, 180, center=(90, 100), radius=60, seed=1),
                     tiny_faces.synthetic_face_image(200, 180, center=(95, 95), radius=55, seed=3)])

    app = FaceAnalysis(name=os.path.join(insightface_root, "models", "antelopev2"), root=insightface_root,
                       allowed_modules=["detection", "recognition"], providers=CPU)
    app.prepare(ctx_id=0, det_thresh=0.5, det_size=(640, 640))
    ref_faces = [insightface_largest(app, r) for r in refs]
    ref_emb = np.stack([f.normed_embedding for f in ref_faces]).astype(np.float64)
    expected = []
    for frame in frames:
        face = insightface_largest(app, frame)
        if face is None:
            expected.append(np.nan)
            continue
        e = face.embedding / np.linalg.norm(face.embedding)
        expected.append(np.mean([float(e @ r) / float(np.linalg.norm(r)) for r in ref_emb]))
    expected = np.array(expected)
    assert np.isnan(expected).sum() == 2  # the two dark frames; the fake detector finds every face

    references = metrics.reference_faces(analyzer, as_image(refs))
    result = metrics.evaluate_video(as_image(frames), analyzer=analyzer, references=references, dynamics=False)
    curve = np.array([np.nan if v is None else v for v in result.curves["face_sim"]])
    np.testing.assert_array_equal(np.isnan(curve), np.isnan(expected))
    np.testing.assert_allclose(curve[~np.isnan(curve)], expected[~np.isnan(expected)], rtol=0, atol=1e-5)
    assert abs(result.face_sim - np.nanmean(expected)) < 1e-5
    assert result.face_rate == pytest.approx(7 / 9)
    q = len(frames) // 4  # 2: first quarter = frames 0, 1; last quarter = frames 7, 8
    assert abs(result.sim_decay - (np.nanmean(expected[-q:]) - np.nanmean(expected[:q]))) < 1e-5


def test_one_detection_per_frame_and_one_batched_recognition_call(analyzer):
    frames = face_video([((160, 120), 50, 1)] * 5 + [(None, None, 0)] * 2 + [((150, 110), 40, 2)] * 3)
    references = metrics.reference_faces(analyzer, as_image(frames[:1]))
    calls = {"detect": [], "run": []}
    detect, session = analyzer.det_model.detect, analyzer.rec_model.session

    class CountingSession:
        def run(self, outputs, feeds):
            calls["run"].append(next(iter(feeds.values())).shape)
            return session.run(outputs, feeds)

    def counting_detect(img, input_size=None, **kwargs):
        calls["detect"].append(input_size)
        return detect(img, input_size=input_size, **kwargs)

    analyzer.det_model.detect, analyzer.rec_model.session = counting_detect, CountingSession()
    try:
        result = metrics.evaluate_video(as_image(frames), analyzer=analyzer, references=references, dynamics=False)
    finally:
        del analyzer.det_model.detect
        analyzer.rec_model.session = session
    assert calls["detect"] == [(640, 640)] * 10  # faceless frames too: one pass, no smaller-size retries
    assert calls["run"] == [(8, 3, 112, 112)]    # every detected face in one recogniser call
    assert result.face_rate == pytest.approx(0.8)


def test_video_without_a_face_is_a_clear_result_not_nan(analyzer):
    dark = face_video([(None, None, s) for s in range(6)])
    references = metrics.reference_faces(analyzer, as_image(face_video([((160, 120), 50, 1)])))
    result = metrics.evaluate_video(as_image(dark), analyzer=analyzer, references=references)
    assert result.face_rate == 0.0
    assert result.face_sim is None and result.sim_decay is None and result.fm_ref is None and result.fm_inter is None
    assert result.curves["face_sim"] == [None] * 6
    assert "no face in any frame" in result.report() and "no face in any frame" in " ".join(result.notes)
    scalars = result.scalars()
    assert set(scalars) == {"face_rate", "dynamics"} and all(math.isfinite(v) for v in scalars.values())
    json.dumps(result.as_dict(), allow_nan=False)  # no NaN anywhere


def test_reference_without_a_face_is_an_error(analyzer):
    from magicmirror_video.models.face_encoder import NoFaceError

    refs = face_video([((160, 120), 50, 1), (None, None, 0)])
    with pytest.raises(NoFaceError, match="reference image 2 of 2"):
        metrics.reference_faces(analyzer, as_image(refs))


def test_reference_embeddings_only(analyzer):
    """A trainer holding FaceEmbeds.arcface (raw ArcFace) gets the same similarity; FM_ref needs landmarks."""
    frames = face_video([((160, 120), 50, 1), ((150, 110), 45, 1), ((170, 125), 50, 1)])
    ref = face_video([((160, 120), 60, 1)])
    full = metrics.evaluate_video(frames, analyzer=analyzer, references=metrics.reference_faces(analyzer, ref),
                                  dynamics=False)
    raw = torch.from_numpy(analyzer.detect_largest(ref[0]).embedding)[None]
    light = metrics.evaluate_video(frames, analyzer=analyzer, references=metrics.ReferenceFaces.from_embeddings(raw),
                                   dynamics=False)
    assert abs(light.face_sim - full.face_sim) < 1e-6 and light.fm_ref is None and full.fm_ref is not None
    assert light.fm_inter == full.fm_inter


# --------------------------------------------------------------------------------------------- face motion


def test_fm_inter_is_zero_for_a_static_face_and_ignores_position_and_scale(analyzer):
    static = face_video([((160, 120), 50, 1)] * 6)
    assert metrics.evaluate_video(static, analyzer=analyzer, dynamics=False).fm_inter == 0.0
    # the fake detector's landmarks sit at fixed places of the face: moving/zooming the face is not face motion
    moving = face_video([((100 + 15 * t, 100 + 5 * t), 40 + 4 * t, 1) for t in range(6)])
    result = metrics.evaluate_video(moving, analyzer=analyzer)
    assert result.fm_inter < 0.01, result.fm_inter
    assert result.dynamics > 1.0  # ... while the frame itself does move


def _shifted_track(step_px: float, frames: int = 7, box=(100.0, 80.0, 200.0, 200.0)):
    """Landmarks moving by ``step_px`` per frame inside a fixed box (larger side 120 px)."""
    base = tiny_faces.kps_template() * 100 + np.array([150.0, 140.0])
    kps = np.stack([base + np.array([step_px * t, 0.5 * step_px * t]) for t in range(frames)])
    return metrics.normalise_landmarks(kps, np.tile(np.array(box), (frames, 1))), base


def test_fm_inter_grows_linearly_with_a_landmark_shift():
    step_norm = math.hypot(1.0, 0.5) / 120.0  # per-frame landmark displacement in face-box units, per px of shift
    values = []
    for step in (0.0, 1.0, 2.0, 4.0, 8.0):
        track, base = _shifted_track(step)
        fm_ref, fm_inter = metrics.face_motion(track, metrics.normalise_landmarks(base, (100, 80, 200, 200))[None])
        assert fm_inter == pytest.approx(step * step_norm, abs=1e-12)
        assert fm_ref == pytest.approx(step * step_norm * np.mean(np.arange(7)), abs=1e-12)  # frame t is t steps away
        values.append(fm_inter)
    assert values[0] == 0.0 and np.allclose(np.diff(values[1:3]), values[1])
    assert values[4] == pytest.approx(8 * values[1])


def test_fm_inter_through_the_pipeline_is_linear_in_a_landmark_shift(analyzer):
    """The fake detector's landmarks never move inside the face box, so shift them: frame t's landmarks move by
    t * step px (box unchanged); FM_inter of evaluate_video must be step * |(1, 0.5)| / larger box side."""
    frames = face_video([((160, 120), 50, 1)] * 5)
    locate = analyzer.locate_largest
    counter = {"t": 0}

    def shifted(image, det_sizes=None, step=0.0):
        box = locate(image, det_sizes=det_sizes)
        box.kps = box.kps + np.array([1.0, 0.5], np.float32) * step * counter["t"]
        counter["t"] += 1
        return box

    side = float(max(np.diff(locate(frames[0]).bbox.reshape(2, 2), axis=0)[0]))
    values = []
    try:
        for step in (0.0, 1.5, 3.0, 6.0):
            counter["t"] = 0
            analyzer.locate_largest = lambda image, det_sizes=None, step=step: shifted(image, det_sizes, step)
            values.append(metrics.evaluate_video(frames, analyzer=analyzer, dynamics=False).fm_inter)
    finally:
        del analyzer.locate_largest
    assert values[0] == 0.0
    for step, value in zip((1.5, 3.0, 6.0), values[1:]):
        assert value == pytest.approx(step * math.hypot(1.0, 0.5) / side, rel=1e-5)


def test_face_motion_skips_faceless_frames():
    track, _ = _shifted_track(2.0, frames=6)
    track[2] = np.nan  # pairs (1,2) and (2,3) drop out; the remaining 3 pairs each move one step
    fm_ref, fm_inter = metrics.face_motion(track)
    assert fm_ref is None and fm_inter == pytest.approx(2.0 * math.hypot(1.0, 0.5) / 120.0)
    assert metrics.face_motion(np.full((4, 5, 2), np.nan), track[:1]) == (None, None)


# --------------------------------------------------------------------------------------------- dynamics


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).uniform(0, 255, (h, w)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 2.0)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min()) * 255
    return np.repeat(smooth[..., None], 3, -1).astype(np.uint8)


def _translated(h: int, w: int, dx: int, dy: int, frames: int = 7) -> np.ndarray:
    """A textured pattern moving by (dx, dy) px per frame (windows of a larger texture, no wrap-around)."""
    big = _texture(h + abs(dy) * frames, w + abs(dx) * frames)
    x0 = 0 if dx >= 0 else abs(dx) * (frames - 1)
    y0 = 0 if dy >= 0 else abs(dy) * (frames - 1)
    return np.stack([big[y0 + dy * t:y0 + dy * t + h, x0 + dx * t:x0 + dx * t + w] for t in range(frames)])


@pytest.mark.parametrize("dx,dy", [(1, 0), (3, 0), (0, -2), (4, 3), (-6, 0)])
def test_flow_recovers_a_known_translation(dx, dy):
    # at the analysis resolution itself (short side 256)
    k = math.hypot(dx, dy)
    flow = metrics.flow_magnitudes(_translated(256, 384, dx, dy))
    assert abs(flow.mean() - k) <= 0.1 * k, (flow, k)
    assert flow.shape == (6,)


def test_flow_is_reported_at_the_analysis_resolution():
    # a 480x720 video moving 6 px/frame moves 6 * 256/480 = 3.2 px/frame at the analysis resolution
    video = _translated(480, 720, 6, 0)
    assert metrics.analysis_size(480, 720) == (256, 384)
    result = metrics.evaluate_video(as_image(video))
    assert abs(result.dynamics - 3.2) <= 0.32, result.dynamics
    assert len(result.curves["flow"]) == 6 and result.face_sim is None and result.face_rate is None
    assert metrics.flow_magnitudes(_translated(256, 384, 0, 0)).max() < 0.01  # a static video: no motion


# --------------------------------------------------------------------------------------------- subject


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    from magicmirror_video.models.clip_vision import load_clip_vision

    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    tiny.build_clip_vision_checkpoint(str(path))
    return load_clip_vision(str(path))


def test_clip_i_is_the_mean_cosine_of_clip_image_embeddings(clip_model):
    frames = face_video([((160, 120), 50, s) for s in (1, 2, 3, 4)], h=112, w=112)
    ref = face_video([((56, 56), 40, 1)], h=112, w=112)
    images, ref_images = as_image(frames), as_image(ref)
    # independent: transformers' forward on hand-normalised pixels, torch cosine
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])

    def embed(x):  # square frames: OpenCLIP's centre crop is the whole frame, then a bicubic resize
        x = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2), size=(56, 56), mode="bicubic",
                                            align_corners=False, antialias=True).clamp(0, 1)
        with torch.no_grad():
            return clip_model(pixel_values=(x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).image_embeds

    expected = torch.nn.functional.cosine_similarity(embed(images), embed(ref_images)).double()
    result = metrics.evaluate_video(images, clip_model=clip_model, clip_references=ref_images, dynamics=False)
    np.testing.assert_allclose(result.curves["clip_i"], expected.numpy(), atol=1e-5)
    assert abs(result.clip_i - float(expected.mean())) < 1e-5
    # the reference itself as a video scores 1
    same = metrics.evaluate_video(ref_images.repeat(3, 1, 1, 1), clip_model=clip_model, clip_references=ref_images,
                                  dynamics=False)
    assert same.clip_i == pytest.approx(1.0, abs=1e-5)


def test_summarise_mean_std_over_videos_skips_undefined():
    rows = [{"face_sim": 0.5, "dynamics": 1.0}, {"face_sim": None, "dynamics": 3.0}, {"face_sim": 0.7, "dynamics": 2.0}]
    table = metrics.summarise(rows, ["face_sim", "dynamics", "clip_i"])
    assert table["face_sim"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1), "n": 2}
    assert table["dynamics"]["mean"] == pytest.approx(2.0) and table["dynamics"]["n"] == 3
    assert table["clip_i"] == {"mean": None, "std": None, "n": 0}
