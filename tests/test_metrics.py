"""Video metrics (models/metrics.py) under the three protocols against independent implementations written here:
insightface's own FaceAnalysis + numpy cosine (magicmirror), and the ConsisID / OpenS2V scripts' procedure
re-done step by step with insightface, OpenCV and the CurricularFace network (consisid, opens2v); hand-built
landmark tracks; the aggregation's counts."""

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
from magicmirror_video.testing import tiny, tiny_faces, tiny_metrics  # noqa: E402

CPU = ["CPUExecutionProvider"]


def face_video(specs, h=240, w=320) -> np.ndarray:
    """uint8 [T,H,W,3]: one frame per (centre, radius, seed); radius None = no face."""
    return np.stack([tiny_faces.synthetic_face_image(h, w, center=c, radius=r, seed=s) for c, r, s in specs])


def as_image(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).float() / 255.0


def insightface_largest(app, bgr):
    """insightface's own pipeline: FaceAnalysis.get on a BGR image, the largest face (or None)."""
    faces = app.get(np.ascontiguousarray(bgr))
    if not faces:
        return None
    return max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))


def face_analysis_app(root, pack, det_size):
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=os.path.join(root, "models", pack), root=root,
                       allowed_modules=["detection", "recognition"], providers=CPU)
    app.prepare(ctx_id=0, det_thresh=0.5, det_size=(det_size, det_size))
    return app


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """An insightface root with fake antelopev2 and buffalo_l packs, and a small CurricularFace file."""
    root = tmp_path_factory.mktemp("packs")
    tiny_faces.build_fake_insightface_pack(str(root), "antelopev2")
    tiny_faces.build_fake_insightface_pack(str(root), "buffalo_l")
    tiny_metrics.build_curricularface_file(str(root / "metrics" / "glint360k_curricular_face_r101_backbone.bin"))
    return root


@pytest.fixture(scope="module")
def buffalo(packs):
    from magicmirror_video.models.face_analysis import FaceAnalyzer

    return FaceAnalyzer(str(packs), name="buffalo_l", providers=CPU)


@pytest.fixture(scope="module")
def curricularface(packs):
    from magicmirror_video.models.curricularface import load_curricularface

    return load_curricularface(str(packs / "metrics" / "glint360k_curricular_face_r101_backbone.bin"))


# --------------------------------------------------------------------------------------------- magicmirror


def test_magicmirror_protocol_equals_insightface_face_analysis(analyzer, insightface_root):
    # two photos of identity 1; identities 3 and 10 have negative cosines to it with the fake recogniser
    specs = [((160, 120), 50, 1), ((150, 110), 55, 1), (None, None, 0), ((170, 125), 45, 10), ((140, 118), 60, 1),
             ((165, 130), 50, 3), (None, None, 0), ((155, 115), 52, 1), ((160, 120), 48, 7)]
    frames = face_video(specs)
    refs = [tiny_faces.synthetic_face_image(200, 180, center=(90, 100), radius=60, seed=1),
            tiny_faces.synthetic_face_image(220, 200, center=(105, 100), radius=80, seed=1)]

    app = face_analysis_app(insightface_root, "antelopev2", 640)
    ref_emb = np.stack([insightface_largest(app, r[..., ::-1]).normed_embedding for r in refs]).astype(np.float64)
    expected = []
    for frame in frames:
        face = insightface_largest(app, frame[..., ::-1])
        if face is None:
            expected.append(np.nan)
            continue
        e = face.embedding / np.linalg.norm(face.embedding)
        expected.append(np.mean([float(e @ r) / float(np.linalg.norm(r)) for r in ref_emb]))  # no clamping
    expected = np.array(expected)
    assert np.isnan(expected).sum() == 2 and (expected[np.isfinite(expected)] < 0).any()  # negatives are kept

    references = metrics.reference_faces(analyzer, refs)
    result = metrics.evaluate_video(as_image(frames), analyzer=analyzer, references=references, dynamics=False)
    assert result.protocol == "magicmirror" and result.frame_indices == list(range(9))
    curve = np.array([np.nan if v is None else v for v in result.curves["face_sim"]])
    np.testing.assert_array_equal(np.isnan(curve), np.isnan(expected))
    np.testing.assert_allclose(curve[~np.isnan(curve)], expected[~np.isnan(expected)], rtol=0, atol=1e-5)
    assert abs(result.face_sim - np.nanmean(expected)) < 1e-5
    assert result.face_rate == pytest.approx(7 / 9) and result.counts["face_sim"] == 7
    faced = expected[np.isfinite(expected)]  # decay over the 7 frames with a face: q = 1
    assert abs(result.sim_decay - (faced[-1] - faced[0])) < 1e-5
    assert result.face_lost_at is None and result.references_used == 2


