"""Video metrics under named evaluation protocols, so numbers can sit next to published tables.

A **protocol** fixes what the published evaluation scripts fix: which frames are scored, the
insightface pack and detector size, the retry when no face is found, whether cosines are clamped at 0,
what a video without a face counts, and how many reference photos are used.

``magicmirror`` (this pack's definitions; MagicMirror, arXiv 2501.03931, proposes the average similarity
to a *set* of reference photos)
    every frame; the pack's detector with the size ladder 640 → 512 → 384 → 256 (the same for frames and
    for reference photos); per frame ``s_t = mean_j cos(e_t, r_j)`` over all references, negative values
    kept; a video without a face has no face similarity (it is left out of the average and counted).

``consisid`` (PKU-YuanGroup/ConsisID ``eval/get_facesim_fid.py`` and ``eval/get_clipscore.py``)
    16 frames ``np.linspace(0, T - 1, 16, dtype=int)`` (repeats when T < 16 are scored again, as the script
    does); insightface ``buffalo_l`` at detector size 320, retried once on the image padded by 25 % of its
    height/width on each side with grey 128; the largest face; ArcFace embedding of the face as detected,
    CurricularFace on the 224 aligned crop; each frame's cosine to ONE reference photo clamped at 0;
    frames without a face are skipped and a video without any face scores 0. FID: per frame the squared
    distance between the Inception-v3 pool features of the reference's and the frame's 224 crops (the
    script's FID of one image against one image, whose covariance terms vanish), averaged; a faceless
    video scores 0 there too. CLIPScore: 16 frames ``int(i * T / 16)``, fed to CLIP in OpenCV's BGR order
    (the script passes ``cv2`` frames), ``logits_per_image`` (= ``logit_scale · cos``) averaged.

``opens2v`` (PKU-YuanGroup/OpenS2V-Nexus ``eval/get_facesim.py``, ``eval/get_motionscore.py``)
    as ``consisid`` with 32 frames and no FID; FaceSim-Cur averages only the frames whose clamped cosine
    is above 0 (the script's ``if cur_score != 0.0``), FaceSim-Arc all frames with a face; motion is the
    script's raw ``motion_fb`` (see :mod:`.motion`).

Every protocol also reports, where its inputs allow: share of frames with a face, similarity decay,
FM_ref / FM_inter, dynamics in px/s and VBench's dynamic degree (:mod:`.motion`, from the full video),
CLIP-T (text-video), CLIP-I and DINO-I (subject) on the protocol's frames.

**Decay.** Over the frames with a face, in time order, with ``q = max(1, F // 4)`` of those ``F`` frames:
mean ``s`` of the last ``q`` minus the first ``q`` (negative = the identity fades). It is defined whenever
one frame has a face; when the face disappears before the end, ``face_lost_at`` gives the first frame
after its last appearance, and the report says so.

**Face motion.** The 5 landmarks in face-box units ``n = (p − box centre) / max(box w, h)``; FM_ref = mean
over frames with a face of the mean point distance to each reference's landmarks; FM_inter = the same
between consecutive scored frames that both have a face. (The MagicMirror paper publishes no FM formula.)

:func:`evaluate_video` computes whatever its inputs allow; :class:`VideoMetrics` holds the numbers, the
frames or pairs each one used (``counts``), why a column has no number (``unavailable``), per-frame curves
and notes. :func:`summarise` aggregates rows per protocol with counts. With the tiny random-weight models
of the tests every number is meaningless; only the arithmetic is real.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import torch

from .motion import FLOW_SHORT_SIDE, Motion, motion_fb, video_motion

NO_FACE = "no face in any frame"
CROP_SIZE = 224  # the aligned crop CurricularFace and Inception see (ConsisID / OpenS2V: norm_crop(..., 224))
# Per-video scalars with their display format.
METRICS = {"face_sim": "{:.4f}", "face_sim_cur": "{:.4f}", "face_fid": "{:.2f}", "clip_t": "{:.2f}",
           "dynamics": "{:.1f}", "dynamic_degree": "{:.3f}", "motion_fb": "{:.4f}", "fm_ref": "{:.4f}",
           "fm_inter": "{:.4f}", "sim_decay": "{:+.4f}", "face_rate": "{:.3f}", "clip_i": "{:.4f}",
           "dino_i": "{:.4f}"}
FACE_KEYS = ("face_sim", "face_sim_cur", "face_fid", "fm_ref", "fm_inter", "sim_decay")

Progress = Callable[[int, int], None]  # (steps done, steps in total)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What a published evaluation fixes (see the module docstring) and the columns of its table."""

    name: str
    sources: tuple
    num_frames: int | None      # None: every frame; N: np.linspace(0, T - 1, N, dtype=int)
    pack: str                   # insightface pack of the protocol
    det_size: int | None        # None: the analyzer's size ladder; an int: that size + the padded retry
    clamp: bool                 # per-frame cosine clamped at 0
    faceless_zero: bool         # a video without a face scores 0 (else: no value, left out of averages)
    one_reference: bool         # the first reference photo only (else the mean over the set)
    cur_drop_zero: bool         # FaceSim-Cur averages only frames with a clamped cosine > 0 (OpenS2V)
    fid: bool                   # ConsisID's face FID
    clip_t: str                 # frames for CLIP-T: "all" | "consisid" (16 x int(i T / 16), BGR, logit scale) |
    #                             "sampled" (the protocol's frames)
    motion_fb: bool             # OpenS2V's motion_fb
    columns: tuple              # (key, label) of the table, in order

    def describe(self) -> str:
        frames = "every frame" if self.num_frames is None else f"{self.num_frames} evenly spaced frames"
        det = ("the size ladder 640→512→384→256" if self.det_size is None
               else f"size {self.det_size} + one retry on the 1.25x grey-padded image")
        refs = "the first reference photo" if self.one_reference else "the mean over the reference set"
        return (f"protocol {self.name} ({'; '.join(self.sources)}): {frames}; insightface {self.pack} at {det}; "
                f"cosine to {refs}{', clamped at 0' if self.clamp else ''}; a video without a face "
                f"{'scores 0' if self.faceless_zero else 'has no face score (left out, counted)'}")


