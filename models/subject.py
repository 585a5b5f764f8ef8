"""Subject reference for CogVideoX: reference-image tokens in the DiT sequence (arXiv 2504.17816).

The reference image(s) are VAE-encoded to clean latent frames, patch-embedded with the model's
own ``patch_embed`` and carried as an extra token stream ``[text; ref; video]`` through every
block; they are dropped before the output layers. RoPE gives the reference the frame-0 positions
and the video the frames 1..T. Reference tokens are modulated with the visual chunk of
``norm1``/``norm2`` at timestep t — computed with the LoRA of the norm layers when that LoRA is
scoped to the reference branch (``LoraPatch(reference_only=NORM_LORA_MODULES)``), so the norm LoRA
provably leaves the text and video tokens' modulation untouched.

The reference tokens ride in front of the video tokens in ``hidden_states``: diffusers' own
attention processor then applies RoPE to ``[ref; video]`` unchanged, and a block wrapper gives the
reference its own modulation and strips it after the last block. With CFG the reference is in
both the conditional and the unconditional rows.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .lora import BRANCH_ATTR
from .patches import replace_blocks
from .sampler import rotary_embeddings

NORM_LORA_MODULES = ("norm1.linear", "norm2.linear")
CLS_TOKEN = "<cls>"
# LoRA targets of the method (paper + released code); text_proj/proj also appear in the v1 release.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "norm1.linear", "norm2.linear", "ff.net.2", "patch_embed.proj")


def encode_reference(bundle, images: torch.Tensor, max_side: int = 720) -> torch.Tensor:
    """IMAGE [N, H, W, 3] 0..1 -> clean reference latents [N, C, h, w] (VAE mean, scaled).

    Each image keeps its aspect ratio: it is scaled so its longer side is at most ``max_side`` and
    cropped to multiples of 16 (any resolution works; the token count follows the size).
    """
    x = images.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = min(1.0, max_side / max(h, w))
    nh, nw = max(16, int(h * scale) // 16 * 16), max(16, int(w * scale) // 16 * 16)
    if (nh, nw) != (h, w):
        sh, sw = max(nh, round(h * scale)), max(nw, round(w * scale))
        x = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (sh - nh) // 2, (sw - nw) // 2
        x = x[..., top:top + nh, left:left + nw]
    vae = bundle.vae
    with torch.no_grad(), bundle.on_device(vae):
        z = vae.encode((x * 2 - 1).unsqueeze(2).to(next(vae.parameters()).device, vae.dtype)).latent_dist.mode()
    return (z[:, :, 0] * vae.config.scaling_factor).float().cpu()  # [N, C, h, w]


def reference_tokens(transformer, latents: torch.Tensor) -> torch.Tensor:
    """Reference latents [N, C, h, w] -> tokens [1, N * h/p * w/p, width] via the model's patch_embed."""
    cfg = transformer.config
    if not cfg.use_rotary_positional_embeddings:
        raise ValueError("subject reference tokens need a CogVideoX with 3D RoPE (5B or 1.5); CogVideoX-2B uses "
                         "absolute positions")
    param = next(transformer.patch_embed.parameters())
    frames = latents.to(param.device, param.dtype)[None]  # [1, N, C, h, w]: one frame per reference
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


@dataclasses.dataclass
class ReferenceState:
    latents: torch.Tensor  # [N, C, h, w]
    tokens: torch.Tensor | None = None  # [B, R, width], set per forward
    keep: torch.Tensor | None = None  # optional token-drop mask [R] (training)

    @property
    def count(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]


def _modulation(norm, temb, branch: str | None):
    """``norm.linear(silu(temb))`` with the module flagged as the given branch while it runs."""
    if branch is not None:
        setattr(norm.linear, BRANCH_ATTR, branch)
    try:
        return norm.linear(norm.silu(temb)).chunk(6, dim=1)
    finally:
        if branch is not None:
            delattr(norm.linear, BRANCH_ATTR)


