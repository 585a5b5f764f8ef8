"""MagicMirror's ID branch, compatible with PhotoMaker-V2's released ID encoder.

PhotoMaker-V2 (``photomaker-v2.bin``, a torch pickle ``{"id_encoder": {...}, "lora_weights": {...}}``)
holds a CLIP ViT-L/14 vision tower (``vision_model.*``) and the ID perceiver
(``qformer_perceiver.*``): ArcFace embedding [512] -> MLP -> ``num_tokens`` tokens -> LayerNorm ->
perceiver resampler over the CLIP last hidden state -> residual sum = ``x_id`` [N, 2, 2048].
This module rebuilds exactly those two parts (config read from the weights' shapes) and loads
them; PhotoMaker's SDXL-specific fuse module and LoRA are not used.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from .clip_vision import clip_vision_config
from .cogvideox import WeightsFileError, read_safetensors, read_torch_pickle
from .perceiver import PerceiverResampler


@dataclasses.dataclass(frozen=True)
class IDPerceiverConfig:
    id_dim: int = 512  # ArcFace
    dim: int = 2048  # cross_attention_dim of PhotoMaker-V2
    num_tokens: int = 2
    clip_dim: int = 1024
    depth: int = 4
    dim_head: int = 128
    ratio: int = 4  # token_proj hidden = id_dim * ratio
    ff_mult: int = 4


class IDPerceiver(nn.Module):
    """PhotoMaker-V2's ``qformer_perceiver``: (ArcFace [N,512], CLIP last hidden [N,S,1024]) -> x_id [N,T,2048]."""

    def __init__(self, config: IDPerceiverConfig = IDPerceiverConfig()):
        super().__init__()
        self.config = config
        c = config
        self.token_proj = nn.Sequential(nn.Linear(c.id_dim, c.id_dim * c.ratio), nn.GELU(),
                                        nn.Linear(c.id_dim * c.ratio, c.dim * c.num_tokens))
        self.token_norm = nn.LayerNorm(c.dim)
        self.perceiver_resampler = PerceiverResampler(dim=c.dim, depth=c.depth, dim_head=c.dim_head,
                                                      heads=c.dim // c.dim_head, embedding_dim=c.clip_dim,
                                                      output_dim=c.dim, ff_mult=c.ff_mult)

    def forward(self, id_embeds: torch.Tensor, clip_last_hidden: torch.Tensor) -> torch.Tensor:
        tokens = self.token_proj(id_embeds).reshape(-1, self.config.num_tokens, self.config.dim)
        tokens = self.token_norm(tokens)  # [N, T, dim]
        return tokens + self.perceiver_resampler(tokens, clip_last_hidden)


def _count(prefix: str, keys) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def id_perceiver_config_from_weights(sd: dict) -> IDPerceiverConfig:
    p = "qformer_perceiver."
    dim = sd[p + "token_norm.weight"].shape[0]
    hidden, id_dim = sd[p + "token_proj.0.weight"].shape
    return IDPerceiverConfig(
        id_dim=id_dim, dim=dim, num_tokens=sd[p + "token_proj.2.weight"].shape[0] // dim,
        clip_dim=sd[p + "perceiver_resampler.proj_in.weight"].shape[1],
        depth=_count(p + "perceiver_resampler.layers.", sd), dim_head=128 if dim % 128 == 0 else dim,
        ratio=hidden // id_dim, ff_mult=sd[p + "perceiver_resampler.layers.0.1.1.weight"].shape[0] // dim)


def clip_config_from_weights(sd: dict):
    """A ``CLIPVisionConfig`` for PhotoMaker-V2's tower (OpenAI ViT-L/14: quick-GELU)."""
    return clip_vision_config(sd, hidden_act="quick_gelu")


class IDEncoder(nn.Module):
    """CLIP vision tower + ID perceiver, as loaded from a PhotoMaker-V2 checkpoint."""

    def __init__(self, clip, perceiver: IDPerceiver):
        super().__init__()
        self.clip = clip  # transformers CLIPVisionModel
        self.perceiver = perceiver

    @property
    def image_size(self) -> int:
        return self.clip.config.image_size

    def clip_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-normalised pixels [N,3,S,S] -> (last hidden [N,T,C], penultimate hidden [N,T,C])."""
        out = self.clip(pixel_values=pixels, output_hidden_states=True)
        return out.last_hidden_state, out.hidden_states[-2]

    def forward(self, pixels: torch.Tensor, arcface: torch.Tensor):
        last, penultimate = self.clip_features(pixels)
        return self.perceiver(arcface.to(last.dtype), last), penultimate


def load_photomaker_id_encoder(path: str) -> IDEncoder:
    """Load the CLIP tower and ID perceiver from ``photomaker-v2.bin`` (or a .safetensors with its keys)."""
    from transformers import CLIPVisionModel

    if path.endswith(".safetensors"):
        sd, _ = read_safetensors(path)
    else:
        sd = read_torch_pickle(path)
    sd = sd.get("id_encoder", sd)
    needed = ("vision_model.embeddings.class_embedding", "qformer_perceiver.token_norm.weight")
    if not all(k in sd for k in needed):
        version = "PhotoMaker v1 (no qformer_perceiver)" if "vision_model.embeddings.class_embedding" in sd else "unknown"
        raise WeightsFileError(f"{path!r} is not a PhotoMaker-V2 ID encoder ({version}); MagicMirror needs "
                               "photomaker-v2.bin (TencentARC/PhotoMaker-V2) in ComfyUI/models/photomaker/.")
    clip = CLIPVisionModel(clip_config_from_weights(sd))
    # transformers < 5 names the tower's weights "vision_model.*", transformers 5 without the prefix.
    keep_prefix = any(k.startswith("vision_model.") for k in clip.state_dict())
    clip_sd = {(k if keep_prefix else k[len("vision_model."):]): v for k, v in sd.items()
               if k.startswith("vision_model.") and not k.endswith("position_ids")}
    missing, unexpected = clip.load_state_dict(clip_sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    perceiver = IDPerceiver(id_perceiver_config_from_weights(sd))
    p_sd = {k[len("qformer_perceiver."):]: v for k, v in sd.items() if k.startswith("qformer_perceiver.")}
    p_missing, p_unexpected = perceiver.load_state_dict(p_sd, strict=False)
    if missing or unexpected or p_missing or p_unexpected:
        raise WeightsFileError(f"{path!r}: PhotoMaker-V2 weights do not fit (missing {missing[:3] + p_missing[:3]}, "
                               f"unexpected {unexpected[:3] + p_unexpected[:3]}).")
    return IDEncoder(clip, perceiver).eval().requires_grad_(False)
