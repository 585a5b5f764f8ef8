"""Metric nodes: identity score (face similarity to the reference set) and video metrics under a published
evaluation protocol (magicmirror / consisid / opens2v). They go at the end of a workflow, next to the video."""

from __future__ import annotations

import logging
import os

from ..models.metrics import PROTOCOLS, FaceModels, evaluate_video, get_protocol, reference_faces
from ..models.metrics_plot import metric_panels, render_panels, to_image_tensor
from . import host
from .cogvideox import MENU, NONE
from .magicmirror import FACE_ENCODER

logger = logging.getLogger(__name__)
METRICS_CATEGORY = f"{MENU}/Metrics"
_CACHE: dict = {}  # the last model of each kind loaded: {kind: (key, model)}


def _cached(kind: str, path: str, load):
    key = (path, os.path.getmtime(path), str(host.torch_device()))
    if kind not in _CACHE or _CACHE[kind][0] != key:
        _CACHE.pop(kind, None)
        _CACHE[kind] = (key, load(path))
    return _CACHE[kind][1]


def _clip_model(name: str):
    from ..models.clip_vision import load_clip_vision

    return _cached("clip_vision", host.resolve_model_file("clip_vision", name), load_clip_vision)


def metric_folders(kind: str) -> list[str]:
    """Where the optional metric models are looked for: ``models/metrics/`` (and, for CurricularFace, the
    insightface folders, where ConsisID's release keeps it)."""
    folders = list(host.model_roots("metrics"))
    if kind == "curricularface":
        for root in host.model_roots("insightface"):
            folders += [root, os.path.join(root, "models")]
    return folders


def list_metric_folders(kind: str) -> list[str]:
    """Names of the model folders of ``kind`` (``clip_text`` or ``dino``) under ``models/metrics/``."""
    from ..models.metric_models import is_model_folder

    names = set()
    for root in host.model_roots("metrics"):
        if os.path.isdir(root):
            names.update(n for n in os.listdir(root) if is_model_folder(kind, os.path.join(root, n)))
    return sorted(names)


def _find(kind: str):
    from ..models.metric_models import NEEDS_TORCHVISION, find_metric_model, missing_reason, torchvision_available

    path, searched = find_metric_model(kind, metric_folders(kind))
    if path is None or (kind in NEEDS_TORCHVISION and not torchvision_available()):
        return None, missing_reason(kind, searched)
    return path, None


def face_models(protocol) -> FaceModels:
    """CurricularFace (and, for consisid, Inception) when their files are in the model folders; else the reasons."""
    from ..models.curricularface import load_curricularface
    from ..models.metric_models import load_inception

    device = host.torch_device()
    out = FaceModels(device=device)
    path, why = _find("curricularface")
    if path:
        out.curricularface = _cached("curricularface", path, lambda p: load_curricularface(p, device))
    else:
        out.unavailable["curricularface"] = why
    if get_protocol(protocol).fid:
        path, why = _find("inception")
        if path:
            out.inception = _cached("inception", path, lambda p: load_inception(p, device))
        else:
            out.unavailable["inception"] = why
    return out


def protocol_analyzer(face_encoder, protocol):
    """The face encoder's insightface analyzer, or the protocol's own pack when the encoder uses another one and
    that pack is installed (consisid / opens2v score with buffalo_l)."""
    from .magicmirror import insightface_packs, insightface_root

    analyzer = face_encoder.analyzer
    pack = get_protocol(protocol).pack
    if analyzer.name == pack or pack not in insightface_packs():
        return analyzer  # evaluate_video notes the pack mismatch
    from ..models.face_analysis import FaceAnalyzer

    root = insightface_root(pack)
    return _cached(f"insightface-{pack}", os.path.join(root, "models", pack),
                   lambda _p: FaceAnalyzer(root, name=pack, providers=analyzer.providers_requested))


def _progress(total_hint: int):
    bar = host.ProgressBar(total_hint)

    def update(done: int, total: int) -> None:
        host.check_interrupt()
        bar.update_absolute(done, total)

    return update


def _output(report: str, result: tuple) -> dict:
    """ComfyUI's convention for a node that shows text on itself and also returns outputs."""
    return {"ui": {"text": [report]}, "result": result}


PROTOCOL_TOOLTIP = ("Evaluation protocol. magicmirror: every frame, the face encoder's pack with the 640->256 size "
                    "ladder, mean over all references. consisid (ConsisID eval/get_facesim_fid.py): 16 evenly spaced "
                    "frames, buffalo_l at 320 with a padded retry, cosine clamped at 0, no face = 0, the first "
                    "reference only. opens2v (OpenS2V eval/get_facesim.py): as consisid with 32 frames.")


