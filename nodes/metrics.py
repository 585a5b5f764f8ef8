"""Metric nodes: identity score (face similarity to the reference set) and video metrics (dynamics, face motion,
CLIP-I). They go at the end of a workflow, next to the video."""

from __future__ import annotations

import os

from ..models.metrics import ReferenceFaces, evaluate_video, reference_faces
from ..models.metrics_plot import metric_panels, render_panels, to_image_tensor
from . import host
from .cogvideox import MENU, NONE
from .magicmirror import FACE_ENCODER

METRICS_CATEGORY = f"{MENU}/Metrics"
_CLIP_CACHE: dict = {}  # the last CLIP vision tower loaded (on the CPU; each measurement brings it in): {key: model}


def _clip_model(name: str):
    from ..models.clip_vision import load_clip_vision

    path = host.resolve_model_file("clip_vision", name)
    key = (path, os.path.getmtime(path), str(host.torch_device()))
    if key not in _CLIP_CACHE:
        _CLIP_CACHE.clear()
        _CLIP_CACHE[key] = load_clip_vision(path)
    return _CLIP_CACHE[key]


def _progress(total_hint: int):
    bar = host.ProgressBar(total_hint)

    def update(done: int, total: int) -> None:
        host.check_interrupt()
        bar.update_absolute(done, total)

    return update


def _output(report: str, result: tuple) -> dict:
    """ComfyUI's convention for a node that shows text on itself and also returns outputs."""
    return {"ui": {"text": [report]}, "result": result}


class IdentityScore:
    DESCRIPTION = ("MagicMirror's identity metric: per frame the largest face's ArcFace embedding, cosine to every "
                   "reference photo, averaged; the score is the mean over frames with a face. Also reports the share "
                   "of frames with a face, the similarity decay (last quarter - first quarter) and face motion "
                   "(FM_ref, FM_inter). One face detection per frame, one batched recognition call.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_encoder": (FACE_ENCODER, {"tooltip": "From MagicMirror Face Encoder Loader (its insightface pack "
                                                       "does the detection and ArcFace embedding)."}),
            "frames": ("IMAGE", {"tooltip": "The video to score: decoded frames [T,H,W,3], e.g. from CogVideoX "
                                            "Decode."}),
            "reference": ("IMAGE", {"tooltip": "The reference photo(s) of the person (the same images given to Face "
                                               "Encode); several are averaged (similarity to the reference set)."}),
        }}

    RETURN_TYPES = ("FLOAT", "STRING", "IMAGE")
    RETURN_NAMES = ("score", "report", "plot")
    OUTPUT_TOOLTIPS = ("Mean face similarity over the frames with a face (0.0 when no frame has a face; the report "
                       "says so).", "The identity report as text (also shown on the node).",
                       "Per-frame similarity plot; connect to Preview Image.")
    FUNCTION = "score"
    OUTPUT_NODE = True
    CATEGORY = METRICS_CATEGORY

    def score(self, face_encoder, frames, reference):
        host.check_interrupt()
        references = reference_faces(face_encoder.analyzer, reference)
        metrics = evaluate_video(frames, analyzer=face_encoder.analyzer, references=references, dynamics=False,
                                 progress=_progress(len(frames)))
        report = metrics.report()
        plot = to_image_tensor(render_panels(metric_panels(metrics, keys=("face_sim",)), footer=report.splitlines()))
        return _output(report, (metrics.face_sim if metrics.face_sim is not None else 0.0, report, plot))


class VideoMetrics:
    DESCRIPTION = ("Measures a video: dynamics (mean optical flow, px/frame at short side 256) always; with a face "
                   "encoder the faces (share of frames with a face, FM_inter; with a reference also face similarity, "
                   "decay and FM_ref); with a CLIP vision model and a reference the subject similarity CLIP-I.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("IMAGE", {"tooltip": "The video to measure: decoded frames [T,H,W,3]."}),
            },
            "optional": {
                "reference": ("IMAGE", {"tooltip": "Reference image(s): the face photo(s) for identity metrics, the "
                                                   "subject image(s) for CLIP-I."}),
                "face_encoder": (FACE_ENCODER, {"tooltip": "Optional, from MagicMirror Face Encoder Loader: enables "
                                                           "the face metrics."}),
                "clip_vision": ([NONE] + host.list_model_files("clip_vision"), {
                    "default": NONE, "tooltip": "Optional CLIP vision model from models/clip_vision/ for CLIP-I "
                    "(needs a reference); none = skip."}),
            },
        }

    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "plot")
    OUTPUT_TOOLTIPS = ("The metrics as text (also shown on the node).", "Per-frame curves; connect to Preview Image.")
    FUNCTION = "measure"
    OUTPUT_NODE = True
    CATEGORY = METRICS_CATEGORY

    def measure(self, frames, reference=None, face_encoder=None, clip_vision=NONE):
        host.check_interrupt()
        use_clip = clip_vision not in (None, NONE)
        if use_clip and reference is None:
            raise ValueError("CLIP-I needs a reference image: connect 'reference' or set clip_vision to none.")
        analyzer = face_encoder.analyzer if face_encoder is not None else None
        references: ReferenceFaces | None = None
        if analyzer is not None and reference is not None:
            references = reference_faces(analyzer, reference)
        clip = _clip_model(clip_vision) if use_clip else None
        with host.placement().run(clip):
            metrics = evaluate_video(frames, analyzer=analyzer, references=references, clip_model=clip,
                                     clip_references=reference if use_clip else None,
                                     progress=_progress(2 * len(frames)))
        report = metrics.report()
        plot = to_image_tensor(render_panels(metric_panels(metrics), footer=report.splitlines()))
        return _output(report, (report, plot))


NODE_CLASS_MAPPINGS = {
    "MMV_IdentityScore": IdentityScore,
    "MMV_VideoMetrics": VideoMetrics,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MMV_IdentityScore": "Identity Score",
    "MMV_VideoMetrics": "Video Metrics",
}