def test_frames_get_the_reference_ladder_and_one_batched_recognition_call(analyzer):
    frames = face_video([((160, 120), 50, 1)] * 5 + [(None, None, 0)] * 2 + [((150, 110), 40, 2)] * 3)
    references = metrics.reference_faces(analyzer, as_image(frames[:1]))
    calls = {"detect": [], "run": []}
    detect, session = analyzer.det_model.detect, analyzer.rec_model.session

    class CountingSession:
        def run(self, outputs, feeds):
            calls["run"].append(next(iter(feeds.values())).shape)
            return session.run(outputs, feeds)

    def counting_detect(img, input_size=None, **kwargs):
        calls["detect"].append(input_size[0])
        return detect(img, input_size=input_size, **kwargs)

    analyzer.det_model.detect, analyzer.rec_model.session = counting_detect, CountingSession()
    try:
        result = metrics.evaluate_video(as_image(frames), analyzer=analyzer, references=references, dynamics=False)
    finally:
        del analyzer.det_model.detect
        analyzer.rec_model.session = session
    # a face is found at 640 at once; each faceless frame tries the whole ladder, as reference photos do
    assert calls["detect"] == [640] * 5 + [640, 512, 384, 256] * 2 + [640] * 3
    assert calls["run"] == [(8, 3, 112, 112)]    # every detected face in one recogniser call
    assert result.face_rate == pytest.approx(0.8)


def test_closeup_frame_is_found_by_the_ladder(analyzer):
    """A face filling the frame (missed at 640 and 512 by the detector's anchors) is scored: frames use the same
    640 -> 256 ladder as reference photos."""
    closeup = tiny_faces.synthetic_face_image(400, 400, center=(200, 200), radius=196, seed=2)
    assert analyzer.locate_largest(closeup, det_sizes=(640,)) is None
    references = metrics.reference_faces(analyzer, closeup[None])
    result = metrics.evaluate_video(np.stack([closeup] * 3), analyzer=analyzer, references=references, dynamics=False)
    assert result.face_rate == 1.0 and result.face_sim == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------------------------- consisid / opens2v


