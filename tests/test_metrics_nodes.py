"""Metric nodes headless: Identity Score and Video Metrics (its protocols, optional models found in models/metrics/)
on the fake insightface packs and tiny CLIP / DINO / CurricularFace models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("insightface")
pytest.importorskip("onnx")

from magicmirror_video import nodes as pack_nodes  # noqa: E402
from magicmirror_video.models import metrics  # noqa: E402
from magicmirror_video.testing import tiny, tiny_faces, tiny_metrics  # noqa: E402

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
    if not (models_dir / "insightface" / "models" / "buffalo_l").exists():
        tiny_faces.build_fake_insightface_pack(str(models_dir / "insightface"), "buffalo_l")
    (models_dir / "clip_vision").mkdir(exist_ok=True)
    tiny.build_clip_vision_checkpoint(str(models_dir / "clip_vision" / "tiny-clip.safetensors"))
    metric_dir = models_dir / "metrics"
    tiny_metrics.build_curricularface_file(str(metric_dir / "glint360k_curricular_face_r101_backbone.bin"))
    tiny_metrics.build_clip_folder(str(metric_dir / "clip-vit-tiny"))
    tiny_metrics.build_dino_folder(str(metric_dir / "dino-tiny"))
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
    assert out["ui"]["text"] == [report] and report.startswith(
        f"Face similarity {expected.face_sim:.4f} (mean over 3/4 frames with a face, 1 reference)")
    assert "FM_ref" in report
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3 and 0 <= plot.min() and plot.max() <= 1

    dark = video([(None, None, 0)] * 3)
    score, report, plot = M["MMV_IdentityScore"]().score(encoder, dark, reference)["result"]
    assert score == 0.0 and "no face in any frame" in report and plot.shape[-1] == 3

    spec = M["MMV_VideoMetrics"].INPUT_TYPES()
    assert "tiny-clip.safetensors" in spec["optional"]["clip_vision"][0]
    assert spec["required"]["protocol"][0] == ["magicmirror", "consisid", "opens2v"]
    assert "clip-vit-tiny" in spec["optional"]["clip_text"][0] and "dino-tiny" in spec["optional"]["dino"][0]
    report, plot = M["MMV_VideoMetrics"]().measure(frames)["result"]
    assert report.startswith("Dynamics") and "Face" not in report and "px/s" in report
    out = M["MMV_VideoMetrics"]().measure(frames, "magicmirror", 8.0, reference, encoder, "tiny-clip.safetensors",
                                          "a person waves", "clip-vit-tiny", "dino-tiny")
    report, plot = out["result"]
    for part in ("Face similarity", "FaceSim-Cur", "FM_inter", "Dynamics", "CLIP-T", "CLIP-I", "DINO-I",
                 "Protocol magicmirror"):
        assert part in report, report
    with pytest.raises(ValueError, match="CLIP-I needs a reference image"):
        M["MMV_VideoMetrics"]().measure(frames, "magicmirror", 8.0, None, None, "tiny-clip.safetensors")


def test_video_metrics_node_consisid_uses_buffalo_l_and_the_script_rules(metric_models, monkeypatch):
    """consisid with an antelopev2 face encoder: the node scores with the installed buffalo_l pack at 320 (padded
    retry), 16 frames, one reference, FaceSim-Cur from models/metrics/; equal to evaluate_video with those."""
    from magicmirror_video.models.curricularface import load_curricularface
    from magicmirror_video.models.face_analysis import FaceAnalyzer

    monkeypatch.setenv("MAGICMIRROR_MODELS_DIR", str(metric_models))
    (encoder,) = M["MMV_MagicMirrorFaceEncoderLoader"]().load("antelopev2", "CPU", "photomaker-v2.bin", "fp32")
    frames = video([((160, 120), 50, 1), ((150, 115), 52, 2), (None, None, 0), ((165, 125), 48, 1)])
    reference = torch.cat([video([((160, 120), 60, 1)]), video([((160, 120), 60, 2)])])
    report, _ = M["MMV_VideoMetrics"]().measure(frames, "consisid", 8.0, reference, encoder)["result"]
    buffalo = FaceAnalyzer(str(metric_models / "insightface"), name="buffalo_l")
    models = metrics.FaceModels(curricularface=load_curricularface(
        str(metric_models / "metrics" / "glint360k_curricular_face_r101_backbone.bin")))
    expected = metrics.evaluate_video(frames, protocol="consisid", fps=8.0, analyzer=buffalo,
                                      references=metrics.reference_faces(buffalo, reference, "consisid", models),
                                      face_models=models)
    assert expected.frames_scored == 16 and expected.references_used == 1
    assert expected.counts["face_sim"] == 11  # frames 0 and 1 five times each, frame 3 once (frame 2 is faceless)
    assert f"FaceSim-Arc {expected.face_sim:.4f} (mean over 11/16 frames with a face, 1 reference of 2)" in report
    assert f"FaceSim-Cur {expected.face_sim_cur:.4f}" in report
    assert "uses the insightface pack" not in report  # scored with buffalo_l, not the encoder's antelopev2
    assert "Protocol consisid: 16 frames scored of 4" in report
