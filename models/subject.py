"""Subject reference for CogVideoX: reference-image tokens in the DiT sequence (arXiv 2504.17816).

The reference image(s) are VAE-encoded to clean latent frames, patch-embedded with the model's
own ``patch_embed`` and carried as an extra token stream ``[text; ref; video]`` through every
block; they are dropped before the output layers. RoPE gives the reference the frame-0 positions
and the video the frames 1..T. Reference tokens are modulated with the visual chunk of
``norm1``/``norm2`` at timestep t — computed with the LoRA of the norm layers when that LoRA is
scoped to the reference branch (``LoraPatch(reference_only=NORM_LORA_MODULES)``), so the norm LoRA
provably leaves the text and video tokens' modulation untouched.

The reference tokens are a leading token stream of the block runner (:mod:`.block_runner`): they ride
in front of the video tokens, the model's own attention processor applies RoPE to ``[ref; video]``,
the runner gives them their own modulation and drops them before the output layers. With CFG the
reference is in both the conditional and the unconditional rows.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .block_runner import BlockExtension, TokenStream, block_runner
from .lora import BRANCH_ATTR
from .memory import vae_encode_activation_bytes
from .sampler import rotary_embeddings
from .speed import token_stream_notes
from .text import EXTRA_TOKENS

NORM_LORA_MODULES = ("norm1.linear", "norm2.linear")
CLS_TOKEN = EXTRA_TOKENS[0]  # prompts start with it
# LoRA targets of the method (paper + released code); text_proj/proj also appear in the v1 release.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "norm1.linear", "norm2.linear", "ff.net.2", "patch_embed.proj")


def reference_size_limit(transformer, vae_scale: int) -> tuple[int, int] | None:
    """The largest reference (height, width) in pixels the model's RoPE holds: CogVideoX 1.5 slices its RoPE tables
    from a grid of ``sample_height x sample_width`` latents (2400 x 2400 px on the 5B models); CogVideoX 1.0 fits its
    grid to any size (None)."""
    cfg = transformer.config
    if cfg.patch_size_t is None:
        return None
    p = cfg.patch_size
    return cfg.sample_height // p * p * vae_scale, cfg.sample_width // p * p * vae_scale


def check_reference_size(transformer, height: int, width: int, vae_scale: int) -> None:
    """Raise ValueError (one line with the largest size that fits) for a reference of ``height x width`` px beyond the
    model's RoPE grid (:func:`reference_size_limit`)."""
    limit = reference_size_limit(transformer, vae_scale)
    if limit is not None and (height > limit[0] or width > limit[1]):
        from .cogvideox import variant_of

        raise ValueError(f"The subject reference is {width}x{height} px, beyond {variant_of(transformer.config)}'s "
                         f"RoPE grid: the largest reference that fits is {limit[1]}x{limit[0]} px; set max_side to "
                         f"{min(limit)} or less (or use a smaller image).")


