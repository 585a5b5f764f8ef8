"""Optional models of the evaluation protocols, found in model folders the user fills (nothing is downloaded).

- ``curricularface``: ``glint360k_curricular_face_r101_backbone.bin`` (ConsisID-preview ``face_encoder/``,
  OpenS2V-Weight) for FaceSim-Cur;
- ``inception``: ``inception_v3_google-0cc3c7bd.pth`` (torchvision's Inception-v3 ImageNet weights) for
  ConsisID's face FID; needs torchvision;
- ``raft``: ``raft-things.pth`` (VBench / original RAFT) or a torchvision ``raft_large_*.pth`` for dynamics and
  the dynamic degree; needs torchvision;
- ``clip_text``: a transformers CLIP folder with both towers (e.g. ``clip-vit-base-patch32``) for CLIP-T;
- ``dino``: a transformers DINO ViT folder whose name contains ``dino`` (e.g. ``dino-vits16``) for DINO-I.

:func:`find_metric_model` looks for them in a list of folders and returns the path, or ``None`` with
every path it searched, so a report can say why a column has no number.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import torch

from .curricularface import FILE_NAMES as CURRICULARFACE_FILES
from .motion import RAFT_FILE_NAMES

INCEPTION_FILES = ("inception_v3_google-0cc3c7bd.pth", "inception_v3_google-0cc3c7bd.safetensors")
FILE_KINDS = {"curricularface": CURRICULARFACE_FILES, "inception": INCEPTION_FILES, "raft": RAFT_FILE_NAMES}
FOLDER_KINDS = ("clip_text", "dino")
NEEDS_TORCHVISION = ("inception", "raft")
DESCRIPTIONS = {"curricularface": "CurricularFace weights", "inception": "Inception-v3 weights",
                "raft": "RAFT weights", "clip_text": "CLIP model folder (text + image towers)",
                "dino": "DINO ViT model folder"}


def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or a torchvision built for another torch
        return False
    return True


def _folder_model_type(folder: str) -> str:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            return str(json.load(f).get("model_type", ""))
    except (OSError, ValueError):
        return ""


def is_model_folder(kind: str, folder: str) -> bool:
    model_type = _folder_model_type(folder)
    if kind == "clip_text":
        return model_type == "clip"
    return "dino" in os.path.basename(os.path.normpath(folder)).lower() and model_type in ("vit", "dinov2")


def find_metric_model(kind: str, folders) -> tuple[str | None, list[str]]:
    """(path or None, the paths searched) of a ``kind`` model (see the module table) in ``folders`` (in order).

    Files: the known file names in each folder. Folders (``clip_text``, ``dino``): a sub-folder (sorted by name)
    whose ``config.json`` says so, or the folder itself."""
    searched = []
    for folder in folders:
        if not folder:
            continue
        folder = os.path.abspath(os.path.expanduser(str(folder)))
        if kind in FILE_KINDS:
            for name in FILE_KINDS[kind]:
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    return path, searched
                searched.append(path)
            continue
        if kind not in FOLDER_KINDS:
            raise ValueError(f"unknown metric model kind {kind!r}")
        if is_model_folder(kind, folder):
            return folder, searched
        subs = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        for name in subs:
            if is_model_folder(kind, os.path.join(folder, name)):
                return os.path.join(folder, name), searched
        searched.append(os.path.join(folder, "*") + ("" if os.path.isdir(folder) else " (missing)"))
    return None, searched


def missing_reason(kind: str, searched: list[str]) -> str:
    """The "n/a" text of a column whose model was not found: what is missing and every folder searched (each
    searched path is one of the names in one of the folders)."""
    if kind in NEEDS_TORCHVISION and not torchvision_available():
        return f"needs torchvision (pip install torchvision) for the {DESCRIPTIONS[kind]}"
    names = " or ".join(FILE_KINDS[kind]) if kind in FILE_KINDS else DESCRIPTIONS[kind]
    folders = list(dict.fromkeys(os.path.dirname(p) for p in searched))
    return f"no {names} in " + (", ".join(folders) if folders else "(no folder given)")


# --------------------------------------------------------------------------------------------- Inception (FID)


def load_inception(path: str, device: torch.device | str = "cpu"):
    """torchvision Inception-v3 with ImageNet weights (as ``models.inception_v3(weights=DEFAULT)`` builds it:
    ``transform_input=True``), ``fc`` replaced by an identity: the 2048-d pool features ConsisID's FID uses."""
    from torchvision.models import inception_v3

    from .cogvideox import WeightsFileError, read_safetensors, read_torch_pickle

    sd = read_safetensors(path)[0] if path.endswith((".safetensors", ".sft")) else read_torch_pickle(path)
    model = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise WeightsFileError(f"{os.path.basename(path)}: not torchvision Inception-v3 weights "
                               f"({str(e)[:300]})") from e
    model.fc = torch.nn.Identity()
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def inception_features(model, crops: np.ndarray, batch_size: int = 16,
                       device: torch.device | str = "cpu") -> np.ndarray:
    """Pool features ``[N, 2048]`` (float64) of RGB uint8 crops ``[N, S, S, 3]``: PIL bilinear resize to 299x299,
    0..1 (no normalisation: the model's ``transform_input`` does it), as ConsisID's ``load_image``. ``device`` is
    where the caller loaded the model."""
    from PIL import Image

    crops = np.asarray(crops)
    if len(crops) == 0:
        return np.zeros((0, 2048))
    out = []
    for i in range(0, len(crops), batch_size):
        batch = np.stack([np.asarray(Image.fromarray(c).resize((299, 299), Image.BILINEAR))
                          for c in crops[i:i + batch_size]])                                # [B,299,299,3]
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255.0).to(device)    # [B,3,299,299]
        out.append(model(x).double().cpu().numpy())
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------- CLIP text-video


