"""MagicMirror's dual-branch face encoder: insightface (detect, align, ArcFace) + CLIP + ID perceiver.

``FaceEncoder.encode`` turns 1..N reference photos into :class:`~.magicmirror.FaceEmbeds`:
ArcFace embeddings [N, 512], the PhotoMaker-V2 ID tokens ``x_id`` [N, 2, 2048] and the CLIP
penultimate hidden states [N, 257, 1024] that the adapter's face Q-Former reads, plus the aligned
crops for preview. The largest face of each photo is used.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .clip_vision import CLIP_MEAN, CLIP_STD
from .id_encoder import IDEncoder
from .magicmirror import FaceEmbeds
from .placement import Placement


class NoFaceError(ValueError):
    """A reference image in which no face was detected."""


class FaceEncoder:
    """``placement`` (default: kept on ``device``) brings the ID encoder to its device for each ``encode``; the
    face-encoder loader node gives it one that keeps it on the offload device between encodes."""

    def __init__(self, analyzer, id_encoder: IDEncoder, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, crop_size: int = 224, placement: Placement | None = None):
        self.analyzer = analyzer  # models.face_analysis.FaceAnalyzer
        self.placement = placement or Placement(device)
        self.id_encoder = id_encoder.to(dtype)
        self.placement.add(self.id_encoder)
        self.device, self.dtype, self.crop_size = self.placement.device, dtype, crop_size

    def describe(self) -> str:
        return f"{self.analyzer.describe()}; CLIP {self.id_encoder.image_size}px on {self.device}"

    def clip_pixels(self, crops: np.ndarray) -> torch.Tensor:
        """Aligned crops uint8 [N, S, S, 3] -> CLIP-normalised pixels [N, 3, size, size]."""
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
        size = self.id_encoder.image_size
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> FaceEmbeds:
        """IMAGE [N, H, W, 3] float 0..1 (ComfyUI batch) -> :class:`FaceEmbeds` for the N references."""
        if images.ndim == 3:
            images = images[None]
        crops, arcface = [], []
        for k, image in enumerate(images):
            rgb = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            face = self.analyzer.detect_largest(rgb)
            if face is None:
                raise NoFaceError(
                    f"No face found in reference image {k + 1} of {len(images)} ({rgb.shape[1]}x{rgb.shape[0]}). "
                    "Use a photo where the face is clearly visible, frontal-ish and not tiny; crop closer if needed.")
            crops.append(self.analyzer.align(rgb, face, size=self.crop_size))
            arcface.append(torch.as_tensor(np.asarray(face.embedding, dtype=np.float32)))
        crops_np = np.stack(crops)
        arcface_t = torch.stack(arcface)
        pixels = self.clip_pixels(crops_np).to(self.device, self.dtype)
        with self.placement.run(self.id_encoder):
            x_id, penultimate = self.id_encoder(pixels, arcface_t.to(self.device, self.dtype))
        return FaceEmbeds(arcface=arcface_t, x_id=x_id.float().cpu(), clip_penultimate=penultimate.float().cpu(),
                          crops=torch.from_numpy(crops_np).float() / 255.0)
