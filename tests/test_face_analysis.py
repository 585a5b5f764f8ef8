"""FaceAnalyzer on a fake insightface pack (ONNX graphs written at test time, CPU only)."""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import pytest

pytest.importorskip("insightface")
pytest.importorskip("onnx")
import onnxruntime as ort  # noqa: E402

from magicmirror_video.models.face_analysis import DetectedFace, FaceAnalyzer, find_insightface_pack  # noqa: E402
from magicmirror_video.testing import tiny_faces  # noqa: E402

CPU = ["CPUExecutionProvider"]


def _box_close(bbox, center, radius, tol):
    expected = np.array([center[0] - radius, center[1] - radius, center[0] + radius, center[1] + radius])
    return np.abs(np.asarray(bbox) - expected).max() <= tol


def test_pack_files_and_routing(analyzer, insightface_root):
    folder = os.path.join(insightface_root, "models", "antelopev2")
    assert sorted(os.listdir(folder)) == ["glintr100.onnx", "scrfd_10g_bnkps.onnx"]
    assert type(analyzer.det_model).__name__ == "SCRFD" and analyzer.det_model.use_kps
    assert analyzer.det_model.fmc == 3 and analyzer.det_model._num_anchors == 2
    assert type(analyzer.rec_model).__name__ == "ArcFaceONNX"
    assert analyzer.model_dir == folder
    assert analyzer.providers_active == CPU
    text = analyzer.describe()
    assert "antelopev2" in text and "scrfd_10g_bnkps.onnx" in text and "CPUExecutionProvider" in text


def test_detects_blob_face(analyzer):
    image = tiny_faces.synthetic_face_image(480, 640, center=(300, 220), radius=60, seed=1)
    face = analyzer.detect_largest(image)
    assert isinstance(face, DetectedFace)
    assert face.det_size == 640 and face.det_score > 0.5
    assert _box_close(face.bbox, (300, 220), 60, tol=6.0), face.bbox
    # keypoints inside the box, eyes above the nose above the mouth, left before right
    x1, y1, x2, y2 = face.bbox
    assert face.kps.shape == (5, 2)
    assert ((face.kps[:, 0] > x1) & (face.kps[:, 0] < x2) & (face.kps[:, 1] > y1) & (face.kps[:, 1] < y2)).all()
    assert face.kps[0, 0] < face.kps[1, 0] and face.kps[3, 0] < face.kps[4, 0]
    assert face.kps[:2, 1].max() < face.kps[2, 1] < face.kps[3:, 1].min()
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    assert np.isclose(np.linalg.norm(face.normed_embedding), 1.0, atol=1e-5)


def test_float_image_matches_uint8(analyzer):
    image = tiny_faces.synthetic_face_image(240, 320, center=(150, 110), radius=40, seed=5)
    a = analyzer.detect_largest(image)
    b = analyzer.detect_largest(image.astype(np.float32) / 255.0)
    np.testing.assert_allclose(a.bbox, b.bbox)
    np.testing.assert_allclose(a.embedding, b.embedding)


def test_largest_of_two_faces(analyzer):
    image = tiny_faces.synthetic_face_image(480, 640, center=(150, 200), radius=40, seed=3)
    tiny_faces.draw_face(image, (430, 260), 90, seed=4)
    dets, _ = analyzer.det_model.detect(np.ascontiguousarray(image[..., ::-1]), input_size=(640, 640))
    assert dets.shape[0] == 2  # both faces are found ...
    face = analyzer.detect_largest(image)
    assert _box_close(face.bbox, (430, 260), 90, tol=6.0), face.bbox  # ... and the larger one is picked


def test_dark_image_has_no_face(analyzer):
    tried = []
    detect = analyzer.det_model.detect

    def recording_detect(img, input_size=None, **kwargs):
        tried.append(input_size)
        return detect(img, input_size=input_size, **kwargs)

    analyzer.det_model.detect = recording_detect
    try:
        assert analyzer.detect_largest(tiny_faces.synthetic_face_image(480, 640, radius=None)) is None
    finally:
        del analyzer.det_model.detect
    assert tried == [(s, s) for s in (640, 512, 384, 256)]  # every size was tried


def test_det_size_fallback_for_closeup_face(analyzer):
    # a face filling the frame is too big for the detector's anchors at 640 and 512 (like real
    # SCRFD missing close-ups); at 384 it fits
    image = tiny_faces.synthetic_face_image(400, 400, center=(200, 200), radius=196, seed=2)
    bgr = np.ascontiguousarray(image[..., ::-1])
    assert analyzer.det_model.detect(bgr, input_size=(640, 640))[0].shape[0] == 0
    tried = []
    detect = analyzer.det_model.detect

    def recording_detect(img, input_size=None, **kwargs):
        tried.append(input_size[0])
        return detect(img, input_size=input_size, **kwargs)

    analyzer.det_model.detect = recording_detect
    try:
        face = analyzer.detect_largest(image)
    finally:
        del analyzer.det_model.detect
    assert tried == [640, 512, 384]
    assert face.det_size == 384
    assert _box_close(face.bbox, (200, 200), 196, tol=8.0), face.bbox
    # a restricted size list without the fallback finds nothing
    only_640 = FaceAnalyzer(os.path.dirname(os.path.dirname(analyzer.model_dir)), providers=CPU, det_sizes=(640,))
    assert only_640.detect_largest(image) is None