_COMMON = (("dynamics", "Dynamics (px/s)↑"), ("dynamic_degree", "Dynamic Degree↑"), ("face_rate", "Face rate"),
           ("sim_decay", "Sim. decay"), ("fm_ref", "FM_ref"), ("fm_inter", "FM_inter"), ("clip_i", "CLIP-I↑"),
           ("dino_i", "DINO-I↑"))
PROTOCOLS = {
    "magicmirror": Protocol(
        name="magicmirror", sources=("MagicMirror arXiv 2501.03931 average similarity to the reference set",
                                     "this pack's definitions"),
        num_frames=None, pack="antelopev2", det_size=None, clamp=False, faceless_zero=False, one_reference=False,
        cur_drop_zero=False, fid=False, clip_t="all", motion_fb=False,
        columns=(("face_sim", "Face Similarity↑"), ("dynamics", "Dynamics (px/s)↑"),
                 ("dynamic_degree", "Dynamic Degree↑"), ("fm_ref", "Face Motion (FM_ref)↑"), ("fm_inter", "FM_inter"),
                 ("sim_decay", "Sim. decay"), ("face_rate", "Face rate"), ("clip_t", "CLIP-T↑"),
                 ("face_sim_cur", "FaceSim-Cur↑"), ("clip_i", "CLIP-I↑"), ("dino_i", "DINO-I↑"))),
    "consisid": Protocol(
        name="consisid", sources=("ConsisID eval/get_facesim_fid.py", "eval/get_clipscore.py"),
        num_frames=16, pack="buffalo_l", det_size=320, clamp=True, faceless_zero=True, one_reference=True,
        cur_drop_zero=False, fid=True, clip_t="consisid", motion_fb=False,
        columns=(("face_sim", "FaceSim-Arc↑"), ("face_sim_cur", "FaceSim-Cur↑"), ("clip_t", "CLIPScore↑"),
                 ("face_fid", "FID↓"), *_COMMON)),
    "opens2v": Protocol(
        name="opens2v", sources=("OpenS2V-Nexus eval/get_facesim.py", "eval/get_motionscore.py"),
        num_frames=32, pack="buffalo_l", det_size=320, clamp=True, faceless_zero=True, one_reference=True,
        cur_drop_zero=True, fid=False, clip_t="sampled", motion_fb=True,
        columns=(("face_sim_cur", "FaceSim-Cur↑"), ("face_sim", "FaceSim-Arc↑"), ("motion_fb", "Motion (motion_fb)"),
                 ("clip_t", "CLIP-T↑"), *_COMMON)),
}
# Which per-video count each column reports (frames with a face, frame pairs, ...).
COUNT_UNITS = {"dynamics": "pairs", "dynamic_degree": "pairs", "motion_fb": "pairs"}


def get_protocol(protocol) -> Protocol:
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol]


def sample_indices(num_frames: int, protocol) -> np.ndarray:
    """The protocol's frame indices of a ``num_frames`` video (repeats kept, as ``np.linspace(dtype=int)`` gives)."""
    protocol = get_protocol(protocol)
    if protocol.num_frames is None:
        return np.arange(num_frames)
    return np.linspace(0, num_frames - 1, protocol.num_frames, dtype=int)


