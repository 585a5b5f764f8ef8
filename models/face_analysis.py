"""The insightface half of MagicMirror's face encoder: detect, align, ArcFace-embed.

MagicMirror reuses PhotoMaker-V2's ID encoder, whose ``id_embeds`` are insightface ArcFace
embeddings: the *raw* (not L2-normalised) 512-d ``face.embedding`` of an ``antelopev2`` pack
(SCRFD-10G detector + glintr100 recogniser), computed on the BGR image with detection sizes
tried from 640 down to 256 until a face is found. ``DetectedFace.embedding`` is exactly that
vector; ``normed_embedding`` is the unit-length one used for face-similarity metrics.

insightface (>= 1.0, checked against 2.1) facts this module relies on:

- ``FaceAnalysis(name, root)`` downloads ``<root>/models/<name>.zip`` when that folder does not
  exist. We look for the pack ourselves and pass its absolute folder as ``name`` (2.1 uses an
  existing directory directly; older versions ``os.path.join`` it onto the root, which keeps
  an absolute path), so no download is ever attempted.
- Models in the folder are routed by graph shapes, not names: >= 5 outputs -> SCRFD detector;
  a square input >= 112 divisible by 16 -> ArcFace recogniser. ``allowed_modules`` filters
  after loading.
- Setting ``det_model.input_size`` has no effect (``detect`` uses ``input_sizes``), and
  ``prepare(det_size=[...])`` with several sizes runs *all* of them and merges the boxes. For
  a 640 -> 256 fallback we call ``det_model.detect(img, input_size=(s, s))`` per size.
- Detector input: ``(bgr->rgb - 127.5) / 128``; recogniser input: ``(bgr->rgb - 127.5) / 127.5``
  on the ``norm_crop`` 112x112 crop (mean 0 / std 1 only for old mxnet exports).
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_DET_SIZES = (640, 512, 384, 256)
# Pack name -> (detector file, recogniser file) of the real packs, for error messages.
PACK_FILES = {"antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
              "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx")}
CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"
PAD_GREY = 128  # the border colour of the padded retry (ConsisID / OpenS2V eval scripts)


def pad_image(image: np.ndarray, scale: float = 1.25) -> tuple[np.ndarray, tuple[int, int]]:
    """``image`` [H, W, 3] with a grey (128) border of ``int(H * (scale - 1))`` rows above and below and
    ``int(W * (scale - 1))`` columns left and right; returns it with ``(left, top)``.

    The retry image of ConsisID's ``eval/get_facesim_fid.py`` and OpenS2V's ``eval/get_facesim.py``
    (``pad_np_bgr_image``): a face too close to the border or too large for the detector is often found on it.
    """
    if scale < 1.0:
        raise ValueError(f"pad scale must be >= 1, got {scale}")
    h, w = image.shape[:2]
    left, top = int(w * (scale - 1.0)), int(h * (scale - 1.0))
    return add_border(image, left, top), (left, top)


def add_border(image: np.ndarray, left: int, top: int) -> np.ndarray:
    """``image`` with a grey (128) border: ``left`` columns on both sides, ``top`` rows above and below."""
    import cv2

    return cv2.copyMakeBorder(np.ascontiguousarray(image), top, top, left, left, cv2.BORDER_CONSTANT,
                              value=(PAD_GREY, PAD_GREY, PAD_GREY))


@dataclass
class FaceBox:
    """The largest face of an image as the detector gives it (no embedding). Pixels of the analysed image."""

    bbox: np.ndarray              # [4] float32 x1, y1, x2, y2
    kps: np.ndarray               # [5, 2] float32 left eye, right eye, nose, mouth left, mouth right
    det_score: float
    det_size: int                 # detector input size (square) that found the face
    pad: tuple = (0, 0)           # (left, top) border of the padded image it was found in; (0, 0) = the image itself


@dataclass
class DetectedFace:
    """One detected face. Coordinates are pixels of the analysed image."""

    bbox: np.ndarray              # [4] float32 x1, y1, x2, y2
    kps: np.ndarray               # [5, 2] float32 left eye, right eye, nose, mouth left, mouth right
    det_score: float
    embedding: np.ndarray         # [512] float32 raw ArcFace (PhotoMaker-V2 id_embeds)
    normed_embedding: np.ndarray  # [512] float32, unit L2 norm
    det_size: int                 # detector input size (square) that found the face

    @property
    def area(self) -> float:
        return float(max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1]))


def _expected_files(name: str) -> str:
    det, rec = PACK_FILES.get(name, ("<SCRFD detector>.onnx", "<ArcFace recogniser>.onnx"))
    return (f"put {name} ({det} + {rec}) in ComfyUI/models/insightface/models/{name}/ "
            "(this pack never downloads models)")


def find_insightface_pack(root: str, name: str = "antelopev2") -> str:
    """The folder holding pack ``name`` under insightface root ``root``; FileNotFoundError if none.

    Searched in order: ``<root>/models/<name>`` (insightface's layout), ``<root>/models/<name>/<name>``
    (some zips nest the folder), ``<root>/<name>``. A folder counts if it holds ``*.onnx`` files
    (or an insightface ``manifest.json``).
    """
    root = os.path.abspath(os.path.expanduser(str(root)))
    candidates = [os.path.join(root, "models", name), os.path.join(root, "models", name, name),
                  os.path.join(root, name)]
    report = []
    for folder in candidates:
        if not os.path.isdir(folder):
            report.append(f"  {folder} (missing)")
        elif glob.glob(os.path.join(folder, "*.onnx")) or os.path.isfile(os.path.join(folder, "manifest.json")):
            return folder
        else:
            report.append(f"  {folder} (no .onnx files)")
    raise FileNotFoundError(f"insightface pack '{name}' not found. Searched:\n" + "\n".join(report)
                            + f"\nExpected: {_expected_files(name)}; here that is {candidates[0]}")


def _provider_name(provider) -> str:
    return str(provider[0] if isinstance(provider, (list, tuple)) else provider)


class FaceAnalyzer:
    """insightface ``FaceAnalysis`` (detection + recognition only) with largest-face selection.

    Args:
        root: insightface root, i.e. ``ComfyUI/models/insightface``; the pack is ``<root>/models/<name>/``.
        name: pack folder name (``antelopev2`` for PhotoMaker-V2 / MagicMirror, or ``buffalo_l``).
        providers: onnxruntime providers, e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]``;
            ``None`` -> CPU.
        det_sizes: square detector input sizes tried in order until a face is found (multiples of 32).
        det_thresh: detection score threshold.
    """

    def __init__(self, root: str, name: str = "antelopev2", providers=None,
                 det_sizes=DEFAULT_DET_SIZES, det_thresh: float = 0.5):
        self.det_sizes = tuple(int(s) for s in det_sizes)
        if not self.det_sizes or any(s <= 0 or s % 32 for s in self.det_sizes):
            raise ValueError(f"det_sizes must be positive multiples of 32, got {det_sizes}")
        self.root = os.path.abspath(os.path.expanduser(str(root)))
        self.name = name
        self.det_thresh = float(det_thresh)
        self.model_dir = find_insightface_pack(self.root, name)
        try:
            import insightface
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise ImportError("the face encoder needs insightface: pip install 'insightface>=1.0' "
                              "(plus onnxruntime, or onnxruntime-gpu for CUDA)") from exc
        self.insightface_version = getattr(insightface, "__version__", "?")

        self.providers_requested = list(providers) if providers else [CPU_PROVIDER]
        onnx_files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.model_dir, "*.onnx")))
        try:
            # absolute folder as name: insightface uses it as is and never downloads
            app = FaceAnalysis(name=self.model_dir, root=self.root, allowed_modules=["detection", "recognition"],
                               providers=self.providers_requested)
        except AssertionError as exc:  # insightface asserts a detector was found
            raise FileNotFoundError(self._incomplete_message("a face detector (SCRFD)", onnx_files)) from exc
        if "detection" not in app.models:
            raise FileNotFoundError(self._incomplete_message("a face detector (SCRFD)", onnx_files))
        if "recognition" not in app.models:
            raise FileNotFoundError(self._incomplete_message("a face recogniser (ArcFace)", onnx_files))
        app.prepare(ctx_id=0, det_thresh=self.det_thresh, det_size=(self.det_sizes[0], self.det_sizes[0]))
        self.app = app
        self.det_model = app.det_model
        self.rec_model = app.models["recognition"]
        self.providers_active = self._active_providers()
        self._warn_on_cpu_fallback()

    def _incomplete_message(self, what: str, onnx_files) -> str:
        return (f"insightface pack folder {self.model_dir} has no {what}; .onnx files found: {onnx_files or 'none'}. "
                f"Expected: {_expected_files(self.name)}.")

    def _active_providers(self) -> list:
        """Providers the onnxruntime sessions actually use (ordered union over detector + recogniser)."""
        active = []
        for model in (self.det_model, self.rec_model):
            for provider in model.session.get_providers():
                if provider not in active:
                    active.append(provider)
        return active

    def _warn_on_cpu_fallback(self) -> None:
        requested = [_provider_name(p) for p in self.providers_requested]
        if CUDA_PROVIDER not in requested or CUDA_PROVIDER in self.providers_active:
            return
        import onnxruntime

        if CUDA_PROVIDER in onnxruntime.get_available_providers():
            fix = ("onnxruntime-gpu is installed but could not start CUDA: check that its CUDA/cuDNN "
                   "versions match the installed libraries")
        else:
            fix = (f"onnxruntime {onnxruntime.__version__} has no CUDA provider (the CPU package is installed); "
                   "fix: pip uninstall onnxruntime && pip install onnxruntime-gpu")
        logger.warning("insightface requested %s but its sessions run on %s (face detection will be slow). %s.",
                       requested, self.providers_active, fix)

    def describe(self) -> str:
        """One-paragraph summary for the node UI."""
        return (f"insightface {self.insightface_version} pack '{self.name}' at {self.model_dir}: "
                f"detector {os.path.basename(self.det_model.model_file)}, recogniser "
                f"{os.path.basename(self.rec_model.model_file)} ({self.rec_model.input_size[0]}px crops). "
                f"Providers requested {[_provider_name(p) for p in self.providers_requested]}, "
                f"active {self.providers_active}. Detection sizes {list(self.det_sizes)}, "
                f"threshold {self.det_thresh}.")

    @staticmethod
    def _as_rgb_uint8(image) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"expected an RGB image [H,W,3], got shape {image.shape}")
        image = image[..., :3]
        if image.dtype != np.uint8:
            if not np.issubdtype(image.dtype, np.floating):
                raise ValueError(f"expected uint8 or float 0..1 pixels, got {image.dtype}")
            image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return image

    def locate_largest(self, image, det_sizes=None) -> FaceBox | None:
        """Largest face (by box area) of ``image`` (RGB uint8 [H,W,3], or float 0..1), detection only.

        ``det_sizes`` (default: the analyzer's) are tried in order until one finds a face; each size
        is one detector pass. ``None`` if none finds a face.
        """
        bgr = np.ascontiguousarray(self._as_rgb_uint8(image)[..., ::-1])            # [H,W,3] BGR
        return self._locate_largest_bgr(bgr, self.det_sizes if det_sizes is None else det_sizes)

    def locate_largest_padded(self, image, det_size: int, pad_scale: float = 1.25) -> FaceBox | None:
        """Largest face at one detector size; if none, again on the image padded by :func:`pad_image`.

        The detection of ConsisID's and OpenS2V's evaluation scripts. A face found on the padded image comes back
        in the coordinates of ``image`` with ``pad = (left, top)``, so :meth:`embeddings` embeds it, as those
        scripts do, from the padded image (insightface's ``get`` runs the recogniser on the image it detected in).
        """
        rgb = self._as_rgb_uint8(image)
        bgr = np.ascontiguousarray(rgb[..., ::-1])                                   # [H,W,3] BGR
        box = self._locate_largest_bgr(bgr, (det_size,))
        if box is not None:
            return box
        padded, (left, top) = pad_image(bgr, pad_scale)
        box = self._locate_largest_bgr(padded, (det_size,))
        if box is None:
            return None
        offset = np.array([left, top], np.float32)
        box.bbox = box.bbox - np.tile(offset, 2)
        box.kps = box.kps - offset
        box.pad = (left, top)
        return box

    def _locate_largest_bgr(self, bgr: np.ndarray, det_sizes) -> FaceBox | None:
        for size in det_sizes:
            dets, kpss = self.det_model.detect(bgr, input_size=(size, size), max_num=0)  # [F,5], [F,5,2]
            if dets.shape[0] == 0 or kpss is None:
                continue
            areas = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
            i = int(np.argmax(areas))
            return FaceBox(bbox=dets[i, :4].astype(np.float32), kps=kpss[i].astype(np.float32),
                           det_score=float(dets[i, 4]), det_size=int(size))
        return None

    def detect_largest(self, image) -> DetectedFace | None:
        """Largest face (by box area) of ``image`` (RGB uint8 [H,W,3], or float 0..1) with its embedding.

        Detection sizes are tried in order (640 first) until one finds a face; ``None`` if none does.
        Only the chosen face is embedded.
        """
        from insightface.app.common import Face

        bgr = np.ascontiguousarray(self._as_rgb_uint8(image)[..., ::-1])            # [H,W,3] BGR
        box = self._locate_largest_bgr(bgr, self.det_sizes)
        if box is None:
            return None
        face = Face(bbox=box.bbox, kps=box.kps, det_score=box.det_score)
        embedding = np.asarray(self.rec_model.get(bgr, face), dtype=np.float32).reshape(-1)  # [512]
        normed = embedding / max(float(np.linalg.norm(embedding)), 1e-12)
        return DetectedFace(bbox=box.bbox, kps=box.kps, det_score=box.det_score, embedding=embedding,
                            normed_embedding=normed.astype(np.float32), det_size=box.det_size)

    def embeddings(self, images, faces) -> np.ndarray:
        """Raw ArcFace embeddings [N, 512] of ``faces[i]`` (a :class:`FaceBox` or :class:`DetectedFace`) in
        ``images[i]``, from ONE batched recogniser call (per-crop calls only for a fixed batch-1 model).

        Each face is aligned exactly as :meth:`detect_largest` does (``norm_crop`` on its 5 keypoints), so
        row i equals ``detect_largest``'s ``embedding`` for that face. A face found on the padded retry image
        (``face.pad != (0, 0)``) is cropped from that padded image, where it was detected.
        """
        from insightface.utils import face_align

        if len(images) != len(faces):
            raise ValueError(f"{len(images)} images but {len(faces)} faces")
        if not faces:
            return np.zeros((0, self.rec_model.output_shape[-1]), np.float32)
        size = self.rec_model.input_size[0]
        crops = []
        for image, face in zip(images, faces):
            bgr, kps = np.ascontiguousarray(self._as_rgb_uint8(image)[..., ::-1]), np.asarray(face.kps, np.float32)
            pad = tuple(getattr(face, "pad", (0, 0)))
            if pad != (0, 0):  # found on the padded retry image: crop it from there
                bgr, kps = add_border(bgr, *pad), kps + np.asarray(pad, np.float32)
            crops.append(face_align.norm_crop(bgr, landmark=kps, image_size=size))     # BGR [size,size,3]
        if self.rec_model.input_shape[0] == 1:  # an export with a fixed batch of one
            return np.concatenate([self.rec_model.get_feat(c) for c in crops]).astype(np.float32)
        return np.asarray(self.rec_model.get_feat(crops), dtype=np.float32)           # [N,512]

    @staticmethod
    def align(image, face: DetectedFace, size: int = 112) -> np.ndarray:
        """ArcFace-aligned crop via insightface ``norm_crop``: RGB uint8 [size,size,3] (112 ArcFace, 224 CLIP)."""
        from insightface.utils import face_align

        if size <= 0 or size % 112:
            raise ValueError(f"align size must be a multiple of 112, got {size}")
        rgb = FaceAnalyzer._as_rgb_uint8(image)
        return face_align.norm_crop(rgb, landmark=np.asarray(face.kps, dtype=np.float32), image_size=size)