def encode_reference(bundle, images: torch.Tensor, max_side: int = 720) -> torch.Tensor:
    """IMAGE [N, H, W, 3] 0..1 -> clean reference latents [N, C, h, w] (VAE mean, scaled).

    Each image keeps its aspect ratio: it is scaled so its longer side is at most ``max_side`` and
    cropped to multiples of 16 (any resolution up to the model's RoPE grid works, checked before the VAE runs: see
    :func:`reference_size_limit`; the token count follows the size).
    """
    x = images.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = min(1.0, max_side / max(h, w))
    nh, nw = max(16, int(h * scale) // 16 * 16), max(16, int(w * scale) // 16 * 16)
    check_reference_size(bundle.transformer, nh, nw, bundle.vae_scale_factor_spatial)
    if (nh, nw) != (h, w):
        sh, sw = max(nh, round(h * scale)), max(nw, round(w * scale))
        x = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (sh - nh) // 2, (sw - nw) // 2
        x = x[..., top:top + nh, left:left + nw]
    vae = bundle.vae
    need = vae_encode_activation_bytes(vae.config, nh, nw, images=x.shape[0], element_size=vae.dtype.itemsize)
    with torch.no_grad(), bundle.placement.run(vae, memory_required=need):
        z = vae.encode((x * 2 - 1).unsqueeze(2).to(bundle.placement.device_of(vae), vae.dtype)).latent_dist.mode()
    return (z[:, :, 0] * vae.config.scaling_factor).float().cpu()  # [N, C, h, w]


def reference_tokens(transformer, latents: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reference latents [N, C, h, w] -> tokens [1, N * h/p * w/p, width] via the model's patch_embed, on the
    device and in the dtype of ``like`` (the forward's video latents; on I2V models the image-condition channels of
    the reference frame are zero)."""
    cfg = transformer.config
    if not cfg.use_rotary_positional_embeddings:
        raise ValueError("subject reference tokens need a CogVideoX with 3D RoPE (5B or 1.5); CogVideoX-2B uses "
                         "absolute positions")
    frames = latents.to(like.device, like.dtype)[None]  # [1, N, C, h, w]: one frame per reference
    if cfg.in_channels == 2 * cfg.out_channels:  # I2V models: a clean frame with no image condition (zeros)
        frames = torch.cat([frames, torch.zeros_like(frames)], dim=2)
    if cfg.patch_size_t is not None:  # CogVideoX 1.5 patches pairs of frames: repeat each reference
        frames = frames.repeat_interleave(cfg.patch_size_t, dim=1)
    empty_text = frames.new_zeros(1, 0, cfg.text_embed_dim)
    return transformer.patch_embed(empty_text, frames)  # text part is empty: image tokens only


def reference_rotary(transformer, latents: torch.Tensor, video_shape, vae_scale: int, device):
    """RoPE tables for ``[ref; video]``: every reference at frame 0, the video at frames 1..T."""
    cfg = transformer.config
    p_t = cfg.patch_size_t or 1
    n, _, h, w = latents.shape
    ref_cos, ref_sin = rotary_embeddings(transformer, h * vae_scale, w * vae_scale, p_t, vae_scale, device)
    frames, height, width = video_shape  # latent frames, latent height, latent width
    cos, sin = rotary_embeddings(transformer, height * vae_scale, width * vae_scale, frames + p_t, vae_scale, device)
    first = (height // cfg.patch_size) * (width // cfg.patch_size)  # tokens of temporal position 0
    return (torch.cat([ref_cos.repeat(n, 1), cos[first:]]), torch.cat([ref_sin.repeat(n, 1), sin[first:]]))


def _modulation(norm, temb, branch: str | None):
    """``norm.linear(silu(temb))`` with the module flagged as the given branch while it runs."""
    if branch is not None:
        setattr(norm.linear, BRANCH_ATTR, branch)
    try:
        return norm.linear(norm.silu(temb)).chunk(6, dim=1)
    finally:
        if branch is not None:
            delattr(norm.linear, BRANCH_ATTR)


def modulate_reference(block, index: int, which: int, x: torch.Tensor, temb: torch.Tensor):
    """The reference tokens' normalisation: the block's own LayerNorm with the visual chunk of its
    modulation, computed with the ``norm{1,2}.linear`` flagged as the reference branch (so a LoRA scoped to
    the reference branch acts here and nowhere else). Returns (normed [B, R, D], gate [B, 1, D])."""
    norm = block.norm1 if which == 1 else block.norm2
    shift, scale, gate = _modulation(norm, temb, "reference")[:3]
    return norm.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :], gate[:, None, :]


class SubjectReferenceExtension(BlockExtension):
    """The reference stream ``[text; ref; video]`` (block-runner extension, see :mod:`.block_runner`).

    ``drop_prob`` > 0 drops each reference token with that probability (training regulariser, one mask
    per forward, drawn from ``generator``).
    """

    name = "subject-reference"

    def __init__(self, transformer, latents: torch.Tensor, *, vae_scale: int = 8, drop_prob: float = 0.0,
                 generator: torch.Generator | None = None):
        self.transformer, self.latents, self.vae_scale = transformer, latents, vae_scale
        self.drop_prob, self.generator = drop_prob, generator

    def begin(self, state, kwargs):
        hidden = kwargs["hidden_states"]  # [B, F, C, H, W]
        tokens = reference_tokens(self.transformer, self.latents, hidden)  # [1, R, D]
        cos, sin = reference_rotary(self.transformer, self.latents, (hidden.shape[1], hidden.shape[3], hidden.shape[4]),
                                    self.vae_scale, hidden.device)
        n = tokens.shape[1]
        ref_cos, ref_sin = cos[:n], sin[:n]
        if self.drop_prob > 0:
            keep = torch.rand(n, generator=self.generator) >= self.drop_prob
            idx = keep.nonzero()[:, 0].to(hidden.device)
            tokens, ref_cos, ref_sin = tokens[:, idx], ref_cos[idx], ref_sin[idx]
        kwargs["image_rotary_emb"] = (cos[n:], sin[n:])  # the video at frames 1..T
        state.add_stream(TokenStream("reference", tokens, modulate_reference, lead=True, rotary=(ref_cos, ref_sin)))


def inject_reference(transformer, latents: torch.Tensor, *, vae_scale: int = 8, drop_prob: float = 0.0,
                     generator: torch.Generator | None = None):
    """Add reference tokens from ``latents`` [N, C, h, w] until the returned undo is called."""
    return block_runner(transformer).add(SubjectReferenceExtension(transformer, latents, vae_scale=vae_scale,
                                                                   drop_prob=drop_prob, generator=generator))


@dataclasses.dataclass(frozen=True, eq=False)
class SubjectReferencePatch:
    """Patch carrying encoded reference latents into a sampling run (see :mod:`.patches`)."""

    latents: torch.Tensor  # [N, C, h, w]
    vae_scale: int = 8
    name: str = "subject-reference"
    method: str = "subject reference"
    compilable = False  # a leading token stream: torch.compile would compile one graph per block

    def cache_notes(self, kind) -> list[str]:
        """What a cache (:class:`~.speed.CacheKind`) skips of the reference: its tokens ride with the others."""
        return token_stream_notes(kind, self.method, "the subject reference tokens")

    def extra_tokens(self, config) -> int:
        """Tokens the references add to the transformer's sequence (one patch-embedded frame each)."""
        n, _, h, w = self.latents.shape
        return n * (h // config.patch_size) * (w // config.patch_size)

    def apply(self, transformer, context=None):
        if self.latents.shape[1] != transformer.config.out_channels:
            raise ValueError(f"reference latents have {self.latents.shape[1]} channels but the model expects "
                             f"{transformer.config.out_channels}; encode the reference with this model's VAE")
        scale = self.vae_scale
        check_reference_size(transformer, self.latents.shape[2] * scale, self.latents.shape[3] * scale, scale)
        return inject_reference(transformer, self.latents, vae_scale=self.vae_scale)