def consisid_clip_indices(num_frames: int, count: int = 16) -> np.ndarray:
    """ConsisID ``get_clipscore.py``'s frames: ``int(i * T / count)`` for ``i < count``."""
    return np.array([int(i * num_frames / count) for i in range(count)], dtype=int)


def frames_uint8(frames) -> np.ndarray:
    """IMAGE ``[T, H, W, 3]`` (torch or numpy, float 0..1 or uint8) -> numpy uint8 ``[T, H, W, 3]``."""
    if isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:  # = round(clamp(x, 0, 1) * 255), with one temporary
            frames = (frames.float() * 255).clamp_(0, 255).round_().to(torch.uint8)
        frames = frames.cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4) or frames.shape[0] == 0:
        raise ValueError(f"expected frames [T, H, W, 3] with T >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return np.ascontiguousarray(frames[..., :3])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _mean(values) -> float | None:
    """Mean of the finite values, ``None`` when there are none (never NaN)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def _as_list(curve) -> list:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(curve, dtype=np.float64)]


# --------------------------------------------------------------------------------------------- faces


def normalise_landmarks(kps, bbox) -> np.ndarray:
    """Landmarks ``[..., 5, 2]`` in face-box units: ``(p - box centre) / max(box width, box height)``."""
    kps, bbox = np.asarray(kps, dtype=np.float64), np.asarray(bbox, dtype=np.float64)
    centre = np.stack([(bbox[..., 0] + bbox[..., 2]) / 2, (bbox[..., 1] + bbox[..., 3]) / 2], axis=-1)
    size = np.maximum(np.maximum(bbox[..., 2] - bbox[..., 0], bbox[..., 3] - bbox[..., 1]), 1e-6)
    return (kps - centre[..., None, :]) / size[..., None, None]


def aligned_crop(image: np.ndarray, kps, size: int = CROP_SIZE) -> np.ndarray:
    """insightface ``norm_crop`` of an RGB uint8 image on 5 landmarks: RGB uint8 ``[size, size, 3]``."""
    from insightface.utils import face_align

    return face_align.norm_crop(np.ascontiguousarray(image), landmark=np.asarray(kps, np.float32), image_size=size)


@dataclasses.dataclass
class FaceModels:
    """The optional face models of a protocol (None when absent, with the reason in ``unavailable``)."""

    curricularface: object = None
    inception: object = None
    unavailable: dict = dataclasses.field(default_factory=dict)
    device: torch.device | str = "cpu"    # where the loader placed both models


@dataclasses.dataclass
class ReferenceFaces:
    """The reference set: unit ArcFace embeddings ``[R, 512]``; when known, normalised landmarks ``[R, 5, 2]``,
    224 aligned crops ``[R, 224, 224, 3]``, CurricularFace embeddings and Inception features."""

    embeddings: np.ndarray
    landmarks: np.ndarray | None = None
    crops: np.ndarray | None = None
    cur: np.ndarray | None = None
    inception: np.ndarray | None = None

    @classmethod
    def from_embeddings(cls, arcface) -> "ReferenceFaces":
        """From raw ArcFace embeddings ``[R, 512]`` (e.g. ``FaceEmbeds.arcface``); FM_ref is then undefined."""
        arcface = arcface.float().cpu().numpy() if isinstance(arcface, torch.Tensor) else np.asarray(arcface)
        return cls(embeddings=_unit(arcface.astype(np.float64).reshape(-1, arcface.shape[-1])))

    def __len__(self) -> int:
        return len(self.embeddings)

    def first(self) -> "ReferenceFaces":
        """The first reference only (the published protocols use one photo)."""
        return ReferenceFaces(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[:1]
                                 for f in dataclasses.fields(self)})


def _locate(analyzer, image, protocol: Protocol):
    if protocol.det_size is None:
        return analyzer.locate_largest(image)                 # the analyzer's ladder, as for reference photos
    return analyzer.locate_largest_padded(image, protocol.det_size)


def reference_faces(analyzer, images, protocol="magicmirror", face_models: FaceModels | None = None) -> ReferenceFaces:
    """Detect (as the protocol does for frames), align and embed the largest face of each reference image.

    ``images``: IMAGE ``[R, H, W, 3]`` or a list of RGB images. A reference without a face is an error.
    """
    from .face_encoder import NoFaceError

    protocol = get_protocol(protocol)
    images = list(images) if not isinstance(images, (torch.Tensor, np.ndarray)) else list(frames_uint8(images))
    images = [frames_uint8(image)[0] for image in images]
    boxes = []
    for k, image in enumerate(images):
        box = _locate(analyzer, image, protocol)
        if box is None:
            raise NoFaceError(f"No face found in reference image {k + 1} of {len(images)}: identity metrics need a "
                              "reference photo with a clearly visible face.")
        boxes.append(box)
    embeddings = _unit(analyzer.embeddings(images, boxes).astype(np.float64))
    landmarks = normalise_landmarks(np.stack([b.kps for b in boxes]), np.stack([b.bbox for b in boxes]))
    crops = np.stack([aligned_crop(image, box.kps) for image, box in zip(images, boxes)])
    refs = ReferenceFaces(embeddings=embeddings, landmarks=landmarks, crops=crops)
    _embed_crops(refs, face_models)
    return refs


def _embed_crops(refs: ReferenceFaces, face_models: FaceModels | None) -> None:
    if face_models is None or refs.crops is None:
        return
    if face_models.curricularface is not None and refs.cur is None:
        from .curricularface import curricularface_embeddings

        refs.cur = curricularface_embeddings(face_models.curricularface, refs.crops, device=face_models.device)
    if face_models.inception is not None and refs.inception is None:
        from .metric_models import inception_features

        refs.inception = inception_features(face_models.inception, refs.crops, device=face_models.device)


@dataclasses.dataclass
class FaceTrack:
    """Per scored frame the largest face: ``boxes[t]`` (a ``FaceBox`` or ``None``), unit ArcFace embeddings
    ``[F, 512]`` and normalised landmarks ``[F, 5, 2]`` (NaN rows where no face), 224 crops (when asked)."""

    boxes: list
    embeddings: np.ndarray
    landmarks: np.ndarray
    crops: np.ndarray | None = None

    @property
    def present(self) -> np.ndarray:
        return np.array([b is not None for b in self.boxes])


def track_faces(analyzer, frames, protocol="magicmirror", indices=None, crops: bool = False,
                progress: Progress | None = None) -> FaceTrack:
    """The protocol's detection on frames ``indices`` (default: all) of ``frames``, each distinct frame once, then
    ONE batched recogniser call for all faces found; ``crops``: also the 224 aligned crops ``[F, 224, 224, 3]``.
    Row ``k`` of the result is frame ``indices[k]``."""
    protocol = get_protocol(protocol)
    frames = frames_uint8(frames)
    indices = np.arange(len(frames)) if indices is None else np.asarray(indices, dtype=int)
    unique = list(dict.fromkeys(int(i) for i in indices))
    located = {}
    for k, i in enumerate(unique):
        located[i] = _locate(analyzer, frames[i], protocol)
        if progress is not None:
            progress(k + 1, len(unique))
    found = [i for i in unique if located[i] is not None]
    raw = analyzer.embeddings([frames[i] for i in found], [located[i] for i in found])     # [F', 512]
    row = {i: k for k, i in enumerate(found)}
    boxes = [located[int(i)] for i in indices]
    embeddings = np.full((len(indices), raw.shape[-1]), np.nan)
    landmarks = np.full((len(indices), 5, 2), np.nan)
    crop_array = np.zeros((len(indices), CROP_SIZE, CROP_SIZE, 3), np.uint8) if crops else None
    unit = _unit(raw.astype(np.float64))
    crop_of = {i: aligned_crop(frames[i], located[i].kps) for i in found} if crops else {}
    for k, i in enumerate(int(i) for i in indices):
        if located[i] is None:
            continue
        embeddings[k] = unit[row[i]]
        landmarks[k] = normalise_landmarks(located[i].kps, located[i].bbox)
        if crops:
            crop_array[k] = crop_of[i]
    return FaceTrack(boxes=boxes, embeddings=embeddings, landmarks=landmarks, crops=crop_array)


def identity_curve(embeddings: np.ndarray, references: np.ndarray, clamp: bool = False) -> np.ndarray:
    """Per-frame mean cosine to the references ``[F]`` (NaN where a frame has no face, i.e. a NaN row); ``clamp``:
    ``max(0, cos)`` (with one reference, the published scripts' ``max(0.0, cosine)``)."""
    cos = (_unit(np.asarray(embeddings, np.float64)) @ _unit(np.asarray(references, np.float64)).T).mean(axis=1)
    return np.where(np.isnan(cos), np.nan, np.maximum(cos, 0.0)) if clamp else cos


def similarity_decay(curve: np.ndarray) -> float | None:
    """Over the frames with a face (in time order): mean of the last ``q`` minus the first ``q``,
    ``q = max(1, F // 4)``; ``None`` when no frame has a face."""
    faced = np.asarray(curve, np.float64)
    faced = faced[np.isfinite(faced)]
    if not faced.size:
        return None
    q = max(1, faced.size // 4)
    return float(faced[-q:].mean() - faced[:q].mean())


def _landmark_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean Euclidean distance of the 5 points: ``[..., 5, 2]`` x ``[..., 5, 2]`` -> ``[...]``."""
    return np.linalg.norm(a - b, axis=-1).mean(axis=-1)


def face_motion(landmarks: np.ndarray,
                reference_landmarks: np.ndarray | None = None) -> tuple[float | None, float | None]:
    """``(FM_ref, FM_inter)`` from normalised landmarks ``[T, 5, 2]`` (NaN where no face); see the module docstring.
    FM_ref is ``None`` without reference landmarks or faces, FM_inter without two consecutive frames with a face."""
    landmarks = np.asarray(landmarks, np.float64)
    fm_ref = None
    if reference_landmarks is not None and len(reference_landmarks):
        per_frame = _landmark_distance(landmarks[:, None], np.asarray(reference_landmarks, np.float64)[None])  # [T, R]
        fm_ref = _mean(per_frame.mean(axis=1))
    fm_inter = _mean(_landmark_distance(landmarks[1:], landmarks[:-1])) if len(landmarks) > 1 else None
    return fm_ref, fm_inter


# --------------------------------------------------------------------------------------------- subject


def clip_similarity_curve(model, frames, references, batch_size: int = 16) -> np.ndarray:
    """Per-frame CLIP-I ``[T]``: mean cosine between each frame's and each reference image's CLIP image embedding.

    ``references``: IMAGE ``[R, H, W, 3]`` (0..1) or precomputed image embeddings ``[R, D]``.
    """
    from .clip_vision import image_embeds

    images = torch.from_numpy(frames_uint8(frames)).float() / 255.0
    if isinstance(references, torch.Tensor) and references.ndim == 2:
        ref = references.float()
    else:
        ref = image_embeds(model, torch.from_numpy(frames_uint8(references)).float() / 255.0)
    frame_embeds = torch.cat([image_embeds(model, images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    return identity_curve(frame_embeds.double().numpy(), ref.double().numpy())


# --------------------------------------------------------------------------------------------- one video


@dataclasses.dataclass
class VideoMetrics:
    """Every metric of one video (``None`` = not computable; ``unavailable[key]`` says why when a model or input is
    missing), how many frames (or frame pairs) each used (``counts``), per-frame curves over the scored frames
    (``frame_indices``), and notes."""

    num_frames: int
    protocol: str = "magicmirror"
    fps: float | None = None
    frame_indices: list = dataclasses.field(default_factory=list)
    face_sim: float | None = None
    face_sim_cur: float | None = None
    face_fid: float | None = None
    face_rate: float | None = None
    sim_decay: float | None = None
    face_lost_at: int | None = None
    fm_ref: float | None = None
    fm_inter: float | None = None
    dynamics: float | None = None
    dynamic_degree: float | None = None
    motion_fb: float | None = None
    clip_t: float | None = None
    clip_i: float | None = None
    dino_i: float | None = None
    num_references: int = 0
    references_used: int = 0
    detector: str | None = None
    flow: str | None = None
    analysis_fps: float | None = None
    counts: dict = dataclasses.field(default_factory=dict)
    unavailable: dict = dataclasses.field(default_factory=dict)
    curves: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)

    @property
    def frames_scored(self) -> int:
        return len(self.frame_indices)

    @property
    def faces_found(self) -> int:
        return int(self.counts.get("face_rate", 0))

    def scalars(self) -> dict[str, float]:
        """The defined metrics as a flat ``{name: float}`` (for TensorBoard / CSV)."""
        return {key: float(getattr(self, key)) for key in METRICS if getattr(self, key) is not None}

    def as_dict(self) -> dict:
        """JSON-ready: every metric (``null`` when undefined), counts, curves and notes."""
        return dataclasses.asdict(self)

    def report(self) -> str:
        """A short human-readable report; every number says how many frames (or frame pairs) it used."""
        p = get_protocol(self.protocol)
        names = {"face_sim": "Face similarity" if p.name == "magicmirror" else "FaceSim-Arc",
                 "face_sim_cur": "FaceSim-Cur", "face_fid": "FID (face crops, ConsisID)"}
        lines = []
        if self.face_rate is not None:
            faces, scored = self.faces_found, self.frames_scored
            refs = f"{self.references_used} reference{'s' if self.references_used != 1 else ''}" + (
                f" of {self.num_references}" if self.references_used != self.num_references else "")
            if not self.num_references:
                lost = f"; face lost at frame {self.face_lost_at}" if self.face_lost_at is not None else ""
                lines.append(f"Frames with a face: {faces}/{scored} (no reference: no similarity{lost})")
            elif faces == 0:
                lines.append(f"Face similarity: {NO_FACE} ({scored} frames, detector {self.detector})"
                             + (f"; face scores count 0 under protocol {p.name}" if p.faceless_zero else ""))
            for key in ("face_sim", "face_sim_cur", "face_fid"):
                value = getattr(self, key)
                if value is not None and faces:
                    which = " and a positive cosine" if key == "face_sim_cur" and p.cur_drop_zero else ""
                    lines.append(f"{names[key]} {METRICS[key].format(value)} (mean over {self.counts.get(key, 0)}/"
                                 f"{scored} frames with a face{which}, {refs})")
                elif value is None and key in self.unavailable:
                    lines.append(f"{names[key]}: n/a ({self.unavailable[key]})")
            if self.sim_decay is not None:
                lost = (f"; face lost at frame {self.face_lost_at} of {self.num_frames}"
                        if self.face_lost_at is not None else "")
                lines.append(f"  decay (last - first quarter of the {faces} frames with a face): "
                             f"{self.sim_decay:+.4f}{lost}")
            fm = [f"{name} {value:.4f}" for name, value in (("FM_ref", self.fm_ref), ("FM_inter", self.fm_inter))
                  if value is not None]
            if fm:
                lines.append("Face motion: " + ", ".join(fm) + " (landmarks in face-box units)")
        if self.dynamics is not None:
            moves = "moves" if self.dynamic_degree else "static"
            lines.append(f"Dynamics {self.dynamics:.1f} px/s at short side {FLOW_SHORT_SIDE} "
                         f"({self.counts.get('dynamics', 0)} frame pairs at {self.analysis_fps:g} of {self.fps:g} "
                         "fps); "
                         f"dynamic degree (VBench rule): {moves}; flow: {self.flow}")
        elif "dynamics" in self.unavailable:
            lines.append(f"Dynamics: n/a ({self.unavailable['dynamics']})")
        if self.motion_fb is not None:
            lines.append(f"Motion (OpenS2V motion_fb) {self.motion_fb:.4f} ({self.counts.get('motion_fb', 0)} pairs)")
        for key, name in (("clip_t", "CLIPScore" if p.clip_t == "consisid" else "CLIP-T"), ("clip_i", "CLIP-I"),
                          ("dino_i", "DINO-I")):
            value = getattr(self, key)
            if value is not None:
                lines.append(f"{name} {METRICS[key].format(value)} (mean over {self.counts.get(key, 0)} frames)")
            elif key in self.unavailable:
                lines.append(f"{name}: n/a ({self.unavailable[key]})")
        repeats = " (frames repeat: the video is shorter)" if self.frames_scored > self.num_frames else ""
        lines.append(f"Protocol {p.name}: {self.frames_scored} frames scored of {self.num_frames}{repeats}")
        lines.extend(n for n in self.notes if not n.startswith(NO_FACE))
        return "\n".join(lines)


def evaluate_video(frames, *, protocol="magicmirror", fps: float | None = None, analyzer=None,
                   references: ReferenceFaces | None = None, face_models: FaceModels | None = None,
                   clip_model=None, clip_references=None, text_clip=None, prompt: str | None = None,
                   dino=None, dino_references=None, flow=None, dynamics: bool = True,
                   progress: Progress | None = None) -> VideoMetrics:
    """All metrics the inputs allow, for one video ``frames`` (IMAGE ``[T, H, W, 3]`` 0..1, or uint8), under
    ``protocol`` (a name of :data:`PROTOCOLS`).

    * ``analyzer`` (a ``FaceAnalyzer``): face rate, FM_inter; with ``references`` (:func:`reference_faces` with the
      same protocol, or :meth:`ReferenceFaces.from_embeddings`) face similarity, decay, FM_ref; with ``face_models``
      FaceSim-Cur and (``consisid``) FID.
    * ``dynamics`` with ``fps``: dynamics and dynamic degree (``flow``: a :mod:`.motion` flow, default Farneback);
      ``opens2v`` also motion_fb.
    * ``clip_model`` + ``clip_references`` (IMAGE or CLIP image embeddings): CLIP-I; ``text_clip`` + ``prompt``:
      CLIP-T; ``dino`` + ``dino_references`` (IMAGE): DINO-I.

    ``progress(done, total)`` is called per face frame and per frame pair. Never NaN: undefined is ``None``.
    """
    p = get_protocol(protocol)
    frames = frames_uint8(frames)
    t = len(frames)
    indices = sample_indices(t, p)
    out = VideoMetrics(num_frames=t, protocol=p.name, fps=fps, frame_indices=[int(i) for i in indices])
    steps = [0, (len(indices) if analyzer is not None else 0) + (t if dynamics and fps else 0)]

    def step(_i=None, _n=None):
        steps[0] += 1
        if progress is not None:
            progress(min(steps[0], steps[1]), steps[1])

    scored = frames if p.num_frames is None else frames[indices]  # (every frame: no copy)
    if analyzer is not None:
        _score_faces(out, p, analyzer, frames, indices, references, face_models or FaceModels(), step)
    if dynamics:
        _score_motion(out, p, frames, fps, flow, step)
    if clip_model is not None:
        if clip_references is None:
            raise ValueError("CLIP-I needs a reference image (clip_references)")
        curve = clip_similarity_curve(clip_model, scored, clip_references)
        out.curves["clip_i"], out.clip_i, out.counts["clip_i"] = _as_list(curve), _mean(curve), len(curve)
    if text_clip is not None:
        if prompt:
            _score_clip_t(out, p, text_clip, frames, indices, prompt)
        else:
            out.unavailable["clip_t"] = "no prompt for this video"
    if dino is not None:
        if dino_references is None:
            raise ValueError("DINO-I needs a reference image (dino_references)")
        from .metric_models import dino_embeddings

        refs = dino_references if isinstance(dino_references, np.ndarray) and dino_references.dtype != np.uint8 \
            and dino_references.ndim == 2 else dino_embeddings(dino, frames_uint8(dino_references))
        curve = (dino_embeddings(dino, scored) @ refs.T).mean(axis=1)
        out.curves["dino_i"], out.dino_i, out.counts["dino_i"] = _as_list(curve), _mean(curve), len(curve)
    return out


def _score_faces(out: VideoMetrics, p: Protocol, analyzer, frames, indices, references, face_models: FaceModels,
                 step) -> None:
    want_cur = references is not None and face_models.curricularface is not None
    want_fid = references is not None and p.fid and face_models.inception is not None
    track = track_faces(analyzer, frames, p, indices=indices, crops=want_cur or want_fid, progress=step)
    present = track.present
    faces = int(present.sum())
    out.detector = (f"{getattr(analyzer, 'name', '?')} at "
                    + ("/".join(str(s) for s in analyzer.det_sizes) if p.det_size is None
                       else f"{p.det_size} + padded retry"))
    if p.pack != getattr(analyzer, "name", p.pack):
        out.notes.append(f"protocol {p.name} uses the insightface pack {p.pack}; this analyzer is "
                         f"{analyzer.name}, so ArcFace numbers are not that protocol's")
    out.face_rate, out.counts["face_rate"] = faces / len(present), faces
    if faces and not present[-1]:
        last = int(np.nonzero(present)[0][-1])
        out.face_lost_at = out.frame_indices[last + 1]
    ref_landmarks = None
    if references is not None:
        refs = references.first() if p.one_reference else references
        out.num_references, out.references_used = len(references), len(refs)
        empty = 0.0 if p.faceless_zero else None
        curve = identity_curve(track.embeddings, refs.embeddings, clamp=p.clamp)
        out.curves["face_sim"] = _as_list(curve)
        out.face_sim = _mean(curve) if faces else empty
        out.counts["face_sim"] = faces
        out.sim_decay = similarity_decay(curve)
        ref_landmarks = refs.landmarks
        if want_cur:
            from .curricularface import curricularface_embeddings

            _embed_crops(refs, FaceModels(curricularface=face_models.curricularface, device=face_models.device))
            cur = np.full(len(present), np.nan)
            if faces:
                crops_cur = curricularface_embeddings(face_models.curricularface, track.crops[present],
                                                      device=face_models.device)
                cur[present] = identity_curve(crops_cur, refs.cur, clamp=p.clamp)
            kept = cur[np.isfinite(cur) & (cur > 0)] if p.cur_drop_zero else cur[np.isfinite(cur)]
            out.curves["face_sim_cur"] = _as_list(cur)
            out.face_sim_cur = float(kept.mean()) if kept.size else empty
            out.counts["face_sim_cur"] = int(kept.size)
        elif "curricularface" in face_models.unavailable:
            out.unavailable["face_sim_cur"] = face_models.unavailable["curricularface"]
        if want_fid:
            from .metric_models import inception_features

            _embed_crops(refs, FaceModels(inception=face_models.inception, device=face_models.device))
            dist = np.full(len(present), np.nan)
            if faces:
                feats = inception_features(face_models.inception, track.crops[present], device=face_models.device)
                dist[present] = ((feats - refs.inception[0]) ** 2).sum(-1)
            out.curves["face_fid"] = _as_list(dist)
            out.face_fid = _mean(dist) if faces else empty
            out.counts["face_fid"] = faces
        elif p.fid and "inception" in face_models.unavailable:
            out.unavailable["face_fid"] = face_models.unavailable["inception"]
    out.fm_ref, out.fm_inter = face_motion(track.landmarks, ref_landmarks)
    out.counts["fm_ref"] = faces if out.fm_ref is not None else 0
    pairs = present[1:] & present[:-1]
    out.counts["fm_inter"] = int(pairs.sum())
    out.counts["sim_decay"] = faces
    if not faces:
        out.notes.append(f"{NO_FACE} of the {len(present)} scored frames: "
                         + ("face scores count 0 (the protocol's rule)" if p.faceless_zero and references is not None
                            else "face similarity and face motion are undefined"))


def _score_motion(out: VideoMetrics, p: Protocol, frames: np.ndarray, fps, flow, step) -> None:
    if len(frames) < 2:
        out.unavailable["dynamics"] = out.unavailable["dynamic_degree"] = "one frame only"
        return
    if not fps or fps <= 0:
        out.unavailable["dynamics"] = out.unavailable["dynamic_degree"] = "frame rate unknown"
        return
    motion: Motion = video_motion(frames, fps, flow, progress=step)
    out.flow, out.analysis_fps = motion.flow, motion.analysis_fps
    if not len(motion.pair_mean):
        out.unavailable["dynamics"] = out.unavailable["dynamic_degree"] = \
            f"one frame left at the analysis rate ({motion.analysis_fps:g} fps)"
    else:
        out.dynamics = motion.dynamics
        out.dynamic_degree = float(motion.moves)
        out.counts["dynamics"] = out.counts["dynamic_degree"] = len(motion.pair_mean)
        out.curves["flow"] = _as_list(motion.pair_mean * motion.analysis_fps)
        out.curves["flow_top"] = _as_list(motion.pair_top)
        out.curves["flow_frames"] = list(motion.indices)
        out.curves["flow_threshold"] = motion.threshold
    if p.motion_fb:
        out.motion_fb, out.counts["motion_fb"] = motion_fb(frames), len(frames) - 1


def _score_clip_t(out: VideoMetrics, p: Protocol, text_clip, frames, indices, prompt: str) -> None:
    from .metric_models import clip_text_cosines

    if p.clip_t == "consisid":
        chosen = consisid_clip_indices(len(frames))
        images = frames[chosen][..., ::-1]                     # the script's cv2 frames: BGR order
        scale = text_clip.logit_scale
    else:
        chosen = np.arange(len(frames)) if p.clip_t == "all" else indices
        images, scale = frames[chosen], 100.0
    curve = clip_text_cosines(text_clip, np.ascontiguousarray(images), prompt) * scale
    out.curves["clip_t"], out.clip_t, out.counts["clip_t"] = _as_list(curve), _mean(curve), len(curve)
    out.curves["clip_t_frames"] = [int(i) for i in chosen]


# --------------------------------------------------------------------------------------------- many videos


def summarise(rows: Sequence[dict], protocol="magicmirror", keys: Sequence[str] | None = None) -> dict[str, dict]:
    """Per metric over the scored videos: mean, std (population), ``n`` videos with a value, ``frames`` (or
    pairs) those used, ``left_out`` videos without a value and why (``reasons``: faceless, model missing, ...).

    The protocol's rules are already in the rows (a faceless video has 0 under ``consisid``/``opens2v``, no value
    under ``magicmirror``); nothing here drops a value."""
    p = get_protocol(protocol)
    keys = keys or [k for k, _ in p.columns]
    table = {}
    for key in keys:
        with_value = [r for r in rows if r.get(key) is not None]
        values = np.array([r[key] for r in with_value], dtype=np.float64)
        reasons: dict[str, int] = {}
        for r in rows:
            if r.get(key) is None:
                reason = (r.get("unavailable") or {}).get(key)
                if reason is None:
                    reason = NO_FACE if key in FACE_KEYS and (r.get("counts") or {}).get("face_rate", 1) == 0 \
                        else "not computable"
                reasons[reason] = reasons.get(reason, 0) + 1
        table[key] = {"mean": float(values.mean()) if values.size else None,
                      "std": float(values.std()) if values.size else None, "n": int(values.size),
                      "frames": int(sum((r.get("counts") or {}).get(key, 0) for r in with_value)),
                      "left_out": len(rows) - len(with_value), "reasons": reasons}
        if key in FACE_KEYS and p.faceless_zero:
            table[key]["faceless_as_zero"] = sum(1 for r in with_value if (r.get("counts") or {}).get("face_rate") == 0)
    return table