def test_align_sizes_and_centering(analyzer):
    image = tiny_faces.synthetic_face_image(480, 640, center=(300, 220), radius=60, seed=1)
    face = analyzer.detect_largest(image)
    crop112 = analyzer.align(image, face)
    crop224 = analyzer.align(image, face, size=224)
    assert crop112.shape == (112, 112, 3) and crop112.dtype == np.uint8
    assert crop224.shape == (224, 224, 3) and crop224.dtype == np.uint8
    # the face disc lands at (56, 64) with diameter ~96 in the 112 crop: bright centre, dark corners
    assert crop112[64, 56].mean() > 150 and crop112[:4, :4].mean() < 40 and crop112[:4, -4:].mean() < 40
    assert crop224[128, 112].mean() > 150 and crop224[:8, :8].mean() < 40
    with pytest.raises(ValueError):
        analyzer.align(image, face, size=100)


def test_embeddings_deterministic_and_distinct(analyzer):
    a1 = analyzer.detect_largest(tiny_faces.synthetic_face_image(480, 640, center=(300, 220), radius=60, seed=1))
    a2 = analyzer.detect_largest(tiny_faces.synthetic_face_image(480, 640, center=(300, 220), radius=60, seed=1))
    b = analyzer.detect_largest(tiny_faces.synthetic_face_image(480, 640, center=(300, 220), radius=60, seed=7))
    np.testing.assert_array_equal(a1.embedding, a2.embedding)
    assert not np.allclose(a1.embedding, b.embedding, atol=1e-3)
    assert float(a1.normed_embedding @ b.normed_embedding) < 0.9
    # alignment makes the embedding position/scale invariant: same identity (seed) elsewhere, other size
    a3 = analyzer.detect_largest(tiny_faces.synthetic_face_image(360, 480, center=(200, 170), radius=80, seed=1))
    assert float(a1.normed_embedding @ a3.normed_embedding) > 0.99


