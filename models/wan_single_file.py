"""A whole Wan transformer as one safetensors file in the original Wan naming: what ComfyUI's Load Diffusion Model
reads (``models/diffusion_models/``).

ComfyUI core detects a Wan model from the original key names (``comfy/model_detection.py``: ``head.modulation`` for
the width, ``blocks.N.ffn.0`` for the feed-forward width, ``patch_embedding`` for the input channels,
``img_emb.proj.0`` for Wan 2.1 I2V) and builds its own ``WanModel`` with those names; diffusers reads the same file
with ``WanTransformer3DModel.from_single_file`` (``convert_wan_transformer_to_diffusers``). Renames from diffusers'
names, per block (``blocks.N.``) and outside the blocks; the tensors keep their shapes:

=========================================  =================================  ======================================
diffusers                                  original                           what
=========================================  =================================  ======================================
``attn1.to_q/to_k/to_v/to_out.0``          ``self_attn.q/k/v/o``              self-attention (the LoRA map's names)
``attn1.norm_q/norm_k``                    ``self_attn.norm_q/norm_k``        its RMSNorms
``attn2.*``, ``add_k_proj/add_v_proj``     ``cross_attn.*``, ``k_img/v_img``  cross-attention, Wan 2.1 I2V image K/V
``attn2.norm_added_k``                     ``cross_attn.norm_k_img``          the image keys' RMSNorm
``ffn.net.0.proj``, ``ffn.net.2``          ``ffn.0``, ``ffn.2``               feed-forward
``norm2``                                  ``norm3``                          the cross-attention's affine LayerNorm
``scale_shift_table`` (in a block)         ``modulation``                     the block's AdaLN table [1, 6, D]
``scale_shift_table``                      ``head.modulation``                the output AdaLN table [1, 2, D]
``proj_out``                               ``head.head``                      output projection
``condition_embedder.*``                   ``text_embedding.0/2`` ...         embedders (the LoRA map's names)
``condition_embedder.image_embedder``      ``img_emb.proj.0/1/3/4``           Wan 2.1 I2V image projection (+ norms)
=========================================  =================================  ======================================
"""

from __future__ import annotations

import re

import torch

from .cogvideox import write_safetensors
from .wan_lora import BLOCK_NAMES, MODEL_NAMES

# block modules the LoRA map (linear layers) does not name
_BLOCK_EXTRA = {"attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
                "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
                "attn2.norm_added_k": "cross_attn.norm_k_img", "norm2": "norm3"}
_MODEL_EXTRA = {"condition_embedder.image_embedder.norm1": "img_emb.proj.0",
                "condition_embedder.image_embedder.norm2": "img_emb.proj.4"}
_BLOCK_TENSOR = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_TENSOR = re.compile(r"^(.+)\.(weight|bias)$")


class WanCheckpointError(ValueError):
    """A tensor of a Wan transformer this file format has no name for."""


def original_key(key: str) -> str:
    """The original Wan name of a ``WanTransformer3DModel`` state-dict key."""
    match = re.match(r"^blocks\.(\d+)\.scale_shift_table$", key)
    if match:
        return f"blocks.{match[1]}.modulation"
    if key == "scale_shift_table":
        return "head.modulation"
    if key == "condition_embedder.image_embedder.pos_embed":  # Wan 2.1 FLF2V
        return "img_emb.emb_pos"
    match = _BLOCK_TENSOR.match(key)
    if match:
        name = BLOCK_NAMES.get(match[2]) or _BLOCK_EXTRA.get(match[2])
        if name:
            return f"blocks.{match[1]}.{name}.{match[3]}"
    else:
        match = _TENSOR.match(key)
        name = match and (MODEL_NAMES.get(match[1]) or _MODEL_EXTRA.get(match[1]))
        if name:
            return f"{name}.{match[2]}"
    raise WanCheckpointError(f"{key!r} has no original Wan name (a Wan variant this pack does not write: VACE, "
                             "Animate, S2V ...)")


def original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``WanTransformer3DModel.state_dict()`` renamed to the original Wan names (see the module doc)."""
    return {original_key(k): v for k, v in state_dict.items()}


def save_wan_transformer_file(path: str, state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """Write a ``WanTransformer3DModel`` state dict as one safetensors file for ComfyUI's Load Diffusion Model (no
    key prefix, as ComfyUI's repackaged Wan files), atomically."""
    return write_safetensors(path, original_state_dict(state_dict), {"format": "wan-original", **(metadata or {})})


__all__ = ["WanCheckpointError", "original_key", "original_state_dict", "save_wan_transformer_file"]