class SubjectBlock(torch.nn.Module):
    """Wraps a ``CogVideoXBlock``: the reference tokens lead ``hidden_states`` with their own modulation."""

    def __init__(self, block, index: int, num_layers: int, state: ReferenceState):
        super().__init__()
        self.wrapped, self.state = block, state
        self.first, self.last = index == 0, index == num_layers - 1

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
        blk, n = self.wrapped, self.state.count
        if self.first:
            ref, h = self.state.tokens.to(hidden_states.dtype), hidden_states
        else:
            ref, h = hidden_states[:, :n], hidden_states[:, n:]
        text = encoder_hidden_states
        shift, scale, gate, e_shift, e_scale, e_gate = _modulation(blk.norm1, temb, None)
        r_shift, r_scale, r_gate = _modulation(blk.norm1, temb, "reference")[:3]
        norm_h = blk.norm1.norm(h) * (1 + scale)[:, None, :] + shift[:, None, :]
        norm_r = blk.norm1.norm(ref) * (1 + r_scale)[:, None, :] + r_shift[:, None, :]
        norm_t = blk.norm1.norm(text) * (1 + e_scale)[:, None, :] + e_shift[:, None, :]
        attn, attn_t = blk.attn1(hidden_states=torch.cat([norm_r, norm_h], dim=1), encoder_hidden_states=norm_t,
                                 image_rotary_emb=image_rotary_emb, **(attention_kwargs or {}))
        ref = ref + r_gate[:, None, :] * attn[:, :n]
        h = h + gate[:, None, :] * attn[:, n:]
        text = text + e_gate[:, None, :] * attn_t

        shift, scale, gate, e_shift, e_scale, e_gate = _modulation(blk.norm2, temb, None)
        r_shift, r_scale, r_gate = _modulation(blk.norm2, temb, "reference")[:3]
        norm_h = blk.norm2.norm(h) * (1 + scale)[:, None, :] + shift[:, None, :]
        norm_r = blk.norm2.norm(ref) * (1 + r_scale)[:, None, :] + r_shift[:, None, :]
        norm_t = blk.norm2.norm(text) * (1 + e_scale)[:, None, :] + e_shift[:, None, :]
        t_len = text.shape[1]
        ff = blk.ff(torch.cat([norm_t, norm_r, norm_h], dim=1))
        text = text + e_gate[:, None, :] * ff[:, :t_len]
        ref = ref + r_gate[:, None, :] * ff[:, t_len:t_len + n]
        h = h + gate[:, None, :] * ff[:, t_len + n:]
        return (h if self.last else torch.cat([ref, h], dim=1)), text


def inject_reference(transformer, latents: torch.Tensor, *, vae_scale: int = 8, drop_prob: float = 0.0,
                     generator: torch.Generator | None = None):
    """Add reference tokens from ``latents`` [N, C, h, w] until the returned undo is called.

    ``drop_prob`` > 0 drops each reference token with that probability (training regulariser,
    one mask for the batch, drawn from ``generator``).
    """
    state = ReferenceState(latents=latents)

    def pre_hook(module, args, kwargs):
        hidden = kwargs["hidden_states"]  # [B, F, C, H, W]
        tokens = reference_tokens(transformer, state.latents)
        cos, sin = reference_rotary(transformer, state.latents, (hidden.shape[1], hidden.shape[3], hidden.shape[4]),
                                    vae_scale, hidden.device)
        n = tokens.shape[1]
        if drop_prob > 0:
            keep = torch.rand(n, generator=generator) >= drop_prob
            idx = keep.nonzero()[:, 0].to(hidden.device)
            tokens, cos, sin = tokens[:, idx], torch.cat([cos[idx], cos[n:]]), torch.cat([sin[idx], sin[n:]])
        state.tokens = tokens.expand(hidden.shape[0], -1, -1)
        kwargs["image_rotary_emb"] = (cos.to(hidden.device), sin.to(hidden.device))
        return args, kwargs

    n = len(transformer.transformer_blocks)
    return replace_blocks(transformer, lambda i, block: SubjectBlock(block, i, n, state), pre_hook)


@dataclasses.dataclass(frozen=True, eq=False)
class SubjectReferencePatch:
    """Patch carrying encoded reference latents into a sampling run (see :mod:`.patches`)."""

    latents: torch.Tensor  # [N, C, h, w]
    vae_scale: int = 8
    name: str = "subject-reference"

    def apply(self, transformer, context=None):
        if self.latents.shape[1] != transformer.config.out_channels:
            raise ValueError(f"reference latents have {self.latents.shape[1]} channels but the model expects "
                             f"{transformer.config.out_channels}; encode the reference with this model's VAE")
        return inject_reference(transformer, self.latents, vae_scale=self.vae_scale)


def ensure_cls_token(tokenizer, text_encoder) -> int:
    """Add ``<cls>`` to the tokenizer (and a T5 embedding row) if missing; return its id.

    The new row is the mean of the existing embeddings — deterministic, so a LoRA trained with
    ``<cls>`` prompts sees the same token embedding at inference. Other tokens are unchanged.
    """
    if CLS_TOKEN in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(CLS_TOKEN)
    tokenizer.add_special_tokens({"additional_special_tokens": [CLS_TOKEN]})
    token_id = tokenizer.convert_tokens_to_ids(CLS_TOKEN)
    emb = text_encoder.get_input_embeddings()
    if emb.weight.shape[0] <= token_id:
        with torch.no_grad():
            mean = emb.weight.float().mean(0)
            text_encoder.resize_token_embeddings(token_id + 1, mean_resizing=False)
            text_encoder.get_input_embeddings().weight[token_id] = mean.to(emb.weight.dtype)
    return token_id