def test_embedding_equals_onnxruntime_on_aligned_crop(analyzer, insightface_root):
    image = tiny_faces.synthetic_face_image(480, 640, center=(260, 240), radius=70, seed=11)
    face = analyzer.detect_largest(image)
    crop = analyzer.align(image, face)                                              # [112,112,3] RGB
    # insightface ArcFaceONNX preprocessing for non-mxnet exports: (RGB - 127.5) / 127.5, NCHW
    blob = ((crop.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]      # [1,3,112,112]
    path = os.path.join(insightface_root, "models", "antelopev2", "glintr100.onnx")
    session = ort.InferenceSession(path, providers=CPU)
    ref = session.run(None, {session.get_inputs()[0].name: blob})[0][0]             # [512]
    np.testing.assert_allclose(face.embedding, ref, rtol=1e-4, atol=1e-4)


def test_batched_embeddings_equal_detect_largest(analyzer):
    """``embeddings`` (one recogniser call for many faces) equals the per-face embedding of ``detect_largest``, and
    ``locate_largest`` finds the same face without embedding it."""
    images = [tiny_faces.synthetic_face_image(240, 320, center=(150, 120), radius=r, seed=s)
              for r, s in ((40, 1), (70, 2), (55, 9))]
    singles = [analyzer.detect_largest(i) for i in images]
    boxes = [analyzer.locate_largest(i) for i in images]
    for box, face in zip(boxes, singles):
        np.testing.assert_array_equal(box.bbox, face.bbox)
        np.testing.assert_array_equal(box.kps, face.kps)
    batched = analyzer.embeddings(images, boxes)
    np.testing.assert_allclose(batched, np.stack([f.embedding for f in singles]), rtol=1e-5, atol=1e-5)
    assert analyzer.embeddings([], []).shape == (0, 512)


def test_missing_pack_lists_searched_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        FaceAnalyzer(str(tmp_path), providers=CPU)
    message = str(info.value)
    assert os.path.join(str(tmp_path), "models", "antelopev2") in message
    assert os.path.join(str(tmp_path), "antelopev2") in message
    assert "scrfd_10g_bnkps.onnx" in message and "glintr100.onnx" in message
    assert "models/insightface/models/antelopev2" in message
    assert not os.path.exists(os.path.join(str(tmp_path), "models"))  # nothing downloaded or created


def test_incomplete_packs(tmp_path):
    folder = tmp_path / "models" / "antelopev2"
    folder.mkdir(parents=True)
    tiny_faces.build_fake_detector(str(folder / "scrfd_10g_bnkps.onnx"))
    with pytest.raises(FileNotFoundError, match="recogniser"):
        FaceAnalyzer(str(tmp_path), providers=CPU)
    os.remove(folder / "scrfd_10g_bnkps.onnx")
    tiny_faces.build_fake_recognizer(str(folder / "glintr100.onnx"))
    with pytest.raises(FileNotFoundError, match="detector"):
        FaceAnalyzer(str(tmp_path), providers=CPU)
    empty = tmp_path / "models" / "buffalo_l"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .onnx files"):
        find_insightface_pack(str(tmp_path), "buffalo_l")


def test_nested_pack_folder_is_found(tmp_path):
    # some antelopev2 zips extract to models/antelopev2/antelopev2/*.onnx
    nested = tmp_path / "models" / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    tiny_faces.build_fake_detector(str(nested / "scrfd_10g_bnkps.onnx"))
    tiny_faces.build_fake_recognizer(str(nested / "glintr100.onnx"))
    assert find_insightface_pack(str(tmp_path)) == str(nested)
    assert FaceAnalyzer(str(tmp_path), providers=CPU).model_dir == str(nested)


def test_cuda_requested_on_cpu_onnxruntime_warns(insightface_root, caplog):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with caplog.at_level(logging.WARNING, logger="magicmirror_video.models.face_analysis"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime's own "not in available provider names" warning
        fa = FaceAnalyzer(insightface_root, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert fa.providers_active == ["CPUExecutionProvider"]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("pip uninstall onnxruntime && pip install onnxruntime-gpu" in m for m in messages), messages
    assert "CUDAExecutionProvider" in fa.describe()


def test_default_providers_are_cpu_and_nothing_downloads(insightface_root, caplog, monkeypatch):
    import insightface.utils.storage as storage

    def no_download(*args, **kwargs):
        raise AssertionError(f"insightface tried to download: {args}")

    monkeypatch.setattr(storage, "download_file", no_download)
    with caplog.at_level(logging.WARNING, logger="magicmirror_video.models.face_analysis"):
        fa = FaceAnalyzer(insightface_root)
    assert fa.providers_requested == CPU and fa.providers_active == CPU
    assert not [r for r in caplog.records if r.name.endswith("face_analysis")]


def test_bad_det_sizes(insightface_root):
    with pytest.raises(ValueError):
        FaceAnalyzer(insightface_root, det_sizes=(640, 300))


def test_padded_retry_of_the_published_scripts(analyzer):
    """ConsisID / OpenS2V ``pad_np_bgr_image``: a grey (128) border of int(0.25 H) rows and int(0.25 W) columns on
    each side; a face the detector misses on the image is looked for there, reported in the image's coordinates,
    and embedded from the padded image (where insightface's ``get`` embeds it)."""
    from insightface.app.common import Face

    from magicmirror_video.models.face_analysis import pad_image

    image = tiny_faces.synthetic_face_image(241, 321, center=(170, 120), radius=50, seed=3)
    padded, (left, top) = pad_image(image)
    assert (left, top) == (80, 60) and padded.shape == (241 + 120, 321 + 160, 3)
    assert (padded[:top] == 128).all() and (padded[:, :left] == 128).all() and (padded[-top:] == 128).all()
    np.testing.assert_array_equal(padded[top:top + 241, left:left + 321], image)

    detect = analyzer.det_model.detect

    def miss_unpadded(img, *args, **kwargs):
        if img.shape[:2] == image.shape[:2]:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        return detect(img, *args, **kwargs)

    analyzer.det_model.detect = miss_unpadded
    try:
        assert analyzer.locate_largest(image, det_sizes=(320,)) is None
        box = analyzer.locate_largest_padded(image, 320)
    finally:
        del analyzer.det_model.detect
    bgr_padded = np.ascontiguousarray(padded[..., ::-1])
    direct = analyzer.locate_largest(padded, det_sizes=(320,))                      # on the padded image itself
    assert box.pad == (80, 60) and box.det_size == 320
    np.testing.assert_allclose(box.kps, direct.kps - np.array([80, 60]), atol=1e-4)
    np.testing.assert_allclose(box.bbox, direct.bbox - np.array([80, 60, 80, 60]), atol=1e-4)
    expected = analyzer.rec_model.get(bgr_padded, Face(bbox=direct.bbox, kps=direct.kps, det_score=direct.det_score))
    np.testing.assert_allclose(analyzer.embeddings([image], [box])[0], expected, rtol=1e-4, atol=1e-4)
    assert analyzer.locate_largest_padded(image, 320).pad == (0, 0)                # found directly: no retry