def _script_reference(app, rgb, cur_model):
    """ConsisID / OpenS2V ``process_image`` + ``inference``, step by step: (ArcFace embedding, CurricularFace unit
    embedding, retried?) or None."""
    from insightface.utils import face_align

    bgr = np.ascontiguousarray(rgb[..., ::-1])
    face, retried = insightface_largest(app, bgr), False
    if face is None:
        h, w = bgr.shape[:2]
        top, left = int(h * 0.25), int(w * 0.25)
        padded = cv2.copyMakeBorder(bgr, top, top, left, left, cv2.BORDER_CONSTANT, value=(128, 128, 128))
        face, retried = insightface_largest(app, padded), True
        if face is None:
            return None
        kps = face.kps - np.array([left, top])
    else:
        kps = face.kps
    crop = cv2.cvtColor(face_align.norm_crop(bgr, landmark=kps, image_size=224), cv2.COLOR_BGR2RGB)
    x = cv2.resize(crop, (112, 112)).transpose(2, 0, 1)[None].astype(np.float32)
    x = (torch.from_numpy(x) / 255 - 0.5) / 0.5
    with torch.no_grad():
        cur = cur_model(x)[0].double().numpy()
    return face.embedding.astype(np.float64), cur / np.linalg.norm(cur), retried


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name", ["consisid", "opens2v"])
def test_published_protocol_equals_the_script_step_by_step(name, packs, buffalo, curricularface):
    """Frame indices (linspace, repeats), buffalo_l at 320 with the 1.25x grey-padded retry (ArcFace of the padded
    detection, CurricularFace on the unpadded 224 crop), cosine clamped at 0, one reference, faceless frames
    skipped, OpenS2V's Cur average over positive frames only."""
    n = metrics.PROTOCOLS[name].num_frames
    specs = [((160, 120), 50, 1), ((150, 110), 55, 2), (None, None, 0), ((170, 125), 45, 7), ((140, 118), 60, 1),
             ((165, 130), 50, 3), (None, None, 0), ((155, 115), 52, 4), ((160, 120), 48, 5), ((150, 125), 50, 6)]
    frames = face_video(specs)
    refs = np.stack([tiny_faces.synthetic_face_image(200, 180, center=(90, 100), radius=60, seed=1),
                     tiny_faces.synthetic_face_image(200, 180, center=(95, 95), radius=55, seed=3)])
    hard = {frames[k][..., ::-1].tobytes() for k in (1, 5)}  # the detector misses these two unpadded frames

    app = face_analysis_app(str(packs), "buffalo_l", 320)
    originals = (app.det_model.detect, buffalo.det_model.detect)

    def missing_hard(detect):
        def wrapped(img, *args, **kwargs):
            if np.ascontiguousarray(img).tobytes() in hard:
                return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
            return detect(img, *args, **kwargs)
        return wrapped

    app.det_model.detect, buffalo.det_model.detect = missing_hard(originals[0]), missing_hard(originals[1])
    try:
        indices = [math.floor(k * (len(frames) - 1) / (n - 1)) for k in range(n)]
        ref_arc, ref_cur, _ = _script_reference(app, refs[0], curricularface)   # the first reference only
        per_frame = {i: _script_reference(app, frames[i], curricularface) for i in set(indices)}  # same frame, same
        raw = {i: (_cos(ref_arc, out[0]), float(ref_cur @ out[1])) for i, out in per_frame.items() if out}
        arc = np.array([max(0.0, raw[i][0]) if i in raw else np.nan for i in indices])
        cur = np.array([max(0.0, raw[i][1]) if i in raw else np.nan for i in indices])
        faced = np.isfinite(arc)
        assert sum(out[2] for out in per_frame.values() if out) >= 2          # the padded retry found faces
        assert not faced.all() and len(set(indices)) < n                      # faceless frames, repeated frames
        assert min(min(v) for v in raw.values()) < 0                          # clamping is exercised
        expected_arc = arc[faced].mean()
        expected_cur = cur[faced & (cur > 0)].mean() if name == "opens2v" else cur[faced].mean()

        models = metrics.FaceModels(curricularface=curricularface)
        references = metrics.reference_faces(buffalo, refs, name, models)
        result = metrics.evaluate_video(frames, protocol=name, analyzer=buffalo, references=references,
                                        face_models=models, dynamics=False)
    finally:
        app.det_model.detect = originals[0]
        del buffalo.det_model.detect
    assert result.frame_indices == indices
    curve = np.array([np.nan if v is None else v for v in result.curves["face_sim"]])
    np.testing.assert_array_equal(np.isfinite(curve), faced)
    np.testing.assert_allclose(curve[faced], arc[faced], atol=1e-5)
    assert (curve[faced] >= 0).all()
    assert result.face_sim == pytest.approx(expected_arc, abs=1e-5)
    assert result.face_sim_cur == pytest.approx(expected_cur, abs=1e-5)
    assert result.counts["face_sim"] == int(faced.sum()) and result.references_used == 1
    assert result.counts["face_sim_cur"] == (int((faced & (cur > 0)).sum()) if name == "opens2v" else int(faced.sum()))
    assert result.num_references == 2 and "1 reference of 2" in result.report()


@pytest.mark.parametrize("name", ["magicmirror", "consisid", "opens2v"])
def test_faceless_video_per_protocol(name, packs, buffalo, analyzer, curricularface):
    """consisid / opens2v: a video without a face scores 0 (their scripts' ``else 0.0``); magicmirror: no value."""
    face_analyzer = analyzer if name == "magicmirror" else buffalo
    dark = face_video([(None, None, s) for s in range(6)])
    models = metrics.FaceModels(curricularface=curricularface)
    references = metrics.reference_faces(face_analyzer, face_video([((160, 120), 50, 1)]), name, models)
    result = metrics.evaluate_video(dark, protocol=name, fps=8, analyzer=face_analyzer, references=references,
                                    face_models=models)
    assert result.face_rate == 0.0 and result.counts["face_rate"] == 0
    if name == "magicmirror":
        assert result.face_sim is None and result.face_sim_cur is None and result.sim_decay is None
        assert set(result.scalars()) == {"face_rate", "dynamics", "dynamic_degree"}
    else:
        assert result.face_sim == 0.0 and result.face_sim_cur == 0.0
        assert "face scores count 0" in result.report()
    assert "no face in any frame" in result.report()
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


