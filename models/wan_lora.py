"""Wan LoRA files in the original Wan module naming, the one ComfyUI core and diffusers both read.

Wan checkpoints (Wan-Video/Wan2.1, and the files ComfyUI's Load Diffusion Model reads) name their layers
``blocks.N.self_attn.q``, ``blocks.N.cross_attn.k_img``, ``blocks.N.ffn.0``, ``head.head`` ...; diffusers'
``WanTransformer3DModel`` names the same layers ``blocks.N.attn1.to_q``, ``blocks.N.attn2.add_k_proj``,
``blocks.N.ffn.net.0.proj``, ``proj_out`` ... ComfyUI core maps LoRA keys onto its model's own names
(``diffusion_model.<original name>``) and has no map for diffusers names, while diffusers' Wan LoRA loader
converts ``diffusion_model.<original name>`` keys to its own (``_convert_non_diffusers_wan_lora_to_diffusers``).
So a Wan LoRA trained on the diffusers model is written with the original names:

* ``diffusion_model.<original>.lora_A.weight`` = down ``[r, in]``, ``.lora_B.weight`` = up ``[out, r]``;
* transformer-block layers carry ``.alpha`` = scale · rank (a scalar), so each loader applies
  ``alpha / rank · B @ A`` itself (ComfyUI in ``LoRAAdapter.calculate_weight``, diffusers by folding the scale
  into A and B when it converts the file);
* the other layers (condition embedder, ``head.head``) get the scale multiplied into ``lora_B`` and no
  ``.alpha``: diffusers' converter reads ``.alpha`` keys only inside the blocks and refuses a file that has
  any other, and both loaders use scale 1 where a layer has none.

A Wan 2.2 A14B model has two experts: each gets its own file (diffusers loads the second with
``load_lora_weights(..., load_into_transformer_2=True)``; ComfyUI applies each file to its own model).
"""

from __future__ import annotations

import re

import torch

from .cogvideox import read_safetensors, write_safetensors
from .lora import LoraLayer, LoraMismatchError, parse_lora_state_dict

PREFIX = "diffusion_model."

# diffusers layer inside ``blocks.N`` -> original Wan name (comfy/ldm/wan/model.py WanAttentionBlock)
BLOCK_NAMES = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",  # Wan 2.1 I2V image K/V
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
# diffusers layer outside the blocks -> original Wan name (WanModel, Head, MLPProj)
MODEL_NAMES = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",  # Wan 2.1 I2V CLIP image projection
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "proj_out": "head.head",
}
# Layers the map names but no file may hold: diffusers' Wan LoRA converter has no rule for them and refuses
# the whole file (ComfyUI alone would load them).
NOT_EXPORTABLE = {"patch_embedding": "diffusers' Wan LoRA loader has no rule for a patch_embedding (Conv3d) LoRA "
                                     "and refuses the whole file"}

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_ORIGINAL_BLOCK_NAMES = {v: k for k, v in BLOCK_NAMES.items()}
_ORIGINAL_MODEL_NAMES = {v: k for k, v in MODEL_NAMES.items()}


class WanLoraError(LoraMismatchError):
    """A layer or file that is not a Wan LoRA this module can write or read."""


def original_name(path: str) -> str:
    """The original Wan module name of a ``WanTransformer3DModel`` module path (``blocks.3.attn2.to_k`` ->
    ``blocks.3.cross_attn.k``)."""
    match = _BLOCK.match(path)
    name = f"blocks.{match[1]}.{BLOCK_NAMES[match[2]]}" if match and match[2] in BLOCK_NAMES else MODEL_NAMES.get(path)
    if name is None:
        raise WanLoraError(
            f"{path!r} is not a WanTransformer3DModel layer a Wan LoRA file can hold; use blocks.N.<"
            f"{'|'.join(BLOCK_NAMES)}> or one of {sorted(MODEL_NAMES)}.")
    return name


def diffusers_name(name: str) -> str:
    """The ``WanTransformer3DModel`` module path of an original Wan module name (inverse of :func:`original_name`)."""
    match = _BLOCK.match(name)
    path = f"blocks.{match[1]}.{_ORIGINAL_BLOCK_NAMES[match[2]]}" if match and match[2] in _ORIGINAL_BLOCK_NAMES \
        else _ORIGINAL_MODEL_NAMES.get(name)
    if path is None:
        raise WanLoraError(f"{name!r} is not a Wan layer this pack maps to diffusers (a LoRA for another Wan "
                           "variant, or an unsupported layer).")
    return path


