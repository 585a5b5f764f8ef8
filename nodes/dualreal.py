"""DualReal nodes: StageBlender (identity + motion adapters) and the blend plot."""

from __future__ import annotations

import torch

from ..models.blend_plot import render_alpha_heatmap
from ..models.clip_vision import image_embeds, load_clip_vision
from ..models.dualreal import BLEND_SCALE, DualRealPatch, load_dualreal
from . import host
from .cogvideox import MENU, MODEL

CATEGORY = f"{MENU}/DualReal"


class DualRealStageBlender:
    DESCRIPTION = ("DualReal: adds identity and motion adapters to every block, blended per denoising stage and "
                   "block group by the StageBlender controller (identity x alpha, motion x (0.2 - alpha)). The "
                   "reference image conditions the motion adapters (CLIP ViT-H/14 embedding). Loads the pack's "
                   ".safetensors or the official adapter.pth.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL, {"tooltip": "The CogVideoX the adapter was trained on (recorded in pack files; the "
                              "official adapter.pth is CogVideoX-5B T2V); another variant is refused."}),
            "adapter": (host.list_model_files("dualreal") or ["adapter.pth"], {
                "tooltip": "DualReal adapter in models/dualreal/ (official adapter.pth or a pack .safetensors)."}),
            "clip_vision": (host.list_model_files("clip_vision") or ["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"], {
                "tooltip": "CLIP vision model for the motion condition (OpenCLIP ViT-H/14, 1024-d embeds)."}),
            "reference_image": ("IMAGE", {"tooltip": "Reference image of the subject; conditions the motion adapters."}),
            "mode": (["dynamic", "fixed"], {"default": "dynamic", "tooltip": "dynamic: the StageBlender predicts "
                     "alpha per step and block group. fixed: 'direct fusion' with the alpha below everywhere."}),
            "fixed_alpha": ("FLOAT", {"default": 0.1, "min": 0.0, "max": BLEND_SCALE, "step": 0.01,
                                      "tooltip": "Identity weight in fixed mode (motion gets 0.2 - alpha)."}),
        }}

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with DualReal recorded; the Sampler's LATENT then carries the blend for the plot.",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, adapter, clip_vision, reference_image, mode, fixed_alpha):
        adapters = load_dualreal(host.resolve_model_file("dualreal", adapter)).to(model.dtype)  # waits on the CPU
        adapters.check_compatible(model.transformer)
        clip = load_clip_vision(host.resolve_model_file("clip_vision", clip_vision)).to(model.dtype)
        side = host.placement()  # where ComfyUI runs its own CLIP vision
        with side.run(clip):
            embeds = image_embeds(clip, reference_image[:1], device=side.device)  # [1, C]
        if embeds.shape[-1] != adapters.config.condition_dim:
            raise ValueError(f"CLIP '{clip_vision}' gives {embeds.shape[-1]}-d image embeddings but the adapter "
                             f"expects {adapters.config.condition_dim} (OpenCLIP ViT-H/14 gives 1024)")
        patch = DualRealPatch(adapters, embeds[:, None], fixed_alpha=fixed_alpha if mode == "fixed" else None,
                              name=f"dualreal:{adapter}")
        return (model.with_patch(patch),)


class DualRealBlendPlot:
    DESCRIPTION = "Shows how identity and motion were mixed: alpha per denoising step (columns) and block group (rows)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT", {"tooltip": "From a CogVideoX Sampler that ran a DualReal model."})}}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("plot",)
    OUTPUT_TOOLTIPS = ("Heatmap of alpha (blue = identity, orange = motion); connect to Preview Image.",)
    FUNCTION = "plot"
    CATEGORY = CATEGORY

    def plot(self, samples):
        alpha = samples.get("dualreal_alpha")
        if alpha is None:
            raise ValueError("this LATENT carries no DualReal blend: sample with a model patched by "
                             "'DualReal StageBlender'")
        return (render_alpha_heatmap(torch.as_tensor(alpha)),)


NODE_CLASS_MAPPINGS = {"MMV_DualRealStageBlender": DualRealStageBlender, "MMV_DualRealBlendPlot": DualRealBlendPlot}
NODE_DISPLAY_NAME_MAPPINGS = {"MMV_DualRealStageBlender": "DualReal StageBlender",
                              "MMV_DualRealBlendPlot": "DualReal Blend Plot"}