def test_decay_is_defined_when_the_face_vanishes_at_the_end(analyzer):
    """The face is there in frames 0..5 and gone in 6..8: the decay is over the 6 frames with a face (q = 1: last
    minus first), and the report says where the face was lost."""
    specs = [((160, 120), 50, s) for s in (1, 1, 2, 3, 4, 5)] + [(None, None, 0)] * 3
    frames = face_video(specs)
    references = metrics.reference_faces(analyzer, face_video([((160, 120), 60, 1)]))
    result = metrics.evaluate_video(frames, analyzer=analyzer, references=references, dynamics=False)
    curve = np.array([np.nan if v is None else v for v in result.curves["face_sim"]])
    assert np.isfinite(curve[:6]).all() and np.isnan(curve[6:]).all()
    assert result.sim_decay == pytest.approx(curve[5] - curve[0], abs=1e-12)
    assert result.face_lost_at == 6
    assert "face lost at frame 6 of 9" in result.report()
    # 9 faced frames -> q = 2
    assert metrics.similarity_decay(np.array([0.9, 0.8, np.nan, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])) == \
        pytest.approx((0.2 + 0.1) / 2 - (0.9 + 0.8) / 2)
    assert metrics.similarity_decay(np.full(4, np.nan)) is None


def test_sample_indices():
    assert list(metrics.sample_indices(49, "consisid")) == [math.floor(k * 48 / 15) for k in range(16)]
    assert list(metrics.sample_indices(81, "opens2v")) == [math.floor(k * 80 / 31) for k in range(32)]
    assert list(metrics.sample_indices(5, "magicmirror")) == [0, 1, 2, 3, 4]
    assert list(metrics.consisid_clip_indices(49)) == [int(i * 49 / 16) for i in range(16)]


# --------------------------------------------------------------------------------------------- face motion


def test_fm_inter_is_zero_for_a_static_face_and_ignores_position_and_scale(analyzer):
    static = face_video([((160, 120), 50, 1)] * 6)
    assert metrics.evaluate_video(static, analyzer=analyzer, dynamics=False).fm_inter == 0.0
    # the fake detector's landmarks sit at fixed places of the face: moving/zooming the face is not face motion
    moving = face_video([((100 + 15 * t, 100 + 5 * t), 40 + 4 * t, 1) for t in range(6)])
    result = metrics.evaluate_video(moving, analyzer=analyzer, fps=8)
    assert result.fm_inter < 0.01, result.fm_inter
    assert result.dynamics > 8.0  # ... while the frame itself does move (px/s)


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
    assert abs(result.clip_i - float(expected.mean())) < 1e-5 and result.counts["clip_i"] == 4
    # the reference itself as a video scores 1
    same = metrics.evaluate_video(ref_images.repeat(3, 1, 1, 1), clip_model=clip_model, clip_references=ref_images,
                                  dynamics=False)
    assert same.clip_i == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------------------------- aggregation


def test_summarise_counts_videos_frames_and_what_was_left_out():
    rows = [{"face_sim": 0.5, "dynamics": 10.0, "counts": {"face_rate": 8, "face_sim": 8, "dynamics": 6}},
            {"face_sim": None, "dynamics": 30.0, "counts": {"face_rate": 0, "face_sim": 0, "dynamics": 6}},
            {"face_sim": 0.7, "dynamics": 20.0, "counts": {"face_rate": 4, "face_sim": 4, "dynamics": 3}},
            {"face_sim": 0.6, "dynamics": None, "counts": {"face_rate": 1, "face_sim": 1},
             "unavailable": {"dynamics": "one frame only"}}]
    table = metrics.summarise(rows, "magicmirror", ["face_sim", "dynamics", "clip_i"])
    assert table["face_sim"]["mean"] == pytest.approx(0.6) and table["face_sim"]["n"] == 3
    assert table["face_sim"]["std"] == pytest.approx(np.std([0.5, 0.7, 0.6]))
    assert table["face_sim"]["frames"] == 13 and table["face_sim"]["left_out"] == 1
    assert table["face_sim"]["reasons"] == {"no face in any frame": 1}
    assert table["dynamics"] == {"mean": pytest.approx(20.0), "std": pytest.approx(np.std([10, 30, 20])), "n": 3,
                                 "frames": 15, "left_out": 1, "reasons": {"one frame only": 1}}
    assert table["clip_i"]["mean"] is None and table["clip_i"]["n"] == 0 and table["clip_i"]["left_out"] == 4
    # consisid: a faceless video's 0 is a value, counted as such
    zero = [{"face_sim": 0.0, "counts": {"face_rate": 0, "face_sim": 0}},
            {"face_sim": 0.8, "counts": {"face_rate": 16, "face_sim": 16}}]
    table = metrics.summarise(zero, "consisid", ["face_sim"])
    assert table["face_sim"]["mean"] == pytest.approx(0.4) and table["face_sim"]["n"] == 2
    assert table["face_sim"]["faceless_as_zero"] == 1 and table["face_sim"]["left_out"] == 0