class IdentityScore:
    DESCRIPTION = ("MagicMirror's identity metric: per frame the largest face's ArcFace embedding, cosine to every "
                   "reference photo, averaged; the score is the mean over frames with a face. Also reports the share "
                   "of frames with a face, the similarity decay (last quarter - first quarter of the frames with a "
                   "face, and where the face is lost) and face motion (FM_ref, FM_inter). Video Metrics scores under "
                   "the ConsisID / OpenS2V protocols.")

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
    DESCRIPTION = ("Measures a video under an evaluation protocol (magicmirror, consisid, opens2v): dynamics in px/s "
                   "and VBench's dynamic degree always (RAFT when its weights are in models/metrics/, else "
                   "Farneback); with a face encoder and a reference the face metrics (FaceSim-Cur when the "
                   "CurricularFace file is in models/metrics/); with a CLIP vision model CLIP-I, with a CLIP folder "
                   "and a prompt CLIP-T, with a DINO folder DINO-I. A missing model is named in the report.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("IMAGE", {"tooltip": "The video to measure: decoded frames [T,H,W,3]."}),
                "protocol": (list(PROTOCOLS), {"default": "magicmirror", "tooltip": PROTOCOL_TOOLTIP}),
                "fps": ("FLOAT", {"default": 16.0, "min": 1.0, "max": 240.0, "step": 1.0,
                                  "tooltip": "Frame rate the video is played at (CogVideoX 1.0: 8, CogVideoX 1.5 and "
                                             "Wan: 16); dynamics are per second and VBench thins to ~8 fps."}),
            },
            "optional": {
                "reference": ("IMAGE", {"tooltip": "Reference image(s): the face photo(s) for identity metrics, the "
                                                   "subject image(s) for CLIP-I / DINO-I."}),
                "face_encoder": (FACE_ENCODER, {"tooltip": "Optional, from MagicMirror Face Encoder Loader: enables "
                                                           "the face metrics."}),
                "clip_vision": ([NONE] + host.list_model_files("clip_vision"), {
                    "default": NONE, "tooltip": "Optional CLIP vision model from models/clip_vision/ for CLIP-I "
                    "(needs a reference); none = skip."}),
                "prompt": ("STRING", {"default": "", "multiline": True,
                                      "tooltip": "The video's prompt, for CLIP-T (text-video similarity)."}),
                "clip_text": ([NONE] + list_metric_folders("clip_text"), {
                    "default": NONE, "tooltip": "Optional CLIP folder with both towers (transformers format, e.g. "
                    "clip-vit-base-patch32) in models/metrics/ for CLIP-T; needs a prompt."}),
                "dino": ([NONE] + list_metric_folders("dino"), {
                    "default": NONE, "tooltip": "Optional DINO ViT folder (e.g. dino-vits16) in models/metrics/ for "
                    "DINO-I; needs a reference."}),
            },
        }

    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "plot")
    OUTPUT_TOOLTIPS = ("The metrics as text (also shown on the node).", "Per-frame curves; connect to Preview Image.")
    FUNCTION = "measure"
    OUTPUT_NODE = True
    CATEGORY = METRICS_CATEGORY

    def measure(self, frames, protocol="magicmirror", fps=16.0, reference=None, face_encoder=None, clip_vision=NONE,
                prompt="", clip_text=NONE, dino=NONE):
        host.check_interrupt()
        p = get_protocol(protocol)
        use_clip, use_dino = clip_vision not in (None, NONE), dino not in (None, NONE)
        if (use_clip or use_dino) and reference is None:
            raise ValueError(f"{'CLIP-I' if use_clip else 'DINO-I'} needs a reference image: connect 'reference' or "
                             f"set {'clip_vision' if use_clip else 'dino'} to none.")
        subject = None if reference is None else (reference[:1] if p.one_reference else reference)
        analyzer = references = models = None
        if face_encoder is not None:
            analyzer = protocol_analyzer(face_encoder, p)
            if reference is not None:  # (CurricularFace / Inception score against references only)
                models = face_models(p)
                references = reference_faces(analyzer, reference, p, models)
        flow = None
        path, raft_missing = _find("raft")
        if path:
            from ..models.motion import load_raft

            flow = _cached("raft", path, lambda q: load_raft(q, host.torch_device()))
        text_clip = dino_model = None
        if clip_text not in (None, NONE):
            from ..models.metric_models import load_text_clip

            text_clip = _cached("clip_text", self._folder(clip_text), lambda q: load_text_clip(q, host.torch_device()))
        if use_dino:
            from ..models.metric_models import load_dino

            dino_model = _cached("dino", self._folder(dino), lambda q: load_dino(q, host.torch_device()))
        clip = _clip_model(clip_vision) if use_clip else None
        with host.placement().run(clip):
            metrics = evaluate_video(frames, protocol=p, fps=fps, analyzer=analyzer, references=references,
                                     face_models=models, clip_model=clip, clip_references=subject, text_clip=text_clip,
                                     prompt=prompt or None, dino=dino_model, dino_references=subject, flow=flow,
                                     progress=_progress(2 * len(frames)))
        if flow is None and raft_missing:
            metrics.notes.append(f"RAFT not used ({raft_missing})")
        report = metrics.report()
        plot = to_image_tensor(render_panels(metric_panels(metrics), footer=report.splitlines()))
        return _output(report, (report, plot))

    @staticmethod
    def _folder(name: str) -> str:
        for root in host.model_roots("metrics"):
            if os.path.isdir(os.path.join(root, name)):
                return os.path.join(root, name)
        raise FileNotFoundError(f"model folder {name!r} not found in {host.model_roots('metrics')}")


NODE_CLASS_MAPPINGS = {
    "MMV_IdentityScore": IdentityScore,
    "MMV_VideoMetrics": VideoMetrics,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MMV_IdentityScore": "Identity Score",
    "MMV_VideoMetrics": "Video Metrics",
}
