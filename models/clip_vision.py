"""CLIP vision towers from a checkpoint file (ComfyUI ``clip_vision/`` or transformers keys).

The config is read off the weights' shapes. OpenAI towers (ViT-B/ViT-L, widths 768/1024) use
quick-GELU; OpenCLIP/LAION towers (e.g. ViT-H/14, width 1280) use GELU.
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F

from .cogvideox import WeightsFileError, read_safetensors, read_torch_pickle

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP pixel statistics (OpenAI and OpenCLIP alike)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}


def _count_layers(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def clip_vision_config(sd: dict, hidden_act: str | None = None):
    """A ``CLIPVisionConfig`` matching ``vision_model.*`` (+ ``visual_projection``) weights."""
    from transformers import CLIPVisionConfig

    p = "vision_model."
    if p + "embeddings.class_embedding" not in sd:
        raise WeightsFileError("not a CLIP vision tower: no 'vision_model.embeddings.class_embedding'")
    hidden = sd[p + "embeddings.class_embedding"].shape[0]
    patch = sd[p + "embeddings.patch_embedding.weight"].shape[-1]
    positions = sd[p + "embeddings.position_embedding.weight"].shape[0]
    act = hidden_act or ("quick_gelu" if hidden in (768, 1024) else "gelu")
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=sd[p + "encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_attention_heads=_HEADS.get(hidden, max(1, hidden // 64)),
                            num_hidden_layers=_count_layers(sd, p + "encoder.layers."), patch_size=patch,
                            image_size=int(round((positions - 1) ** 0.5)) * patch,
                            projection_dim=sd["visual_projection.weight"].shape[0] if "visual_projection.weight" in sd
                            else hidden, hidden_act=act, layer_norm_eps=1e-5)


def load_clip_vision(path: str):
    """``CLIPVisionModelWithProjection`` from a .safetensors/.bin file or a transformers folder."""
    from transformers import CLIPVisionModelWithProjection

    if os.path.isdir(path):
        return CLIPVisionModelWithProjection.from_pretrained(path).eval().requires_grad_(False)
    sd = read_safetensors(path)[0] if path.endswith((".safetensors", ".sft")) else read_torch_pickle(path)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    if "visual_projection.weight" not in sd:
        raise WeightsFileError(f"{path!r}: CLIP vision checkpoint without 'visual_projection.weight' (the image "
                               "embedding projection); use a full CLIP vision file such as "
                               "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    model = CLIPVisionModelWithProjection(clip_vision_config(sd))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise WeightsFileError(f"{path!r}: CLIP weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval().requires_grad_(False)


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """IMAGE [N, H, W, 3] 0..1 -> CLIP input [N, 3, size, size]: centre crop to a square, bicubic resize
    (antialiased), CLIP normalisation -- OpenCLIP's preprocessing (resize the short side, centre crop).
    The DualReal trainer and the StageBlender node both embed their reference image through this."""
    x = images.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top:top + side, left:left + side]
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def image_embeds(model, images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Projected CLIP image embeddings [N, projection_dim] (OpenCLIP ``encode_image``'s output), computed on
    ``device`` (a placement's execution device; default: where a model that is not offloaded sits)."""
    pixels = clip_pixels(images, model.config.image_size).to(device or model.device, model.dtype)
    return model(pixel_values=pixels).image_embeds.float().cpu()
