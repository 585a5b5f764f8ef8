"""Tiny random Wan 2.1 / 2.2 models, built offline, for tests and demos.

Each variant mirrors the real diffusers folder of its kind (``testing/reference/wan/*.json`` hold the real
configs): the same component classes, the same options (I2V input channels and CLIP image branch, Wan 2.2's
two experts and boundary ratio, TI2V-5B's 48-channel-style patchified residual VAE and ``expand_timesteps``),
only narrow. Folders have the diffusers layout (``transformer/ [transformer_2/] vae/ text_encoder/ tokenizer/
scheduler/ [image_encoder/ image_processor/] model_index.json``), so they load through the same code as
real weights.
"""

from __future__ import annotations

import json
import os

import torch

# variant -> what its real model has (see testing/reference/wan/pipeline_facts.json)
VARIANTS = {
    "wan2.1-t2v": dict(pipeline="WanPipeline", in_factor=1, clip=False, experts=1, ti2v=False, flow_shift=3.0),
    "wan2.1-i2v": dict(pipeline="WanImageToVideoPipeline", in_factor=2, clip=True, experts=1, ti2v=False,
                       flow_shift=3.0),
    "wan2.2-ti2v": dict(pipeline="WanPipeline", in_factor=1, clip=False, experts=1, ti2v=True, flow_shift=5.0),
    "wan2.2-t2v-a14b": dict(pipeline="WanPipeline", in_factor=1, clip=False, experts=2, ti2v=False, flow_shift=3.0,
                            boundary_ratio=0.875),
    "wan2.2-i2v-a14b": dict(pipeline="WanImageToVideoPipeline", in_factor=2, clip=False, experts=2, ti2v=False,
                            flow_shift=3.0, boundary_ratio=0.9),
}

CLIP_HIDDEN = 32  # the tiny CLIP's width = the transformer's image_dim


def transformer_config(variant: str, *, heads: int = 2, head_dim: int = 12, num_layers: int = 2, text_dim: int = 32,
                       z_dim: int | None = None) -> dict:
    """A small ``WanTransformer3DModel`` config with the options of ``variant``'s real model."""
    v = VARIANTS[variant]
    z = z_dim or (8 if v["ti2v"] else 4)
    in_channels = z + (z + 4 if v["in_factor"] == 2 else 0)  # I2V: noisy + 4 mask channels + condition latents
    cfg = dict(patch_size=[1, 2, 2], num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
               out_channels=z, text_dim=text_dim, freq_dim=16, ffn_dim=2 * heads * head_dim, num_layers=num_layers,
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
    if v["clip"]:
        cfg.update(image_dim=CLIP_HIDDEN, added_kv_proj_dim=heads * head_dim)
    return cfg


def vae_config(variant: str, z_dim: int | None = None) -> dict:
    """A small ``AutoencoderKLWan`` config: Wan 2.1's plain VAE, or TI2V-5B's patchified residual one."""
    v = VARIANTS[variant]
    z = z_dim or (8 if v["ti2v"] else 4)
    gen = torch.Generator().manual_seed(7)
    mean = (torch.randn(z, generator=gen) * 0.3).tolist()
    std = (torch.rand(z, generator=gen) + 0.5).tolist()
    cfg = dict(base_dim=8, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
               temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std)
    if v["ti2v"]:
        cfg.update(is_residual=True, in_channels=12, out_channels=12, patch_size=2, decoder_base_dim=12,
                   scale_factor_spatial=16)
    return cfg


def umt5_config(vocab_size: int, d_model: int = 32):
    from transformers import UMT5Config

    return UMT5Config(vocab_size=vocab_size, d_model=d_model, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1)


def scheduler_config(variant: str) -> dict:
    """UniPC with flow sigmas, as the Wan-AI diffusers folders ship it."""
    return {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction", "use_flow_sigmas": True,
            "num_train_timesteps": 1000, "flow_shift": VARIANTS[variant]["flow_shift"]}


def build_components(variant: str = "wan2.1-t2v", *, seed: int = 0, **transformer_kwargs) -> dict:
    """Random pipeline components of ``variant`` (float32, CPU): the keyword arguments of the diffusers
    pipeline class ``VARIANTS[variant]["pipeline"]``."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from .tiny import build_tokenizer

    v = VARIANTS[variant]
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    tcfg = transformer_config(variant, **transformer_kwargs)
    out = dict(transformer=WanTransformer3DModel(**tcfg),
               vae=AutoencoderKLWan(**vae_config(variant, tcfg["out_channels"])),
               text_encoder=UMT5EncoderModel(umt5_config(len(tokenizer), tcfg["text_dim"])), tokenizer=tokenizer,
               scheduler=UniPCMultistepScheduler.from_config(scheduler_config(variant)))
    if v["experts"] == 2:
        out["transformer_2"] = WanTransformer3DModel(**tcfg)
        out["boundary_ratio"] = v["boundary_ratio"]
    if v["ti2v"]:
        out["expand_timesteps"] = True
    if v["clip"]:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        out["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=CLIP_HIDDEN, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3, patch_size=14,
            image_size=56, hidden_act="gelu"))
        out["image_processor"] = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    for m in out.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return out


def save_model_folder(path: str, components: dict, variant: str) -> str:
    """Write ``components`` as a diffusers Wan folder (``model_index.json`` as the Wan-AI folders have it)."""
    os.makedirs(path, exist_ok=True)
    index = {"_class_name": VARIANTS[variant]["pipeline"], "_diffusers_version": "0.42.1"}
    for name, value in components.items():
        if hasattr(value, "save_pretrained"):
            value.save_pretrained(os.path.join(path, name))
            library = "diffusers" if type(value).__module__.startswith("diffusers") else "transformers"
            index[name] = [library, type(value).__name__]
        else:
            index[name] = value
    if index["_class_name"] == "WanImageToVideoPipeline":  # Wan 2.2 I2V A14B has no CLIP branch: listed as null
        for name in ("image_encoder", "image_processor"):
            index.setdefault(name, [None, None])
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return path


def build_model_folder(path: str, variant: str = "wan2.1-t2v", *, seed: int = 0, **kwargs) -> str:
    """Build random components of ``variant`` and save them as a diffusers folder at ``path``."""
    return save_model_folder(path, build_components(variant, seed=seed, **kwargs), variant)


def pipeline(components: dict):
    """The diffusers pipeline of these components (``WanPipeline`` or ``WanImageToVideoPipeline``)."""
    import diffusers

    image = "image_encoder" in components or components["transformer"].config.in_channels != \
        components["transformer"].config.out_channels
    cls = diffusers.WanImageToVideoPipeline if image else diffusers.WanPipeline
    return cls(**components)
