"""Metric nodes headless: Identity Score and Video Metrics on the fake insightface pack and a tiny CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("insightface")
pytest.importorskip("onnx")

from magicmirror_video import nodes as pack_nodes  # noqa: E402
from magicmirror_video.models import metrics  # noqa: E402
from magicmirror_video.testing import tiny, tiny_faces  # noqa: E402

M = pack_nodes.NODE_CLASS_MAPPINGS


def video(specs, h=240, w=320) -> torch.Tensor:
    """IMAGE [T,H,W,3]: one frame per (centre, radius, seed); radius None = no face."""
    rgb = np.stack([tiny_faces.synthetic_face_image(h, w, center=c, radius=r, seed=s) for c, r, s in specs])
    return torch.from_numpy(rgb).float() / 255.0


@pytest.fixture(scope="module")
def metric_models(models_dir):
    if not (models_dir / "insightface").exists():
        tiny_faces.build_fake_insightface_pack(str(models_dir / "insightface"))
    (models_dir / "photomaker").mkdir(exist_ok=True)
    if not (models_dir / "photomaker" / "photomaker-v2.bin").exists():
        tiny.build_photomaker_checkpoint(str(models_dir / "photomaker" / "photomaker-v2.bin"))
    (models_dir / "clip_vision").mkdir(exist_ok=True)
    tiny.build_clip_vision_checkpoint(str(models_dir / "clip_vision" / "tiny-clip.safetensors"))
    return models_dir


def test_metric_nodes_headless(metric_models, monkeypatch):
    monkeypatch.setenv("MAGICMIRROR_MODELS_DIR", str(metric_models))
    assert M["MMV_IdentityScore"].CATEGORY == M["MMV_VideoMetrics"].CATEGORY == "MagicMirror Video/Metrics"
    (encoder,) = M["MMV_MagicMirrorFaceEncoderLoader"]().load("antelopev2", "CPU", "photomaker-v2.bin", "fp32")
    frames = video([((160, 120), 50, 1), ((150, 115), 52, 1), (None, None, 0), ((165, 125), 48, 1)])
    reference = video([((160, 120), 60, 1)])

    out = M["MMV_IdentityScore"]().score(encoder, frames, reference)
    score, report, plot = out["result"]
    analyzer = encoder.analyzer  # the face encoder's own insightface
    references = metrics.reference_faces(analyzer, reference)
    expected = metrics.evaluate_video(frames, analyzer=analyzer, references=references, dynamics=False)
    assert isinstance(score, float) and abs(score - expected.face_sim) < 1e-9
    assert out["ui"]["text"] == [report] and f"Face similarity {expected.face_sim:.4f}" in report
    assert "3/4 frames with a face" in report and "FM_ref" in report
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3 and 0 <= plot.min() and plot.max() <= 1

    dark = video([(None, None, 0)] * 3)
    score, report, plot = M["MMV_IdentityScore"]().score(encoder, dark, reference)["result"]
    assert score == 0.0 and "no face in any frame" in report and plot.shape[-1] == 3

    spec = M["MMV_VideoMetrics"].INPUT_TYPES()
    assert "tiny-clip.safetensors" in spec["optional"]["clip_vision"][0]
    report, plot = M["MMV_VideoMetrics"]().measure(frames)["result"]
    assert report.startswith("Dynamics") and "Face" not in report
    out = M["MMV_VideoMetrics"]().measure(frames, reference, encoder, "tiny-clip.safetensors")
    report, plot = out["result"]
    for part in ("Face similarity", "FM_inter", "Dynamics", "CLIP-I"):
        assert part in report, report
    with pytest.raises(ValueError, match="CLIP-I needs a reference image"):
        M["MMV_VideoMetrics"]().measure(frames, None, None, "tiny-clip.safetensors")