@dataclasses.dataclass
class TextClip:
    """A full CLIP (both towers) with its tokenizer and image processor, from a transformers folder."""

    model: object
    tokenizer: object
    image_processor: object
    path: str = ""

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())


def _pil_image_processor(folder: str, auto: bool = False):
    """The PIL-based image processor of ``folder`` (the one the published scripts ran: transformers 4's "slow"
    processor; transformers 5 names it ``*ImageProcessorPil``)."""
    import transformers

    if not auto:
        cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        return cls.from_pretrained(folder)
    with open(os.path.join(folder, "preprocessor_config.json"), encoding="utf-8") as f:
        name = str(json.load(f).get("image_processor_type", "")).removesuffix("Fast").removesuffix("Pil")
    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name, None)
    if cls is None:
        return transformers.AutoImageProcessor.from_pretrained(folder)
    return cls.from_pretrained(folder)


def load_text_clip(folder: str, device: torch.device | str = "cpu") -> TextClip:
    """:class:`TextClip` from a transformers CLIP folder (``CLIPModel`` + tokenizer + image processor)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval().requires_grad_(False).to(device)
    return TextClip(model=model, tokenizer=AutoTokenizer.from_pretrained(folder),
                    image_processor=_pil_image_processor(folder), path=folder)


@torch.no_grad()
def clip_text_cosines(clip: TextClip, images: np.ndarray, prompt: str, batch_size: int = 16) -> np.ndarray:
    """Cosine ``[N]`` between ``prompt`` and each image (uint8 ``[N, H, W, 3]``, passed to the processor as given),
    from ``CLIPModel``'s own forward (``logits_per_image / logit_scale``), the text tokenised with padding and
    truncation as ConsisID's ``get_clipscore.py``."""
    device = clip.model.logit_scale.device
    text = clip.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt")
    out = []
    for i in range(0, len(images), batch_size):
        pixels = clip.image_processor(images=list(images[i:i + batch_size]), return_tensors="pt")["pixel_values"]
        logits = clip.model(input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device),
                            pixel_values=pixels.to(device, clip.model.dtype)).logits_per_image       # [B, 1]
        out.append((logits[:, 0] / clip.model.logit_scale.exp()).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


# --------------------------------------------------------------------------------------------- DINO


@dataclasses.dataclass
class Dino:
    """A DINO ViT (transformers ``ViTModel`` / ``Dinov2Model``) with its image processor."""

    model: object
    image_processor: object
    path: str = ""
    device: torch.device | str = "cpu"    # where load_dino placed the model


def load_dino(folder: str, device: torch.device | str = "cpu") -> Dino:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, add_pooling_layer=False) if _folder_model_type(folder) == "vit" \
        else AutoModel.from_pretrained(folder)
    return Dino(model=model.eval().requires_grad_(False).to(device), image_processor=_pil_image_processor(folder, True),
                path=folder, device=device)


@torch.no_grad()
def dino_embeddings(dino: Dino, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Unit CLS embeddings ``[N, D]`` (float64, the final layer-normed ``[CLS]`` token) of RGB uint8 images."""
    device = dino.device
    out = []
    for i in range(0, len(images), batch_size):
        pixels = dino.image_processor(images=list(images[i:i + batch_size]), return_tensors="pt")["pixel_values"]
        cls = dino.model(pixel_values=pixels.to(device, dino.model.dtype)).last_hidden_state[:, 0]   # [B, D]
        out.append(cls.double().cpu().numpy())
    emb = np.concatenate(out)
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
