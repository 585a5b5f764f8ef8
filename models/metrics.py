"""Video metrics for identity, face motion, dynamics and subject fidelity (MagicMirror Table 1 and friends).

Everything here is computed with models the pack already loads (insightface face analysis, a CLIP
vision tower) and OpenCV, which comes with insightface. Nothing is downloaded.

**Identity similarity** (MagicMirror's "average similarity to the reference set"). Per frame the
largest face's ArcFace embedding ``e_t`` (unit length), and for each reference photo its embedding
``r_j``::

    s_t = mean_j cos(e_t, r_j)            (frames with a detected face only)
    face_sim  = mean_t s_t
    face_rate = (# frames with a face) / T
    sim_decay = mean(s_t, last quarter of the frames) - mean(s_t, first quarter)   (quarter = max(1, T // 4))

Each frame gets exactly one detector pass (at ``det_size``, default the analyzer's first size, 640,
no smaller-size fallback), then all detected faces are aligned and embedded in ONE batched
recogniser call.

**Face motion.** The 5 insightface landmarks (eyes, nose, mouth corners) are normalised by the face
box so that the face's position and size in the frame do not count::

    n_k = (p_k - c) / max(w, h)           c = box centre, w, h = box width and height

so a landmark's coordinates are in units of the face size. With ``d(a, b) = mean_k ||a_k - b_k||_2``
(the mean Euclidean distance of the 5 points)::

    FM_ref   = mean over frames with a face of mean_j d(n_t, n_ref_j)     (how far the face moves
               away from the reference photos' expression/pose)
    FM_inter = mean over consecutive frame pairs (t-1, t) that both have a face of d(n_t, n_{t-1})
               (how much the face moves from frame to frame)

The paper does not publish its FM formula, so these values are not on the paper's scale (its FM_ref
0.704); compare them between runs of this pack.

**Dynamics.** The mean optical-flow magnitude between consecutive frames: OpenCV Farneback on
grayscale frames resized (aspect kept) to a short side of :data:`FLOW_SHORT_SIDE` = 256 px
(a 480x720 video is analysed at 256x384), in pixels per frame *at that resolution*, averaged over
all pixels and frame pairs. (The paper's "Dynamics" is a VBench-style score, another scale.)

**Subject similarity (CLIP-I).** The cosine between the projected CLIP image embeddings of each
frame and of each reference image, averaged over the references and the frames.

:func:`evaluate_video` computes whatever its inputs allow and returns :class:`VideoMetrics`;
``VideoMetrics.scalars()`` is the flat dict a trainer logs. With random-weight (tiny test) models
every number is meaningless; only the plumbing is real.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import torch

FLOW_SHORT_SIDE = 256
# cv2.calcOpticalFlowFarneback(prev, next, flow, pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags)
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)
NO_FACE = "no face in any frame"
# The per-video scalars (VideoMetrics fields) with their display format; the Table-1 columns first.
METRICS = {"face_sim": "{:.4f}", "dynamics": "{:.3f}", "fm_ref": "{:.4f}", "fm_inter": "{:.4f}", "sim_decay": "{:+.4f}",
           "face_rate": "{:.3f}", "clip_i": "{:.4f}"}

Progress = Callable[[int, int], None]  # (steps done, steps in total)


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


# --------------------------------------------------------------------------------------------- faces


def normalise_landmarks(kps, bbox) -> np.ndarray:
    """Landmarks ``[..., 5, 2]`` in face-box units: ``(p - box centre) / max(box width, box height)``."""
    kps, bbox = np.asarray(kps, dtype=np.float64), np.asarray(bbox, dtype=np.float64)
    centre = np.stack([(bbox[..., 0] + bbox[..., 2]) / 2, (bbox[..., 1] + bbox[..., 3]) / 2], axis=-1)
    size = np.maximum(np.maximum(bbox[..., 2] - bbox[..., 0], bbox[..., 3] - bbox[..., 1]), 1e-6)
    return (kps - centre[..., None, :]) / size[..., None, None]


@dataclasses.dataclass
class ReferenceFaces:
    """The reference set: unit ArcFace embeddings ``[R, 512]`` and, when known, normalised landmarks ``[R, 5, 2]``."""

    embeddings: np.ndarray
    landmarks: np.ndarray | None = None

    @classmethod
    def from_embeddings(cls, arcface) -> "ReferenceFaces":
        """From raw ArcFace embeddings ``[R, 512]`` (e.g. ``FaceEmbeds.arcface``); FM_ref is then undefined."""
        arcface = arcface.float().cpu().numpy() if isinstance(arcface, torch.Tensor) else np.asarray(arcface)
        return cls(embeddings=_unit(arcface.astype(np.float64).reshape(-1, arcface.shape[-1])))


def reference_faces(analyzer, images) -> ReferenceFaces:
    """Detect (with the analyzer's full 640 -> 256 fallback), align and embed the largest face of each reference.

    ``images``: IMAGE ``[R, H, W, 3]`` or a list of RGB images. A reference without a face is an error.
    """
    from .face_encoder import NoFaceError

    images = list(images) if not isinstance(images, (torch.Tensor, np.ndarray)) else list(frames_uint8(images))
    embeddings, landmarks = [], []
    for k, image in enumerate(images):
        face = analyzer.detect_largest(frames_uint8(image)[0])
        if face is None:
            raise NoFaceError(f"No face found in reference image {k + 1} of {len(images)}: identity metrics need a "
                              "reference photo with a clearly visible face.")
        embeddings.append(face.normed_embedding)
        landmarks.append(normalise_landmarks(face.kps, face.bbox))
    return ReferenceFaces(embeddings=_unit(np.stack(embeddings).astype(np.float64)), landmarks=np.stack(landmarks))


@dataclasses.dataclass
class FaceTrack:
    """Per-frame largest faces: ``boxes[t]`` (a ``FaceBox`` or ``None``), unit embeddings ``[T, 512]`` (NaN rows
    where no face) and normalised landmarks ``[T, 5, 2]`` (NaN where no face)."""

    boxes: list
    embeddings: np.ndarray
    landmarks: np.ndarray

    @property
    def present(self) -> np.ndarray:
        return np.array([b is not None for b in self.boxes])


def track_faces(analyzer, frames, det_size: int | None = None, progress: Progress | None = None) -> FaceTrack:
    """One detector pass per frame (at ``det_size``, default the analyzer's first size), then one batched
    recogniser call for all detected faces."""
    frames = frames_uint8(frames)
    sizes = (int(det_size or analyzer.det_sizes[0]),)
    boxes = []
    for t, frame in enumerate(frames):
        boxes.append(analyzer.locate_largest(frame, det_sizes=sizes))
        if progress is not None:
            progress(t + 1, len(frames))
    found = [t for t, b in enumerate(boxes) if b is not None]
    raw = analyzer.embeddings([frames[t] for t in found], [boxes[t] for t in found])       # [F, 512]
    embeddings = np.full((len(frames), raw.shape[-1]), np.nan)
    landmarks = np.full((len(frames), 5, 2), np.nan)
    if found:
        embeddings[found] = _unit(raw.astype(np.float64))
        landmarks[found] = normalise_landmarks(np.stack([boxes[t].kps for t in found]),
                                               np.stack([boxes[t].bbox for t in found]))
    return FaceTrack(boxes=boxes, embeddings=embeddings, landmarks=landmarks)


def identity_curve(embeddings: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Per-frame mean cosine to the references ``[T]`` (NaN where a frame has no face, i.e. a NaN row)."""
    return (_unit(np.asarray(embeddings, np.float64)) @ _unit(np.asarray(references, np.float64)).T).mean(axis=1)


def similarity_decay(curve: np.ndarray) -> float | None:
    """Mean of the last quarter of the frames minus the first quarter (faceless frames ignored; ``None`` when a
    quarter has no face). Quarter = ``max(1, T // 4)`` frames."""
    q = max(1, len(curve) // 4)
    first, last = _mean(curve[:q]), _mean(curve[-q:])
    return None if first is None or last is None else last - first


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


# --------------------------------------------------------------------------------------------- dynamics


def analysis_size(height: int, width: int, short_side: int = FLOW_SHORT_SIDE) -> tuple[int, int]:
    """(height, width) with the short side scaled to ``short_side``, aspect kept."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def flow_magnitudes(frames, short_side: int = FLOW_SHORT_SIDE, progress: Progress | None = None) -> np.ndarray:
    """Mean Farneback flow magnitude of each consecutive frame pair ``[T-1]``, in px/frame at ``short_side``."""
    import cv2

    frames = frames_uint8(frames)
    h, w = analysis_size(frames.shape[1], frames.shape[2], short_side)
    interpolation = cv2.INTER_AREA if h < frames.shape[1] else cv2.INTER_LINEAR
    gray = [cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (w, h), interpolation=interpolation) for f in frames]
    out = np.zeros(len(frames) - 1)
    for t in range(1, len(frames)):
        flow = cv2.calcOpticalFlowFarneback(gray[t - 1], gray[t], None, *FARNEBACK)          # [h, w, 2]
        out[t - 1] = float(np.sqrt((flow.astype(np.float64) ** 2).sum(-1)).mean())
        if progress is not None:
            progress(t, len(frames) - 1)
    return out


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
    """Every metric of one video (``None`` = not computable from the given inputs or the video), the per-frame
    curves (``face_sim`` [T] with ``None`` for faceless frames, ``flow`` [T-1], ``clip_i`` [T]) and notes."""

    num_frames: int
    face_sim: float | None = None
    face_rate: float | None = None
    sim_decay: float | None = None
    fm_ref: float | None = None
    fm_inter: float | None = None
    dynamics: float | None = None
    clip_i: float | None = None
    num_references: int = 0
    det_size: int | None = None
    curves: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)

    def scalars(self) -> dict[str, float]:
        """The defined metrics as a flat ``{name: float}`` (for TensorBoard / CSV)."""
        return {key: getattr(self, key) for key in METRICS if getattr(self, key) is not None}

    def as_dict(self) -> dict:
        """JSON-ready: every metric (``null`` when undefined), curves and notes."""
        return dataclasses.asdict(self)

    def report(self) -> str:
        """A short human-readable report."""
        lines = []
        if self.face_rate is not None:
            faces = round(self.face_rate * self.num_frames)
            if self.face_sim is not None:
                lines.append(f"Face similarity {self.face_sim:.4f} (mean over {faces}/{self.num_frames} frames with a "
                             f"face, {self.num_references} reference{'s' if self.num_references != 1 else ''})")
                decay = "n/a (a quarter without faces)" if self.sim_decay is None else f"{self.sim_decay:+.4f}"
                lines.append(f"  decay (last quarter - first quarter): {decay}")
            elif faces == 0:
                lines.append(f"Face similarity: {NO_FACE} ({self.num_frames} frames, detector size {self.det_size})")
            else:
                lines.append(f"Frames with a face: {faces}/{self.num_frames} (no reference: no similarity)")
            fm = [f"{name} {value:.4f}" for name, value in (("FM_ref", self.fm_ref), ("FM_inter", self.fm_inter))
                  if value is not None]
            if fm:
                lines.append("Face motion: " + ", ".join(fm) + " (landmarks in face-box units)")
        if self.dynamics is not None:
            lines.append(f"Dynamics {self.dynamics:.3f} px/frame (Farneback flow at short side {FLOW_SHORT_SIDE})")
        if self.clip_i is not None:
            lines.append(f"Subject similarity CLIP-I {self.clip_i:.4f}")
        lines.extend(n for n in self.notes if not n.startswith(NO_FACE))  # said above already
        return "\n".join(lines) if lines else f"{self.num_frames} frames; nothing to measure with these inputs"


def _as_list(curve: np.ndarray) -> list:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(curve, dtype=np.float64)]


def evaluate_video(frames, *, analyzer=None, references: ReferenceFaces | None = None, clip_model=None,
                   clip_references=None, dynamics: bool = True, det_size: int | None = None,
                   progress: Progress | None = None) -> VideoMetrics:
    """All metrics the inputs allow, for one video ``frames`` (IMAGE ``[T, H, W, 3]`` 0..1, or uint8).

    * ``analyzer`` (a ``FaceAnalyzer``): face rate, FM_inter; with ``references`` (:func:`reference_faces`, or
      :meth:`ReferenceFaces.from_embeddings`) also face similarity, decay and (with reference landmarks) FM_ref.
    * ``dynamics``: the Farneback flow magnitude (at short side :data:`FLOW_SHORT_SIDE`).
    * ``clip_model`` + ``clip_references`` (IMAGE or CLIP image embeddings): CLIP-I.

    ``progress(done, total)`` is called once per analysed frame (faces) and frame pair (flow).
    A video without any face gives ``face_sim = None`` and the note "no face in any frame", never NaN.
    """
    frames = frames_uint8(frames)
    t = len(frames)
    steps = (t if analyzer is not None else 0) + (t - 1 if dynamics else 0) + (1 if clip_model is not None else 0)
    done = [0]

    def step(_i=None, _n=None):
        done[0] += 1
        if progress is not None:
            progress(done[0], steps)

    out = VideoMetrics(num_frames=t)
    if analyzer is not None:
        out.det_size = int(det_size or analyzer.det_sizes[0])
        track = track_faces(analyzer, frames, det_size=out.det_size, progress=step)
        present = track.present
        out.face_rate = float(present.mean())
        ref_landmarks = None
        if references is not None:
            out.num_references = len(references.embeddings)
            curve = identity_curve(track.embeddings, references.embeddings)
            out.curves["face_sim"] = _as_list(curve)
            out.face_sim, out.sim_decay = _mean(curve), similarity_decay(curve)
            ref_landmarks = references.landmarks
        out.fm_ref, out.fm_inter = face_motion(track.landmarks, ref_landmarks)
        if not present.any():
            out.notes.append(f"{NO_FACE}: face similarity and face motion are undefined")
    if dynamics and t > 1:
        flow = flow_magnitudes(frames, progress=step)
        out.curves["flow"] = _as_list(flow)
        out.dynamics = float(flow.mean())
    elif dynamics:
        out.notes.append("one frame only: no dynamics")
    if clip_model is not None:
        if clip_references is None:
            raise ValueError("CLIP-I needs a reference image (clip_references)")
        curve = clip_similarity_curve(clip_model, frames, clip_references)
        out.curves["clip_i"] = _as_list(curve)
        out.clip_i = _mean(curve)
        step()
    return out


def summarise(rows: Sequence[dict], keys: Sequence[str] | None = None) -> dict[str, dict]:
    """Mean / std / count over videos of each metric (videos where it is undefined are left out)."""
    keys = keys or list(METRICS)
    table = {}
    for key in keys:
        values = np.array([r[key] for r in rows if r.get(key) is not None], dtype=np.float64)
        table[key] = {"mean": float(values.mean()) if values.size else None,
                      "std": float(values.std()) if values.size else None, "n": int(values.size)}
    return table