def _check_exportable(layers: dict) -> None:
    """Everything diffusers' converter and ComfyUI's loader need, checked before anything is written."""
    for path, layer in layers.items():
        original_name(path)
        if path in NOT_EXPORTABLE:
            raise WanLoraError(f"Cannot export a LoRA on {path!r}: {NOT_EXPORTABLE[path]}; leave it out of the "
                               "LoRA targets.")
        if layer.down.dim() != 2 or layer.up.dim() != 2 or layer.down.shape[0] != layer.up.shape[1]:
            raise WanLoraError(f"LoRA layer {path!r}: down {tuple(layer.down.shape)} and up {tuple(layer.up.shape)} "
                               "are not [rank, in] and [out, rank] of one rank.")
    if not any(_BLOCK.match(p) for p in layers):
        raise WanLoraError("A Wan LoRA file needs at least one transformer-block layer (blocks.N....): diffusers' "
                           "Wan LoRA loader cannot read a file without one.")
    image_kv = {p.rsplit(".", 1)[1] for p in layers if p.endswith((".add_k_proj", ".add_v_proj"))}
    if len(image_kv) == 1:
        raise WanLoraError(f"The LoRA has {image_kv.pop()} layers without their pair: diffusers reads Wan I2V image "
                           "K/V LoRAs only when both attn2.add_k_proj and attn2.add_v_proj are targeted.")


def wan_lora_state_dict(layers: dict[str, LoraLayer]) -> dict[str, torch.Tensor]:
    """``{diffusers module path: LoraLayer}`` -> the file's tensors (see the module docstring)."""
    _check_exportable(layers)
    tensors = {}
    for path, layer in layers.items():
        key = PREFIX + original_name(path)
        tensors[f"{key}.lora_A.weight"] = layer.down
        if _BLOCK.match(path):
            tensors[f"{key}.lora_B.weight"] = layer.up
            tensors[f"{key}.alpha"] = torch.tensor(float(layer.scale) * layer.down.shape[0], dtype=torch.float32)
        else:  # scale baked: diffusers' converter reads .alpha only inside the blocks
            tensors[f"{key}.lora_B.weight"] = (layer.up.detach().float() * layer.scale).to(layer.up.dtype)
    return tensors


def save_wan_lora(path: str, layers: dict[str, LoraLayer], metadata: dict | None = None) -> str:
    """Write ``layers`` (``{WanTransformer3DModel module path: LoraLayer}``) as a Wan LoRA in original naming,
    atomically; ``metadata`` values that are not strings are stored as JSON. Raises :class:`WanLoraError`
    before writing when a layer cannot be exported."""
    metadata = dict(metadata or {})
    if "lora_adapter_metadata" in metadata:  # diffusers would read it as the PEFT config and rescale every layer
        raise WanLoraError("metadata must not hold 'lora_adapter_metadata' (diffusers would apply its lora_alpha / r "
                           "on top of the file's .alpha keys).")
    tensors = wan_lora_state_dict(layers)
    meta = {"base_model": "wan", **metadata, "lora_format": "wan-original",
            "lora_scale": "alpha / rank in blocks; baked into lora_B outside them"}
    return write_safetensors(path, tensors, meta)


def read_wan_lora(path: str) -> dict[str, LoraLayer]:
    """A Wan LoRA in original naming (``diffusion_model.`` keys, lora_A/lora_B or lora_down/lora_up, optional
    ``.alpha``) as ``{WanTransformer3DModel module path: LoraLayer}`` (scale = alpha / rank, 1 without alpha)."""
    state_dict, metadata = read_safetensors(path)
    lora = parse_lora_state_dict(state_dict, metadata, name=path)
    return {diffusers_name(name): layer for name, layer in lora.layers.items()}


__all__ = ["BLOCK_NAMES", "MODEL_NAMES", "WanLoraError", "diffusers_name", "original_name", "read_wan_lora",
           "save_wan_lora", "wan_lora_state_dict"]
